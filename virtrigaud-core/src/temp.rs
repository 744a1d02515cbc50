//! Temporary names of puts in progress, and the sweep that removes the ones a killed process
//! left behind.
//!
//! Every backend that writes under a temporary name and renames on commit (the fs backend, the
//! local provider, the NFS and WebDAV backends) names its temporary file
//! `.<name>.<unique>.vrg-tmp` beside the target, where `<unique>` is
//! `<pid>-<hex nanoseconds>-<counter>` ([`temp_name`]). Such names are hidden from listings and
//! refused as keys ([`is_temp_name`]).
//!
//! A process killed in the middle of a put cannot remove its temporary file. **The sweep:**
//! whenever a put starts in a directory, the backend first removes the temporary files in that
//! directory whose last modification is older than a bound ([`DEFAULT_TEMP_MAX_AGE`], 24 h,
//! configurable per backend; `None` turns the sweep off). A put in progress writes all the time,
//! so its file is always young; a file untouched for a day belongs to a dead process. Only names
//! of exactly our shape ([`is_own_temp_name`]: the leading dot, a name, the three-part unique
//! suffix, `.vrg-tmp`) that are regular files are ever removed: any other file, however old, is
//! left alone. The sweep is best effort: a failure is logged and never fails the put.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// The suffix of temporary files and objects (a put in progress).
pub const TEMP_SUFFIX: &str = ".vrg-tmp";

/// Temporary files older than this are removed by the sweep (see the module documentation).
pub const DEFAULT_TEMP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The longest part of the target's name kept in a temporary name (so that the temporary name
/// stays under the usual 255-byte limit whenever the target's name is).
const NAME_KEPT: usize = 100;

/// A process-unique suffix: `<pid>-<hex nanoseconds since the epoch>-<counter>`.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{}-{:x}-{}",
        std::process::id(),
        t,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The temporary name of a put of `name`: `.<name>.<unique>.vrg-tmp`, `name` cut to 100 bytes.
///
/// ```
/// use virtrigaud_core::temp::{is_own_temp_name, temp_name};
/// let t = temp_name("disk.qcow2");
/// assert!(t.starts_with(".disk.qcow2.") && t.ends_with(".vrg-tmp"));
/// assert!(is_own_temp_name(&t));
/// ```
pub fn temp_name(name: &str) -> String {
    let mut end = name.len().min(NAME_KEPT);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.{}{TEMP_SUFFIX}", &name[..end], unique_suffix())
}

/// Whether `name` (one path segment) has the shape of a temporary name: a leading dot and the
/// `.vrg-tmp` suffix. Such names are hidden from listings and refused as keys.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// Whether `name` is exactly the shape [`temp_name`] makes: `.<name>.<a>-<b>-<c>.vrg-tmp` with
/// `a`, `b`, `c` hexadecimal. Only such names are ever removed by a sweep.
///
/// ```
/// use virtrigaud_core::temp::is_own_temp_name;
/// assert!(is_own_temp_name(".disk.raw.4242-18c3f-7.vrg-tmp"));
/// assert!(!is_own_temp_name(".disk.raw.vrg-tmp"));
/// assert!(!is_own_temp_name(".notes.vrg-tmp"));
/// assert!(!is_own_temp_name("disk.raw.4242-18c3f-7.vrg-tmp"));
/// ```
pub fn is_own_temp_name(name: &str) -> bool {
    let Some(inner) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let Some((target, unique)) = inner.rsplit_once('.') else {
        return false;
    };
    let parts: Vec<&str> = unique.split('-').collect();
    !target.is_empty()
        && parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a temporary file last modified at `modified` is older than `max_age` now.
pub fn is_stale(modified: SystemTime, max_age: Duration) -> bool {
    SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age > max_age)
}

/// Removes the stale temporary files of a local directory (see the module documentation):
/// regular files (not symlinks, not directories) named by [`is_own_temp_name`] and not modified
/// for `max_age`. Returns how many it removed. Blocking; best effort (errors are logged).
pub fn sweep_dir(dir: &Path, max_age: Duration) -> usize {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(dir = %dir.display(), error = %e, "temp sweep: cannot read the directory");
            }
            return 0;
        }
    };
    let mut removed = 0;
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !is_own_temp_name(name) {
            continue;
        }
        let path = entry.path();
        // symlink_metadata: a symlink is never followed, never removed.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() || !meta.modified().is_ok_and(|m| is_stale(m, max_age)) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(file = %path.display(), "removed a stale temporary file left by an interrupted put");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a stale temporary file");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets a file's modification time `age` in the past.
    pub(crate) fn age(path: &Path, age: Duration) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        let t = temp_name(&"x".repeat(300));
        assert!(
            is_temp_name(&t) && is_own_temp_name(&t) && t.len() < 160,
            "{t}"
        );
        assert!(is_own_temp_name(&temp_name("é".repeat(80).as_str())));
        for foreign in [
            "disk.vrg-tmp",
            ".hidden",
            ".x.vrg-tmp",
            "..1-2-3.vrg-tmp",
            ".x.1-2.vrg-tmp",
            ".x.1-2-3-4.vrg-tmp",
            ".x.1-g-3.vrg-tmp",
            ".x.1--3.vrg-tmp",
            ".x.1-2-3.vrg-tmp.bak",
        ] {
            assert!(!is_own_temp_name(foreign), "{foreign}");
        }
    }

    #[test]
    fn sweep_removes_only_our_old_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = d.join(temp_name("a.raw"));
        let young = d.join(temp_name("b.raw"));
        let foreign_old = d.join(".notes.vrg-tmp");
        let object = d.join("c.raw");
        for f in [&old, &young, &foreign_old, &object] {
            std::fs::write(f, b"x").unwrap();
        }
        let day = Duration::from_secs(25 * 3600);
        for f in [&old, &foreign_old, &object] {
            age(f, day);
        }
        // An old directory and an old symlink of our shape are not files: left alone.
        let dir_like = d.join(temp_name("dir"));
        std::fs::create_dir(&dir_like).unwrap();
        let link = d.join(temp_name("link"));
        std::os::unix::fs::symlink(&object, &link).unwrap();
        assert_eq!(sweep_dir(d, DEFAULT_TEMP_MAX_AGE), 1);
        assert!(!old.exists());
        assert!(young.exists() && foreign_old.exists() && object.exists());
        assert!(dir_like.is_dir() && link.symlink_metadata().is_ok());
        // A missing directory is nothing to sweep.
        assert_eq!(sweep_dir(&d.join("missing"), DEFAULT_TEMP_MAX_AGE), 0);
    }
}

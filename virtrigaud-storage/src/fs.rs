//! The filesystem backend: a local directory or an NFS/SMB-mounted path.
//!
//! Puts write to a temporary name beside the target, fsync, then rename (atomic visibility);
//! an aborted or dropped put removes its temporary file, and a put removes the temporary files
//! a killed process left in its directory once they are a day old (the sweep of
//! [`virtrigaud_core::temp`]; [`FsBackend::with_temp_max_age`]). Keys are checked
//! ([`validate_key`]) and resolved paths must stay
//! inside the root, symlinks included. Files are created with mode 0600 (owner only: a disk
//! image holds a whole file system); [`FsBackend::with_file_mode`] changes that. Large aligned
//! writes go around the page cache unless [`FsBackend::with_direct_writes`] says otherwise;
//! large reads take from the page cache the pages it holds and read the rest around it.

use async_trait::async_trait;
use futures::StreamExt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use virtrigaud_core::io::{ByteSink, ByteStream, FileCreateOptions, LocalFileSink};
use virtrigaud_core::storage::{validate_key, validate_prefix};
use virtrigaud_core::temp::is_temp_name;
use virtrigaud_core::{
    Error, ErrorKind, ObjectMeta, PutOptions, Result, StorageBackend, StorageCapabilities,
};

/// Read size of GET streams.
const READ_CHUNK: usize = 1 << 20;
/// Reads of at least this much go around the page cache (see [`FsBackend::get`]'s body).
const DIRECT_READ_MIN: u64 = 4 << 20;

/// A directory used as object storage.
#[derive(Debug, Clone)]
pub struct FsBackend {
    root: PathBuf,
    file: FileCreateOptions,
}

impl FsBackend {
    /// A backend rooted at `root` (created on first put).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsBackend {
            root: root.into(),
            file: FileCreateOptions::default(),
        }
    }

    /// Whether puts write large aligned pieces around the page cache (`O_DIRECT`, where the
    /// file system takes it; default `true`). `false` writes objects through the page cache
    /// (writeback still starts with each large write, and commit still fsyncs), so a read
    /// that follows soon, such as the import of the same migration, takes the object from
    /// memory instead of the disk ([`FsBackend::get`] looks before each read).
    ///
    /// Direct is the default because fresh page-cache pages can cost more than the disk read
    /// they save, and an object larger than the free memory saves nothing. Measured on a
    /// 2-core VM whose host takes freed guest memory back (free page reporting: writing 1 GiB
    /// into new page-cache pages took 3.3 s of CPU after the memory had been free for 10 s,
    /// 0.35 s right after it was freed): a libvirt migration of a 10 GiB / 3 GiB disk
    /// through a local store took 11.65 s through the page cache against 10.52 s direct, 12.7
    /// against 8.2 CPU-seconds; only a single 4 GiB / 1 GiB disk was faster through it (2.8 to
    /// 3.4 s against 3.6 to 3.9 s).
    pub fn with_direct_writes(mut self, direct: bool) -> Self {
        self.file = self.file.direct_writes(direct);
        self
    }

    /// Sets the permission bits of the files a put creates (default
    /// [`DEFAULT_FILE_MODE`](virtrigaud_core::io::DEFAULT_FILE_MODE), 0600).
    pub fn with_file_mode(mut self, mode: u32) -> Self {
        self.file = self.file.mode(mode);
        self
    }

    /// Sets the age after which a put removes the temporary files that interrupted puts left
    /// in its directory (default 24 h; `None`: never; see [`virtrigaud_core::temp`]).
    pub fn with_temp_max_age(mut self, max_age: Option<std::time::Duration>) -> Self {
        self.file = self.file.sweep_temp_after(max_age);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Fails if `path`'s existing ancestors resolve (through symlinks) outside the root.
    async fn check_inside(&self, path: &Path) -> Result<()> {
        let root = match tokio::fs::canonicalize(&self.root).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(e, "cannot resolve storage root")),
        };
        let mut p = path.to_path_buf();
        loop {
            match tokio::fs::canonicalize(&p).await {
                Ok(real) => {
                    if !real.starts_with(&root) {
                        return Err(Error::invalid(format!(
                            "{} resolves outside the storage root",
                            path.display()
                        )));
                    }
                    return Ok(());
                }
                Err(_) => match p.parent() {
                    Some(parent) if parent.starts_with(&self.root) => p = parent.to_path_buf(),
                    _ => return Ok(()),
                },
            }
        }
    }

    fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        Some(parts.join("/"))
    }
}

fn not_found(key: &str) -> Error {
    Error::not_found(format!("no object {key:?}")).with_target(key.to_string())
}

#[async_trait]
impl StorageBackend for FsBackend {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            ranged_read: true,
            list: true,
            multipart: false,
            resume: false,
            presign: false,
            atomic_put: true,
        }
    }

    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        let path = self.path(key)?;
        self.check_inside(&path).await?;
        let sink = LocalFileSink::create_with(&path, &self.file.clone().overwrite(opts.overwrite))
            .await
            .map_err(|e| e.with_operation("put").with_target(key.to_string()))?;
        Ok(Box::new(sink))
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let path = self.path(key)?;
        self.check_inside(&path).await?;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found(key)),
            Err(e) => return Err(Error::io(e, "cannot open object").with_target(key.to_string())),
        };
        let size = file.metadata()?.len();
        let (start, end) = match range {
            Some(r) => {
                if r.start > r.end || r.start > size {
                    return Err(Error::invalid(format!(
                        "range {}..{} outside object of {size} bytes",
                        r.start, r.end
                    ))
                    .with_target(key.to_string()));
                }
                (r.start, r.end.min(size))
            }
            None => (0, size),
        };
        // An object is read once, start to end: large ones around the page cache where it
        // does not hold them (the bytes go from the disk to the buffer; an import does not
        // fill the host's memory with the object it reads), from the cache where it does (an
        // object a put just wrote: `read_file_at` looks before each read).
        let direct = if end - start >= DIRECT_READ_MIN {
            virtrigaud_core::io::open_direct_read(&path, &file).map(std::sync::Arc::new)
        } else {
            None
        };
        let file = std::sync::Arc::new(file);
        let key = key.to_string();
        let stream = futures::stream::unfold(start, move |pos| {
            let file = file.clone();
            let direct = direct.clone();
            let key = key.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let n = ((end - pos) as usize).min(READ_CHUNK);
                let res = tokio::task::spawn_blocking(move || {
                    let b = virtrigaud_core::io::read_file_at(&file, direct.as_deref(), pos, n)?;
                    if b.len() < n {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                    Ok(b)
                })
                .await;
                let item = match res {
                    Ok(Ok(b)) => Ok(b),
                    Ok(Err(e)) => Err(Error::io(e, "read failed")
                        .with_target(key)
                        .with_offset(pos)),
                    Err(e) => Err(Error::new(ErrorKind::Io, e.to_string())),
                };
                let next = if item.is_ok() { pos + n as u64 } else { end };
                Some((item, next))
            }
        });
        Ok(stream.boxed())
    }

    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path(key)?;
        self.check_inside(&path).await?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                etag: None,
                last_modified: m.modified().ok(),
            }),
            Ok(_) => Err(not_found(key)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found(key)),
            Err(e) => Err(Error::io(e, "stat failed").with_target(key.to_string())),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.check_inside(&path).await?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(e, "delete failed").with_target(key.to_string())),
        }
        // Remove directories the key left empty, up to the root.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) {
                break;
            }
            if tokio::fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(e, "list failed")),
            };
            while let Some(entry) = rd.next_entry().await? {
                let ft = entry.file_type().await?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() && !is_temp_name(&name) {
                    let Some(key) = self.key_of(&path) else {
                        continue;
                    };
                    if key.starts_with(prefix) {
                        let m = entry.metadata().await?;
                        out.push(ObjectMeta {
                            key,
                            size: m.len(),
                            etag: None,
                            last_modified: m.modified().ok(),
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fs_backend_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(dir.path().join("store")));
        let raw = crate::conformance::local_files(dir.path().join("store"));
        crate::conformance::run_all(b, "conf", raw).await;
        // and leaves no temporary file anywhere
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                assert!(
                    !is_temp_name(&e.file_name().to_string_lossy()),
                    "{:?}",
                    e.path()
                );
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }

    #[tokio::test]
    async fn symlinks_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let b = FsBackend::new(&root);
        assert_eq!(
            b.get("link/secret", None).await.err().unwrap().kind(),
            ErrorKind::InvalidInput
        );
        // stat refuses it like get, put and delete do, for a linked directory or file.
        assert_eq!(
            b.stat("link/secret").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        std::os::unix::fs::symlink(outside.join("secret"), root.join("file-link")).unwrap();
        assert_eq!(
            b.stat("file-link").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            b.delete("file-link").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            b.put("link/new", &PutOptions::default())
                .await
                .err()
                .unwrap()
                .kind(),
            ErrorKind::InvalidInput
        );
        assert!(!outside.join("new").exists());
    }

    #[tokio::test]
    async fn objects_are_owner_only_unless_configured() {
        use std::os::unix::fs::PermissionsExt;
        use virtrigaud_core::StorageExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let b = FsBackend::new(dir.path().join("a"));
        b.put_bytes("vm/disk.raw", bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(mode(&dir.path().join("a/vm/disk.raw")), 0o600);
        let b = FsBackend::new(dir.path().join("b")).with_file_mode(0o640);
        b.put_bytes("vm/disk.raw", bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(mode(&dir.path().join("b/vm/disk.raw")), 0o640);
    }

    /// Puts the page-aligned pieces of `data` (as the pipeline's pooled buffers are: what a
    /// direct write takes) as `key`; returns how many of its pages the page cache then holds,
    /// and how many it has, or `None` where the kernel cannot tell.
    async fn put_aligned(b: &FsBackend, key: &str, data: &[u8]) -> Option<(u64, u64)> {
        let mut sink = b.put(key, &PutOptions::default()).await.unwrap();
        for piece in data.chunks(1 << 20) {
            let mut buf = virtrigaud_core::io::ReadBuf::new(piece.len());
            buf.as_mut().copy_from_slice(piece);
            sink.write(buf.freeze(piece.len())).await.unwrap();
        }
        sink.commit().await.unwrap();
        let f = std::fs::File::open(b.root().join(key)).unwrap();
        virtrigaud_core::io::page_cache_residency(&f, 0, data.len() as u64)
    }

    /// By default a put sends large aligned pieces around the page cache; with
    /// `with_direct_writes(false)` it leaves the object there, and the read that follows gets
    /// the same bytes either way.
    #[tokio::test]
    async fn puts_write_around_the_page_cache_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let data = virtrigaud_core::testdata::noise(5, 4 << 20);
        let direct = FsBackend::new(dir.path().join("direct"));
        let cached = FsBackend::new(dir.path().join("cached")).with_direct_writes(false);
        let around = put_aligned(&direct, "vm/disk.qcow2", &data).await;
        let through = put_aligned(&cached, "vm/disk.qcow2", &data).await;
        for b in [&direct, &cached] {
            let mut got = Vec::new();
            let mut s = b.get("vm/disk.qcow2", None).await.unwrap();
            while let Some(c) = s.next().await {
                got.extend_from_slice(&c.unwrap());
            }
            assert!(
                got == data,
                "the object in {} reads back different",
                b.location()
            );
        }
        let tmpfs =
            virtrigaud_core::io::LocalFile::open_direct(direct.root().join("vm/disk.qcow2"))
                .await
                .is_ok_and(|f| !f.is_direct());
        let (Some((c_direct, pages)), Some((c_cached, _)), false) = (around, through, tmpfs) else {
            eprintln!("SKIP page-cache residency: no cachestat, or no O_DIRECT here (tmpfs?)");
            return;
        };
        assert_eq!(
            c_cached, pages,
            "a put through the page cache left it without the object"
        );
        assert!(
            c_direct < pages / 2,
            "a direct put left {c_direct} of {pages} pages in the page cache"
        );
    }

    /// A killed process leaves its temporary file behind; the next put into that directory
    /// removes it once it is old, and touches nothing else.
    #[tokio::test]
    async fn a_put_sweeps_old_temp_files_of_its_directory_only() {
        use virtrigaud_core::StorageExt;
        use virtrigaud_core::temp::temp_name;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let vm = root.join("vm");
        let other = root.join("other");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let old = vm.join(temp_name("disk.raw"));
        let young = vm.join(temp_name("disk.raw"));
        let foreign = vm.join(".mine.vrg-tmp");
        let elsewhere = other.join(temp_name("disk.raw"));
        for f in [&old, &young, &foreign, &elsewhere] {
            std::fs::write(f, b"partial").unwrap();
        }
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(25 * 3600);
        for f in [&old, &foreign, &elsewhere] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        // Sweep turned off: nothing is removed.
        let off = FsBackend::new(&root).with_temp_max_age(None);
        off.put_bytes("vm/a.raw", bytes::Bytes::from_static(b"a"))
            .await
            .unwrap();
        assert!(old.exists());
        let b = FsBackend::new(&root);
        b.put_bytes("vm/b.raw", bytes::Bytes::from_static(b"b"))
            .await
            .unwrap();
        assert!(!old.exists(), "the old temp file of a killed put is swept");
        assert!(young.exists(), "a young one may be a put in progress");
        assert!(foreign.exists(), "not our name shape: never removed");
        assert!(
            elsewhere.exists(),
            "another directory is swept by its own puts"
        );
        // A shorter bound is honoured.
        let quick = FsBackend::new(&root).with_temp_max_age(Some(std::time::Duration::ZERO));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        quick
            .put_bytes("vm/c.raw", bytes::Bytes::from_static(b"c"))
            .await
            .unwrap();
        assert!(!young.exists());
        assert!(foreign.exists());
    }

    #[tokio::test]
    async fn unwritable_root_is_a_clear_error() {
        let b = FsBackend::new("/proc/virtrigaud-cannot-write-here");
        let e = b.put("k", &PutOptions::default()).await.err().unwrap();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Permission | ErrorKind::Io | ErrorKind::NotFound
            ),
            "{e}"
        );
        assert!(e.to_string().contains("k"), "{e}");
    }
}

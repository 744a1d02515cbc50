//! Helpers shared by the integration tests of every virtrigaud crate (a dev-dependency only,
//! never published).
//!
//! * [`skip`], [`peer_env`]: the one rule for a missing peer. A plain `cargo test` prints
//!   `SKIP: …` and passes; under `VIRTRIGAUD_IT=1` (what `scripts/test.sh` sets, with every peer
//!   started) a missing peer fails the test.
//! * [`unique`]: names no other test run on the machine uses (pools, domains, keys).
//! * [`libvirt`]: `virsh`, and transient pools and domains removed on drop.

#![warn(missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};

/// Whether this run requires every peer (`VIRTRIGAUD_IT=1`).
pub fn it() -> bool {
    std::env::var("VIRTRIGAUD_IT").as_deref() == Ok("1")
}

/// A test, or part of one, that cannot run here because `what`: under `VIRTRIGAUD_IT=1` that is
/// a failure (a panic naming it), otherwise `SKIP: what` is printed and the caller returns.
pub fn skip(what: &str) {
    assert!(!it(), "VIRTRIGAUD_IT=1 but {what}");
    eprintln!("SKIP: {what}");
}

/// The peer variable `var` (unset and empty alike count as missing), or `None` after
/// [`skip`]ping with the peer script that sets it (`scripts/peers/{script}`).
pub fn peer_env(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skip(&format!("{var} is not set (start scripts/peers/{script})"));
            None
        }
    }
}

/// Whether the command `tool` can be run (`tool --version` starts); when it cannot, a
/// [`skip`] naming it and `hint` (where it comes from).
pub fn have_tool(tool: &str, hint: &str) -> bool {
    if std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    skip(&format!("{tool} is not installed ({hint})"));
    false
}

/// Runs `cmd ARGS…`, which must succeed (a failure shows its stdout and stderr); its output.
pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `vrg-{tag}-{pid}-{nanoseconds}-{counter}`: unique across the tests of this process and
/// across concurrent runs on one machine.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "vrg-{tag}-{}-{t:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A sparse raw file of `size` bytes (at least 41 MiB) with patterned data at a few offsets
/// (the start, 1–3 MiB, 40 MiB + 4 KiB, the last 4 KiB) and holes between them.
pub fn write_patterned_raw(path: &std::path::Path, size: u64) {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, len, byte) in [
        (0u64, 64 * 1024u64, 0x11u8),
        (MIB, 2 * MIB, 0xab),
        (40 * MIB + 4096, 512 * 1024, 0xcd),
        (size - 4096, 4096, 0xef),
    ] {
        let buf: Vec<u8> = (0..len).map(|i| byte ^ (i as u8).wrapping_mul(7)).collect();
        f.write_all_at(&buf, off).unwrap();
    }
}

/// The line [`boot_sector`] writes to the first serial port.
pub const BOOT_MARKER: &str = "VIRTRIGAUD-BOOT-OK";

/// A 512-byte x86 real-mode boot sector that writes [`BOOT_MARKER`] to COM1 and halts: the
/// root disk that proves a migrated VM boots (under TCG, no KVM needed).
pub fn boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let code: &[u8] = &[
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xFC, // cld
        0xBE, 0x17, 0x7C, // mov si, 0x7C17 (msg)
        0xBA, 0xF8, 0x03, // mov dx, 0x3F8 (COM1)
        0xAC, // loop: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp loop
        0xFA, // done: cli
        0xF4, // hlt
        0xEB, 0xFC, // jmp done
    ];
    assert_eq!(code.len(), 0x17);
    s[..code.len()].copy_from_slice(code);
    let msg = format!("{BOOT_MARKER}\r\n\0");
    s[code.len()..code.len() + msg.len()].copy_from_slice(msg.as_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// A libvirtd (`scripts/peers/libvirt.sh`) driven through `virsh`.
pub mod libvirt {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// `virsh -c URI ARGS…`, which must succeed; its stdout.
    pub fn virsh(uri: &str, args: &[&str]) -> String {
        let all: Vec<&str> = ["-c", uri].iter().chain(args).copied().collect();
        String::from_utf8_lossy(&crate::run("virsh", &all).stdout).into_owned()
    }

    /// `virsh -c URI ARGS…` for cleanup: its outcome is ignored.
    pub fn virsh_quiet(uri: &str, args: &[&str]) {
        let _ = Command::new("virsh").arg("-c").arg(uri).args(args).output();
    }

    /// A transient dir pool over a temp dir; destroyed (and its files removed) on drop.
    pub struct TestPool {
        /// The libvirt URI.
        pub uri: String,
        /// The pool's name.
        pub name: String,
        /// The directory the pool holds its volumes in.
        pub dir: tempfile::TempDir,
    }

    impl TestPool {
        /// A new pool named after `tag`.
        pub fn new(uri: &str, tag: &str) -> TestPool {
            let dir = tempfile::Builder::new()
                .prefix("vrg-libvirt-pool")
                .tempdir()
                .unwrap();
            let name = crate::unique(tag);
            let target = dir.path().to_str().unwrap().to_string();
            virsh(uri, &["pool-create-as", &name, "dir", "--target", &target]);
            TestPool {
                uri: uri.to_string(),
                name,
                dir,
            }
        }

        /// The path of `file` in the pool's directory.
        pub fn path(&self, file: &str) -> PathBuf {
            self.dir.path().join(file)
        }

        /// Lets libvirt see the files written into the directory behind its back.
        pub fn refresh(&self) {
            virsh(&self.uri, &["pool-refresh", &self.name]);
        }
    }

    impl Drop for TestPool {
        fn drop(&mut self) {
            virsh_quiet(&self.uri, &["pool-destroy", &self.name]);
        }
    }

    /// Destroys and undefines a domain (snapshot metadata and NVRAM too) on drop.
    pub struct DomainGuard {
        uri: String,
        name: String,
    }

    impl DomainGuard {
        /// Guards the domain `name`.
        pub fn new(uri: &str, name: &str) -> DomainGuard {
            DomainGuard {
                uri: uri.to_string(),
                name: name.to_string(),
            }
        }
    }

    impl Drop for DomainGuard {
        fn drop(&mut self) {
            virsh_quiet(&self.uri, &["destroy", &self.name]);
            virsh_quiet(
                &self.uri,
                &["undefine", "--snapshots-metadata", "--nvram", &self.name],
            );
            virsh_quiet(&self.uri, &["undefine", &self.name]);
        }
    }

    /// Defines the domain of `xml` (written to a file in `dir`, removed after).
    pub fn define_xml(uri: &str, dir: &Path, xml: &str) {
        let f = dir.join(format!("{}.xml", crate::unique("def")));
        std::fs::write(&f, xml).unwrap();
        virsh(uri, &["define", f.to_str().unwrap()]);
        let _ = std::fs::remove_file(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_sector_is_bootable_and_carries_the_marker() {
        let s = boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // `mov si, 0x7C17`: the message sits right after the code, at its load address.
        assert_eq!(&s[0x17..0x17 + BOOT_MARKER.len()], BOOT_MARKER.as_bytes());
        assert_eq!(&s[5..8], &[0xBE, 0x17, 0x7C]);
    }

    #[test]
    fn tools_are_found_or_skipped() {
        assert!(have_tool("sh", "the system"));
        let r = std::panic::catch_unwind(|| have_tool("vrg-surely-no-such-tool", "nowhere"));
        if it() {
            assert!(r.is_err());
        } else {
            assert!(!r.unwrap());
        }
    }

    #[test]
    fn unique_names_differ_within_a_process() {
        let a = unique("t");
        let b = unique("t");
        assert_ne!(a, b);
        assert!(
            a.starts_with(&format!("vrg-t-{}-", std::process::id())),
            "{a}"
        );
    }

    #[test]
    fn a_missing_peer_fails_only_under_it() {
        let var = "VIRTRIGAUD_TESTKIT_SURELY_UNSET";
        let r = std::panic::catch_unwind(|| peer_env(var, "none.sh"));
        if it() {
            let msg = r.unwrap_err();
            let msg = msg.downcast_ref::<String>().unwrap();
            assert!(msg.contains(var) && msg.contains("none.sh"), "{msg}");
        } else {
            assert_eq!(r.unwrap(), None);
        }
    }
}

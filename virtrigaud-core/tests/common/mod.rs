//! Helpers shared by the qemu interop tests.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Starts `qemu-nbd` serving `image` (read-only, format `fmt`) on the unix socket `sock`, and
/// returns once it accepts connections (up to 30 s: the socket file appears before `listen`).
/// `--persistent` keeps the server up after the readiness probe disconnects.
pub fn serve_nbd(image: &Path, fmt: &str, sock: &Path) -> Child {
    let mut child = Command::new("qemu-nbd")
        .arg("--persistent")
        .arg("--read-only")
        .args(["-f", fmt])
        .arg(format!("--socket={}", sock.display()))
        .arg(image)
        .spawn()
        .expect("qemu-nbd starts");
    let t = Instant::now();
    while UnixStream::connect(sock).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "qemu-nbd exited before serving {}: {status}",
                image.display()
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("qemu-nbd did not serve {} within 30 s", image.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

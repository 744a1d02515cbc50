//! Helpers shared by the binary's test files (`cli.rs`, `matrix.rs`): peer variables, `virsh`,
//! the vSphere peer as a `vsphere://` URL. Each test file uses a subset.
#![allow(dead_code)]

use std::process::Command;

/// The peer variable `var`, or `None` (SKIP) when unset; under `VIRTRIGAUD_IT=1` a missing peer
/// fails, naming the script that starts it.
pub fn peer_env(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("VIRTRIGAUD_IT").as_deref() == Ok("1") {
                panic!("{var} is not set but VIRTRIGAUD_IT=1: start scripts/peers/{script}");
            }
            eprintln!("SKIP: {var} is not set (start scripts/peers/{script})");
            None
        }
    }
}

/// `virsh -c URI ARGS…`, which must succeed; its stdout.
pub fn virsh(uri: &str, args: &[&str]) -> String {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The govmomi simulator (`scripts/peers/vcsim.sh`) as the command's provider URL
/// `vsphere://user@host/DC0?thumbprint=…` (the password stays in the environment).
pub fn vsphere_url() -> Option<String> {
    let url = peer_env("VIRTRIGAUD_VSPHERE_URL", "vcsim.sh")?;
    let user = std::env::var("VIRTRIGAUD_VSPHERE_USER").unwrap();
    let thumb = std::env::var("VIRTRIGAUD_VSPHERE_THUMBPRINT").unwrap();
    let host = url.trim_start_matches("https://").trim_end_matches("/sdk");
    Some(format!("vsphere://{user}@{host}/DC0?thumbprint={thumb}"))
}

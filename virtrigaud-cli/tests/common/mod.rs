//! Helpers shared by the binary's test files (`cli.rs`, `matrix.rs`): peer variables, `virsh`,
//! the vSphere peer as a `vsphere://` URL. Each test file uses a subset.
#![allow(dead_code, unused_imports)]

pub use virtrigaud_testkit::libvirt::virsh;
pub use virtrigaud_testkit::peer_env;

/// The govmomi simulator (`scripts/peers/vcsim.sh`) as the command's provider URL
/// `vsphere://user@host/DC0?thumbprint=…` (the password stays in the environment).
pub fn vsphere_url() -> Option<String> {
    let url = peer_env("VIRTRIGAUD_VSPHERE_URL", "vcsim.sh")?;
    let user = std::env::var("VIRTRIGAUD_VSPHERE_USER").unwrap();
    let thumb = std::env::var("VIRTRIGAUD_VSPHERE_THUMBPRINT").unwrap();
    let host = url.trim_start_matches("https://").trim_end_matches("/sdk");
    Some(format!("vsphere://{user}@{host}/DC0?thumbprint={thumb}"))
}

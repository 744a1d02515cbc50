//! Shared helpers of the Proxmox provider's integration tests.
//!
//! **No real Proxmox VE is obtainable for these tests.** The API side runs against `fakepve`
//! (scripts/peers/fakepve.sh), the SSH side against a real OpenSSH sshd with a `pvesm` stand-in
//! (scripts/peers/sshd.sh). What the fakes cannot prove is said in each test module.
//!
//! Variables (written by the peer scripts into `STATE_DIR/NAME.env`; without them a test prints
//! `SKIP: …` and passes, unless `VIRTRIGAUD_IT=1`, when it fails):
//! * fakepve.sh: `VIRTRIGAUD_PVE_URL`, `VIRTRIGAUD_PVE_OLD_URL` (PVE 8.3.2, 2 s tickets),
//!   `VIRTRIGAUD_PVE_USER`, `VIRTRIGAUD_PVE_PASSWORD`, `VIRTRIGAUD_PVE_TOKEN_ID`,
//!   `VIRTRIGAUD_PVE_TOKEN_SECRET`, `VIRTRIGAUD_PVE_AUDIT_TOKEN_ID`,
//!   `VIRTRIGAUD_PVE_AUDIT_TOKEN_SECRET`, `VIRTRIGAUD_PVE_FINGERPRINT`, `VIRTRIGAUD_PVE_CA`,
//!   `VIRTRIGAUD_PVE_NODE`;
//! * sshd.sh: `VIRTRIGAUD_PVE_SSH_HOST`, `_PORT`, `_USER`, `_KEY`, `_HOST_FINGERPRINT`,
//!   `_KNOWN_HOSTS`, `_IMAGES` (all `VIRTRIGAUD_PVE_SSH_…`);
//! * seaweedfs.sh (download-url test): `VIRTRIGAUD_S3_ENDPOINT`, `_ACCESS_KEY`, `_SECRET_KEY`;
//! * libvirt.sh (migration tests): `VIRTRIGAUD_LIBVIRT_URI`.

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use virtrigaud_core::Secret;
use virtrigaud_proxmox::{Auth, ProxmoxConfig, ProxmoxProvider, SshConfig};

pub use virtrigaud_testkit::peer_env as env;

/// The fakepve peer's address and credentials.
pub struct Pve {
    pub url: String,
    pub old_url: String,
    pub user: String,
    pub password: String,
    pub token_id: String,
    pub token_secret: String,
    pub fingerprint: String,
    pub ca: String,
    pub node: String,
}

pub fn pve() -> Option<Pve> {
    let s = "fakepve.sh";
    Some(Pve {
        url: env("VIRTRIGAUD_PVE_URL", s)?,
        old_url: env("VIRTRIGAUD_PVE_OLD_URL", s)?,
        user: env("VIRTRIGAUD_PVE_USER", s)?,
        password: env("VIRTRIGAUD_PVE_PASSWORD", s)?,
        token_id: env("VIRTRIGAUD_PVE_TOKEN_ID", s)?,
        token_secret: env("VIRTRIGAUD_PVE_TOKEN_SECRET", s)?,
        fingerprint: env("VIRTRIGAUD_PVE_FINGERPRINT", s)?,
        ca: env("VIRTRIGAUD_PVE_CA", s)?,
        node: env("VIRTRIGAUD_PVE_NODE", s)?,
    })
}

impl Pve {
    pub fn token(&self) -> Auth {
        Auth::Token {
            id: self.token_id.clone(),
            secret: Secret::new(self.token_secret.clone()),
        }
    }

    /// A token-authenticated config pinned to the fake's certificate.
    pub fn config(&self) -> ProxmoxConfig {
        let mut c = ProxmoxConfig::new(&self.url, self.token())
            .unwrap()
            .with_fingerprint(&self.fingerprint);
        c.node = Some(self.node.clone());
        c.task_poll = std::time::Duration::from_millis(50);
        c
    }

    pub fn provider(&self) -> ProxmoxProvider {
        ProxmoxProvider::new(self.config()).unwrap()
    }
}

/// The sshd peer.
pub struct Sshd {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    pub fingerprint: String,
    pub known_hosts: PathBuf,
    pub images: PathBuf,
}

pub fn sshd() -> Option<Sshd> {
    let s = "sshd.sh";
    Some(Sshd {
        host: env("VIRTRIGAUD_PVE_SSH_HOST", s)?,
        port: env("VIRTRIGAUD_PVE_SSH_PORT", s)?.parse().unwrap(),
        user: env("VIRTRIGAUD_PVE_SSH_USER", s)?,
        key: env("VIRTRIGAUD_PVE_SSH_KEY", s)?.into(),
        fingerprint: env("VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT", s)?,
        known_hosts: env("VIRTRIGAUD_PVE_SSH_KNOWN_HOSTS", s)?.into(),
        images: env("VIRTRIGAUD_PVE_SSH_IMAGES", s)?.into(),
    })
}

impl Sshd {
    pub fn config(&self) -> SshConfig {
        SshConfig {
            host: Some(self.host.clone()),
            port: self.port,
            user: self.user.clone(),
            key_file: Some(self.key.clone()),
            use_agent: false,
            host_key_fingerprint: Some(self.fingerprint.clone()),
            ..SshConfig::default()
        }
    }
}

pub use virtrigaud_testkit::unique;

/// Runs a command and asserts it succeeded.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes sure fakepve has storage `id` of type `stype` (created through its API when missing,
/// with `extra` parameters such as `vgname` or `pool`). The sshd peer's pvesm stand-in lists the
/// same storages (scripts/peers/sshd/storage.cfg), so the API and the node agree on the type.
pub async fn ensure_storage(pve: &Pve, id: &str, stype: &str, extra: &[(&str, &str)]) {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pve.ca).unwrap()).unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let auth = format!("PVEAPIToken={}={}", pve.token_id, pve.token_secret);
    let url = format!("{}/api2/json/storage", pve.url);
    let got = c
        .get(format!("{url}/{id}"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    if got.status().is_success() {
        return;
    }
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("storage", id)
        .append_pair("type", stype)
        .append_pair("content", "images");
    for (k, v) in extra {
        form.append_pair(k, v);
    }
    let r = c
        .post(&url)
        .header("Authorization", &auth)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form.finish())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    // A test running in parallel may have created it meanwhile.
    assert!(
        status.is_success() || body.contains("already"),
        "creating storage {id}: {status} {body}"
    );
}

/// fakepve behind `tests/multipart_server.py` as a forwarding proxy: the upload with
/// `content=import` (which fakepve refuses) is parsed and stored by the proxy in the directory
/// the `pvesm` stand-in serves as `local:import/…`, everything else reaches fakepve.
pub struct Proxy {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_proxy(out: &std::path::Path, upstream: &str) -> Proxy {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/multipart_server.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(upstream)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Proxy {
        child,
        port: line.trim().parse().unwrap(),
    }
}

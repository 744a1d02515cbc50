//! The SSH side of a PVE node: disk exports run there, because no PVE API streams a disk out.
//!
//! Crate choice: **russh** (0.65, pure Rust, maintained by the Warpgate project, used by many
//! tools) with **russh-sftp** (3.0) for SFTP. libssh2 bindings (`ssh2`) need a C library and
//! block a thread per session; `openssh` drives the `ssh` binary, which a library should not
//! require. russh runs on tokio, verifies the host key through a callback we control (checked
//! *before* any credential is offered), and authenticates with a key file or the agent; we never
//! send a password. It is built with aws-lc-rs, the same crypto provider reqwest's rustls uses
//! here, so no second crypto library compiles.
//!
//! Three data paths (which storage type takes which is decided in [`crate::export`]):
//! * [`SshNode::export`]: `pvesm export VOLID raw+size - --with-snapshots 0`. Upstream answers
//!   it for lvm, lvmthin, rbd and file storages without a snapshot (not for ZFS, and for no
//!   storage type from a snapshot). The stream is an 8-byte little-endian size followed by
//!   exactly that many raw bytes; a stream that ends early, runs long or whose command fails is
//!   an error (`Corrupt`, or `Provider` with pvesm's stderr), never a short disk.
//! * [`SshNode::open_file`]: `pvesm path VOLID`, then ranged SFTP reads of the image file, as a
//!   random-access source (dir, NFS, CIFS, btrfs storages), so a qcow2 keeps its allocation map
//!   and holes are never read.
//! * [`SshNode::open_device`]: ranged SFTP reads of a block device (a zvol) whose size
//!   [`SshNode::device_size`] took with `blockdev --getsize64`.

use crate::config::SshConfig;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use std::sync::{Arc, Mutex};
use tracing::{debug, info};
use virtrigaud_core::io::ReadAt;
use virtrigaud_core::{Error, ErrorKind, Result};

/// Bytes of a command's stderr kept for its error message.
const STDERR_KEEP: usize = 4096;
/// Largest SFTP read request (OpenSSH's sftp-server answers at most 256 KiB).
const SFTP_READ_MAX: usize = 255 * 1024;

/// How the server's host key is checked.
#[derive(Debug, Clone)]
enum HostKeyCheck {
    Fingerprint(String),
    KnownHosts(std::path::PathBuf),
}

struct Checker {
    host: String,
    port: u16,
    check: HostKeyCheck,
    /// Why the key was refused, for the error.
    refused: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            self.refuse("the server offered a host certificate; only plain host keys are checked");
            return Ok(false);
        };
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        let ok = match &self.check {
            HostKeyCheck::Fingerprint(want) => {
                fp.trim_start_matches("SHA256:") == want.trim().trim_start_matches("SHA256:")
            }
            HostKeyCheck::KnownHosts(path) => {
                match russh::keys::check_known_hosts_path(&self.host, self.port, key, path) {
                    Ok(found) => found,
                    Err(e) => {
                        self.refuse(&format!("known_hosts {}: {e}", path.display()));
                        return Ok(false);
                    }
                }
            }
        };
        if !ok {
            self.refuse(&format!(
                "host key {fp} of {}:{} is not the trusted one",
                self.host, self.port
            ));
        }
        Ok(ok)
    }
}

impl Checker {
    fn refuse(&self, why: &str) {
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(why.to_string());
        }
    }
}

/// An authenticated SSH connection to one node.
pub struct SshNode {
    handle: Arc<Handle<Checker>>,
    target: String,
    pvesm: String,
}

impl std::fmt::Debug for SshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshNode")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn ssh_err(e: russh::Error, what: &str, target: &str) -> Error {
    let kind = match &e {
        russh::Error::IO(_) | russh::Error::Disconnect | russh::Error::HUP => ErrorKind::Network,
        russh::Error::ConnectionTimeout | russh::Error::InactivityTimeout => ErrorKind::Timeout,
        _ => ErrorKind::Provider,
    };
    Error::new(kind, format!("SSH {what} failed: {e}"))
        .with_target(target.to_string())
        .with_retryable(kind == ErrorKind::Network)
}

impl SshNode {
    /// Connects to `host` and authenticates as configured. The host key is checked against the
    /// pinned fingerprint or the known_hosts file before any credential is sent; with neither
    /// configured the connection is refused (`InvalidInput`).
    pub async fn connect(cfg: &SshConfig, host: &str) -> Result<SshNode> {
        let target = format!("{}@{host}:{}", cfg.user, cfg.port);
        let check = match (&cfg.host_key_fingerprint, &cfg.known_hosts) {
            (Some(fp), _) => HostKeyCheck::Fingerprint(fp.clone()),
            (None, Some(kh)) => HostKeyCheck::KnownHosts(kh.clone()),
            (None, None) => {
                return Err(Error::invalid(
                    "SSH needs a pinned host key fingerprint or a known_hosts file",
                )
                .with_target(target));
            }
        };
        let refused = Arc::new(Mutex::new(None));
        let checker = Checker {
            host: host.to_string(),
            port: cfg.port,
            check,
            refused: refused.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(std::time::Duration::from_secs(300)),
            keepalive_interval: Some(std::time::Duration::from_secs(30)),
            ..Default::default()
        });
        let connect = client::connect(config, (host, cfg.port), checker);
        let mut handle = match tokio::time::timeout(cfg.connect_timeout, connect).await {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "SSH connection not established within {:?}",
                        cfg.connect_timeout
                    ),
                )
                .with_target(target));
            }
            Ok(Err(e)) => {
                if let Some(why) = refused.lock().ok().and_then(|r| r.clone()) {
                    return Err(Error::new(
                        ErrorKind::Auth,
                        format!("SSH host key refused before authentication: {why}"),
                    )
                    .with_target(target));
                }
                return Err(ssh_err(e, "connect", &target));
            }
            Ok(Ok(h)) => h,
        };
        let ok = if let Some(path) = &cfg.key_file {
            let key =
                russh::keys::load_secret_key(path, cfg.key_passphrase.as_ref().map(|s| s.expose()))
                    .map_err(|e| {
                        Error::invalid(format!("cannot load SSH key {}: {e}", path.display()))
                            .with_target(target.clone())
                    })?;
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| ssh_err(e, "negotiation", &target))?
                    .flatten()
            } else {
                None
            };
            handle
                .authenticate_publickey(
                    cfg.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(|e| ssh_err(e, "authentication", &target))?
                .success()
        } else if cfg.use_agent {
            let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                .await
                .map_err(|e| {
                    Error::invalid(format!("no SSH key file configured and no agent: {e}"))
                        .with_target(target.clone())
                })?;
            let ids = agent.request_identities().await.map_err(|e| {
                Error::new(ErrorKind::Auth, format!("SSH agent: {e}")).with_target(target.clone())
            })?;
            let mut ok = false;
            for id in ids {
                let key = id.public_key().into_owned();
                let hash = if key.algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|e| ssh_err(e, "negotiation", &target))?
                        .flatten()
                } else {
                    None
                };
                if let Ok(r) = handle
                    .authenticate_publickey_with(cfg.user.clone(), key, hash, &mut agent)
                    .await
                    && r.success()
                {
                    ok = true;
                    break;
                }
            }
            ok
        } else {
            return Err(Error::invalid("SSH needs a key file or the agent").with_target(target));
        };
        if !ok {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("SSH public key authentication as {} failed", cfg.user),
            )
            .with_target(target));
        }
        debug!(target = %target, "SSH session established");
        Ok(SshNode {
            handle: Arc::new(handle),
            target,
            pvesm: cfg.pvesm.clone(),
        })
    }

    async fn exec(&self, command: &str) -> Result<russh::Channel<client::Msg>> {
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| ssh_err(e, "channel open", &self.target))?;
        ch.exec(true, command)
            .await
            .map_err(|e| ssh_err(e, "exec", &self.target))?;
        Ok(ch)
    }

    /// Runs a command and returns its stdout; a non-zero exit fails with its stderr.
    pub async fn run(&self, command: &str) -> Result<Vec<u8>> {
        let mut ch = self.exec(command).await?;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut status = None;
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => keep(&mut err, &data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        match status {
            Some(0) => Ok(out),
            other => Err(command_failed(command, other, &err)),
        }
    }

    /// `pvesm path VOLID`: the file behind a volume of a file storage.
    pub async fn pvesm_path(&self, volid: &str) -> Result<String> {
        check_volid(volid)?;
        let out = self.run(&format!("{} path {volid}", self.pvesm)).await?;
        let path = String::from_utf8(out)
            .map_err(|_| Error::corrupt("pvesm path printed no UTF-8"))?
            .trim()
            .to_string();
        if !path.starts_with('/') {
            return Err(Error::unsupported(format!(
                "volume {volid} is not a file (pvesm path gave {path:?}); use the export stream"
            )));
        }
        Ok(path)
    }

    /// `pvesm export VOLID raw+size - --with-snapshots 0 [--snapshot S]`: the size from the
    /// stream's header, and a stream of exactly that many raw bytes.
    pub async fn export(
        &self,
        volid: &str,
        snapshot: Option<&str>,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes>>)> {
        check_volid(volid)?;
        let mut cmd = format!(
            "{} export {volid} raw+size - --with-snapshots 0",
            self.pvesm
        );
        if let Some(s) = snapshot {
            check_snapshot(s)?;
            cmd.push_str(&format!(" --snapshot {s}"));
        }
        info!(target = %self.target, volid, snapshot, "exporting over SSH");
        let ch = self.exec(&cmd).await?;
        let mut st = ExportState {
            ch,
            cmd,
            pending: Bytes::new(),
            stderr: Vec::new(),
            exit: None,
            closed: false,
            size: 0,
            seen: 0,
            keep_alive: self.handle.clone(),
        };
        // The header: 8 bytes, little-endian.
        let mut header = Vec::with_capacity(8);
        while header.len() < 8 {
            match st.next_raw().await? {
                Some(b) => {
                    let take = (8 - header.len()).min(b.len());
                    header.extend_from_slice(&b[..take]);
                    st.pending = b.slice(take..);
                }
                None => return Err(st.failed_or("export stream ended before its size header")),
            }
        }
        let mut h = [0u8; 8];
        h.copy_from_slice(&header);
        st.size = u64::from_le_bytes(h);
        let size = st.size;
        let stream = futures::stream::unfold(Some(st), |st| async move {
            let mut st = st?;
            match st.next_data().await {
                Ok(Some(b)) => Some((Ok(b), Some(st))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed();
        Ok((size, stream))
    }

    /// `blockdev --getsize64 PATH`: the size of a block device (a zvol), which SFTP's `fstat`
    /// does not give.
    pub async fn device_size(&self, path: &str) -> Result<u64> {
        check_path(path)?;
        let out = self.run(&format!("blockdev --getsize64 {path}")).await?;
        String::from_utf8_lossy(&out).trim().parse().map_err(|_| {
            Error::corrupt(format!(
                "blockdev --getsize64 {path} printed {:?}, not a size",
                String::from_utf8_lossy(&out)
            ))
        })
    }

    /// Opens a file for ranged SFTP reads.
    pub async fn open_file(&self, path: &str) -> Result<SftpFile> {
        self.open_sftp(path, None).await
    }

    /// Opens a block device of `size` bytes for ranged SFTP reads.
    pub async fn open_device(&self, path: &str, size: u64) -> Result<SftpFile> {
        self.open_sftp(path, Some(size)).await
    }

    async fn open_sftp(&self, path: &str, known_size: Option<u64>) -> Result<SftpFile> {
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| ssh_err(e, "channel open", &self.target))?;
        ch.request_subsystem(true, "sftp")
            .await
            .map_err(|e| ssh_err(e, "sftp subsystem", &self.target))?;
        let sftp = RawSftpSession::new(ch.into_stream());
        sftp.set_timeout(120);
        let sftp_err = |e: russh_sftp::client::error::Error, what: &str| {
            let kind = match &e {
                russh_sftp::client::error::Error::Status(s)
                    if s.status_code == StatusCode::NoSuchFile =>
                {
                    ErrorKind::NotFound
                }
                russh_sftp::client::error::Error::Status(s)
                    if s.status_code == StatusCode::PermissionDenied =>
                {
                    ErrorKind::Permission
                }
                russh_sftp::client::error::Error::Timeout => ErrorKind::Timeout,
                _ => ErrorKind::Network,
            };
            Error::new(kind, format!("SFTP {what} failed: {e}")).with_target(path.to_string())
        };
        sftp.init().await.map_err(|e| sftp_err(e, "init"))?;
        let handle = sftp
            .open(path, OpenFlags::READ, FileAttributes::default())
            .await
            .map_err(|e| sftp_err(e, "open"))?
            .handle;
        let size = match known_size {
            Some(s) => s,
            None => sftp
                .fstat(handle.clone())
                .await
                .map_err(|e| sftp_err(e, "fstat"))?
                .attrs
                .size
                .ok_or_else(|| {
                    Error::corrupt("SFTP fstat gave no size").with_target(path.to_string())
                })?,
        };
        Ok(SftpFile {
            sftp: Arc::new(sftp),
            handle,
            size,
            path: path.to_string(),
            _keep_alive: self.handle.clone(),
        })
    }
}

fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = STDERR_KEEP.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..room.min(data.len())]);
}

fn command_failed(cmd: &str, status: Option<u32>, stderr: &[u8]) -> Error {
    let err = String::from_utf8_lossy(stderr).trim().to_string();
    let kind = crate::error::kind_of_message(&err).unwrap_or(ErrorKind::Provider);
    let status = status.map_or("no exit status (connection lost?)".to_string(), |s| {
        format!("exit status {s}")
    });
    Error::new(kind, format!("`{cmd}` failed with {status}: {err}"))
}

/// Volume ids go on a command line: only the characters PVE allows in them.
pub(crate) fn check_volid(volid: &str) -> Result<()> {
    let ok = !volid.is_empty()
        && volid.contains(':')
        && !volid.contains("..")
        && !volid.starts_with('-')
        && volid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{volid:?} is not a volume id this provider passes to a shell"
        )))
    }
}

/// Paths go on a command line: absolute, and only characters PVE uses in device and image paths.
pub(crate) fn check_path(path: &str) -> Result<()> {
    let ok = path.starts_with('/')
        && !path.contains("..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/@+:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{path:?} is not a path this provider passes to a shell"
        )))
    }
}

/// PVE snapshot names: a letter, then letters, digits, `_` and `-` (at most 40).
pub(crate) fn check_snapshot(name: &str) -> Result<()> {
    let ok = name.len() >= 2
        && name.len() <= 40
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name:?} is not a PVE snapshot name (a letter, then up to 39 letters, digits, '_' or '-')"
        )))
    }
}

struct ExportState {
    ch: russh::Channel<client::Msg>,
    cmd: String,
    pending: Bytes,
    stderr: Vec<u8>,
    exit: Option<u32>,
    closed: bool,
    size: u64,
    seen: u64,
    keep_alive: Arc<Handle<Checker>>,
}

impl ExportState {
    /// The next stdout bytes; `None` at the channel's end.
    async fn next_raw(&mut self) -> Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        while !self.closed {
            match self.ch.wait().await {
                Some(ChannelMsg::Data { data }) => return Ok(Some(Bytes::copy_from_slice(&data))),
                Some(ChannelMsg::ExtendedData { data, .. }) => keep(&mut self.stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => self.exit = Some(exit_status),
                Some(_) => {}
                None => self.closed = true,
            }
        }
        Ok(None)
    }

    /// The command's failure if it failed, else a `Corrupt` error saying `what`.
    fn failed_or(&self, what: &str) -> Error {
        let _ = &self.keep_alive;
        match self.exit {
            Some(0) => Error::corrupt(what.to_string()),
            other => {
                let e = command_failed(&self.cmd, other, &self.stderr);
                if other.is_none() {
                    // Lost connection: the data is short; say so as well.
                    Error::new(ErrorKind::Corrupt, format!("{what}; {}", e.message()))
                } else {
                    e
                }
            }
        }
    }

    async fn next_data(&mut self) -> Result<Option<Bytes>> {
        match self.next_raw().await? {
            Some(b) => {
                self.seen += b.len() as u64;
                if self.seen > self.size {
                    return Err(Error::corrupt(format!(
                        "export stream holds more than the {} bytes its header announced",
                        self.size
                    ))
                    .with_offset(self.size));
                }
                Ok(Some(b))
            }
            None if self.seen < self.size => Err(self
                .failed_or(&format!(
                    "export stream ended after {} of {} bytes",
                    self.seen, self.size
                ))
                .with_offset(self.seen)),
            None if self.exit.is_some_and(|s| s != 0) => Err(self.failed_or("export failed")),
            None => Ok(None),
        }
    }
}

/// A file read with ranged SFTP requests.
pub struct SftpFile {
    sftp: Arc<RawSftpSession>,
    handle: String,
    size: u64,
    path: String,
    _keep_alive: Arc<Handle<Checker>>,
}

impl std::fmt::Debug for SftpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SftpFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ReadAt for SftpFile {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let len = len.min(self.size.saturating_sub(offset) as usize);
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let want = (len - out.len()).min(SFTP_READ_MAX) as u32;
            let at = offset + out.len() as u64;
            match self.sftp.read(self.handle.clone(), at, want).await {
                Ok(d) if d.data.is_empty() => break,
                Ok(d) => out.extend_from_slice(&d.data),
                Err(russh_sftp::client::error::Error::Status(s))
                    if s.status_code == StatusCode::Eof =>
                {
                    break;
                }
                Err(e) => {
                    return Err(
                        Error::new(ErrorKind::Network, format!("SFTP read failed: {e}"))
                            .with_target(self.path.clone())
                            .with_offset(at)
                            .with_retryable(true),
                    );
                }
            }
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volids_and_snapshot_names_are_shell_safe() {
        assert!(check_volid("local-lvm:vm-100-disk-0").is_ok());
        assert!(check_volid("local:100/vm-100-disk-1.qcow2").is_ok());
        assert!(check_volid("rbd:base-9@snap").is_ok());
        for bad in [
            "",
            "nocolon",
            "a:b;rm -rf /",
            "a:$(x)",
            "a:../../etc",
            "-o:x",
            "a:b c",
        ] {
            assert!(check_volid(bad).is_err(), "{bad}");
        }
        assert!(check_snapshot("vrg-1_a").is_ok());
        for bad in ["1abc", "a", "a b", "a;b", &"a".repeat(41)] {
            assert!(check_snapshot(bad).is_err(), "{bad}");
        }
    }
}

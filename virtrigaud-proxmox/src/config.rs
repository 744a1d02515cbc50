//! Configuration of the Proxmox provider: API endpoint and credentials ([`Secret`]s), TLS
//! (verified by default, SHA-256 fingerprint pinning opt-in), timeouts, import placement, and
//! the SSH side used for exports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use virtrigaud_core::{Error, Result, Secret};

/// How the client authenticates to the API.
#[derive(Debug, Clone)]
pub enum Auth {
    /// An API token: `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET` (no CSRF token, no
    /// expiry). The recommended way: a token with exactly the privileges a migration needs.
    Token {
        /// `USER@REALM!TOKENID`.
        id: String,
        /// The token's secret.
        secret: Secret,
    },
    /// A password login (`POST /access/ticket`): a `PVEAuthCookie` ticket plus a
    /// `CSRFPreventionToken` on writes, renewed before its 2 hours run out.
    Password {
        /// `USER@REALM`.
        user: String,
        /// The password.
        password: Secret,
    },
}

/// How the server's TLS certificate is checked.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// Trust only this CA (PEM file) instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Pin the server certificate's SHA-256 fingerprint (hex, with or without `:`, as
    /// `pvenode cert info` prints it) instead of checking a chain: the opt-in for PVE's
    /// self-signed node certificates. The host name is then not checked.
    pub fingerprint: Option<String>,
    /// Turn verification off altogether (explicit; never the default).
    pub danger_accept_invalid_certs: bool,
}

/// How the SSH side of a node is reached (exports run `pvesm` there).
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Host (default: the API URL's host).
    pub host: Option<String>,
    /// Port (default 22).
    pub port: u16,
    /// User (default `root`: `pvesm export` needs it).
    pub user: String,
    /// Private key file (OpenSSH format).
    pub key_file: Option<PathBuf>,
    /// The key file's passphrase.
    pub key_passphrase: Option<Secret>,
    /// Use the SSH agent at `$SSH_AUTH_SOCK` when no key file is given.
    pub use_agent: bool,
    /// Pinned host key fingerprint (`SHA256:…` as `ssh-keygen -l` prints it).
    pub host_key_fingerprint: Option<String>,
    /// A known_hosts file to check the host key against (when no fingerprint is pinned).
    pub known_hosts: Option<PathBuf>,
    /// The `pvesm` command (default `pvesm`, found on the session's PATH).
    pub pvesm: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Per-node overrides of `host` (a cluster's API answers for every node; SSH goes to the
    /// node that holds the disk).
    pub node_hosts: BTreeMap<String, String>,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            host: None,
            port: 22,
            user: "root".into(),
            key_file: None,
            key_passphrase: None,
            use_agent: true,
            host_key_fingerprint: None,
            known_hosts: None,
            pvesm: "pvesm".into(),
            connect_timeout: Duration::from_secs(15),
            node_hosts: BTreeMap::new(),
        }
    }
}

/// The provider's configuration.
#[derive(Debug, Clone)]
pub struct ProxmoxConfig {
    /// `https://host:8006` (the `/api2/json` path is added).
    pub url: url::Url,
    /// Credentials.
    pub auth: Auth,
    /// TLS checks.
    pub tls: TlsConfig,
    /// Connect timeout of API requests.
    pub connect_timeout: Duration,
    /// Timeout of one API request (uploads excepted: they are bounded by their task deadline).
    pub request_timeout: Duration,
    /// How long a task (UPID) may run before the wait fails with `Timeout`.
    pub task_timeout: Duration,
    /// Delay between task status polls.
    pub task_poll: Duration,
    /// Age after which a password login's ticket is renewed before the next request (default
    /// 90 minutes; PVE's tickets live 2 hours). Keep it below the server's ticket lifetime.
    pub ticket_renew_after: Duration,
    /// Node that imports and creates VMs (default: the first online node).
    pub node: Option<String>,
    /// File storage with the `import` content type that disks are staged on (default `local`).
    pub import_storage: String,
    /// Storage the VMs' disks are created on (default `local-lvm`); `DiskCreateSpec::placement`
    /// overrides it.
    pub target_storage: String,
    /// Bridge for NICs whose spec names no network (default `vmbr0`).
    pub default_bridge: String,
    /// Whether download-url checks the presigned URL's TLS certificate (default true).
    pub pull_verify_certificates: bool,
    /// Accept a plain `http://` URL (default false: the API token or password would travel in
    /// clear; PVE itself serves only HTTPS, so this is for test proxies and TLS-terminating
    /// front ends on the same host).
    pub allow_http: bool,
    /// SSH side for exports; `None`: exports are unsupported.
    pub ssh: Option<SshConfig>,
}

impl ProxmoxConfig {
    /// A configuration for `url` with defaults: TLS verified against the system roots, 10 s
    /// connect / 60 s request timeouts, tasks awaited up to 1 hour.
    pub fn new(url: &str, auth: Auth) -> Result<Self> {
        let url = url::Url::parse(url)
            .map_err(|e| Error::invalid(format!("invalid Proxmox URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(Error::invalid(format!(
                "Proxmox URL {url} must be https://host[:port]"
            )));
        }
        if let Auth::Token { id, .. } = &auth
            && !id.contains('!')
        {
            return Err(Error::invalid(format!(
                "API token id {id:?} must read USER@REALM!TOKENID"
            )));
        }
        Ok(ProxmoxConfig {
            url,
            auth,
            tls: TlsConfig::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            task_timeout: Duration::from_secs(3600),
            task_poll: Duration::from_millis(500),
            ticket_renew_after: crate::client::TICKET_RENEW_AFTER,
            node: None,
            import_storage: "local".into(),
            target_storage: "local-lvm".into(),
            default_bridge: "vmbr0".into(),
            pull_verify_certificates: true,
            allow_http: false,
            ssh: None,
        })
    }

    /// Pins the server certificate's SHA-256 fingerprint.
    pub fn with_fingerprint(mut self, fp: impl Into<String>) -> Self {
        self.tls.fingerprint = Some(fp.into());
        self
    }

    /// Trusts only the CA in this PEM file.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// Sets the SSH side.
    pub fn with_ssh(mut self, ssh: SshConfig) -> Self {
        self.ssh = Some(ssh);
        self
    }

    /// The API base (`https://host:port/api2/json`).
    pub(crate) fn api_base(&self) -> String {
        format!("{}/api2/json", self.url.as_str().trim_end_matches('/'))
    }
}

/// Parses a SHA-256 fingerprint (`AB:CD:…` or `abcd…`) into its 32 bytes.
pub(crate) fn parse_fingerprint(fp: &str) -> Result<[u8; 32]> {
    let hex: String = fp.chars().filter(|c| *c != ':').collect();
    let bad = || {
        Error::invalid(format!(
            "{fp:?} is not a SHA-256 fingerprint (64 hex digits)"
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_tokens_and_fingerprints_are_checked() {
        let tok = || Auth::Token {
            id: "root@pam!x".into(),
            secret: Secret::new("s3cret"),
        };
        assert!(ProxmoxConfig::new("ftp://h", tok()).is_err());
        assert!(ProxmoxConfig::new("not a url", tok()).is_err());
        let bad = Auth::Token {
            id: "root@pam".into(),
            secret: Secret::new("s3cret"),
        };
        assert!(ProxmoxConfig::new("https://h:8006", bad).is_err());
        let c = ProxmoxConfig::new("https://h:8006/", tok()).unwrap();
        assert_eq!(c.api_base(), "https://h:8006/api2/json");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.tls.danger_accept_invalid_certs);
        let fp = "63:DA:4F:BC:1A:F5:97:56:AA:1A:67:8E:5B:23:67:1A:6E:B9:BF:7C:C5:F6:B6:34:C3:A2:95:04:0E:D5:DF:A7";
        assert_eq!(parse_fingerprint(fp).unwrap()[0], 0x63);
        assert_eq!(
            parse_fingerprint(&fp.replace(':', "").to_lowercase()).unwrap(),
            parse_fingerprint(fp).unwrap()
        );
        assert!(parse_fingerprint("63:DA").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}

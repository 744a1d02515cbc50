//! Providers by URL, one syntax for all:
//!
//! | URL | provider |
//! |---|---|
//! | `local:///dir` | a directory of offline images with a `vm.json` per VM |
//! | `libvirt+qemu:///system`, `libvirt+qemu+tcp://host/system`, `libvirt+qemu+ssh://user@host/system` | libvirt (feature `libvirt`); everything after `libvirt+` is the libvirt URI |
//! | `vsphere://user@vcenter/Datacenter?thumbprint=…` | vSphere (feature `vsphere`) |
//! | `proxmox://user@realm!token@host:8006/node?fingerprint=…` | Proxmox VE (feature `proxmox`) |
//!
//! Secrets never come from a URL or an argument (`ps` shows both): a password in a URL is
//! refused with an error that names where it goes instead (an environment variable, a file
//! given by `--password-file`, or a prompt on a terminal).

// Secrets are read only by the vSphere and Proxmox providers.
#![cfg_attr(not(any(feature = "vsphere", feature = "proxmox")), allow(dead_code))]

use std::sync::Arc;
use virtrigaud::{Error, LocalProvider, Provider, Result};

/// Where the secrets of the providers come from.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// `--password-file`: read the password or token secret from this file.
    pub password_file: Option<std::path::PathBuf>,
    /// Secrets typed at a prompt, by variable, so that a plan of many VMs asks once.
    typed: Arc<std::sync::Mutex<std::collections::HashMap<String, virtrigaud::Secret>>>,
}

/// Where a provider's secret comes from, in this order: the environment variable, the
/// `--password-file`, a prompt (only when stdin is a terminal), else nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// `VIRTRIGAUD_<WHAT>_PASSWORD`.
    Env,
    /// `--password-file`.
    File,
    /// A prompt on the terminal, without echo.
    Prompt,
    /// None: an error naming the variable and the file option.
    Missing,
}

/// Decides where the secret comes from (see [`SecretSource`]).
pub fn secret_source(env_set: bool, file_given: bool, stdin_is_terminal: bool) -> SecretSource {
    if env_set {
        SecretSource::Env
    } else if file_given {
        SecretSource::File
    } else if stdin_is_terminal {
        SecretSource::Prompt
    } else {
        SecretSource::Missing
    }
}

impl Secrets {
    /// Secrets from the environment, `file`, or a prompt.
    pub fn new(password_file: Option<std::path::PathBuf>) -> Secrets {
        Secrets {
            password_file,
            ..Default::default()
        }
    }

    /// The secret for `what` (`VSPHERE` or `PROXMOX`) of `account` (shown in the prompt): from
    /// `VIRTRIGAUD_<WHAT>_PASSWORD`, the password file, or a prompt without echo when stdin is a
    /// terminal.
    pub fn get(&self, what: &str, account: &str) -> Result<virtrigaud::Secret> {
        use std::io::IsTerminal;
        let var = format!("VIRTRIGAUD_{what}_PASSWORD");
        let env = std::env::var(&var).ok().filter(|v| !v.is_empty());
        match secret_source(
            env.is_some(),
            self.password_file.is_some(),
            std::io::stdin().is_terminal(),
        ) {
            SecretSource::Env => Ok(virtrigaud::Secret::new(env.unwrap_or_default())),
            SecretSource::File => {
                let f = self
                    .password_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                let s = std::fs::read_to_string(f)
                    .map_err(|e| Error::io(e, format!("cannot read {}", f.display())))?;
                Ok(virtrigaud::Secret::new(s.trim_end_matches(['\r', '\n'])))
            }
            SecretSource::Prompt => {
                let mut typed = self
                    .typed
                    .lock()
                    .map_err(|_| Error::new(virtrigaud::ErrorKind::Io, "prompt lock poisoned"))?;
                if let Some(s) = typed.get(&var) {
                    return Ok(s.clone());
                }
                let label = what.to_lowercase();
                let pw = rpassword::prompt_password(format!(
                    "{label} password for {account} (or set {var}): "
                ))
                .map_err(|e| Error::io(e, "cannot read the password from the terminal"))?;
                if pw.is_empty() {
                    return Err(Error::new(
                        virtrigaud::ErrorKind::Auth,
                        format!("no password typed: set {var} or pass --password-file FILE"),
                    ));
                }
                let s = virtrigaud::Secret::new(pw);
                typed.insert(var, s.clone());
                Ok(s)
            }
            SecretSource::Missing => Err(Error::new(
                virtrigaud::ErrorKind::Auth,
                format!(
                    "no password: set {var}, pass --password-file FILE, or run on a terminal \
                     to be asked"
                ),
            )),
        }
    }
}

/// Refuses a provider URL that carries a password, naming where the secret goes instead.
fn refuse_secret_in_url(url: &str) -> Result<()> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let in_userinfo = authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    if !in_userinfo && secret_query_key(url).is_none() {
        return Ok(());
    }
    let instead = if scheme.starts_with("proxmox") {
        "set VIRTRIGAUD_PROXMOX_PASSWORD (the API token secret or password), or pass \
         --password-file FILE, or type it at the prompt on a terminal"
            .to_string()
    } else if scheme.starts_with("vsphere") {
        "set VIRTRIGAUD_VSPHERE_PASSWORD, or pass --password-file FILE, or type it at the \
         prompt on a terminal"
            .to_string()
    } else if scheme.starts_with("libvirt") && scheme.contains("ssh") {
        "libvirt over SSH logs in with an SSH key: load it into ssh-agent (SSH_AUTH_SOCK) or \
         name it in ~/.ssh/config (for qemu+ssh, ?keyfile=FILE)"
            .to_string()
    } else if scheme.starts_with("libvirt") {
        "libvirt reads SASL credentials from its auth file: set LIBVIRT_AUTH_FILE (or use \
         ~/.config/libvirt/auth.conf)"
            .to_string()
    } else {
        "use the provider's environment variable or --password-file".to_string()
    };
    Err(Error::invalid(format!(
        "a secret in a URL is visible to every user of this machine (ps, shell history): \
         remove it from the URL; {instead}"
    )))
}

/// The first query parameter of `url` whose name says it carries a secret.
fn secret_query_key(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split('=').next())
        .map(|k| k.to_ascii_lowercase())
        .find(|k| {
            [
                "secret",
                "password",
                "passwd",
                "pwd",
                "token",
                "signature",
                "credential",
                "access_key",
                "accesskey",
                "apikey",
                "api_key",
            ]
            .iter()
            .any(|w| k.contains(w))
                || k == "key"
                || k == "sig"
        })
}

/// Refuses a store URL that carries credentials, naming the environment variables the storage
/// layer reads them from.
pub fn refuse_secret_in_store_url(url: &str) -> Result<()> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let key = secret_query_key(url);
    // A user name alone is no secret (`https://user@host/dav` with the password elsewhere).
    let s3 = scheme.eq_ignore_ascii_case("s3");
    if key.is_none() && !userinfo.is_some_and(|u| u.contains(':') || s3) {
        return Ok(());
    }
    let instead = match scheme.to_ascii_lowercase().as_str() {
        "s3" => {
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, \
                 AWS_REGION, AWS_ENDPOINT_URL as needed)"
        }
        "http" | "https" | "webdav" | "webdavs" => {
            "set VIRTRIGAUD_WEBDAV_USER and VIRTRIGAUD_WEBDAV_PASSWORD, or VIRTRIGAUD_WEBDAV_TOKEN \
             for a bearer token"
        }
        "nfs" => "NFS takes no password (AUTH_UNIX: ?uid=N&gid=N)",
        _ => "set the storage's environment variables",
    };
    Err(Error::invalid(format!(
        "credentials in a store URL are visible to every user of this machine (ps, shell \
         history) and may be written to checkpoints and logs: remove them from the URL; \
         {instead}"
    )))
}

/// Opens a store by URL, after refusing credentials in it.
pub fn open_store(url: &str) -> Result<Arc<dyn virtrigaud::StorageBackend>> {
    refuse_secret_in_store_url(url)?;
    virtrigaud::storage::open(url)
}

/// Splits `user@host:port/path?query` (the user may itself hold `@`).
#[allow(dead_code)]
struct Parts {
    user: Option<String>,
    host: String,
    path: String,
    query: Vec<(String, String)>,
}

#[allow(dead_code)]
fn parts(rest: &str) -> Result<Parts> {
    let (before_q, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_q.split_once('/').unwrap_or((before_q, ""));
    let (user, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h.to_string()),
        None => (None, authority.to_string()),
    };
    if host.is_empty() {
        return Err(Error::invalid("the provider URL has no host"));
    }
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Ok(Parts {
        user,
        host,
        path: path.trim_matches('/').to_string(),
        query,
    })
}

/// `vsphere://user@host[:port]/Datacenter?thumbprint=SHA256&datastore=DS&allow_http=1`; the
/// password from `VIRTRIGAUD_VSPHERE_PASSWORD` or `--password-file`.
#[cfg(feature = "vsphere")]
fn open_vsphere(rest: &str, secrets: &Secrets) -> Result<Arc<dyn Provider>> {
    use virtrigaud::vsphere::{VsphereConfig, VsphereProvider};
    let p = parts(rest)?;
    let user = p
        .user
        .ok_or_else(|| Error::invalid("vsphere:// needs a user: vsphere://user@host/Datacenter"))?;
    let mut scheme = "https";
    let secret = secrets.get("VSPHERE", &format!("{user}@{}", p.host))?;
    let mut cfg = VsphereConfig::new(String::new(), user, secret);
    for (k, v) in &p.query {
        match k.as_str() {
            "thumbprint" => cfg.thumbprint = Some(v.clone()),
            "datastore" => cfg.datastore = Some(v.clone()),
            "pool" => cfg.resource_pool = Some(v.clone()),
            "network" => cfg.default_network = Some(v.clone()),
            "allow_http" if v == "1" || v == "true" => {
                cfg.allow_http = true;
                scheme = "http";
            }
            other => {
                return Err(Error::invalid(format!(
                    "unknown vsphere:// parameter {other:?} (thumbprint, datastore, pool, \
                     network, allow_http)"
                )));
            }
        }
    }
    cfg.url = format!("{scheme}://{}/sdk", p.host);
    if !p.path.is_empty() {
        cfg.datacenter = Some(p.path.clone());
    }
    Ok(Arc::new(VsphereProvider::new(cfg)?))
}

/// `proxmox://USER@REALM!TOKEN@host:8006/node?fingerprint=SHA256&storage=local-lvm&…` (an API
/// token; `USER@REALM@host` logs in with a password instead); the token secret or password from
/// `VIRTRIGAUD_PROXMOX_PASSWORD` or `--password-file`. Exports run over SSH to the node:
/// `ssh_key=FILE`, `ssh_fingerprint=SHA256:…` or `known_hosts=FILE`, `ssh_user`, `ssh_port`,
/// `ssh_host`. Other parameters: `ca=FILE`, `import_storage`, `bridge`.
#[cfg(feature = "proxmox")]
fn open_proxmox(rest: &str, secrets: &Secrets) -> Result<Arc<dyn Provider>> {
    use virtrigaud::proxmox::{Auth, ProxmoxConfig, ProxmoxProvider, SshConfig};
    let p = parts(rest)?;
    let who = p.user.ok_or_else(|| {
        Error::invalid("proxmox:// needs a user or token: proxmox://root@pam!token@host:8006/node")
    })?;
    let secret = secrets.get("PROXMOX", &format!("{who}@{}", p.host))?;
    let auth = if who.contains('!') {
        Auth::Token { id: who, secret }
    } else {
        Auth::Password {
            user: who,
            password: secret,
        }
    };
    let http = p
        .query
        .iter()
        .any(|(k, v)| k == "allow_http" && (v == "1" || v == "true"));
    let mut cfg = ProxmoxConfig::new(
        &format!("{}://{}", if http { "http" } else { "https" }, p.host),
        auth,
    )?;
    cfg.allow_http = http;
    if !p.path.is_empty() {
        cfg.node = Some(p.path.clone());
    }
    let mut ssh = SshConfig::default();
    let mut want_ssh = false;
    for (k, v) in &p.query {
        match k.as_str() {
            "fingerprint" => cfg.tls.fingerprint = Some(v.clone()),
            "ca" => cfg.tls.ca_file = Some(v.into()),
            "storage" => cfg.target_storage = v.clone(),
            "import_storage" => cfg.import_storage = v.clone(),
            "bridge" => cfg.default_bridge = v.clone(),
            "ssh_key" => (ssh.key_file, want_ssh) = (Some(v.into()), true),
            "ssh_fingerprint" => (ssh.host_key_fingerprint, want_ssh) = (Some(v.clone()), true),
            "known_hosts" => (ssh.known_hosts, want_ssh) = (Some(v.into()), true),
            "ssh_user" => ssh.user = v.clone(),
            "ssh_host" => ssh.host = Some(v.clone()),
            "ssh_port" => {
                ssh.port = v
                    .parse()
                    .map_err(|_| Error::invalid(format!("ssh_port {v:?} is not a port")))?
            }
            "pvesm" => ssh.pvesm = v.clone(),
            "allow_http" if v == "1" || v == "true" => {}
            other => {
                return Err(Error::invalid(format!(
                    "unknown proxmox:// parameter {other:?} (fingerprint, ca, storage, \
                     import_storage, bridge, ssh_key, ssh_fingerprint, known_hosts, ssh_user, \
                     ssh_host, ssh_port, pvesm, allow_http)"
                )));
            }
        }
    }
    if want_ssh {
        cfg.ssh = Some(ssh);
    }
    Ok(Arc::new(ProxmoxProvider::new(cfg)?))
}

/// Whether an environment flag is set: `1`, `true`, `yes` or `on` (any case).
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
fn flag(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        ["1", "true", "yes", "on"]
            .iter()
            .any(|t| v.trim().eq_ignore_ascii_case(t))
    })
}

/// Opens the provider a URL names. With `VIRTRIGAUD_LIBVIRT_STREAMS` set ([`flag`]), a libvirt
/// provider moves all disk data through libvirt's streams, even for a volume whose file this
/// process could open (see `LibvirtProvider::with_local_files`).
#[cfg_attr(
    not(any(feature = "vsphere", feature = "proxmox")),
    allow(unused_variables)
)]
pub fn open(url: &str, secrets: &Secrets) -> Result<Arc<dyn Provider>> {
    refuse_secret_in_url(url)?;
    if let Some(path) = url.strip_prefix("local://") {
        if path.is_empty() {
            return Err(Error::invalid(
                "local:// needs a directory: local:///srv/images",
            ));
        }
        return Ok(Arc::new(LocalProvider::new(path)));
    }
    if let Some(uri) = url.strip_prefix("libvirt+") {
        #[cfg(feature = "libvirt")]
        return Ok(Arc::new(
            virtrigaud::libvirt::LibvirtProvider::new(uri).with_local_files(!flag(
                std::env::var("VIRTRIGAUD_LIBVIRT_STREAMS").ok().as_deref(),
            )),
        ));
        #[cfg(not(feature = "libvirt"))]
        return Err(Error::unsupported(format!(
            "{uri}: this virtrigaud was built without the libvirt feature (cargo install \
             virtrigaud-cli --features libvirt)"
        )));
    }
    if let Some(rest) = url.strip_prefix("vsphere://") {
        #[cfg(feature = "vsphere")]
        return open_vsphere(rest, secrets);
        #[cfg(not(feature = "vsphere"))]
        return Err(Error::unsupported(format!(
            "vsphere://{rest}: this virtrigaud was built without the vsphere feature"
        )));
    }
    if let Some(rest) = url.strip_prefix("proxmox://") {
        #[cfg(feature = "proxmox")]
        return open_proxmox(rest, secrets);
        #[cfg(not(feature = "proxmox"))]
        return Err(Error::unsupported(format!(
            "proxmox://{rest}: this virtrigaud was built without the proxmox feature"
        )));
    }
    Err(Error::invalid(format!(
        "unknown provider URL {url:?}: use local:///dir, libvirt+qemu:///system, \
         vsphere://user@host/Datacenter or proxmox://user@realm!token@host:8006/node"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_flags() {
        for v in ["1", "true", "YES", " on "] {
            assert!(flag(Some(v)), "{v}");
        }
        for v in ["", "0", "false", "no", "off", "2"] {
            assert!(!flag(Some(v)), "{v}");
        }
        assert!(!flag(None));
    }

    #[test]
    fn a_password_in_a_url_is_refused_and_says_where_it_goes() {
        let Err(e) = open("vsphere://admin:hunter2@vc/DC0", &Secrets::default()) else {
            panic!()
        };
        assert_eq!(e.kind(), virtrigaud::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("VIRTRIGAUD_VSPHERE_PASSWORD"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let Err(e) = open("proxmox://root@pam:pw@pve:8006/n1", &Secrets::default()) else {
            panic!()
        };
        assert!(e.to_string().contains("VIRTRIGAUD_PROXMOX_PASSWORD"), "{e}");
        assert!(refuse_secret_in_url("proxmox://root@pam!tok@pve:8006/n1").is_ok());
    }

    #[test]
    fn where_a_secret_comes_from() {
        use SecretSource::*;
        assert_eq!(secret_source(true, true, true), Env);
        assert_eq!(secret_source(false, true, true), File);
        assert_eq!(secret_source(false, false, true), Prompt);
        assert_eq!(secret_source(false, false, false), Missing);
    }

    #[test]
    fn store_urls_with_credentials_are_refused_naming_the_variables() {
        for (url, var) in [
            ("s3://AKID:s3cr3t@bucket/p", "AWS_SECRET_ACCESS_KEY"),
            ("s3://AKID@bucket/p", "AWS_ACCESS_KEY_ID"),
            ("s3://bucket/p?secret=s3cr3t", "AWS_SECRET_ACCESS_KEY"),
            ("https://u:s3cr3t@dav/x", "VIRTRIGAUD_WEBDAV_PASSWORD"),
            ("webdav://dav/x?token=s3cr3t", "VIRTRIGAUD_WEBDAV_TOKEN"),
        ] {
            let e = refuse_secret_in_store_url(url).unwrap_err();
            assert_eq!(e.kind(), virtrigaud::ErrorKind::InvalidInput);
            let m = e.to_string();
            assert!(m.contains(var) && !m.contains("s3cr3t"), "{url}: {m}");
        }
        for url in [
            "s3://bucket/p",
            "https://user@dav/x",
            "file:///srv/stage",
            "nfs://h/export?uid=0&gid=0",
        ] {
            assert!(refuse_secret_in_store_url(url).is_ok(), "{url}");
        }
        let e = refuse_secret_in_url("libvirt+qemu+ssh://root:pw@kvm1/system").unwrap_err();
        assert!(
            e.to_string().contains("SSH_AUTH_SOCK") && !e.to_string().contains("VSPHERE"),
            "{e}"
        );
    }

    #[test]
    fn local_and_unknown() {
        assert_eq!(
            open("local:///tmp", &Secrets::default()).unwrap().kind(),
            "local"
        );
        let Err(e) = open("ftp://x", &Secrets::default()) else {
            panic!()
        };
        assert_eq!(e.kind(), virtrigaud::ErrorKind::InvalidInput);
    }
}

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

use std::sync::Arc;
use virtrigaud::{Error, LocalProvider, Provider, Result};

/// Where the secrets of the providers come from.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// `--password-file`: read the password or token secret from this file.
    pub password_file: Option<std::path::PathBuf>,
}

impl Secrets {
    /// The secret for `what` (`VSPHERE` or `PROXMOX`): from `VIRTRIGAUD_<WHAT>_PASSWORD`, or
    /// the password file.
    #[allow(dead_code)]
    pub fn get(&self, what: &str) -> Result<virtrigaud::Secret> {
        let var = format!("VIRTRIGAUD_{what}_PASSWORD");
        if let Ok(v) = std::env::var(&var) {
            return Ok(virtrigaud::Secret::new(v));
        }
        if let Some(f) = &self.password_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| Error::io(e, format!("cannot read {}", f.display())))?;
            return Ok(virtrigaud::Secret::new(s.trim_end_matches(['\r', '\n'])));
        }
        Err(Error::new(
            virtrigaud::ErrorKind::Auth,
            format!("no password: set {var} or pass --password-file FILE"),
        ))
    }
}

/// Refuses a URL that carries a password.
fn refuse_secret_in_url(url: &str) -> Result<()> {
    let Some((_, rest)) = url.split_once("://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        let scheme = url.split("://").next().unwrap_or("");
        let var = if scheme.starts_with("proxmox") {
            "VIRTRIGAUD_PROXMOX_PASSWORD"
        } else {
            "VIRTRIGAUD_VSPHERE_PASSWORD"
        };
        return Err(Error::invalid(format!(
            "a password in a URL is visible to every user of this machine (ps, shell \
             history): remove it from the URL and set {var}, or pass --password-file FILE"
        )));
    }
    Ok(())
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
    let mut cfg = VsphereConfig::new(String::new(), user, secrets.get("VSPHERE")?);
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
    let secret = secrets.get("PROXMOX")?;
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

/// Opens the provider a URL names.
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
        return Ok(Arc::new(virtrigaud::libvirt::LibvirtProvider::new(uri)));
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

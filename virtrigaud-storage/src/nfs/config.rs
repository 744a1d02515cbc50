//! Configuration of the NFSv3 backend: server, ports, export, path inside the export, AUTH_UNIX
//! identity, request size and parallelism.

use std::time::Duration;
use virtrigaud_core::storage::validate_key;
use virtrigaud_core::{Error, Result};

/// Smallest request size accepted (bytes).
pub const MIN_REQUEST_SIZE: u32 = 64 << 10;
/// Largest request size accepted (bytes); the server's FSINFO `rtmax`/`wtmax` may lower it.
pub const MAX_REQUEST_SIZE: u32 = 16 << 20;
/// Default request size: 1 MiB, which every common server (Linux knfsd, ganesha) accepts.
pub const DEFAULT_REQUEST_SIZE: u32 = 1 << 20;
/// Default number of READ or WRITE requests one get or put keeps in flight.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Default number of TCP connections the backend opens at most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// How a put makes its data durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteStability {
    /// `UNSTABLE` writes, then one `COMMIT` before the rename (fast; the default). A server that
    /// restarts between the writes and the COMMIT is detected by its write verifier and the put
    /// fails (retryable).
    #[default]
    UnstableThenCommit,
    /// Every WRITE is `FILE_SYNC` (slower; no COMMIT needed).
    FileSync,
}

/// Where and how to reach an NFSv3 export.
///
/// ```
/// use virtrigaud_storage::nfs::NfsConfig;
/// let cfg = NfsConfig::from_url("nfs://10.0.0.5/srv/nfs/vms?export=/srv/nfs&uid=1000&gid=1000")
///     .unwrap();
/// assert_eq!(cfg.host, "10.0.0.5");
/// assert_eq!(cfg.export, "/srv/nfs");
/// assert_eq!(cfg.path, "vms");
/// assert_eq!((cfg.uid, cfg.gid), (1000, 1000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsConfig {
    /// Server host name or IP address.
    pub host: String,
    /// Port of the portmapper (rpcbind), asked for the MOUNT and NFS ports unless both are set.
    pub portmapper_port: u16,
    /// Port of the MOUNT service; `None` asks the portmapper.
    pub mount_port: Option<u16>,
    /// Port of the NFS service (usually 2049); `None` asks the portmapper.
    pub nfs_port: Option<u16>,
    /// The exported path, as the server's MOUNT service knows it (e.g. `/srv/nfs`).
    pub export: String,
    /// Directory inside the export that is the backend's root (`/`-separated, may be empty).
    /// Created on the first put.
    pub path: String,
    /// AUTH_UNIX user id (default 0).
    pub uid: u32,
    /// AUTH_UNIX group id (default 0).
    pub gid: u32,
    /// Extra AUTH_UNIX group ids (at most 16).
    pub gids: Vec<u32>,
    /// Machine name sent in AUTH_UNIX credentials.
    pub machine_name: String,
    /// Connect from a privileged source port (< 1024), as Linux knfsd's default `secure` export
    /// option demands. `None`: when running as root.
    pub privileged_port: Option<bool>,
    /// Bytes per READ and WRITE request (default 1 MiB; lowered to the server's FSINFO maximum).
    pub request_size: u32,
    /// READ or WRITE requests kept in flight by one get or put (default 8). Memory of a put or
    /// get is about `request_size × (concurrency + 1)`.
    pub concurrency: usize,
    /// TCP connections the backend opens at most, shared by all its puts and gets (default 16).
    pub max_connections: usize,
    /// How writes are made durable.
    pub stability: WriteStability,
    /// Time allowed to open a TCP connection (default 10 s).
    pub connect_timeout: Duration,
    /// Time allowed for one request and its reply (default 60 s).
    pub request_timeout: Duration,
    /// Permission bits of the files a put creates (default
    /// [`DEFAULT_FILE_MODE`](virtrigaud_core::io::DEFAULT_FILE_MODE), 0600: a disk image holds a
    /// whole file system). Sent in CREATE, so the file never has more open bits, not even while
    /// it is written; the server may still apply its own policy (anonymous squashing, ACLs).
    pub file_mode: u32,
    /// A put first removes the temporary files that interrupted puts left in its directory and
    /// that were not modified for this long (default 24 h; `None`: never). See
    /// [`virtrigaud_core::temp`] for what is removed.
    pub temp_max_age: Option<Duration>,
}

impl NfsConfig {
    /// A configuration with defaults: portmapper on 111, uid/gid 0, 1 MiB requests, 8 in flight.
    pub fn new(host: impl Into<String>, export: impl Into<String>) -> Self {
        NfsConfig {
            host: host.into(),
            portmapper_port: 111,
            mount_port: None,
            nfs_port: None,
            export: export.into(),
            path: String::new(),
            uid: 0,
            gid: 0,
            gids: Vec::new(),
            machine_name: "virtrigaud".to_string(),
            privileged_port: None,
            request_size: DEFAULT_REQUEST_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stability: WriteStability::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            file_mode: virtrigaud_core::io::DEFAULT_FILE_MODE,
            temp_max_age: Some(virtrigaud_core::temp::DEFAULT_TEMP_MAX_AGE),
        }
    }

    /// Sets [`NfsConfig::temp_max_age`].
    pub fn with_temp_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.temp_max_age = max_age;
        self
    }

    /// Sets the permission bits of the files a put creates ([`NfsConfig::file_mode`]).
    pub fn with_file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode & 0o7777;
        self
    }

    /// Sets the directory inside the export.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Sets the AUTH_UNIX identity.
    pub fn with_identity(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets fixed MOUNT and NFS ports (no portmapper).
    pub fn with_ports(mut self, mount_port: u16, nfs_port: u16) -> Self {
        self.mount_port = Some(mount_port);
        self.nfs_port = Some(nfs_port);
        self
    }

    /// Sets the request size and the number of requests in flight.
    pub fn with_io(mut self, request_size: u32, concurrency: usize) -> Self {
        self.request_size = request_size;
        self.concurrency = concurrency;
        self
    }

    /// Parses `nfs://host[:port]/export/path`. The first path segment is the export unless the
    /// query names it (`?export=/srv/nfs`). Other query parameters: `uid`, `gid`, `mountport`,
    /// `portmapper` (portmapper port), `request_size`, `concurrency`, `privileged` (`true`/`false`),
    /// `sync` (`true`: FILE_SYNC writes), `mode` (octal permission bits of created files, default
    /// `600`). A port in the authority is the NFS port.
    pub fn from_url(s: &str) -> Result<NfsConfig> {
        let (host, export, path) = match crate::url::StorageUrl::parse(s)? {
            crate::url::StorageUrl::Nfs { host, export, path } => (host, export, path),
            other => {
                return Err(Error::invalid(format!(
                    "not an nfs:// URL (scheme {})",
                    other.scheme()
                )));
            }
        };
        let u = url::Url::parse(s).map_err(|e| Error::invalid(format!("invalid URL: {e}")))?;
        // IPv6 literals come back in brackets.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut cfg = NfsConfig::new(host, export).with_path(path);
        cfg.nfs_port = u.port();
        for (k, v) in u.query_pairs() {
            let num = |what: &str| -> Result<u64> {
                v.parse::<u64>().map_err(|_| {
                    Error::invalid(format!("nfs URL parameter {what}={v:?} is not a number"))
                })
            };
            let port = |what: &str| -> Result<u16> {
                u16::try_from(num(what)?)
                    .map_err(|_| Error::invalid(format!("nfs URL parameter {what}={v:?} too big")))
            };
            let boolean = |what: &str| -> Result<bool> {
                match v.as_ref() {
                    "1" | "true" | "yes" => Ok(true),
                    "0" | "false" | "no" => Ok(false),
                    _ => Err(Error::invalid(format!(
                        "nfs URL parameter {what}={v:?} is not true/false"
                    ))),
                }
            };
            match k.as_ref() {
                "export" => {}
                "uid" => cfg.uid = u32::try_from(num("uid")?).map_err(|_| bad("uid"))?,
                "gid" => cfg.gid = u32::try_from(num("gid")?).map_err(|_| bad("gid"))?,
                "mountport" => cfg.mount_port = Some(port("mountport")?),
                "portmapper" => cfg.portmapper_port = port("portmapper")?,
                "request_size" => {
                    cfg.request_size =
                        u32::try_from(num("request_size")?).map_err(|_| bad("request_size"))?
                }
                "concurrency" => {
                    cfg.concurrency =
                        usize::try_from(num("concurrency")?).map_err(|_| bad("concurrency"))?
                }
                "privileged" => cfg.privileged_port = Some(boolean("privileged")?),
                "mode" => cfg.file_mode = u32::from_str_radix(&v, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "nfs URL parameter mode={v:?} is not octal permission bits (e.g. 640)"
                        ))
                    })?,
                "sync" => {
                    cfg.stability = if boolean("sync")? {
                        WriteStability::FileSync
                    } else {
                        WriteStability::UnstableThenCommit
                    }
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unknown nfs URL parameter {other:?} (known: export, uid, gid, mountport, \
                         portmapper, request_size, concurrency, privileged, sync, mode)"
                    )));
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the configuration: a host, an absolute export, a path that cannot leave the
    /// export, sizes in range.
    pub fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::invalid("NFS configuration without a host"));
        }
        if !self.export.starts_with('/') || self.export.contains('\0') {
            return Err(Error::invalid(format!(
                "NFS export {:?} must be an absolute path",
                self.export
            )));
        }
        if !self.path.is_empty() {
            validate_key(&self.path)
                .map_err(|e| Error::invalid(format!("NFS path inside the export: {e}")))?;
        }
        if !(MIN_REQUEST_SIZE..=MAX_REQUEST_SIZE).contains(&self.request_size) {
            return Err(Error::invalid(format!(
                "NFS request size {} outside {MIN_REQUEST_SIZE}..={MAX_REQUEST_SIZE}",
                self.request_size
            )));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err(Error::invalid("NFS concurrency must be within 1..=64"));
        }
        if self.max_connections == 0 || self.max_connections > 256 {
            return Err(Error::invalid("NFS max_connections must be within 1..=256"));
        }
        if self.gids.len() > 16 {
            return Err(Error::invalid("AUTH_UNIX allows at most 16 extra groups"));
        }
        if self.machine_name.len() > 255 {
            return Err(Error::invalid(
                "AUTH_UNIX machine name longer than 255 bytes",
            ));
        }
        Ok(())
    }

    /// The path segments of the backend root inside the export.
    pub(crate) fn root_segments(&self) -> Vec<String> {
        self.path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Whether new connections bind a privileged source port.
    pub(crate) fn use_privileged_port(&self) -> bool {
        self.privileged_port.unwrap_or_else(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() == 0 }
        })
    }

    /// A printable location (`nfs://host/export/path`).
    pub fn location(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut s = format!("nfs://{host}");
        if let Some(p) = self.nfs_port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(&self.export);
        if !self.path.is_empty() {
            if !s.ends_with('/') {
                s.push('/');
            }
            s.push_str(&self.path);
        }
        s
    }
}

fn bad(what: &str) -> Error {
    Error::invalid(format!("nfs URL parameter {what} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_parameters() {
        let c = NfsConfig::from_url("nfs://127.0.0.1/vrg").unwrap();
        assert_eq!(c.export, "/vrg");
        assert_eq!(c.path, "");
        assert_eq!(c.location(), "nfs://127.0.0.1/vrg");
        assert_eq!(c.file_mode, 0o600);
        let c = NfsConfig::from_url(
            "nfs://h:2050/e/a/b?uid=7&gid=8&mountport=999&request_size=4194304&concurrency=4&sync=true&privileged=false&mode=640",
        )
        .unwrap();
        assert_eq!(c.nfs_port, Some(2050));
        assert_eq!(c.mount_port, Some(999));
        assert_eq!((c.uid, c.gid), (7, 8));
        assert_eq!(c.request_size, 4 << 20);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.stability, WriteStability::FileSync);
        assert_eq!(c.privileged_port, Some(false));
        assert_eq!(c.file_mode, 0o640);
        assert_eq!(c.path, "a/b");
        assert_eq!(c.location(), "nfs://h:2050/e/a/b");
        for bad in [
            "nfs://h/e?uid=x",
            "nfs://h/e?mode=9",
            "nfs://h/e?mode=17777",
            "nfs://h/e?what=1",
            "nfs://h/e?request_size=1",
            "nfs://h/e?concurrency=0",
            "nfs://h/e/../x",
            "s3://b/x",
        ] {
            assert_eq!(
                NfsConfig::from_url(bad).unwrap_err().kind(),
                virtrigaud_core::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }

    #[test]
    fn path_cannot_leave_the_export() {
        let mut c = NfsConfig::new("h", "/e");
        c.path = "a/../../b".into();
        assert!(c.validate().is_err());
        c.path = "/abs".into();
        assert!(c.validate().is_err());
        c.path = "ok/dir".into();
        c.validate().unwrap();
        assert_eq!(c.root_segments(), vec!["ok", "dir"]);
    }
}

//! The NFSv3 protocol layer: a pool of TCP connections to the server and one method per NFS
//! procedure (MOUNT, LOOKUP, GETATTR, SETATTR, CREATE, MKDIR, WRITE, COMMIT, READ, RENAME, LINK,
//! REMOVE, RMDIR, READDIRPLUS, FSINFO), each returning virtrigaud errors.
//!
//! The `nfs3_client` crate speaks ONC RPC over one TCP connection, one call at a time. Requests
//! in flight therefore each use a connection of their own: [`NfsCore`] keeps idle connections
//! and opens new ones up to [`NfsConfig::max_connections`]. A connection is put back only after
//! a complete exchange; one whose call failed at the transport level, timed out or was
//! cancelled is closed. A call that fails on a *reused* connection with a transport error (the
//! server closed it while idle, or restarted) closes all idle connections and is sent once more
//! on a new connection.
//!
//! The transport wrapper checks each RPC record-marking fragment header before the crate
//! allocates a buffer for it, so a hostile server cannot make us allocate more than
//! [`MAX_FRAGMENT`] bytes per reply, and turns a closed connection into an error.

use super::config::NfsConfig;
use super::error;
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::net::Connector;
use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, FSINFO3args, GETATTR3args, LINK3args, LOOKUP3args, MKDIR3args,
    Nfs3Option, Nfs3Result, READ3args, READDIRPLUS3args, REMOVE3args, RENAME3args, RMDIR3args,
    SETATTR3args, WRITE3args, cookieverf3, createhow3, createverf3, diropargs3, fattr3, filename3,
    ftype3, nfs_fh3, nfsstat3, sattr3, stable_how,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use virtrigaud_core::{Error, ErrorKind, Result};

/// Largest RPC reply fragment accepted from the server (64 MiB).
pub const MAX_FRAGMENT: u32 = 64 << 20;
/// Bytes asked for per READDIRPLUS reply.
const READDIR_MAXCOUNT: u32 = 256 << 10;
/// Directory entries read at most from one directory (guards against a server that never
/// says `eof`).
const MAX_DIR_ENTRIES: usize = 10_000_000;

/// An NFS file handle.
pub type FileHandle = nfs_fh3;

/// A connection to the NFS service.
type Client = Nfs3Client<Transport>;

/// A TCP stream that checks RPC fragment headers and reports a closed connection as an error.
pub struct Transport {
    stream: TcpStream,
    /// Bytes of the current reply fragment not yet read.
    left: u32,
    /// The current fragment header, handed to the crate from `hdr_pos`.
    hdr: [u8; 4],
    hdr_pos: usize,
}

impl Transport {
    fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Transport {
            stream,
            left: 0,
            hdr: [0; 4],
            hdr_pos: 4,
        }
    }
}

impl AsyncRead for Transport {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.hdr_pos < 4 {
            let n = buf.len().min(4 - self.hdr_pos);
            buf[..n].copy_from_slice(&self.hdr[self.hdr_pos..self.hdr_pos + n]);
            self.hdr_pos += n;
            return Ok(n);
        }
        if self.left == 0 {
            // A new fragment: its header says how long it is.
            let mut h = [0u8; 4];
            self.stream.read_exact(&mut h).await?;
            let len = u32::from_be_bytes(h) & 0x7fff_ffff;
            if len > MAX_FRAGMENT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("RPC reply fragment of {len} bytes exceeds {MAX_FRAGMENT}"),
                ));
            }
            self.left = len;
            self.hdr = h;
            self.hdr_pos = 0;
            let n = buf.len().min(4);
            buf[..n].copy_from_slice(&h[..n]);
            self.hdr_pos = n;
            return Ok(n);
        }
        let want = buf.len().min(self.left as usize);
        let n = self.stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.left -= n as u32;
        Ok(n)
    }
}

impl AsyncWrite for Transport {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf).await
    }
}

/// Opens TCP connections with a timeout, from a given local port when asked.
struct TcpConnector {
    timeout: std::time::Duration,
}

impl TcpConnector {
    async fn open(&self, addr: SocketAddr, local_port: Option<u16>) -> std::io::Result<Transport> {
        let fut = async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(port) = local_port {
                socket.set_reuseaddr(true)?;
                let any: IpAddr = if addr.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                socket.bind(SocketAddr::new(any, port))?;
            }
            socket.connect(addr).await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map(Transport::new),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} took longer than {:?}", self.timeout),
            )),
        }
    }

    /// Connects from a free privileged port (600..1024), trying the next one while busy.
    async fn open_privileged(&self, addr: SocketAddr) -> std::io::Result<Transport> {
        use std::sync::atomic::{AtomicU16, Ordering};
        static NEXT: AtomicU16 = AtomicU16::new(0);
        const LOW: u16 = 600;
        const SPAN: u16 = 1024 - LOW;
        let mut last = None;
        for _ in 0..SPAN {
            let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
            match self.open(addr, Some(port)).await {
                Ok(t) => return Ok(t),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free privileged port")))
    }
}

impl Connector for TcpConnector {
    type Connection = Transport;

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Transport> {
        self.open(addr, None).await
    }

    async fn connect_with_port(
        &self,
        addr: SocketAddr,
        local_port: u16,
    ) -> std::io::Result<Transport> {
        // nfs3_client's MOUNT walks privileged ports and moves on only after `AddrInUse`; a
        // port taken by one of our own connections (SO_REUSEADDR) fails later, at connect,
        // with `AddrNotAvailable`: report it as in use so the next port is tried.
        self.open(addr, Some(local_port)).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                std::io::Error::new(std::io::ErrorKind::AddrInUse, e)
            } else {
                e
            }
        })
    }
}

/// What MOUNT and FSINFO told us.
#[derive(Debug, Clone)]
pub struct Mounted {
    /// Handle of the export's root directory.
    pub root: FileHandle,
    /// Address of the NFS service.
    pub nfs_addr: SocketAddr,
    /// Bytes per READ: the configured size, lowered to the server's `rtmax`.
    pub read_size: u32,
    /// Bytes per WRITE: the configured size, lowered to the server's `wtmax`.
    pub write_size: u32,
}

/// Attributes of a directory entry, from READDIRPLUS.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Entry name (not `.` or `..`).
    pub name: Vec<u8>,
    /// Attributes, when the server sent them.
    pub attr: Option<fattr3>,
    /// Handle, when the server sent it.
    pub handle: Option<FileHandle>,
}

/// How CREATE treats an existing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// Truncate or reuse an existing file.
    Unchecked,
    /// Fail with `AlreadyExists` if the name exists (mode: [`NfsConfig::file_mode`]).
    Guarded,
    /// Exclusive create with a verifier (safe to repeat after a lost reply); the file gets
    /// default attributes.
    Exclusive([u8; 8]),
}

/// The reply to a WRITE.
#[derive(Debug, Clone, Copy)]
pub struct WriteReply {
    /// Bytes the server accepted (may be fewer than sent).
    pub count: u32,
    /// How durable they are.
    pub committed: stable_how,
    /// The server's write verifier (changes when it restarts).
    pub verf: [u8; 8],
}

/// A borrowed connection, returned to the pool by [`Lease::release`] only: dropping a lease
/// (a failed or cancelled call) closes the connection.
struct Lease<'a> {
    core: &'a NfsCore,
    client: Client,
    fresh: bool,
    _permit: OwnedSemaphorePermit,
}

impl Lease<'_> {
    fn release(self) {
        if let Ok(mut idle) = self.core.idle.lock() {
            idle.push(self.client);
        }
    }
}

/// Runs one RPC on a pooled connection with the request timeout; maps failures.
/// `|c| call` is evaluated again when the call is retried on a fresh connection.
macro_rules! rpc {
    ($core:expr, $op:expr, $target:expr, |$c:ident| $call:expr) => {{
        let core: &NfsCore = $core;
        let mut retried = false;
        loop {
            let mut lease = core.lease($op, $target, retried).await?;
            let fresh = lease.fresh;
            let outcome = {
                let $c = &mut lease.client;
                tokio::time::timeout(core.cfg.request_timeout, $call).await
            };
            match outcome {
                Ok(Ok(v)) => {
                    lease.release();
                    break Ok(v);
                }
                Ok(Err(e)) => {
                    if e.is_connection_reusable() {
                        lease.release();
                    }
                    if matches!(e, RpcError::Io(_)) && !fresh && !retried {
                        // The server dropped an idle connection (restart, idle timeout): the
                        // other idle ones are likely dead too. Retry once on a new one.
                        core.drop_idle();
                        retried = true;
                        continue;
                    }
                    break Err(error::from_rpc(e, $op, $target));
                }
                Err(_) => break Err(error::timeout($op, $target, core.cfg.request_timeout)),
            }
        }
    }};
}

/// Connections to one NFS server and export, and the NFS procedures.
pub struct NfsCore {
    cfg: NfsConfig,
    credential: opaque_auth<'static>,
    connector: TcpConnector,
    mounted: OnceCell<Mounted>,
    idle: std::sync::Mutex<Vec<Client>>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for NfsCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsCore")
            .field("location", &self.cfg.location())
            .field("mounted", &self.mounted.get())
            .finish()
    }
}

impl NfsCore {
    /// A core for `cfg` (validated); nothing is contacted until the first call.
    pub fn new(cfg: NfsConfig) -> Result<NfsCore> {
        cfg.validate()?;
        let cred = auth_unix {
            stamp: std::process::id(),
            machinename: Opaque::owned(cfg.machine_name.as_bytes().to_vec()),
            uid: cfg.uid,
            gid: cfg.gid,
            gids: cfg.gids.clone(),
        };
        Ok(NfsCore {
            credential: opaque_auth::auth_unix(&cred),
            connector: TcpConnector {
                timeout: cfg.connect_timeout,
            },
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
            idle: std::sync::Mutex::new(Vec::new()),
            mounted: OnceCell::new(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NfsConfig {
        &self.cfg
    }

    /// MOUNT (once; later calls return the same answer): resolves the host, asks the
    /// portmapper for the ports unless configured, mounts the export, asks FSINFO for the
    /// transfer sizes. A failed attempt is retried by the next call.
    pub async fn mount(&self) -> Result<&Mounted> {
        self.mounted.get_or_try_init(|| self.do_mount()).await
    }

    async fn do_mount(&self) -> Result<Mounted> {
        let cfg = &self.cfg;
        let server = cfg.host.clone();
        let ip: IpAddr = match cfg.host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                let lookup = tokio::net::lookup_host((cfg.host.as_str(), 0));
                let mut addrs = tokio::time::timeout(cfg.connect_timeout, lookup)
                    .await
                    .map_err(|_| error::timeout("resolve", &server, cfg.connect_timeout))?
                    .map_err(|e| error::from_io(&e, "resolve", &server).with_source(e))?;
                addrs.next().map(|a| a.ip()).ok_or_else(|| {
                    Error::new(ErrorKind::Network, format!("host {server} has no address"))
                        .with_retryable(true)
                })?
            }
        };
        let connector = TcpConnector {
            timeout: cfg.connect_timeout,
        };
        let mut builder = Nfs3ConnectionBuilder::new(connector, ip.to_string(), &cfg.export)
            .portmapper_port(cfg.portmapper_port)
            .connect_from_privileged_port(cfg.use_privileged_port())
            .credential(self.credential.clone());
        if let Some(p) = cfg.mount_port {
            builder = builder.mount_port(p);
        }
        if let Some(p) = cfg.nfs_port {
            builder = builder.nfs3_port(p);
        }
        let limit = cfg.connect_timeout + cfg.request_timeout;
        let mut conn = tokio::time::timeout(limit, builder.mount())
            .await
            .map_err(|_| error::timeout("mount", &cfg.export, limit))?
            .map_err(|e| error::from_connect(e, &server, &cfg.export))?;
        let root = conn.root_nfs_fh3();
        let nfs_addr = SocketAddr::new(ip, conn.nfs3_port);
        let target = cfg.export.as_str();
        let args = FSINFO3args {
            fsroot: root.clone(),
        };
        let info = tokio::time::timeout(cfg.request_timeout, conn.fsinfo(&args))
            .await
            .map_err(|_| error::timeout("fsinfo", target, cfg.request_timeout))?
            .map_err(|e| error::from_rpc(e, "fsinfo", target))?;
        let (rtmax, wtmax) = match info {
            Nfs3Result::Ok(ok) => (ok.rtmax, ok.wtmax),
            // Servers must answer FSINFO; if one does not, stay with the configured size.
            Nfs3Result::Err(_) => (0, 0),
        };
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn.into_nfs3_client());
        }
        let fit = |max: u32| {
            if max >= 4096 {
                cfg.request_size.min(max)
            } else {
                cfg.request_size
            }
        };
        let m = Mounted {
            root,
            nfs_addr,
            read_size: fit(rtmax),
            write_size: fit(wtmax),
        };
        tracing::debug!(
            location = %cfg.location(), read_size = m.read_size, write_size = m.write_size,
            "nfs export mounted"
        );
        Ok(m)
    }

    /// Closes every idle connection.
    fn drop_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A connection: an idle one unless `fresh` is asked for, else a new one.
    async fn lease(&self, op: &str, target: &str, fresh: bool) -> Result<Lease<'_>> {
        let mounted = self.mount().await?;
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::new(ErrorKind::Storage, "NFS connection pool closed"))?;
        let idle = if fresh {
            None
        } else {
            self.idle.lock().ok().and_then(|mut v| v.pop())
        };
        if let Some(client) = idle {
            return Ok(Lease {
                core: self,
                client,
                fresh: false,
                _permit: permit,
            });
        }
        let addr = mounted.nfs_addr;
        let io = if self.cfg.use_privileged_port() {
            self.connector.open_privileged(addr).await
        } else {
            self.connector.open(addr, None).await
        }
        .map_err(|e| error::from_io(&e, op, target).with_source(e))?;
        Ok(Lease {
            core: self,
            client: Nfs3Client::new_with_auth(io, self.credential.clone(), opaque_auth::default()),
            fresh: true,
            _permit: permit,
        })
    }

    /// The export's root directory handle.
    pub async fn root(&self) -> Result<FileHandle> {
        Ok(self.mount().await?.root.clone())
    }

    /// LOOKUP of `name` in `dir`: `None` when absent, when `dir` is not a directory, or when
    /// `dir` was removed meanwhile (`NFS3ERR_STALE`: a concurrent delete emptied it).
    pub async fn lookup(
        &self,
        dir: &FileHandle,
        name: &str,
        target: &str,
    ) -> Result<Option<(FileHandle, Option<fattr3>)>> {
        let res = rpc!(self, "lookup", target, |c| c.lookup(&LOOKUP3args {
            what: diropargs(dir, name),
        }))?;
        match res {
            Nfs3Result::Ok(ok) => Ok(Some((ok.object, option(ok.obj_attributes)))),
            Nfs3Result::Err((
                nfsstat3::NFS3ERR_NOENT | nfsstat3::NFS3ERR_NOTDIR | nfsstat3::NFS3ERR_STALE,
                _,
            )) => Ok(None),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "lookup", target)),
        }
    }

    /// GETATTR.
    pub async fn getattr(&self, fh: &FileHandle, target: &str) -> Result<fattr3> {
        let res = rpc!(self, "getattr", target, |c| c
            .getattr(&GETATTR3args { object: fh.clone() }))?;
        match res {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "getattr", target)),
        }
    }

    /// SETATTR of the size (extends with a hole, or truncates).
    pub async fn set_size(&self, fh: &FileHandle, size: u64, target: &str) -> Result<()> {
        let res = rpc!(self, "setattr", target, |c| c.setattr(&SETATTR3args {
            object: fh.clone(),
            new_attributes: sattr3 {
                size: Nfs3Option::Some(size),
                ..Default::default()
            },
            guard: Nfs3Option::None,
        }))?;
        match res {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "setattr", target)),
        }
    }

    /// CREATE of a regular file `name` in `dir`.
    pub async fn create(
        &self,
        dir: &FileHandle,
        name: &str,
        mode: CreateMode,
        target: &str,
    ) -> Result<FileHandle> {
        let file_mode = self.config().file_mode;
        let how = || match mode {
            CreateMode::Unchecked => createhow3::UNCHECKED(file_attrs(file_mode)),
            CreateMode::Guarded => createhow3::GUARDED(file_attrs(file_mode)),
            CreateMode::Exclusive(v) => createhow3::EXCLUSIVE(createverf3(v)),
        };
        let res = rpc!(self, "create", target, |c| c.create(&CREATE3args {
            where_: diropargs(dir, name),
            how: how(),
        }))?;
        match res {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                // The server may omit the handle: look it up.
                Nfs3Option::None => self
                    .lookup(dir, name, target)
                    .await?
                    .map(|(fh, _)| fh)
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Storage, "created file vanished")
                            .with_target(target.to_string())
                    }),
            },
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "create", target)),
        }
    }

    /// MKDIR of `name` in `dir` (mode 0755). An existing directory is not an error; the flag
    /// says whether this call created it.
    pub async fn mkdir(
        &self,
        dir: &FileHandle,
        name: &str,
        target: &str,
    ) -> Result<(FileHandle, bool)> {
        let res = rpc!(self, "mkdir", target, |c| c.mkdir(&MKDIR3args {
            where_: diropargs(dir, name),
            attributes: sattr3 {
                mode: Nfs3Option::Some(0o755),
                ..Default::default()
            },
        }))?;
        let created = match res {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => return Ok((fh, true)),
                Nfs3Option::None => true,
            },
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => false,
            Nfs3Result::Err((stat, _)) => return Err(error::from_status(stat, "mkdir", target)),
        };
        match self.lookup(dir, name, target).await? {
            Some((fh, attr)) => {
                let attr = match attr {
                    Some(a) => a,
                    None => self.getattr(&fh, target).await?,
                };
                if attr.type_ != ftype3::NF3DIR {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("{name:?} exists and is not a directory"),
                    )
                    .with_operation("nfs.mkdir")
                    .with_target(target.to_string()));
                }
                Ok((fh, created))
            }
            None => Err(
                Error::new(ErrorKind::Storage, "directory vanished after MKDIR")
                    .with_retryable(true)
                    .with_target(target.to_string()),
            ),
        }
    }

    /// WRITE of `data` at `offset`.
    pub async fn write(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
        target: &str,
    ) -> Result<WriteReply> {
        let count = u32::try_from(data.len()).map_err(|_| Error::invalid("WRITE too large"))?;
        let res = rpc!(self, "write", target, |c| c.write(&WRITE3args {
            file: fh.clone(),
            offset,
            count,
            stable,
            data: Opaque::borrowed(data),
        }))?;
        match res {
            Nfs3Result::Ok(ok) => {
                if ok.count > count {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!(
                            "server claims to have written {} of {count} bytes",
                            ok.count
                        ),
                    )
                    .with_target(target.to_string())
                    .with_offset(offset));
                }
                Ok(WriteReply {
                    count: ok.count,
                    committed: ok.committed,
                    verf: ok.verf.0,
                })
            }
            Nfs3Result::Err((stat, _)) => {
                Err(error::from_status(stat, "write", target).with_offset(offset))
            }
        }
    }

    /// COMMIT of the whole file; returns the write verifier.
    pub async fn commit(&self, fh: &FileHandle, target: &str) -> Result<[u8; 8]> {
        let res = rpc!(self, "commit", target, |c| c.commit(&COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        }))?;
        match res {
            Nfs3Result::Ok(ok) => Ok(ok.verf.0),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "commit", target)),
        }
    }

    /// READ of up to `count` bytes at `offset`; returns the bytes and the end-of-file flag.
    pub async fn read(
        &self,
        fh: &FileHandle,
        offset: u64,
        count: u32,
        target: &str,
    ) -> Result<(Vec<u8>, bool)> {
        let res = rpc!(self, "read", target, |c| c.read(&READ3args {
            file: fh.clone(),
            offset,
            count,
        }))?;
        match res {
            Nfs3Result::Ok(ok) => {
                let data = ok.data.0.into_owned();
                if data.len() > count as usize {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!("server sent {} bytes for a READ of {count}", data.len()),
                    )
                    .with_target(target.to_string())
                    .with_offset(offset));
                }
                Ok((data, ok.eof))
            }
            Nfs3Result::Err((stat, _)) => {
                Err(error::from_status(stat, "read", target).with_offset(offset))
            }
        }
    }

    /// RENAME `from_dir/from` to `to_dir/to` (replaces an existing `to`).
    pub async fn rename(
        &self,
        from_dir: &FileHandle,
        from: &str,
        to_dir: &FileHandle,
        to: &str,
        target: &str,
    ) -> Result<()> {
        let res = rpc!(self, "rename", target, |c| c.rename(&RENAME3args {
            from: diropargs(from_dir, from),
            to: diropargs(to_dir, to),
        }))?;
        match res {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "rename", target)),
        }
    }

    /// LINK: a second name `dir/name` for `file`; fails with `AlreadyExists` if it exists.
    pub async fn link(
        &self,
        file: &FileHandle,
        dir: &FileHandle,
        name: &str,
        target: &str,
    ) -> Result<()> {
        let res = rpc!(self, "link", target, |c| c.link(&LINK3args {
            file: file.clone(),
            link: diropargs(dir, name),
        }))?;
        match res {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "link", target)),
        }
    }

    /// REMOVE of the file `dir/name`; `false` if it did not exist.
    pub async fn remove(&self, dir: &FileHandle, name: &str, target: &str) -> Result<bool> {
        let res = rpc!(self, "remove", target, |c| c.remove(&REMOVE3args {
            object: diropargs(dir, name),
        }))?;
        match res {
            Nfs3Result::Ok(_) => Ok(true),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(false),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "remove", target)),
        }
    }

    /// RMDIR of the directory `dir/name`; `false` if it is absent or not empty.
    pub async fn rmdir(&self, dir: &FileHandle, name: &str, target: &str) -> Result<bool> {
        let res = rpc!(self, "rmdir", target, |c| c.rmdir(&RMDIR3args {
            object: diropargs(dir, name),
        }))?;
        match res {
            Nfs3Result::Ok(_) => Ok(true),
            Nfs3Result::Err((
                nfsstat3::NFS3ERR_NOENT | nfsstat3::NFS3ERR_NOTEMPTY | nfsstat3::NFS3ERR_EXIST,
                _,
            )) => Ok(false),
            Nfs3Result::Err((stat, _)) => Err(error::from_status(stat, "rmdir", target)),
        }
    }

    /// READDIRPLUS of the whole directory (every page), without `.` and `..`; `None` on
    /// `NFS3ERR_STALE` or `NFS3ERR_NOENT`. A server answers so both when the directory itself
    /// is gone and when an entry vanished while it gathered the entries' attributes
    /// (nfs-ganesha does, for a while after the removal): the caller tells the two apart.
    pub async fn readdirplus(
        &self,
        dir: &FileHandle,
        target: &str,
    ) -> Result<Option<Vec<DirEntry>>> {
        let mut out = Vec::new();
        let mut cookie = 0u64;
        let mut verf = cookieverf3::default();
        loop {
            let res = rpc!(self, "readdirplus", target, |c| c.readdirplus(
                &READDIRPLUS3args {
                    dir: dir.clone(),
                    cookie,
                    cookieverf: verf,
                    dircount: READDIR_MAXCOUNT / 4,
                    maxcount: READDIR_MAXCOUNT,
                }
            ))?;
            let ok = match res {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((nfsstat3::NFS3ERR_STALE | nfsstat3::NFS3ERR_NOENT, _)) => {
                    return Ok(None);
                }
                Nfs3Result::Err((stat, _)) => {
                    return Err(error::from_status(stat, "readdirplus", target));
                }
            };
            verf = ok.cookieverf;
            let entries = ok.reply.entries.0;
            let progressed = !entries.is_empty();
            for e in entries {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if name == b"." || name == b".." {
                    continue;
                }
                out.push(DirEntry {
                    name,
                    attr: option(e.name_attributes),
                    handle: option(e.name_handle),
                });
            }
            if out.len() > MAX_DIR_ENTRIES {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!("directory has more than {MAX_DIR_ENTRIES} entries"),
                )
                .with_target(target.to_string()));
            }
            if ok.reply.eof {
                return Ok(Some(out));
            }
            if !progressed {
                return Err(Error::new(
                    ErrorKind::Storage,
                    "READDIRPLUS returned no entries and no end of directory",
                )
                .with_target(target.to_string()));
            }
        }
    }
}

fn diropargs<'a>(dir: &FileHandle, name: &'a str) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name.as_bytes())),
    }
}

fn file_attrs(mode: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(mode),
        ..Default::default()
    }
}

fn option<
    T: nfs3_client::nfs3_types::xdr_codec::Pack + nfs3_client::nfs3_types::xdr_codec::Unpack,
>(
    o: Nfs3Option<T>,
) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(v),
        Nfs3Option::None => None,
    }
}

//! Mapping NFSv3 status codes, MOUNT status codes, RPC and transport failures to
//! [`ErrorKind`].
//!
//! | answer | kind | retryable |
//! |---|---|---|
//! | `NFS3ERR_NOENT`, `NFS3ERR_NOTDIR` (a path segment is a file), MOUNT `MNT3ERR_NOENT`/`NOTDIR` | `NotFound` | no |
//! | `NFS3ERR_ACCES`, `NFS3ERR_PERM`, `NFS3ERR_ROFS`, MOUNT `MNT3ERR_ACCES`/`PERM` | `Permission` | no |
//! | RPC `AUTH_ERROR` (credentials refused) | `Auth` | no |
//! | `NFS3ERR_EXIST` | `AlreadyExists` | no |
//! | `NFS3ERR_NAMETOOLONG`, `NFS3ERR_INVAL`, `NFS3ERR_ISDIR` | `InvalidInput` | no |
//! | `NFS3ERR_NOTSUPP`, RPC `PROG_UNAVAIL`/`PROG_MISMATCH`/`PROC_UNAVAIL` | `Unsupported` | no |
//! | `NFS3ERR_JUKEBOX` (server busy), `NFS3ERR_STALE`/`BADHANDLE` (object replaced under us), `NFS3ERR_SERVERFAULT`, RPC `SYSTEM_ERR` | `Storage` | yes |
//! | other NFS status (`NFS3ERR_IO`, `NOSPC`, `DQUOT`, `FBIG`, …), undecodable replies | `Storage` | no |
//! | connection refused/reset/closed, portmapper without the service | `Network` | yes |
//! | connect or request timeout | `Timeout` | yes |

use nfs3_client::nfs3_types::mount::mountstat3;
use nfs3_client::nfs3_types::nfs3::nfsstat3;
use nfs3_client::{ConnectError, MountError, PortmapError, RpcError};
use virtrigaud_core::{Error, ErrorKind};

/// An error for an NFS status code returned by procedure `op` about `target`.
pub fn from_status(stat: nfsstat3, op: &str, target: &str) -> Error {
    use nfsstat3::*;
    let (kind, retry) = match stat {
        NFS3ERR_NOENT | NFS3ERR_NOTDIR => (ErrorKind::NotFound, false),
        NFS3ERR_ACCES | NFS3ERR_PERM | NFS3ERR_ROFS => (ErrorKind::Permission, false),
        NFS3ERR_EXIST => (ErrorKind::AlreadyExists, false),
        NFS3ERR_NAMETOOLONG | NFS3ERR_INVAL | NFS3ERR_ISDIR => (ErrorKind::InvalidInput, false),
        NFS3ERR_NOTSUPP => (ErrorKind::Unsupported, false),
        NFS3ERR_JUKEBOX | NFS3ERR_STALE | NFS3ERR_BADHANDLE | NFS3ERR_SERVERFAULT => {
            (ErrorKind::Storage, true)
        }
        _ => (ErrorKind::Storage, false),
    };
    Error::new(kind, format!("NFS {op} of {target:?} failed: {stat}"))
        .with_retryable(retry)
        .with_operation(format!("nfs.{op}"))
        .with_target(target.to_string())
}

/// An error for a failed RPC (transport or protocol) during procedure `op`.
pub fn from_rpc(e: RpcError, op: &str, target: &str) -> Error {
    let (kind, retry, what) = match &e {
        RpcError::Io(io) => return from_io(io, op, target).with_source(e),
        RpcError::Auth(stat) => (
            ErrorKind::Auth,
            false,
            format!("server refused the AUTH_UNIX credentials ({stat:?})"),
        ),
        RpcError::ProgUnavail | RpcError::ProgMismatch { .. } | RpcError::ProcUnavail => (
            ErrorKind::Unsupported,
            false,
            format!("server does not offer this NFSv3 procedure ({e})"),
        ),
        RpcError::SystemErr => (ErrorKind::Storage, true, "server system error".to_string()),
        _ => (
            ErrorKind::Storage,
            false,
            format!("malformed RPC exchange ({e})"),
        ),
    };
    Error::new(kind, format!("NFS {op} of {target:?} failed: {what}"))
        .with_retryable(retry)
        .with_operation(format!("nfs.{op}"))
        .with_target(target.to_string())
        .with_source(e)
}

/// An error for a socket failure during `op`: `Timeout` for timeouts, `Network` otherwise.
pub fn from_io(e: &std::io::Error, op: &str, target: &str) -> Error {
    let kind = if e.kind() == std::io::ErrorKind::TimedOut {
        ErrorKind::Timeout
    } else {
        ErrorKind::Network
    };
    Error::new(
        kind,
        format!("NFS {op} of {target:?}: connection failed: {e}"),
    )
    .with_retryable(true)
    .with_operation(format!("nfs.{op}"))
    .with_target(target.to_string())
}

/// A request that got no answer in time.
pub fn timeout(op: &str, target: &str, after: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("NFS {op} of {target:?}: no answer within {after:?}"),
    )
    .with_operation(format!("nfs.{op}"))
    .with_target(target.to_string())
}

/// An error for a failed connection setup (portmapper, MOUNT).
pub fn from_connect(e: ConnectError, server: &str, export: &str) -> Error {
    let target = format!("{server}:{export}");
    match e {
        ConnectError::Io(io) => from_io(&io, "connect", &target).with_source(io),
        ConnectError::Portmap(PortmapError::Rpc(r)) => from_rpc(r, "portmap", &target),
        ConnectError::Portmap(p) => Error::new(
            ErrorKind::Network,
            format!("portmapper of {server} does not offer NFSv3/MOUNTv3 over TCP: {p}"),
        )
        .with_retryable(true)
        .with_operation("nfs.portmap")
        .with_target(target)
        .with_source(p),
        ConnectError::Mount(MountError::Rpc(r)) => from_rpc(r, "mount", &target),
        ConnectError::Mount(MountError::Denied(stat)) => {
            let kind = match stat {
                mountstat3::MNT3ERR_NOENT | mountstat3::MNT3ERR_NOTDIR => ErrorKind::NotFound,
                mountstat3::MNT3ERR_PERM | mountstat3::MNT3ERR_ACCES => ErrorKind::Permission,
                mountstat3::MNT3ERR_INVAL | mountstat3::MNT3ERR_NAMETOOLONG => {
                    ErrorKind::InvalidInput
                }
                mountstat3::MNT3ERR_NOTSUPP => ErrorKind::Unsupported,
                _ => ErrorKind::Storage,
            };
            Error::new(
                kind,
                format!("server {server} refused to mount export {export}: {stat:?}"),
            )
            .with_operation("nfs.mount")
            .with_target(target)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_kinds() {
        let k = |s| from_status(s, "lookup", "k").kind();
        assert_eq!(k(nfsstat3::NFS3ERR_NOENT), ErrorKind::NotFound);
        assert_eq!(k(nfsstat3::NFS3ERR_ACCES), ErrorKind::Permission);
        assert_eq!(k(nfsstat3::NFS3ERR_PERM), ErrorKind::Permission);
        assert_eq!(k(nfsstat3::NFS3ERR_EXIST), ErrorKind::AlreadyExists);
        assert_eq!(k(nfsstat3::NFS3ERR_IO), ErrorKind::Storage);
        assert!(from_status(nfsstat3::NFS3ERR_JUKEBOX, "write", "k").is_retryable());
        assert!(!from_status(nfsstat3::NFS3ERR_NOSPC, "write", "k").is_retryable());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = from_connect(ConnectError::Io(refused), "h", "/e");
        assert_eq!(e.kind(), ErrorKind::Network);
        assert!(e.is_retryable());
        let eof = RpcError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(from_rpc(eof, "read", "k").kind(), ErrorKind::Network);
    }
}

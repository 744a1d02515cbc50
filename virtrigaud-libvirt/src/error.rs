//! Mapping of libvirt errors to virtrigaud [`Error`]s.
//!
//! libvirt reports an error number and a domain with every failure; the number decides the
//! [`ErrorKind`]: a missing domain, pool, volume, snapshot or network is `NotFound`, an existing
//! domain or volume `AlreadyExists`, an operation invalid in the current state `Conflict`, and
//! so on. Everything else is `Provider`.

use virt::error::ErrorNumber;
use virtrigaud_core::{Error, ErrorKind};

/// The kind of a libvirt error.
pub fn kind_of(e: &virt::error::Error) -> ErrorKind {
    use ErrorNumber as N;
    let virt::enumutil::Enum::Known(code) = e.code() else {
        return ErrorKind::Provider;
    };
    match code {
        N::NoDomain
        | N::NoStoragePool
        | N::NoStorageVolume
        | N::NoDomainSnapshot
        | N::NoNetwork
        | N::NoSecret
        | N::NoInterface
        | N::NoNodeDevice => ErrorKind::NotFound,
        N::DomExist | N::StorageVolExist | N::NetworkExist => ErrorKind::AlreadyExists,
        N::OperationInvalid | N::ResourceBusy | N::BlockCopyActive => ErrorKind::Conflict,
        N::OperationTimeout | N::AgentUnresponsive | N::AgentCommandTimeout => ErrorKind::Timeout,
        N::NoSupport | N::ArgumentUnsupported | N::OperationUnsupported | N::ConfigUnsupported => {
            ErrorKind::Unsupported
        }
        N::AuthFailed | N::AuthCancelled | N::AuthUnavailable => ErrorKind::Auth,
        N::OperationDenied | N::AccessDenied => ErrorKind::Permission,
        N::XmlError | N::XmlDetail | N::InvalidArg | N::XmlInvalidSchema | N::InvalidMac => {
            ErrorKind::InvalidInput
        }
        N::NoConnect | N::Rpc | N::UnknownHost | N::Ssh | N::Libssh | N::NoServer => {
            ErrorKind::Network
        }
        _ => ErrorKind::Provider,
    }
}

/// Converts a libvirt error into an [`Error`] about `op`.
pub fn from_virt(e: virt::error::Error, op: &str) -> Error {
    let kind = kind_of(&e);
    let msg = format!("libvirt: {}", e.message());
    Error::new(kind, msg).with_operation(op.to_string())
}

/// Extension to convert `Result<T, virt::error::Error>`.
pub trait VirtResultExt<T> {
    /// Converts the error with [`from_virt`].
    fn op(self, op: &str) -> virtrigaud_core::Result<T>;
}

impl<T> VirtResultExt<T> for Result<T, virt::error::Error> {
    fn op(self, op: &str) -> virtrigaud_core::Result<T> {
        self.map_err(|e| from_virt(e, op))
    }
}

/// Whether `e` says the object does not exist.
pub fn is_not_found(e: &virt::error::Error) -> bool {
    kind_of(e) == ErrorKind::NotFound
}

//! # virtrigaud-storage
//!
//! [`StorageBackend`](virtrigaud_core::StorageBackend) implementations and storage URLs.
//!
//! | scheme | backend | status |
//! |---|---|---|
//! | `file:///path` (or a bare absolute path) | [`FsBackend`]: local or NFS-mounted directory | available |
//! | `s3://bucket/prefix` | S3 with resumable multipart (feature `s3`) | not implemented yet |
//! | `http(s)://…` | WebDAV PUT / plain HTTP GET (feature `http`) | not implemented yet |
//! | `nfs://host/export/path` | native NFSv3 (feature `nfs`) | not implemented yet |
//!
//! [`open`] turns a URL into a backend; a scheme whose backend does not exist yet gives an
//! `Unsupported` error that names it. [`conformance`] is the suite every backend must pass.

#![warn(missing_docs)]

pub mod conformance;
pub mod fs;
pub mod url;

pub use fs::FsBackend;
pub use url::StorageUrl;

use std::sync::Arc;
use virtrigaud_core::{Error, Result, StorageBackend};

/// Opens the backend for a storage URL.
///
/// ```
/// let b = virtrigaud_storage::open("file:///tmp/virtrigaud-doc").unwrap();
/// assert_eq!(b.location(), "file:///tmp/virtrigaud-doc");
/// let e = virtrigaud_storage::open("s3://bucket/prefix").unwrap_err();
/// assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Unsupported);
/// ```
pub fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    match StorageUrl::parse(url)? {
        StorageUrl::File { root } => Ok(Arc::new(FsBackend::new(root))),
        other => Err(Error::unsupported(format!(
            "the {}:// storage backend is not implemented yet in this version of virtrigaud",
            other.scheme()
        ))
        .with_target(url::redact(url))),
    }
}

//! # virtrigaud-storage
//!
//! [`StorageBackend`] implementations and storage URLs.
//!
//! | scheme | backend | status |
//! |---|---|---|
//! | `file:///path` (or a bare absolute path) | [`FsBackend`]: local or NFS-mounted directory | available |
//! | `s3://bucket/prefix` | [`s3::S3Backend`]: S3 with resumable multipart (feature `s3`) | available |
//! | `http(s)://…`, `webdav(s)://…` | [`webdav::WebdavBackend`]: WebDAV with atomic streamed puts (feature `http`); [`webdav::HttpSource`] reads any web server | available |
//! | `nfs://host/export/path` | [`nfs::NfsBackend`]: native NFSv3, no kernel mount (feature `nfs`) | available |
//!
//! [`open`] turns a URL into a backend; a scheme whose backend does not exist yet gives an
//! `Unsupported` error that names it. [`conformance`] is the suite every backend must pass.

#![warn(missing_docs)]
// The overview links every backend; a build without some features has no such items to link
// to (docs.rs builds with all of them: `[package.metadata.docs.rs]`).
#![cfg_attr(
    not(all(feature = "s3", feature = "http", feature = "nfs")),
    allow(rustdoc::broken_intra_doc_links)
)]

pub mod conformance;
pub mod fs;
#[cfg(any(feature = "s3", feature = "http"))]
mod idle;
#[cfg(feature = "nfs")]
pub mod nfs;
#[cfg(any(feature = "s3", feature = "http"))]
pub mod retry;
#[cfg(feature = "s3")]
pub mod s3;
pub mod url;
#[cfg(feature = "http")]
pub mod webdav;

pub use fs::FsBackend;
pub use url::StorageUrl;

use std::sync::Arc;
use virtrigaud_core::{Error, Result, StorageBackend};

/// Opens the backend for a storage URL.
///
/// ```
/// let b = virtrigaud_storage::open("file:///tmp/virtrigaud-doc").unwrap();
/// assert_eq!(b.location(), "file:///tmp/virtrigaud-doc");
/// let e = virtrigaud_storage::open("ftp://host/x").unwrap_err();
/// assert_eq!(e.kind(), virtrigaud_core::ErrorKind::InvalidInput);
/// ```
///
/// `s3://bucket/prefix` (feature `s3`) takes its endpoint, region and credentials from the
/// standard `AWS_*` environment variables (see [`s3::S3Config::from_env`]); build an
/// [`s3::S3Backend`] from an [`s3::S3Config`] to set them explicitly.
///
/// `http(s)://` and `webdav(s)://` (feature `http`) open a [`webdav::WebdavBackend`] with the
/// credentials of the URL or of `VIRTRIGAUD_WEBDAV_USER` / `_PASSWORD` / `_TOKEN`; a read-only
/// web server is a [`webdav::HttpSource`], built explicitly.
///
/// `nfs://host/export/path` (feature `nfs`) mounts on first use; query parameters set the
/// AUTH_UNIX identity, ports and sizes (see `nfs::NfsConfig::from_url`).
pub fn open(url: &str) -> Result<Arc<dyn StorageBackend>> {
    match StorageUrl::parse(url)? {
        StorageUrl::File { root } => Ok(Arc::new(FsBackend::new(root))),
        #[cfg(feature = "s3")]
        StorageUrl::S3 { bucket, prefix } => {
            Ok(Arc::new(s3::S3Backend::from_env(&bucket, &prefix)?))
        }
        #[cfg(feature = "http")]
        StorageUrl::Http { .. } => Ok(Arc::new(webdav::WebdavBackend::from_url(url)?)),
        #[cfg(feature = "nfs")]
        StorageUrl::Nfs { .. } => Ok(Arc::new(nfs::NfsBackend::from_url(url)?)),
        // Reachable only when some backend feature is off.
        #[allow(unreachable_patterns)]
        other => Err(Error::unsupported(format!(
            "the {}:// storage backend is not implemented yet in this version of virtrigaud",
            other.scheme()
        ))
        .with_target(url::redact(url))),
    }
}

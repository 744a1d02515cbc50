//! WebDAV backend and read-only plain HTTP(S) source (feature `http`).
//!
//! ```no_run
//! # async fn demo() -> virtrigaud_core::Result<()> {
//! use virtrigaud_storage::webdav::{HttpSource, WebdavBackend, WebdavConfig};
//! let dav = WebdavBackend::new(
//!     WebdavConfig::new("https://dav.example/images/").with_basic_auth("vrg", "secret"),
//! )?;
//! let web = HttpSource::new(WebdavConfig::new("https://mirror.example/images/"))?;
//! let reader = web.reader("debian-12.qcow2").await?; // a `ReadAt` (ranged GETs)
//! # Ok(()) }
//! ```
//!
//! `virtrigaud_storage::open("webdav://user:pw@host/dav/")` (or `http(s)://`, `webdavs://`)
//! gives a [`WebdavBackend`]; credentials come from the URL or from `VIRTRIGAUD_WEBDAV_USER` /
//! `VIRTRIGAUD_WEBDAV_PASSWORD` / `VIRTRIGAUD_WEBDAV_TOKEN` ([`WebdavConfig::with_env`]).
//!
//! ## Requests
//!
//! | operation | request |
//! |---|---|
//! | put | `MKCOL` of the parent (and of each missing ancestor, on 409), then one chunked `PUT` of `<dir>/.<name>.<unique>.vrg-tmp` streamed from the writer; commit: `HEAD` of the key (a collection is refused with `Conflict`; an existing object with `AlreadyExists` when the put must not overwrite), then `MOVE` with `Overwrite: T` (`F` when it must not) |
//! | get | `GET` with `Range: bytes=a-b`, streamed; a server that ignores `Range` (200) is skipped and cut locally |
//! | stat | `HEAD` (size from `Content-Length`, `ETag`, `Last-Modified`) |
//! | delete | `DELETE` (404 counts as deleted) |
//! | list | `PROPFIND` with `Depth: 1`, walking down the collections under the prefix |
//!
//! Temporary objects (`.*.vrg-tmp`) never appear in listings; keys of that shape are refused.
//! Temporary objects that a killed process left are not swept: nginx's dav-ext module hides
//! names starting with a dot from `PROPFIND`, so a put cannot see them (remove them on the
//! server, e.g. `find DIR -name '.*.vrg-tmp' -mtime +1 -delete`).
//! Commit is atomic: the object appears under its key only through the MOVE (a rename on the
//! server). Abort or drop cancels the PUT mid-body (the server discards it) and DELETEs the
//! temporary name anyway.
//!
//! ## Why not opendal's `services-webdav`
//!
//! opendal 0.59.5's WebDAV service was checked and does not fit: its writer is a
//! `OneShotWriter` that buffers the whole object in memory before one PUT (a disk image must
//! stream with bounded memory); its rename always sends `Overwrite: T` (no refusal to
//! overwrite) after a PROPFIND and an MKCOL walk; its recursive listing sends `Depth: infinity`,
//! which nginx's dav-ext module refuses; and its errors fold 401 into "unexpected". So this
//! module speaks HTTP directly over reqwest 0.13 (rustls), the client the S3 backend shares
//! with opendal. The plain HTTP source needs only GET and HEAD and uses the same code.
//!
//! ## Retries and errors
//!
//! Every request except the streamed PUT (its body cannot be replayed) is retried with
//! `backon` — exponential backoff with jitter, [`RetryConfig`] — when the failure is
//! retryable: connection refused/reset, timeouts, 408, 429, 5xx. 401 gives `Auth` at once,
//! 403 `Permission`, 404 `NotFound`; [`error`] has the table. Messages carry the URL, never a
//! credential (credentials travel in a header marked sensitive). A failed PUT fails the put:
//! the caller re-runs the transfer. TLS certificates are verified unless
//! [`WebdavConfig::tls_verify`] is turned off explicitly; the WebDAV client follows no
//! redirect, the plain HTTP source follows up to 5.
//!
//! ## Tested against
//!
//! `tests/webdav_nginx.rs`: Debian 12's nginx 1.22 with `dav_methods PUT DELETE MKCOL COPY
//! MOVE`, the dav-ext module for PROPFIND and HTTP basic auth, started by
//! `scripts/peers/nginx.sh`: the conformance suite (nothing left on the server's disk, temporary
//! objects included); a wrong password (`Auth`, not retried, nothing written); `overwrite:
//! false` (refused up front, and at commit through `Overwrite: F` when the object appeared
//! meanwhile); no put over a collection; a 2 GiB put streamed with an 11 MiB peak RSS; writers
//! and readers slower than the idle timeout; the plain HTTP source on a read-only location
//! (ranged reads, HEAD size, `NotFound`, `Unsupported` writes) and over TLS with a self-signed
//! certificate (refused by default, not retried; accepted only with `tls_verify` off); a
//! location answering 503 (exactly 1 + `max_retries` requests, then a retryable `Storage`
//! error); an unreachable port (`Network` within the bounded retries).
//!
//! ## Timeouts
//!
//! [`WebdavConfig::idle_timeout`] bounds every wait for the network — an answer, the next GET
//! chunk, the server accepting the next PUT chunk, the answer to a finished PUT — and never
//! the time the caller spends producing or consuming data. (reqwest's own read timeout is not
//! used for streams: it fails a GET whose consumer pauses longer than it, and a PUT whose
//! producer is slower than it in total.)

pub mod config;
pub mod core;
pub mod error;
pub mod source;
pub mod writer;

pub use self::config::{RetryConfig, WebdavConfig};
pub use self::core::{TEMP_SUFFIX, is_temp_key};
pub use self::source::{HttpReader, HttpSource};
pub use self::writer::WebdavWriter;

use self::core::{DavCore, not_found, temp_key};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use virtrigaud_core::io::{ByteSink, ByteStream};
use virtrigaud_core::storage::{validate_key, validate_prefix};
use virtrigaud_core::{
    Error, ErrorKind, ObjectMeta, PutOptions, Result, StorageBackend, StorageCapabilities,
};

/// Most collections a listing visits (a bound against hostile or huge trees).
const MAX_LIST_COLLECTIONS: usize = 100_000;

/// A WebDAV collection used as intermediate storage (see the module docs).
#[derive(Debug, Clone)]
pub struct WebdavBackend {
    core: Arc<DavCore>,
}

impl WebdavBackend {
    /// A backend for `cfg` (validated; no request is sent).
    pub fn new(cfg: WebdavConfig) -> Result<WebdavBackend> {
        Ok(WebdavBackend {
            core: Arc::new(DavCore::new(&cfg, false)?),
        })
    }

    /// A backend for a storage URL (`http(s)://`, `webdav(s)://`, credentials in the URL or
    /// the environment, see [`WebdavConfig::from_url`] and [`WebdavConfig::with_env`]).
    pub fn from_url(url: &str) -> Result<WebdavBackend> {
        WebdavBackend::new(WebdavConfig::from_url(url)?.with_env())
    }

    /// Starts a put and returns the concrete writer. [`StorageBackend::put`] is this, boxed.
    pub async fn put_streaming(&self, key: &str, opts: &PutOptions) -> Result<WebdavWriter> {
        validate_key(key)?;
        if is_temp_key(key) {
            return Err(Error::invalid(format!(
                "key {key:?} has the shape of a temporary object (.*{TEMP_SUFFIX})"
            )));
        }
        let target = self.core.url(key);
        if !opts.overwrite && self.core.head(key).await?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{target} exists and overwriting was not asked"),
            )
            .with_operation("http.put")
            .with_target(target));
        }
        if self.core.create_parents {
            self.core
                .ensure_parents(key)
                .await
                .map_err(|e| e.with_operation("http.put").with_target(target.clone()))?;
        }
        Ok(WebdavWriter::start(
            self.core.clone(),
            key.to_string(),
            temp_key(key),
            opts.overwrite,
        ))
    }
}

#[async_trait]
impl StorageBackend for WebdavBackend {
    fn location(&self) -> String {
        self.core.base().to_string()
    }

    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            ranged_read: true,
            list: true,
            multipart: false,
            resume: false,
            presign: false,
            atomic_put: true,
        }
    }

    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        Ok(Box::new(self.put_streaming(key, opts).await?))
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        validate_key(key)?;
        self.core.get(key, range).await
    }

    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        validate_key(key)?;
        self.core
            .head(key)
            .await?
            .ok_or_else(|| not_found(&self.core.url(key)))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.core.delete(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let start = match prefix.rfind('/') {
            Some(i) => prefix[..=i].to_string(),
            None => String::new(),
        };
        let mut out = Vec::new();
        let mut queue = VecDeque::from([start]);
        let mut visited = 0usize;
        while let Some(dir) = queue.pop_front() {
            visited += 1;
            if visited > MAX_LIST_COLLECTIONS {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!("listing visits more than {MAX_LIST_COLLECTIONS} collections"),
                )
                .with_target(self.core.url(prefix)));
            }
            for e in self.core.propfind(&dir).await? {
                let Some(key) = self.core.key_of(&e.path) else {
                    continue;
                };
                // Only strict descendants of the collection listed (no self, no loops).
                if key.len() <= dir.len() || !key.starts_with(&dir) {
                    continue;
                }
                if e.collection {
                    let mut sub = key;
                    if !sub.ends_with('/') {
                        sub.push('/');
                    }
                    if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                        queue.push_back(sub);
                    }
                } else if key.starts_with(prefix)
                    && !is_temp_key(&key)
                    && validate_key(&key).is_ok()
                {
                    out.push(ObjectMeta {
                        key,
                        size: e.size,
                        etag: e.etag,
                        last_modified: e.last_modified,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_maps_webdav_urls_to_this_backend() {
        let b = crate::open("webdav://u:secret@dav.example:8080/images").unwrap();
        assert_eq!(b.location(), "http://dav.example:8080/images/");
        assert!(!format!("{b:?}").contains("secret"));
        let b = crate::open("webdavs://dav.example/x/").unwrap();
        assert_eq!(b.location(), "https://dav.example/x/");
        assert!(b.capabilities().atomic_put);
        let b = crate::open("https://dav.example/").unwrap();
        assert_eq!(b.location(), "https://dav.example/");
    }

    #[tokio::test]
    async fn temporary_keys_and_bad_keys_are_refused_before_any_request() {
        // Port 9 (discard) on 127.0.0.1: nothing is sent for an invalid key.
        let b = WebdavBackend::new(WebdavConfig::new("http://127.0.0.1:9/dav/")).unwrap();
        for k in ["a/.x.1.vrg-tmp", "../x", "a//b"] {
            let e = b.put(k, &PutOptions::default()).await.err().unwrap();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{k}");
        }
    }
}

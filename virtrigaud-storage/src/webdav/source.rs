//! [`HttpSource`]: a read-only backend over any web server that holds images (GET with
//! `Range`, HEAD for the size), and [`HttpReader`], random access to one object.

use super::config::WebdavConfig;
use super::core::{DavCore, not_found};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;
use virtrigaud_core::io::{ByteSink, ByteStream, ReadAt};
use virtrigaud_core::storage::{collect_range, validate_key};
use virtrigaud_core::{Error, ObjectMeta, PutOptions, Result, StorageBackend, StorageCapabilities};

/// A read-only plain HTTP(S) location: `get`, `stat`; `put`, `delete` and `list` are
/// `Unsupported`. Follows up to 5 redirects.
#[derive(Debug, Clone)]
pub struct HttpSource {
    core: Arc<DavCore>,
}

impl HttpSource {
    /// A source for `cfg` (validated; no request is sent). Credentials are optional.
    pub fn new(cfg: WebdavConfig) -> Result<HttpSource> {
        Ok(HttpSource {
            core: Arc::new(DavCore::new(&cfg, true)?),
        })
    }

    /// Opens `key` for random access (one HEAD for the size).
    pub async fn reader(&self, key: &str) -> Result<HttpReader> {
        let meta = self.stat(key).await?;
        Ok(HttpReader {
            core: self.core.clone(),
            key: key.to_string(),
            size: meta.size,
        })
    }

    /// Opens one image URL (`https://host/path/disk.qcow2`) for random access.
    pub async fn open_url(url: &str) -> Result<HttpReader> {
        let cfg = WebdavConfig::from_url(url)?;
        let full = cfg.url.trim_end_matches('/').to_string();
        let (base, name) = full
            .rsplit_once('/')
            .filter(|(b, n)| !n.is_empty() && b.contains("://") && !b.ends_with('/'))
            .ok_or_else(|| Error::invalid("the URL does not name a file"))?;
        let name = percent_encoding::percent_decode_str(name)
            .decode_utf8_lossy()
            .into_owned();
        let src = HttpSource::new(WebdavConfig {
            url: format!("{base}/"),
            ..cfg
        })?;
        src.reader(&name).await
    }
}

#[async_trait]
impl StorageBackend for HttpSource {
    fn location(&self) -> String {
        self.core.base().to_string()
    }

    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            ranged_read: true,
            ..StorageCapabilities::default()
        }
    }

    async fn put(&self, key: &str, _opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        validate_key(key)?;
        Err(read_only(&self.location(), "put"))
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
        Err(read_only(&self.location(), "delete"))
    }

    async fn list(&self, _prefix: &str) -> Result<Vec<ObjectMeta>> {
        Err(read_only(&self.location(), "list"))
    }
}

fn read_only(location: &str, op: &str) -> Error {
    Error::unsupported(format!(
        "{location} is a read-only plain HTTP source: no {op}"
    ))
    .with_operation(format!("http.{op}"))
}

/// Random access to one object of an [`HttpSource`] through ranged GETs.
#[derive(Debug, Clone)]
pub struct HttpReader {
    core: Arc<DavCore>,
    key: String,
    size: u64,
}

impl HttpReader {
    /// The URL read.
    pub fn url(&self) -> String {
        self.core.url(&self.key)
    }
}

#[async_trait]
impl ReadAt for HttpReader {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if end <= offset {
            return Ok(Bytes::new());
        }
        let s = self.core.get(&self.key, Some(offset..end)).await?;
        collect_range(s, offset, end).await
    }
}

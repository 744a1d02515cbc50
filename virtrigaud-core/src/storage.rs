//! The [`StorageBackend`] trait: intermediate storage for disk images (S3, WebDAV/HTTP, NFS,
//! a local directory). A small required set of methods, and conveniences in [`StorageExt`].

use crate::io::{ByteSink, ByteStream, ReadAt};
use crate::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the backend's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Entity tag, when the backend has one.
    pub etag: Option<String>,
    /// Last modification time, when known.
    pub last_modified: Option<SystemTime>,
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageCapabilities {
    /// Ranged GET.
    pub ranged_read: bool,
    /// Listing by prefix.
    pub list: bool,
    /// Uploads in parts.
    pub multipart: bool,
    /// Interrupted uploads resume from a checkpoint.
    pub resume: bool,
    /// Presigned GET URLs.
    pub presign: bool,
    /// A put becomes visible atomically on commit.
    pub atomic_put: bool,
}

/// Options of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOptions {
    /// Expected size, when known (lets S3 choose its part size).
    pub size_hint: Option<u64>,
    /// Replace an existing object (default true: staged objects are ours to replace).
    pub overwrite: bool,
    /// Content type.
    pub content_type: Option<String>,
    /// When the put resumes an interrupted upload, every part the store already holds must
    /// be the very bytes this put sends, or the put fails with `Conflict` instead of replacing
    /// the part (an encrypted export sets it when it reuses the interrupted upload's key: one
    /// key must never seal two different plaintexts). Backends that do not resume ignore it.
    pub resume_must_match: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            size_hint: None,
            overwrite: true,
            content_type: None,
            resume_must_match: false,
        }
    }
}

/// Intermediate storage for disk images.
///
/// Keys are `/`-separated relative paths, checked by [`validate_key`]: no `..`, no absolute
/// paths, no escape from the backend's root.
#[async_trait]
pub trait StorageBackend: Send + Sync + std::fmt::Debug {
    /// A printable location of the backend (URL without credentials).
    fn location(&self) -> String;
    /// What the backend can do.
    fn capabilities(&self) -> StorageCapabilities;
    /// Starts a streaming put. The object is visible only after the sink's `commit`; `abort`
    /// (or a cancelled transfer) leaves nothing behind.
    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>>;
    /// Streams an object, or a byte range of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream>;
    /// Metadata of an object; `NotFound` if absent.
    async fn stat(&self, key: &str) -> Result<ObjectMeta>;
    /// Deletes an object; deleting an absent object succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Lists objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Whether an interrupted upload of `key` is waiting to be resumed by the next put (a
    /// multipart upload with its checkpoint). Backends that do not resume answer `false`.
    async fn pending_upload(&self, key: &str) -> Result<bool> {
        let _ = key;
        Ok(false)
    }
    /// A URL that lets anyone GET the object until it expires.
    async fn presign_get(&self, key: &str, expires: Duration) -> Result<String> {
        let _ = (key, expires);
        Err(Error::unsupported(format!(
            "{} cannot presign URLs",
            self.location()
        )))
    }
}

/// Conveniences over any [`StorageBackend`].
#[async_trait]
pub trait StorageExt: StorageBackend {
    /// Stores a small object in one go.
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<()> {
        let mut sink = self
            .put(
                key,
                &PutOptions {
                    size_hint: Some(data.len() as u64),
                    ..Default::default()
                },
            )
            .await?;
        if let Err(e) = sink.write(data).await {
            let _ = sink.abort().await;
            return Err(e);
        }
        sink.commit().await
    }
    /// Reads a whole object into memory, refusing objects larger than `limit` bytes.
    async fn get_bytes(&self, key: &str, limit: u64) -> Result<Bytes> {
        let meta = self.stat(key).await?;
        if meta.size > limit {
            return Err(Error::invalid(format!(
                "object is {} bytes, more than the {limit} allowed here",
                meta.size
            ))
            .with_target(key.to_string()));
        }
        let mut s = self.get(key, None).await?;
        let mut buf = BytesMut::new();
        while let Some(b) = s.next().await {
            buf.extend_from_slice(&b?);
            if buf.len() as u64 > limit {
                return Err(Error::invalid("object grew past its limit while reading"));
            }
        }
        Ok(buf.freeze())
    }
    /// Whether an object exists.
    async fn exists(&self, key: &str) -> Result<bool> {
        match self.stat(key).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl<T: StorageBackend + ?Sized> StorageExt for T {}

/// Random access to a stored object through ranged GETs.
#[derive(Debug)]
pub struct StorageReader {
    backend: Arc<dyn StorageBackend>,
    key: String,
    size: u64,
}

/// Collects the answer to a ranged read of `offset..end` into one buffer; an error the stream
/// yields carries the offset the range starts at. For [`ReadAt`] over a backend's ranged gets.
pub async fn collect_range(mut s: ByteStream, offset: u64, end: u64) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(end.saturating_sub(offset) as usize);
    while let Some(b) = s.next().await {
        buf.extend_from_slice(&b.map_err(|e| e.with_offset(offset))?);
    }
    Ok(buf.freeze())
}

impl StorageReader {
    /// Opens `key` (one stat).
    pub async fn open(backend: Arc<dyn StorageBackend>, key: &str) -> Result<StorageReader> {
        let meta = backend.stat(key).await?;
        Ok(StorageReader {
            backend,
            key: key.to_string(),
            size: meta.size,
        })
    }
}

#[async_trait]
impl ReadAt for StorageReader {
    fn size(&self) -> u64 {
        self.size
    }
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if end <= offset {
            return Ok(Bytes::new());
        }
        let s = self.backend.get(&self.key, Some(offset..end)).await?;
        collect_range(s, offset, end).await
    }
}

/// Checks an object key: non-empty, relative, `/`-separated, no `.`/`..`/empty segments, no
/// backslashes or control characters, at most 1024 bytes.
pub fn validate_key(key: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid(format!("invalid key {key:?}: {why}")));
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("absolute");
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control character or backslash");
    }
    for seg in key.split('/') {
        match seg {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("'.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a listing prefix: like a key, but may be empty and may end with `/`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    if p.is_empty() {
        return Ok(());
    }
    validate_key(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for k in ["a", "a/b.qcow2", "vm-1/disk 0.raw"] {
            validate_key(k).unwrap();
        }
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "a/./b",
            "a\\b",
            "a\0b",
            "a/",
        ] {
            assert_eq!(
                validate_key(k).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{k:?}"
            );
        }
        validate_prefix("").unwrap();
        validate_prefix("vm/").unwrap();
        assert!(validate_prefix("../").is_err());
    }
}

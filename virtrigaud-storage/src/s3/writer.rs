//! [`S3Writer`]: the multipart [`ByteSink`] with a checkpoint for resume across processes.
//!
//! Bytes are gathered into parts whose sizes follow the schedule of
//! [`part_size_of`] (a function of the part number alone); each full
//! part is uploaded by a task of its own (at most `concurrency` at a time, fewer as parts grow so
//! that the parts in flight stay within the memory budget; memory ≈ part size ×
//! (concurrency + 1)). An object that never fills more than one part goes up as one PutObject
//! on `commit`.
//!
//! The multipart upload is created when the first part is ready, and its checkpoint
//! `<key>.upload.json` (upload id, first part size, creation time, and the parts known to be stored
//! with their MD5 and ETag) is written right after. When a put starts and that checkpoint exists,
//! the writer reuses the upload: ListParts tells which parts the server holds, and each part the
//! writer is about to send is skipped when the server lists its number with the same size and an
//! ETag equal to the MD5 computed locally (or, for servers whose ListParts carries no ETag, equal
//! to the one the checkpoint recorded along with the same MD5). The checkpoint is refreshed at
//! most once per second while parts complete, and at [`S3Writer::wait_parts`] /
//! [`S3Writer::suspend`]; it is removed after Complete or Abort.

use super::config::{DropPolicy, MAX_OBJECT_SIZE, MAX_PARTS, part_size_of};
use super::core::{RemotePart, S3Core, normalize_etag};
use super::sign::sha256_hex;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinSet;
use tracing::Instrument;
use virtrigaud_core::io::ByteSink;
use virtrigaud_core::{Error, ErrorKind, Result};

/// Suffix of checkpoint objects: `<key>.upload.json`.
pub const CHECKPOINT_SUFFIX: &str = ".upload.json";

/// Schema version of the checkpoints this library writes and resumes: 2, part sizes from the
/// schedule of [`part_size_of`] starting at [`Checkpoint::part_size`]. (Version 1 had one
/// fixed part size; such an upload is not resumed but started over.)
pub const CHECKPOINT_VERSION: u32 = 2;

/// How often the checkpoint is refreshed while parts complete.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// A part the checkpoint knows to be stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPart {
    /// Part number (1-based).
    pub number: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hex MD5 of the part's bytes, computed locally.
    pub md5: String,
    /// ETag the server answered.
    pub etag: String,
}

/// The checkpoint object of a multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Schema version ([`CHECKPOINT_VERSION`]).
    pub version: u32,
    /// Full object key (prefix included).
    pub key: String,
    /// Upload id.
    pub upload_id: String,
    /// Size of the first part of the upload; part `n` has
    /// [`part_size_of(n, part_size)`](super::config::part_size_of) bytes.
    pub part_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Parts known to be stored (may lag behind the server; ListParts is the authority).
    #[serde(default)]
    pub parts: Vec<CheckpointPart>,
}

/// What the server already holds for a part, as far as resume can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KnownPart {
    size: u64,
    /// ETag listed by the server.
    remote_etag: Option<String>,
    /// (md5, etag) recorded by the checkpoint.
    recorded: Option<(String, String)>,
}

impl KnownPart {
    /// The ETag to use for this part when its bytes have `md5` and `size`, or `None` when it
    /// must be uploaded again.
    pub(crate) fn reusable_etag(&self, size: u64, md5: &str) -> Option<String> {
        if self.size != size {
            return None;
        }
        match (&self.remote_etag, &self.recorded) {
            (Some(r), _) if r == md5 => Some(r.clone()),
            (Some(r), Some((m, e))) if r == e && m == md5 => Some(r.clone()),
            (None, Some((m, e))) if m == md5 => Some(e.clone()),
            _ => None,
        }
    }

    /// Whether the stored part is known to hold other bytes than `size` bytes of MD5 `md5`:
    /// another size, the checkpoint's MD5 for it, or a listed ETag that is a plain MD5 (32 hex
    /// digits) and another one. A part the server lists without anything to compare (no ETag
    /// in ListParts, not yet in the checkpoint) is not known to differ.
    pub(crate) fn differs(&self, size: u64, md5: &str) -> bool {
        if self.size != size {
            return true;
        }
        match (&self.remote_etag, &self.recorded) {
            (Some(r), Some((m, e))) if r == e => m != md5,
            (None, Some((m, _))) => m != md5,
            (Some(r), _) => r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit()) && r != md5,
            (None, None) => false,
        }
    }
}

/// Merges ListParts with the checkpoint's records: only parts the server lists count.
pub(crate) fn known_parts(remote: &[RemotePart], cp: &Checkpoint) -> HashMap<u32, KnownPart> {
    let recorded: HashMap<u32, &CheckpointPart> = cp.parts.iter().map(|p| (p.number, p)).collect();
    remote
        .iter()
        .map(|r| {
            let rec = recorded
                .get(&r.number)
                .filter(|c| c.size == r.size)
                .map(|c| (c.md5.to_ascii_lowercase(), normalize_etag(&c.etag)));
            (
                r.number,
                KnownPart {
                    size: r.size,
                    remote_etag: r.etag.clone(),
                    recorded: rec,
                },
            )
        })
        .collect()
}

/// A resumable upload found at put time.
#[derive(Debug)]
pub(crate) struct Resume {
    pub checkpoint: Checkpoint,
    pub known: HashMap<u32, KnownPart>,
    /// [`PutOptions::resume_must_match`](virtrigaud_core::storage::PutOptions): a stored part
    /// known to differ fails the put instead of being replaced.
    pub must_match: bool,
}

/// A finished part.
#[derive(Debug, Clone)]
struct PartDone {
    number: u32,
    size: u64,
    md5: String,
    etag: String,
    skipped: bool,
}

/// Counters of one put.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Parts sent to the server by this writer.
    pub parts_uploaded: u32,
    /// Parts found already stored (resume) and not sent.
    pub parts_skipped: u32,
    /// Bytes written to the writer.
    pub bytes_written: u64,
}

#[derive(Debug)]
struct Upload {
    upload_id: Arc<str>,
    created_unix: u64,
}

/// The streaming, resumable multipart writer of [`S3Backend`](super::S3Backend).
#[derive(Debug)]
pub struct S3Writer {
    core: Arc<S3Core>,
    /// Full object key.
    key: String,
    checkpoint_key: String,
    /// Size of the first part (the schedule gives the others).
    part_size: u64,
    concurrency: usize,
    memory_budget: u64,
    content_type: Option<String>,
    if_none_match: bool,
    drop_policy: DropPolicy,
    buf: BytesMut,
    next_part: u32,
    upload: Option<Upload>,
    resume: Option<Resume>,
    inflight: JoinSet<Result<PartDone>>,
    done: BTreeMap<u32, PartDone>,
    checkpoint_dirty: bool,
    last_checkpoint: Instant,
    stats: WriterStats,
    finished: bool,
}

pub(crate) struct WriterParams {
    pub key: String,
    pub part_size: u64,
    pub concurrency: usize,
    pub memory_budget: u64,
    pub content_type: Option<String>,
    pub if_none_match: bool,
    pub drop_policy: DropPolicy,
    pub resume: Option<Resume>,
}

/// Parts of `part_size` bytes that may be in flight at once: `configured`, lowered so that they
/// stay within `budget` bytes, and at least one.
pub(crate) fn parts_in_flight(configured: usize, budget: u64, part_size: u64) -> usize {
    let fit = (budget / part_size.max(1)).max(1);
    configured
        .max(1)
        .min(usize::try_from(fit).unwrap_or(usize::MAX))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl S3Writer {
    pub(crate) fn new(core: Arc<S3Core>, p: WriterParams) -> S3Writer {
        S3Writer {
            checkpoint_key: format!("{}{CHECKPOINT_SUFFIX}", p.key),
            core,
            key: p.key,
            part_size: p.part_size,
            concurrency: p.concurrency.max(1),
            memory_budget: p.memory_budget,
            content_type: p.content_type,
            if_none_match: p.if_none_match,
            drop_policy: p.drop_policy,
            buf: BytesMut::new(),
            next_part: 1,
            upload: None,
            resume: p.resume,
            inflight: JoinSet::new(),
            done: BTreeMap::new(),
            checkpoint_dirty: false,
            last_checkpoint: Instant::now(),
            stats: WriterStats::default(),
            finished: false,
        }
    }

    /// The size of the first part of this put.
    pub fn part_size(&self) -> u64 {
        self.part_size
    }

    /// The size of part `number` (1-based) of this put.
    pub fn part_size_of(&self, number: u32) -> u64 {
        part_size_of(number, self.part_size)
    }

    /// Parts of the size of part `number` that may be in flight at once: the configured
    /// concurrency, lowered so that they stay within the memory budget (at least one).
    pub fn concurrency_for(&self, number: u32) -> usize {
        parts_in_flight(
            self.concurrency,
            self.memory_budget,
            self.part_size_of(number),
        )
    }

    /// The multipart upload id, once the upload exists (or when resuming one).
    pub fn upload_id(&self) -> Option<&str> {
        self.upload.as_ref().map(|u| &*u.upload_id).or_else(|| {
            self.resume
                .as_ref()
                .map(|r| r.checkpoint.upload_id.as_str())
        })
    }

    /// Whether this put continues an upload found through its checkpoint.
    pub fn is_resuming(&self) -> bool {
        self.resume.is_some()
    }

    /// Changes what dropping this writer without `commit`/`abort` does (the backend's
    /// [`S3Config::drop_policy`](super::S3Config::drop_policy) by default).
    pub fn set_drop_policy(&mut self, policy: DropPolicy) {
        self.drop_policy = policy;
    }

    /// Counters so far.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Waits for every part in flight and records them in the checkpoint.
    pub async fn wait_parts(&mut self) -> Result<()> {
        while let Some(r) = self.inflight.join_next().await {
            self.record(r)?;
        }
        if self.upload.is_some() {
            self.write_checkpoint().await?;
        }
        Ok(())
    }

    /// Stops here and keeps the upload and its checkpoint so that a later put of the same key
    /// and the same bytes resumes it (parts in flight are finished first; the bytes gathered
    /// for the next part are dropped and will be sent by the resuming put).
    pub async fn suspend(mut self) -> Result<()> {
        let r = self.wait_parts().await;
        self.finished = true;
        r
    }

    fn record(
        &mut self,
        r: std::result::Result<Result<PartDone>, tokio::task::JoinError>,
    ) -> Result<()> {
        let part = r.map_err(|e| {
            Error::new(ErrorKind::Storage, format!("S3 part task failed: {e}"))
                .with_target(format!("s3://{}/{}", self.core.bucket, self.key))
        })??;
        if part.skipped {
            self.stats.parts_skipped += 1;
        } else {
            self.stats.parts_uploaded += 1;
            self.checkpoint_dirty = true;
        }
        self.done.insert(part.number, part);
        Ok(())
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        let up = self.upload.as_ref()?;
        Some(Checkpoint {
            version: CHECKPOINT_VERSION,
            key: self.key.clone(),
            upload_id: up.upload_id.to_string(),
            part_size: self.part_size,
            created_unix: up.created_unix,
            parts: self
                .done
                .values()
                .map(|p| CheckpointPart {
                    number: p.number,
                    size: p.size,
                    md5: p.md5.clone(),
                    etag: p.etag.clone(),
                })
                .collect(),
        })
    }

    async fn write_checkpoint(&mut self) -> Result<()> {
        let Some(cp) = self.checkpoint() else {
            return Ok(());
        };
        let json = serde_json::to_vec(&cp).map_err(|e| {
            Error::new(ErrorKind::Storage, format!("cannot encode checkpoint: {e}"))
        })?;
        self.core
            .put_object(
                &self.checkpoint_key,
                Bytes::from(json),
                Some("application/json"),
                false,
            )
            .await?;
        self.checkpoint_dirty = false;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Collects finished parts without waiting, and refreshes the checkpoint now and then.
    async fn reap(&mut self) -> Result<()> {
        while let Some(r) = self.inflight.try_join_next() {
            self.record(r)?;
        }
        if self.checkpoint_dirty
            && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
            && let Err(e) = self.write_checkpoint().await
        {
            // A refresh only saves work on resume (ListParts stays the authority): keep going.
            tracing::warn!(key = %self.key, error = %e, "cannot refresh the S3 upload checkpoint");
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    /// Makes sure the multipart upload exists (created, or taken over from the checkpoint).
    async fn ensure_upload(&mut self) -> Result<Arc<str>> {
        if let Some(u) = &self.upload {
            return Ok(u.upload_id.clone());
        }
        let up = match &self.resume {
            Some(r) => {
                tracing::info!(key = %self.key, upload_id = %r.checkpoint.upload_id, known_parts = r.known.len(), "resuming S3 multipart upload");
                Upload {
                    upload_id: Arc::from(r.checkpoint.upload_id.as_str()),
                    created_unix: r.checkpoint.created_unix,
                }
            }
            None => {
                let id = self
                    .core
                    .create_multipart_upload(&self.key, self.content_type.as_deref())
                    .await?;
                tracing::debug!(key = %self.key, upload_id = %id, part_size = self.part_size, "created S3 multipart upload");
                Upload {
                    upload_id: Arc::from(id.as_str()),
                    created_unix: now_unix(),
                }
            }
        };
        let id = up.upload_id.clone();
        self.upload = Some(up);
        if self.resume.is_none() {
            self.write_checkpoint().await?;
        }
        Ok(id)
    }

    /// Hands one full (or the last) part to a task.
    async fn send_part(&mut self, data: Bytes) -> Result<()> {
        let number = self.next_part;
        if u64::from(number) > MAX_PARTS {
            return Err(Error::invalid(format!(
                "object exceeds S3's 10,000 parts ({} bytes written)",
                self.stats.bytes_written
            ))
            .with_target(format!("s3://{}/{}", self.core.bucket, self.key)));
        }
        let upload_id = self.ensure_upload().await?;
        let concurrency = self.concurrency_for(number);
        while self.inflight.len() >= concurrency {
            if let Some(r) = self.inflight.join_next().await {
                self.record(r)?;
            }
        }
        self.next_part += 1;
        let known = self
            .resume
            .as_ref()
            .and_then(|r| r.known.get(&number).cloned());
        let must_match = self.resume.as_ref().is_some_and(|r| r.must_match);
        let target = self.key.clone();
        let core = self.core.clone();
        let key = self.key.clone();
        let size = data.len() as u64;
        let span = tracing::info_span!("s3.part", key = %key, part = number, size);
        self.inflight.spawn(
            async move {
                let d = data.clone();
                let (md5, sha) = tokio::task::spawn_blocking(move || {
                    (hex::encode(Md5::digest(&d)), sha256_hex(&d))
                })
                .await
                .map_err(|e| Error::new(ErrorKind::Storage, format!("hashing task failed: {e}")))?;
                if must_match && known.as_ref().is_some_and(|k| k.differs(size, &md5)) {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "part {number} of the upload being resumed holds other bytes than \
                             this put sends (the source changed since the interrupted upload)"
                        ),
                    )
                    .with_target(target));
                }
                if let Some(etag) = known.and_then(|k| k.reusable_etag(size, &md5)) {
                    tracing::debug!("part already stored, not sent again");
                    return Ok(PartDone {
                        number,
                        size,
                        md5,
                        etag,
                        skipped: true,
                    });
                }
                let etag = core
                    .upload_part(&key, &upload_id, number, data, sha)
                    .await?;
                tracing::debug!(%etag, "part uploaded");
                Ok(PartDone {
                    number,
                    size,
                    md5,
                    etag,
                    skipped: false,
                })
            }
            .instrument(span),
        );
        self.reap().await
    }

    /// Aborts the upload (ours or the resumed one) and removes the checkpoint.
    async fn abort_remote(&mut self) -> Result<()> {
        self.inflight.abort_all();
        while self.inflight.join_next().await.is_some() {}
        let id = self.upload_id().map(str::to_string);
        if let Some(id) = id {
            self.core.abort_multipart_upload(&self.key, &id).await?;
            self.core.delete_object(&self.checkpoint_key).await?;
        }
        Ok(())
    }

    async fn commit_inner(&mut self) -> Result<()> {
        if self.upload.is_none() && self.next_part == 1 {
            // Everything fits in one part: a single PutObject.
            let data = std::mem::take(&mut self.buf).freeze();
            self.core
                .put_object(
                    &self.key,
                    data,
                    self.content_type.as_deref(),
                    self.if_none_match,
                )
                .await?;
            if let Some(r) = self.resume.take() {
                // An earlier, larger attempt left an upload: it is not needed any more.
                self.core
                    .abort_multipart_upload(&self.key, &r.checkpoint.upload_id)
                    .await?;
                self.core.delete_object(&self.checkpoint_key).await?;
            }
            return Ok(());
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf).freeze();
            self.send_part(last).await?;
        }
        while let Some(r) = self.inflight.join_next().await {
            self.record(r)?;
        }
        let upload_id = match &self.upload {
            Some(u) => u.upload_id.clone(),
            None => {
                return Err(Error::new(
                    ErrorKind::Storage,
                    "no multipart upload to complete",
                ));
            }
        };
        let parts: Vec<(u32, String)> = (1..self.next_part)
            .map(|n| {
                self.done
                    .get(&n)
                    .map(|p| (n, p.etag.clone()))
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Storage, format!("part {n} is missing at commit"))
                    })
            })
            .collect::<Result<_>>()?;
        let total: u64 = self.done.values().map(|p| p.size).sum();
        let span = tracing::info_span!("s3.complete", key = %self.key, parts = parts.len(), total);
        let res = self
            .core
            .complete_multipart_upload(&self.key, &upload_id, &parts, self.if_none_match)
            .instrument(span)
            .await;
        if let Err(e) = res {
            // A Complete whose answer was lost and that was retried finds no upload any more;
            // the object is there if the first attempt went through.
            if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Permission)
                || !self.completed_object_is_there(total, &parts).await
            {
                return Err(e);
            }
        }
        self.core.delete_object(&self.checkpoint_key).await?;
        Ok(())
    }

    /// Whether the object exists with `total` bytes and the multipart ETag of `parts`.
    async fn completed_object_is_there(&self, total: u64, parts: &[(u32, String)]) -> bool {
        let Ok(Some((size, Some(etag)))) = self.core.head_object(&self.key).await else {
            return false;
        };
        let mut h = Md5::new();
        for (_, e) in parts {
            match hex::decode(e) {
                Ok(b) => h.update(b),
                Err(_) => return false,
            }
        }
        let expected = format!("{}-{}", hex::encode(h.finalize()), parts.len());
        size == total && etag == expected
    }
}

#[async_trait]
impl ByteSink for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.stats.bytes_written += data.len() as u64;
        if self.stats.bytes_written > MAX_OBJECT_SIZE {
            return Err(Error::invalid(format!(
                "object of more than {} bytes exceeds S3's 5 TiB limit",
                self.stats.bytes_written
            ))
            .with_target(format!("s3://{}/{}", self.core.bucket, self.key)));
        }
        let mut data = data;
        while !data.is_empty() {
            // Fill the current part; a full part is sent only once more bytes arrive, so that
            // an object of exactly one part goes up as one PutObject.
            let ps = usize::try_from(self.part_size_of(self.next_part)).unwrap_or(usize::MAX);
            if self.buf.len() >= ps {
                let part = std::mem::take(&mut self.buf).freeze();
                self.send_part(part).await?;
                continue;
            }
            let room = ps - self.buf.len();
            let take = room.min(data.len());
            if self.buf.is_empty() && take == ps {
                self.buf = BytesMut::from(data.split_to(take));
            } else {
                if self.buf.capacity() == 0 {
                    // One allocation per part: growing by doubling could reach twice its size.
                    self.buf.reserve(ps);
                }
                self.buf.extend_from_slice(&data.split_to(take));
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let r = self.commit_inner().await;
        self.finished = r.is_ok();
        r
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        let r = self.abort_remote().await;
        self.finished = true;
        r
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.inflight.abort_all();
        let Some(id) = self.upload_id().map(str::to_string) else {
            return;
        };
        match self.drop_policy {
            DropPolicy::KeepForResume => {
                tracing::info!(key = %self.key, upload_id = %id, "S3 writer dropped: upload kept for resume");
            }
            DropPolicy::Abort => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    tracing::warn!(key = %self.key, upload_id = %id, "S3 writer dropped outside a runtime: upload left behind");
                    return;
                };
                let core = self.core.clone();
                let key = self.key.clone();
                let cp = self.checkpoint_key.clone();
                let mut tasks = std::mem::take(&mut self.inflight);
                rt.spawn(async move {
                    while tasks.join_next().await.is_some() {}
                    let r = match core.abort_multipart_upload(&key, &id).await {
                        Ok(()) => core.delete_object(&cp).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        tracing::warn!(%key, upload_id = %id, error = %e, "aborting a dropped S3 upload failed");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(parts: Vec<CheckpointPart>) -> Checkpoint {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            key: "k".into(),
            upload_id: "u".into(),
            part_size: 5 << 20,
            created_unix: 0,
            parts,
        }
    }

    #[test]
    fn parts_are_reused_only_when_size_and_digest_match() {
        let md5 = "0123456789abcdef0123456789abcdef";
        let other = "ffffffffffffffffffffffffffffffff";
        let remote = vec![
            RemotePart {
                number: 1,
                size: 10,
                etag: Some(md5.into()),
            },
            RemotePart {
                number: 2,
                size: 10,
                etag: None,
            },
            RemotePart {
                number: 3,
                size: 10,
                etag: Some("kms-etag".into()),
            },
            RemotePart {
                number: 4,
                size: 10,
                etag: None,
            },
        ];
        let c = cp(vec![
            CheckpointPart {
                number: 2,
                size: 10,
                md5: md5.into(),
                etag: "\"E2\"".into(),
            },
            CheckpointPart {
                number: 3,
                size: 10,
                md5: md5.into(),
                etag: "kms-etag".into(),
            },
            CheckpointPart {
                number: 5,
                size: 10,
                md5: md5.into(),
                etag: "e5".into(),
            },
        ]);
        let k = known_parts(&remote, &c);
        // ETag listed by the server equals the local MD5
        assert_eq!(k[&1].reusable_etag(10, md5), Some(md5.to_string()));
        assert_eq!(k[&1].reusable_etag(11, md5), None, "size differs");
        assert_eq!(k[&1].reusable_etag(10, other), None, "content differs");
        // no ETag listed: the checkpoint's record decides
        assert_eq!(k[&2].reusable_etag(10, md5), Some("e2".to_string()));
        assert_eq!(k[&2].reusable_etag(10, other), None);
        // non-MD5 ETag (e.g. SSE-KMS) recorded with our MD5
        assert_eq!(k[&3].reusable_etag(10, md5), Some("kms-etag".to_string()));
        // listed, but nothing proves its content
        assert_eq!(k[&4].reusable_etag(10, md5), None);
        // recorded, but the server does not list it
        assert!(!k.contains_key(&5));
    }

    #[test]
    fn parts_in_flight_stay_within_the_memory_budget_as_parts_grow() {
        use super::super::config::{DEFAULT_PART_SIZE, MAX_PARTS};
        let budget = 96 << 20;
        let mut last = usize::MAX;
        for n in 1..=MAX_PARTS as u32 {
            let size = part_size_of(n, DEFAULT_PART_SIZE);
            let k = parts_in_flight(4, budget, size);
            assert!((1..=4).contains(&k), "part {n}");
            // Within the budget whenever one part fits in it; one at a time otherwise.
            assert!(
                k as u64 * size <= budget || k == 1,
                "part {n}: {k} x {size}"
            );
            assert!(k <= last, "concurrency only goes down as parts grow");
            last = k;
        }
        assert_eq!(parts_in_flight(4, budget, 8 << 20), 4);
        assert_eq!(parts_in_flight(4, budget, 32 << 20), 3);
        assert_eq!(parts_in_flight(4, budget, 64 << 20), 1);
        assert_eq!(parts_in_flight(4, budget, 1536 << 20), 1);
        assert_eq!(parts_in_flight(0, budget, 8 << 20), 1);
    }

    #[test]
    fn checkpoint_round_trips_as_json() {
        let c = cp(vec![CheckpointPart {
            number: 1,
            size: 5,
            md5: "a".into(),
            etag: "b".into(),
        }]);
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&s).unwrap(), c);
        let old: Checkpoint = serde_json::from_str(
            r#"{"version":1,"key":"k","upload_id":"u","part_size":5242880,"created_unix":1}"#,
        )
        .unwrap();
        assert!(old.parts.is_empty());
    }
}

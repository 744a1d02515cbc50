//! The requests: HEAD, ranged GET, DELETE, MKCOL, MOVE and PROPFIND (`Depth: 1`) over one
//! reqwest (rustls) client, each retried with `backon` when the failure is retryable; the
//! streamed PUT lives in [`writer`](super::writer).

use super::config::{RetryConfig, WebdavConfig};
use super::error::{from_status, from_transport};
use crate::idle::idle_stream;
use bytes::Bytes;
use futures::StreamExt;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use std::ops::Range;
use std::time::{Duration, SystemTime};
use virtrigaud_core::io::ByteStream;
use virtrigaud_core::{Error, ErrorKind, ObjectMeta, Result};

/// Characters escaped in a path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The suffix of temporary objects (a put in progress); see [`virtrigaud_core::temp`].
pub const TEMP_SUFFIX: &str = virtrigaud_core::temp::TEMP_SUFFIX;

/// Longest body of an error answer we read.
const MAX_ERROR_BODY: usize = 4096;

/// Largest PROPFIND answer accepted for one collection.
const MAX_PROPFIND_BODY: usize = 64 << 20;

const PROPFIND_BODY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/></D:prop></D:propfind>"#;

/// Whether the last segment of `key` is a temporary object of a put in progress.
pub fn is_temp_key(key: &str) -> bool {
    virtrigaud_core::temp::is_temp_name(key.rsplit('/').next().unwrap_or(key))
}

/// A temporary key next to `key`: `<dir>/.<name>.<unique>.vrg-tmp`.
pub(crate) fn temp_key(key: &str) -> String {
    match key.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{}", virtrigaud_core::temp::temp_name(name)),
        None => virtrigaud_core::temp::temp_name(key),
    }
}

/// One entry of a PROPFIND answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DavEntry {
    /// Decoded absolute path of the resource.
    pub path: String,
    /// A collection (directory).
    pub collection: bool,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<SystemTime>,
}

/// What a HEAD found.
#[derive(Debug)]
pub(crate) enum Head {
    /// An object.
    Object(ObjectMeta),
    /// Nothing (404, 410).
    Missing,
    /// A redirect: for a WebDAV server, a collection named without its trailing `/`.
    Redirect,
}

/// Shared state of the requests: client, base URL, authorization header, retry policy.
pub(crate) struct DavCore {
    client: reqwest::Client,
    /// The client of streamed PUTs and GETs (no read timeout, see [`DavCore::new`]).
    stream_client: reqwest::Client,
    /// Longest silence allowed (reads; chunks accepted by a PUT; a PUT's final answer).
    pub(crate) idle_timeout: Duration,
    /// Base URL, ending with `/`.
    base: String,
    /// Decoded path of the base URL, ending with `/`.
    base_path: String,
    auth: Option<HeaderValue>,
    retry: RetryConfig,
    pub(crate) create_parents: bool,
    pub(crate) queue_depth: usize,
}

impl std::fmt::Debug for DavCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DavCore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl DavCore {
    /// Builds the client. `follow_redirects` is for the plain HTTP source only: the WebDAV
    /// client never follows a redirect with credentials.
    pub(crate) fn new(cfg: &WebdavConfig, follow_redirects: bool) -> Result<DavCore> {
        cfg.validate()?;
        let policy = if follow_redirects {
            reqwest::redirect::Policy::limited(5)
        } else {
            reqwest::redirect::Policy::none()
        };
        let builder = || {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(!cfg.tls_verify)
                .connect_timeout(cfg.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
        };
        let client = builder()
            .read_timeout(cfg.idle_timeout)
            .redirect(policy)
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the HTTP client: {e}")))?;
        // Streams (PUT bodies, GET bodies) need their idle bound counted only while *we* wait
        // for the network: the server is silent while a PUT body flows, for as long as the
        // caller takes to produce it, and reqwest's read timeout also fires when a GET consumer
        // merely pauses longer than it. The writer and `idle_stream` bound waits themselves.
        let stream_client = builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the HTTP client: {e}")))?;
        let auth = match (&cfg.user, &cfg.password, &cfg.bearer_token) {
            (Some(u), p, _) => {
                use base64_lite::encode;
                let raw = format!("{u}:{}", p.as_ref().map(|p| p.expose()).unwrap_or(""));
                Some(format!("Basic {}", encode(raw.as_bytes())))
            }
            (None, _, Some(t)) => Some(format!("Bearer {}", t.expose())),
            _ => None,
        };
        let auth = match auth {
            Some(a) => {
                let mut v = HeaderValue::from_str(&a)
                    .map_err(|_| Error::invalid("credentials contain invalid characters"))?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let u = url::Url::parse(&cfg.url)
            .map_err(|e| Error::invalid(format!("invalid base URL: {e}")))?;
        let base_path = percent_encoding::percent_decode_str(u.path())
            .decode_utf8_lossy()
            .into_owned();
        Ok(DavCore {
            client,
            stream_client,
            idle_timeout: cfg.idle_timeout,
            base: u.to_string(),
            base_path,
            auth,
            retry: cfg.retry,
            create_parents: cfg.create_parents,
            queue_depth: cfg.queue_depth,
        })
    }

    /// The base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// The URL of `key` (a valid key, or a directory ending with `/`).
    pub(crate) fn url(&self, key: &str) -> String {
        let mut s = self.base.clone();
        let mut first = true;
        for seg in key.split('/') {
            if !first {
                s.push('/');
            }
            first = false;
            s.extend(utf8_percent_encode(seg, SEGMENT));
        }
        s
    }

    /// A request with the authorization header.
    pub(crate) fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, url);
        if let Some(a) = &self.auth {
            r = r.header(header::AUTHORIZATION, a.clone());
        }
        r
    }

    /// A request of a streamed body (PUT, GET) with the authorization header, on the client
    /// without read timeout.
    pub(crate) fn stream_request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut r = self.stream_client.request(method, url);
        if let Some(a) = &self.auth {
            r = r.header(header::AUTHORIZATION, a.clone());
        }
        r
    }

    /// Runs `f` with the configured retry policy ([`RetryConfig::run`]).
    pub(crate) async fn retry<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.retry.run("HTTP", op, f).await
    }

    /// Sends a request once; the response of any status.
    async fn send_once(
        &self,
        op: &str,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        req.send().await.map_err(|e| from_transport(op, url, e))
    }

    /// The error of a failure answer (reads a bounded part of the body).
    pub(crate) async fn error_of(op: &str, url: &str, resp: reqwest::Response) -> Error {
        let status = resp.status();
        let mut body = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(Ok(c)) = s.next().await {
            body.extend_from_slice(&c[..c.len().min(MAX_ERROR_BODY - body.len())]);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        from_status(op, url, status, &body)
    }

    /// HEAD: the object's metadata, `None` if absent (404) or not an object (a redirect, as
    /// nginx answers for a collection without its trailing `/`).
    pub(crate) async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(match self.head_outcome(key).await? {
            Head::Object(m) => Some(m),
            Head::Missing | Head::Redirect => None,
        })
    }

    /// HEAD, telling a redirect (a collection, for WebDAV servers) from a missing resource.
    pub(crate) async fn head_outcome(&self, key: &str) -> Result<Head> {
        let url = self.url(key);
        self.retry("head", || async {
            let resp = self
                .send_once("head", &url, self.request(Method::HEAD, &url))
                .await?;
            let st = resp.status();
            if st == StatusCode::NOT_FOUND || st == StatusCode::GONE {
                return Ok(Head::Missing);
            }
            if st.is_redirection() {
                return Ok(Head::Redirect);
            }
            if !st.is_success() {
                return Err(from_status("head", &url, st, b""));
            }
            let size = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!("HEAD {url} gave no Content-Length: cannot tell the size"),
                    )
                    .with_operation("http.head")
                })?;
            Ok(Head::Object(ObjectMeta {
                key: key.to_string(),
                size,
                etag: header_str(resp.headers(), header::ETAG).map(normalize_etag),
                last_modified: header_str(resp.headers(), header::LAST_MODIFIED)
                    .and_then(|v| httpdate::parse_http_date(v).ok()),
            }))
        })
        .await
    }

    /// Opens a GET stream of `key` (or a range of it). Opening is retried; a stream that
    /// breaks later is not (the caller re-reads the range). A server that ignores `Range`
    /// (200) is handled by skipping and cutting the stream.
    pub(crate) async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let url = self.url(key);
        if let Some(r) = &range {
            if r.start > r.end {
                return Err(
                    Error::invalid(format!("invalid range {}..{}", r.start, r.end))
                        .with_target(url),
                );
            }
            if r.start == r.end {
                let meta = self.head(key).await?.ok_or_else(|| not_found(&url))?;
                if r.start > meta.size {
                    return Err(range_outside(r, meta.size).with_target(url));
                }
                return Ok(futures::stream::empty().boxed());
            }
        }
        let resp = self
            .retry("get", || async {
                let mut req = self.stream_request(Method::GET, &url);
                if let Some(r) = &range {
                    req = req.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
                }
                let resp = self.send_once("get", &url, req).await?;
                let st = resp.status();
                if st.is_success() {
                    return Ok(Some(resp));
                }
                if st == StatusCode::RANGE_NOT_SATISFIABLE {
                    return Ok(None);
                }
                if st.is_redirection() {
                    return Err(not_found(&url));
                }
                Err(Self::error_of("get", &url, resp).await)
            })
            .await?;
        let Some(resp) = resp else {
            // 416: a range at or past the end.
            let meta = self.head(key).await?.ok_or_else(|| not_found(&url))?;
            let r = range.unwrap_or(0..0);
            if r.start == meta.size {
                return Ok(futures::stream::empty().boxed());
            }
            return Err(range_outside(&r, meta.size).with_target(url));
        };
        let (skip, take) = match (&range, resp.status()) {
            (Some(r), StatusCode::PARTIAL_CONTENT) => (0, r.end - r.start),
            (Some(r), _) => (r.start, r.end - r.start),
            (None, _) => (0, u64::MAX),
        };
        let target = url.clone();
        let body = resp
            .bytes_stream()
            .map(move |c| c.map_err(|e| from_transport("get", &target, e)));
        Ok(skip_take(
            idle_stream(body.boxed(), self.idle_timeout, "http.get", url),
            skip,
            take,
        ))
    }

    /// DELETE; an absent object counts as deleted.
    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        let url = self.url(key);
        self.retry("delete", || async {
            let resp = self
                .send_once("delete", &url, self.request(Method::DELETE, &url))
                .await?;
            let st = resp.status();
            if st.is_success() || st == StatusCode::NOT_FOUND || st == StatusCode::GONE {
                return Ok(());
            }
            Err(Self::error_of("delete", &url, resp).await)
        })
        .await
    }

    /// MKCOL of `dir` (ending with `/`): `true` if created or already there, `false` if its
    /// parent is missing (409).
    async fn mkcol(&self, dir: &str) -> Result<bool> {
        let url = self.url(dir);
        let method = Method::from_bytes(b"MKCOL").map_err(|e| Error::invalid(e.to_string()))?;
        self.retry("mkcol", || async {
            let resp = self
                .send_once("mkcol", &url, self.request(method.clone(), &url))
                .await?;
            match resp.status() {
                s if s.is_success() => Ok(true),
                // exists already (RFC 4918 §9.3.1)
                StatusCode::METHOD_NOT_ALLOWED => Ok(true),
                StatusCode::CONFLICT => Ok(false),
                _ => Err(Self::error_of("mkcol", &url, resp).await),
            }
        })
        .await
    }

    /// Creates the collections that hold `key`: one MKCOL of the parent when it exists or
    /// its own parent does, else one per level from the top.
    pub(crate) async fn ensure_parents(&self, key: &str) -> Result<()> {
        let dirs: Vec<String> = key
            .match_indices('/')
            .map(|(i, _)| key[..=i].to_string())
            .collect();
        let Some(last) = dirs.last() else {
            return Ok(());
        };
        if self.mkcol(last).await? {
            return Ok(());
        }
        for d in &dirs {
            if !self.mkcol(d).await? {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("cannot create collection {}", self.url(d)),
                )
                .with_operation("http.mkcol"));
            }
        }
        Ok(())
    }

    /// MOVE `from` over `to`. `overwrite: false` sends `Overwrite: F` (412 →
    /// `AlreadyExists`). Returns `Ok(false)` if the source is gone (404), which on a retry
    /// means an earlier attempt moved it.
    pub(crate) async fn move_object(&self, from: &str, to: &str, overwrite: bool) -> Result<bool> {
        let src = self.url(from);
        let dst = self.url(to);
        let method = Method::from_bytes(b"MOVE").map_err(|e| Error::invalid(e.to_string()))?;
        self.retry("move", || async {
            let req = self
                .request(method.clone(), &src)
                .header("Destination", dst.as_str())
                .header("Overwrite", if overwrite { "T" } else { "F" });
            let resp = self.send_once("move", &src, req).await?;
            match resp.status() {
                s if s.is_success() => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(Self::error_of("move", &dst, resp).await),
            }
        })
        .await
    }

    /// PROPFIND `Depth: 1` of the collection `dir` (empty or ending with `/`); an absent
    /// collection lists nothing.
    pub(crate) async fn propfind(&self, dir: &str) -> Result<Vec<DavEntry>> {
        let url = if dir.is_empty() {
            self.base.clone()
        } else {
            self.url(dir)
        };
        let method = Method::from_bytes(b"PROPFIND").map_err(|e| Error::invalid(e.to_string()))?;
        let body = self
            .retry("propfind", || async {
                let req = self
                    .request(method.clone(), &url)
                    .header("Depth", "1")
                    .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
                    .body(PROPFIND_BODY);
                let resp = self.send_once("propfind", &url, req).await?;
                match resp.status() {
                    StatusCode::MULTI_STATUS | StatusCode::OK => {}
                    StatusCode::NOT_FOUND => return Ok(None),
                    _ => return Err(Self::error_of("propfind", &url, resp).await),
                }
                let mut body = Vec::new();
                let mut s = resp.bytes_stream();
                while let Some(c) = s.next().await {
                    let c = c.map_err(|e| from_transport("propfind", &url, e))?;
                    if body.len() + c.len() > MAX_PROPFIND_BODY {
                        return Err(Error::new(
                            ErrorKind::Storage,
                            format!(
                                "PROPFIND answer of {url} is larger than {MAX_PROPFIND_BODY} bytes"
                            ),
                        ));
                    }
                    body.extend_from_slice(&c);
                }
                Ok(Some(body))
            })
            .await?;
        match body {
            None => Ok(Vec::new()),
            Some(b) => parse_multistatus(&b).map_err(|e| e.with_target(url)),
        }
    }

    /// The key of an absolute decoded path below the base, `None` if outside it.
    pub(crate) fn key_of(&self, path: &str) -> Option<String> {
        path.strip_prefix(&self.base_path).map(str::to_string)
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Strips quotes and the weak marker from an ETag.
pub(crate) fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

pub(crate) fn not_found(url: &str) -> Error {
    Error::not_found(format!("no object {url}")).with_target(url.to_string())
}

fn range_outside(r: &Range<u64>, size: u64) -> Error {
    Error::invalid(format!(
        "range {}..{} outside object of {size} bytes",
        r.start, r.end
    ))
}

/// Skips `skip` bytes of a stream and ends it after `take` more.
fn skip_take(s: ByteStream, skip: u64, take: u64) -> ByteStream {
    futures::stream::unfold((s, skip, take), |(mut s, mut skip, mut take)| async move {
        loop {
            if take == 0 {
                return None;
            }
            match s.next().await? {
                Err(e) => return Some((Err(e), (s, 0, 0))),
                Ok(mut b) => {
                    if skip > 0 {
                        let n = skip.min(b.len() as u64);
                        skip -= n;
                        b = b.slice(n as usize..);
                    }
                    if b.is_empty() {
                        continue;
                    }
                    if b.len() as u64 > take {
                        b = b.slice(..take as usize);
                    }
                    take -= b.len() as u64;
                    return Some((Ok::<Bytes, Error>(b), (s, skip, take)));
                }
            }
        }
    })
    .boxed()
}

/// Parses a `DAV:multistatus` document into entries (namespace prefixes ignored).
pub(crate) fn parse_multistatus(xml: &[u8]) -> Result<Vec<DavEntry>> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_reader(xml);
    let mut out = Vec::new();
    let mut cur: Option<DavEntry> = None;
    #[derive(Clone, Copy)]
    enum Field {
        Href,
        Len,
        Etag,
        Mtime,
    }
    let mut field: Option<Field> = None;
    let mut text = String::new();
    let mut buf = Vec::new();
    let bad = |e: &dyn std::fmt::Display| Error::corrupt(format!("invalid PROPFIND answer: {e}"));
    loop {
        let ev = r.read_event_into(&mut buf).map_err(|e| bad(&e))?;
        match ev {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.local_name();
                match name.as_ref() {
                    "response" => cur = Some(DavEntry::default()),
                    "collection" => {
                        if let Some(c) = cur.as_mut() {
                            c.collection = true;
                        }
                    }
                    "href" => field = Some(Field::Href),
                    "getcontentlength" => field = Some(Field::Len),
                    "getetag" => field = Some(Field::Etag),
                    "getlastmodified" => field = Some(Field::Mtime),
                    _ => {}
                }
            }
            Event::Text(t) if field.is_some() => text.push_str(&t.into_inner()),
            Event::GeneralRef(r) if field.is_some() => {
                if let Some(ch) = r.resolve_char_ref().map_err(|e| bad(&e))? {
                    text.push(ch);
                } else {
                    let name = r.into_inner();
                    let v = quick_xml::escape::resolve_predefined_entity(&name)
                        .ok_or_else(|| bad(&format!("unknown entity &{name};")))?;
                    text.push_str(v);
                }
            }
            Event::End(e) => {
                if let (Some(f), Some(c)) = (field.take(), cur.as_mut()) {
                    let t = text.trim();
                    match f {
                        Field::Href => c.path.push_str(t),
                        Field::Len => c.size = t.parse().unwrap_or(0),
                        Field::Etag => c.etag = Some(normalize_etag(t)),
                        Field::Mtime => c.last_modified = httpdate::parse_http_date(t).ok(),
                    }
                }
                text.clear();
                if e.local_name().as_ref() == "response"
                    && let Some(mut c) = cur.take()
                {
                    c.path = href_path(&c.path);
                    out.push(c);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(out)
}

/// The decoded absolute path of an href (absolute URL or absolute path).
fn href_path(href: &str) -> String {
    let path = match href.split_once("://") {
        Some((_, rest)) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => href,
    };
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// Base64 for the basic authorization header (a few lines; no extra dependency).
mod base64_lite {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64_lite::encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn temp_keys_are_hidden_siblings() {
        let t = temp_key("vm/disk.qcow2");
        assert!(t.starts_with("vm/.disk.qcow2."), "{t}");
        assert!(is_temp_key(&t));
        assert!(is_temp_key(&temp_key("top")));
        assert!(!is_temp_key("vm/disk.qcow2"));
        assert_ne!(temp_key("a"), temp_key("a"));
    }

    #[test]
    fn urls_escape_segments() {
        let c = DavCore::new(&WebdavConfig::new("http://h:1/dav"), false).unwrap();
        assert_eq!(c.url("a b/c#d%"), "http://h:1/dav/a%20b/c%23d%25");
        assert_eq!(c.url("dir/"), "http://h:1/dav/dir/");
        assert_eq!(c.key_of("/dav/x/y"), Some("x/y".to_string()));
        assert_eq!(c.key_of("/other"), None);
    }

    #[test]
    fn multistatus_parses_with_any_prefix() {
        let xml = br#"<?xml version="1.0" encoding="utf-8" ?>
<D:multistatus xmlns:D="DAV:">
<D:response><D:href>/dav/p/</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
<D:response><D:href>http://h/dav/p/a%20b.bin</D:href><D:propstat><D:prop><D:resourcetype/><D:getcontentlength>42</D:getcontentlength><D:getetag>"abc"</D:getetag><D:getlastmodified>Sun, 06 Nov 1994 08:49:37 GMT</D:getlastmodified></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
</D:multistatus>"#;
        let e = parse_multistatus(xml).unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0].collection);
        assert_eq!(e[0].path, "/dav/p/");
        assert_eq!(e[1].path, "/dav/p/a b.bin");
        assert_eq!(e[1].size, 42);
        assert_eq!(e[1].etag.as_deref(), Some("abc"));
        assert!(e[1].last_modified.is_some());
        let xml = br#"<multistatus xmlns="DAV:"><response><href>/x</href><propstat><prop><getcontentlength>7</getcontentlength></prop></propstat></response></multistatus>"#;
        assert_eq!(parse_multistatus(xml).unwrap()[0].size, 7);
        let xml = br#"<multistatus xmlns="DAV:"><response><href>/d/a&amp;b&#x20;c</href></response></multistatus>"#;
        assert_eq!(parse_multistatus(xml).unwrap()[0].path, "/d/a&b c");
        assert!(parse_multistatus(b"<a><b></a>").is_err());
    }

    #[tokio::test]
    async fn skip_take_cuts_streams() {
        let s: ByteStream = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"hello")),
            Ok(Bytes::from_static(b"world")),
        ])
        .boxed();
        let out: Vec<Bytes> = skip_take(s, 3, 4)
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
            .await;
        assert_eq!(out.concat(), b"lowo");
    }
}

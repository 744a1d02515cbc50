//! Mapping S3 answers (HTTP status + S3 error code) and transport failures to
//! [`ErrorKind`].
//!
//! | answer | kind | retried |
//! |---|---|---|
//! | 403 `InvalidAccessKeyId`, `NotSignedUp`, `SignatureDoesNotMatch`, `ExpiredToken`, `InvalidToken`, …; 401 | `Auth` | no |
//! | 403 `AccessDenied` and other 403 | `Permission` | no |
//! | 404 `NoSuchKey`, `NoSuchBucket`, `NoSuchUpload` | `NotFound` | no |
//! | 409 | `Conflict` | no |
//! | 412 (`If-None-Match: *` lost) | `AlreadyExists` | no |
//! | 416 | `InvalidInput` | no |
//! | 501 `NotImplemented` | `Unsupported` | no |
//! | 429, 500, 502, 503 (`SlowDown`), 504, 400 `RequestTimeout`, other 5xx | `Storage` | yes |
//! | other 4xx | `Storage` | no |
//! | connection refused/reset, body cut short | `Network` | yes |
//! | timeout | `Timeout` | yes |
//!
//! Messages name the operation, bucket and key, the status and the S3 code and message — never
//! a credential.

use serde::Deserialize;
use virtrigaud_core::error::{is_certificate_refusal, source_chain};
use virtrigaud_core::{Error, ErrorKind};

/// S3 codes that mean "these credentials are wrong", as opposed to "not allowed".
const AUTH_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    // s3s's answer to an unknown access key
    "NotSignedUp",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "MissingSecurityHeader",
    "RequestTimeTooSkewed",
];

/// The `<Error>` document of an S3 answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename = "Error")]
pub(crate) struct S3ErrorBody {
    #[serde(rename = "Code", default)]
    pub code: String,
    #[serde(rename = "Message", default)]
    pub message: String,
}

/// Parses an `<Error>` document; `None` when the body is not one.
pub(crate) fn parse_error_body(body: &[u8]) -> Option<S3ErrorBody> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if !text.contains("<Error") {
        return None;
    }
    quick_xml::de::from_str::<S3ErrorBody>(text).ok()
}

/// The kind and retryability of an S3 error answer.
pub(crate) fn classify(status: u16, code: &str) -> (ErrorKind, bool) {
    match (status, code) {
        (_, c) if AUTH_CODES.contains(&c) => (ErrorKind::Auth, false),
        (401, _) => (ErrorKind::Auth, false),
        (403, _) => (ErrorKind::Permission, false),
        (404, _) => (ErrorKind::NotFound, false),
        (409, "OperationAborted") => (ErrorKind::Storage, true),
        (409, _) => (ErrorKind::Conflict, false),
        (412, _) => (ErrorKind::AlreadyExists, false),
        (416, _) | (_, "InvalidRange") => (ErrorKind::InvalidInput, false),
        (501, _) | (_, "NotImplemented") => (ErrorKind::Unsupported, false),
        (400, "RequestTimeout") | (_, "SlowDown") | (_, "InternalError") => {
            (ErrorKind::Storage, true)
        }
        (429, _) | (500..=599, _) => (ErrorKind::Storage, true),
        _ => (ErrorKind::Storage, false),
    }
}

/// An error for an S3 answer with a failure status (or a 200 carrying an `<Error>`).
pub(crate) fn from_response(
    op: &str,
    bucket: &str,
    key: Option<&str>,
    status: u16,
    body: &[u8],
) -> Error {
    let parsed = parse_error_body(body);
    let (code, msg) = match &parsed {
        Some(b) => (b.code.as_str(), b.message.as_str()),
        None => ("", ""),
    };
    let (kind, retryable) = classify(status, code);
    let target = target(bucket, key);
    let mut text = format!("S3 {op} on {target} failed: HTTP {status}");
    if !code.is_empty() {
        text.push(' ');
        text.push_str(code);
    }
    if !msg.is_empty() {
        text.push_str(": ");
        // S3 messages are short; keep a bound on what a hostile server can make us print.
        text.extend(msg.chars().take(300));
    }
    match kind {
        ErrorKind::Auth => text.push_str(" (check the access key id and secret access key)"),
        ErrorKind::NotFound if code == "NoSuchBucket" => text.push_str(" (no such bucket)"),
        _ => {}
    }
    Error::new(kind, text)
        .with_retryable(retryable)
        .with_operation(format!("s3.{op}"))
        .with_target(target)
}

/// Appended to the message of an error whose TLS certificate was refused.
const TLS_HINT: &str = " (TLS certificate refused: verification is on; trust the server's CA, \
                        or turn tls_verify off explicitly)";

/// An error for a failed exchange (no HTTP answer, or a body cut short).
pub(crate) fn from_transport(
    op: &str,
    bucket: &str,
    key: Option<&str>,
    e: reqwest::Error,
) -> Error {
    let target = target(bucket, key);
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_builder() {
        ErrorKind::InvalidInput
    } else {
        ErrorKind::Network
    };
    // reqwest's Display prints the URL; ours carry no credentials (they are in headers), but
    // strip the query anyway so that presigned or signed parameters never reach a log.
    let e = e.without_url();
    let chain = source_chain(&e);
    // A refused certificate stays refused: not worth a retry.
    let tls = is_certificate_refusal(&e);
    let mut msg = format!("S3 {op} on {target}: {chain}");
    if tls {
        msg.push_str(TLS_HINT);
    }
    Error::new(kind, msg)
        .with_retryable(kind != ErrorKind::InvalidInput && !tls)
        .with_operation(format!("s3.{op}"))
        .with_target(target)
}

/// An error for an opendal failure (get, stat, list, delete, presign).
pub(crate) fn from_opendal(op: &str, bucket: &str, key: Option<&str>, e: opendal::Error) -> Error {
    use opendal::ErrorKind as K;
    let target = target(bucket, key);
    let text = e.to_string();
    let auth = AUTH_CODES.iter().any(|c| text.contains(c));
    let chain = source_chain(&e).to_ascii_lowercase();
    // A refused certificate stays refused: not worth a retry.
    let tls = is_certificate_refusal(&e);
    let transport = chain.contains("error sending request")
        || chain.contains("connection refused")
        || chain.contains("connection reset")
        || chain.contains("timed out");
    let (kind, retryable) = match e.kind() {
        _ if auth => (ErrorKind::Auth, false),
        _ if tls => (ErrorKind::Network, false),
        _ if transport => (ErrorKind::Network, true),
        K::NotFound => (ErrorKind::NotFound, false),
        K::PermissionDenied => (ErrorKind::Permission, false),
        K::AlreadyExists | K::ConditionNotMatch => (ErrorKind::AlreadyExists, false),
        K::RateLimited => (ErrorKind::Storage, true),
        K::RangeNotSatisfied => (ErrorKind::InvalidInput, false),
        K::Unsupported => (ErrorKind::Unsupported, false),
        K::ConfigInvalid => (ErrorKind::InvalidInput, false),
        _ => (ErrorKind::Storage, e.is_temporary()),
    };
    let mut msg = format!("S3 {op} on {target} failed: {}", e.kind());
    if kind == ErrorKind::Auth {
        msg.push_str(" (check the access key id and secret access key)");
    }
    if tls {
        msg.push_str(TLS_HINT);
    }
    Error::new(kind, msg)
        .with_retryable(retryable)
        .with_operation(format!("s3.{op}"))
        .with_target(target)
        .with_source(e)
}

/// Maps an I/O error that wraps an opendal error (from a GET stream).
pub(crate) fn from_stream_io(bucket: &str, key: &str, e: std::io::Error) -> Error {
    if !e
        .get_ref()
        .is_some_and(|inner| inner.is::<opendal::Error>())
    {
        return Error::io(e, "S3 get stream failed")
            .with_operation("s3.get")
            .with_target(target(bucket, Some(key)));
    }
    match e.into_inner().map(|b| b.downcast::<opendal::Error>()) {
        Some(Ok(oe)) => from_opendal("get", bucket, Some(key), *oe),
        _ => Error::new(ErrorKind::Network, "S3 get stream failed")
            .with_operation("s3.get")
            .with_target(target(bucket, Some(key))),
    }
}

/// `s3://bucket/key` for messages.
pub(crate) fn target(bucket: &str, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("s3://{bucket}/{k}"),
        None => format!("s3://{bucket}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_map_to_kinds() {
        let e = from_response(
            "put_object",
            "b",
            Some("k"),
            403,
            b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>nope</Message></Error>",
        );
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("s3://b/k"), "{e}");
        let e = from_response(
            "get",
            "b",
            Some("k"),
            403,
            b"<Error><Code>AccessDenied</Code></Error>",
        );
        assert_eq!(e.kind(), ErrorKind::Permission);
        let e = from_response(
            "get",
            "b",
            Some("k"),
            404,
            b"<Error><Code>NoSuchBucket</Code></Error>",
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("no such bucket"), "{e}");
        for (status, body) in [
            (503, &b"<Error><Code>SlowDown</Code></Error>"[..]),
            (500, b""),
            (429, b""),
            (400, b"<Error><Code>RequestTimeout</Code></Error>"),
            (200, b"<Error><Code>InternalError</Code></Error>"),
        ] {
            let e = from_response("upload_part", "b", Some("k"), status, body);
            assert_eq!(e.kind(), ErrorKind::Storage, "{status}");
            assert!(e.is_retryable(), "{status}");
        }
        let e = from_response("list_multipart_uploads", "b", None, 501, b"");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = from_response("put_object", "b", Some("k"), 412, b"");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let e = from_response(
            "complete",
            "b",
            Some("k"),
            400,
            b"<Error><Code>InvalidPart</Code></Error>",
        );
        assert!(!e.is_retryable());
    }

    #[test]
    fn hostile_messages_are_bounded() {
        let long = format!(
            "<Error><Code>X</Code><Message>{}</Message></Error>",
            "a".repeat(100_000)
        );
        let e = from_response("get", "b", Some("k"), 400, long.as_bytes());
        assert!(e.to_string().len() < 1000);
    }
}

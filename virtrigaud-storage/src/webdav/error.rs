//! Mapping HTTP answers and transport failures to [`ErrorKind`].
//!
//! | answer | kind | retried |
//! |---|---|---|
//! | 401 | `Auth` | no |
//! | 403 | `Permission` | no |
//! | 404, 410 | `NotFound` | no |
//! | 405, 501 | `Unsupported` (the server does not allow this method here) | no |
//! | 409 | `Conflict` (e.g. a missing parent collection) | no |
//! | 412 | `AlreadyExists` (`Overwrite: F` on MOVE) | no |
//! | 416 | `InvalidInput` | no |
//! | 408, 429, 500, 502, 503, 504, other 5xx except 501/507 | `Storage` | yes |
//! | 507, 413, other 4xx, 3xx (redirects are not followed by the WebDAV client) | `Storage` | no |
//! | connection refused/reset, body cut short | `Network` | yes |
//! | TLS certificate refused | `Network` | no |
//! | timeout | `Timeout` | yes |
//!
//! Messages name the operation, the URL (credentials never are part of it: they travel in a
//! header) and the status — never a credential, and at most 200 characters of the body.

use reqwest::StatusCode;
use virtrigaud_core::error::{is_certificate_refusal, source_chain};
use virtrigaud_core::{Error, ErrorKind};

/// The kind and retryability of an HTTP failure status.
pub(crate) fn classify(status: StatusCode) -> (ErrorKind, bool) {
    match status.as_u16() {
        401 => (ErrorKind::Auth, false),
        403 => (ErrorKind::Permission, false),
        404 | 410 => (ErrorKind::NotFound, false),
        405 | 501 => (ErrorKind::Unsupported, false),
        409 => (ErrorKind::Conflict, false),
        412 => (ErrorKind::AlreadyExists, false),
        416 => (ErrorKind::InvalidInput, false),
        408 | 429 => (ErrorKind::Storage, true),
        507 => (ErrorKind::Storage, false),
        500..=599 => (ErrorKind::Storage, true),
        _ => (ErrorKind::Storage, false),
    }
}

/// An error for an HTTP answer with a failure status.
pub(crate) fn from_status(op: &str, target: &str, status: StatusCode, body: &[u8]) -> Error {
    let (kind, retryable) = classify(status);
    let mut text = format!("HTTP {op} on {target} failed: {status}");
    let snippet: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let snippet = snippet.trim();
    if !snippet.is_empty() && !snippet.starts_with('<') {
        text.push_str(": ");
        text.push_str(snippet);
    }
    match kind {
        ErrorKind::Auth => text.push_str(" (check the user and password or the token)"),
        ErrorKind::Unsupported => {
            text.push_str(" (the server does not allow this method here)");
        }
        _ => {}
    }
    Error::new(kind, text)
        .with_retryable(retryable)
        .with_operation(format!("http.{op}"))
        .with_target(target.to_string())
}

/// An error for a failed exchange (no HTTP answer, or a body cut short).
pub(crate) fn from_transport(op: &str, target: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_builder() {
        ErrorKind::InvalidInput
    } else {
        ErrorKind::Network
    };
    let e = e.without_url();
    let chain = source_chain(&e);
    // A certificate the client refuses stays refused: not worth a retry.
    let tls = is_certificate_refusal(&e);
    let retryable = kind != ErrorKind::InvalidInput && !tls;
    let mut msg = format!("HTTP {op} on {target}: {chain}");
    if tls {
        msg.push_str(
            " (TLS verification failed; turn `tls_verify` off only for a server you trust)",
        );
    }
    Error::new(kind, msg)
        .with_retryable(retryable)
        .with_operation(format!("http.{op}"))
        .with_target(target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let k = |s: u16| classify(StatusCode::from_u16(s).unwrap());
        assert_eq!(k(401), (ErrorKind::Auth, false));
        assert_eq!(k(403), (ErrorKind::Permission, false));
        assert_eq!(k(404), (ErrorKind::NotFound, false));
        assert_eq!(k(412), (ErrorKind::AlreadyExists, false));
        assert_eq!(k(405).0, ErrorKind::Unsupported);
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(k(s), (ErrorKind::Storage, true), "{s}");
        }
        assert_eq!(k(507), (ErrorKind::Storage, false));
        assert_eq!(k(301), (ErrorKind::Storage, false));
    }

    #[test]
    fn messages_are_bounded_and_name_the_target() {
        let body = "x".repeat(100_000);
        let e = from_status(
            "put",
            "http://h/dav/k",
            StatusCode::INSUFFICIENT_STORAGE,
            body.as_bytes(),
        );
        let s = e.to_string();
        assert!(s.len() < 600, "{s}");
        assert!(s.contains("http://h/dav/k"), "{s}");
        let e = from_status("put", "t", StatusCode::UNAUTHORIZED, b"<html>");
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(!e.is_retryable());
    }
}

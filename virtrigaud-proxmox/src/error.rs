//! PVE's HTTP and API errors mapped to [`ErrorKind`].
//!
//! PVE answers every error with an HTTP status and a message (in the body's `message` and the
//! status line), plus per-parameter `errors` on 400. Missing VMs and locked VMs come back as
//! 500 with PVE's own wording, so those are recognised by their text:
//!
//! | answer | kind |
//! |---|---|
//! | 401 | `Auth` |
//! | 403 (`Permission check failed (/vms/100, VM.PowerMgmt)`) | `Auth`, with the path and privilege |
//! | 400 (parameter verification) | `InvalidInput`, with each parameter's complaint |
//! | `… does not exist`, `no such VM …` | `NotFound` |
//! | `… is locked …`, `can't lock file …` | `Conflict` |
//! | `… already exists …` | `AlreadyExists` |
//! | 501 | `Unsupported` |
//! | 502, 503, 504, 595, 596 (proxy could not reach a node) | `Network`, retryable |
//! | other | `Provider` |

use virtrigaud_core::error::{is_certificate_refusal, source_chain};
use virtrigaud_core::{Error, ErrorKind};

/// The error for an HTTP `status` with PVE's `message` and per-parameter `errors`.
pub(crate) fn from_status(
    status: u16,
    message: &str,
    errors: Option<&serde_json::Value>,
    op: &str,
) -> Error {
    let message = message.trim();
    let mut text = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {message}")
    };
    if let Some(serde_json::Value::Object(m)) = errors {
        let parts: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or(&v.to_string()).trim()))
            .collect();
        if !parts.is_empty() {
            text.push_str(&format!(" ({})", parts.join("; ")));
        }
    }
    let kind = match status {
        401 => ErrorKind::Auth,
        403 => ErrorKind::Auth,
        400 => ErrorKind::InvalidInput,
        501 => ErrorKind::Unsupported,
        502..=504 | 595 | 596 => ErrorKind::Network,
        _ => kind_of_message(message).unwrap_or(ErrorKind::Provider),
    };
    let retryable = matches!(status, 502..=504 | 595 | 596);
    Error::new(kind, text)
        .with_retryable(retryable)
        .with_operation(op.to_string())
}

/// The kind PVE's wording implies, for answers whose status does not tell (500, task errors).
pub(crate) fn kind_of_message(message: &str) -> Option<ErrorKind> {
    let m = message.to_ascii_lowercase();
    if m.contains("does not exist") || m.contains("no such vm") || m.contains("not found") {
        Some(ErrorKind::NotFound)
    } else if m.contains("is locked") || m.contains("can't lock file") || m.contains("got timeout")
    {
        Some(ErrorKind::Conflict)
    } else if m.contains("already exists") {
        Some(ErrorKind::AlreadyExists)
    } else if m.contains("permission check failed") {
        Some(ErrorKind::Auth)
    } else {
        None
    }
}

/// A transport error from reqwest.
pub(crate) fn transport(e: reqwest::Error, op: &str) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_decode() {
        ErrorKind::Corrupt
    } else {
        ErrorKind::Network
    };
    // reqwest's Display carries the URL, which holds no secret here (auth is in headers).
    let mut msg = source_chain(&e);
    // A refused certificate stays refused: not worth a retry.
    let tls = is_certificate_refusal(&e);
    if tls {
        msg.push_str(
            " (TLS certificate refused: trust the node's CA, or pin its certificate by its \
             SHA-256 fingerprint)",
        );
    }
    Error::new(kind, msg)
        .with_retryable(!tls && (kind == ErrorKind::Network || kind == ErrorKind::Timeout))
        .with_operation(op.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_wording_map_to_kinds() {
        let k = |s, m: &str| from_status(s, m, None, "t").kind();
        assert_eq!(k(401, "authentication failure"), ErrorKind::Auth);
        let e = from_status(
            403,
            "Permission check failed (/vms/100, VM.PowerMgmt)",
            None,
            "t",
        );
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(e.to_string().contains("VM.PowerMgmt"), "{e}");
        assert_eq!(
            k(
                500,
                "Configuration file 'nodes/pve1/qemu-server/9.conf' does not exist"
            ),
            ErrorKind::NotFound
        );
        assert_eq!(k(500, "VM is locked (backup)"), ErrorKind::Conflict);
        assert_eq!(
            k(500, "unable to create VM 5 - VM 5 already exists"),
            ErrorKind::AlreadyExists
        );
        assert_eq!(k(500, "something else"), ErrorKind::Provider);
        assert_eq!(k(501, "Method not implemented"), ErrorKind::Unsupported);
        assert!(from_status(596, "", None, "t").is_retryable());
        let errs = serde_json::json!({"vmid": "invalid format"});
        let e = from_status(400, "Parameter verification failed.", Some(&errs), "t");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("vmid: invalid format"), "{e}");
    }
}

//! The one public error type of virtrigaud.
//!
//! Every fallible operation returns [`Error`]. Callers branch on [`Error::kind`] and ask
//! [`Error::is_retryable`] before retrying; the [`ErrorContext`] says which operation, object,
//! VM, disk and offset the error is about. Secrets never appear in messages or context.

use std::fmt;

/// Result alias used across virtrigaud.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The VM, disk, object, pool or snapshot does not exist.
    NotFound,
    /// The target already exists and overwriting was not requested.
    AlreadyExists,
    /// Authentication failed (wrong or expired credentials).
    Auth,
    /// Authenticated, but not allowed.
    Permission,
    /// The caller passed something invalid (bad URL, key escaping its root, bad option).
    InvalidInput,
    /// The operation or format is not supported by this implementation or peer.
    Unsupported,
    /// Data did not match its expected digest.
    ChecksumMismatch,
    /// A disk image or manifest is malformed.
    Corrupt,
    /// The remote state conflicts with the request (e.g. VM in the wrong power state).
    Conflict,
    /// The operation did not finish in time.
    Timeout,
    /// The operation was cancelled by its token.
    Cancelled,
    /// A transport failure (connection refused or reset, DNS, TLS handshake).
    Network,
    /// The hypervisor reported a failure.
    Provider,
    /// The storage service reported a failure.
    Storage,
    /// A local I/O failure.
    Io,
}

impl ErrorKind {
    /// Whether errors of this kind are worth retrying by default.
    pub fn default_retryable(self) -> bool {
        matches!(self, ErrorKind::Network | ErrorKind::Timeout)
    }

    /// Lower-case name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Permission => "permission denied",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ChecksumMismatch => "checksum mismatch",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Network => "network error",
            ErrorKind::Provider => "provider error",
            ErrorKind::Storage => "storage error",
            ErrorKind::Io => "i/o error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an error happened. All fields are optional; set what is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    /// The operation, e.g. `"export_disk"`, `"put"`, `"qcow2.decode"`.
    pub operation: Option<String>,
    /// Object key, URL (without credentials) or file path.
    pub target: Option<String>,
    /// VM name or id.
    pub vm: Option<String>,
    /// Disk id.
    pub disk: Option<String>,
    /// Byte offset in the disk or object.
    pub offset: Option<u64>,
}

impl ErrorContext {
    fn is_empty(&self) -> bool {
        self.operation.is_none()
            && self.target.is_none()
            && self.vm.is_none()
            && self.disk.is_none()
            && self.offset.is_none()
    }
}

impl fmt::Display for ErrorContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        let mut field = |f: &mut fmt::Formatter<'_>, name: &str, v: &dyn fmt::Display| {
            let r = write!(f, "{sep}{name}={v}");
            sep = ", ";
            r
        };
        if let Some(v) = &self.operation {
            field(f, "op", v)?;
        }
        if let Some(v) = &self.target {
            field(f, "target", v)?;
        }
        if let Some(v) = &self.vm {
            field(f, "vm", v)?;
        }
        if let Some(v) = &self.disk {
            field(f, "disk", v)?;
        }
        if let Some(v) = &self.offset {
            field(f, "offset", v)?;
        }
        Ok(())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of every virtrigaud operation.
#[derive(thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: Option<bool>,
    context: Box<ErrorContext>,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: None,
            context: Box::default(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Shorthand for [`ErrorKind::Cancelled`].
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "operation cancelled")
    }

    /// Wraps an I/O error, mapping its kind (not found, permission, already exists, …).
    pub fn io(err: std::io::Error, message: impl Into<String>) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::Permission,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::InvalidInput => ErrorKind::InvalidInput,
            K::TimedOut => ErrorKind::Timeout,
            K::UnexpectedEof | K::InvalidData => ErrorKind::Corrupt,
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected => ErrorKind::Network,
            _ => ErrorKind::Io,
        };
        Error::new(kind, message).with_source(err)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying the same request may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
            .unwrap_or_else(|| self.kind.default_retryable())
    }

    /// Where the error happened.
    pub fn context(&self) -> &ErrorContext {
        &self.context
    }

    /// Overrides whether the error is retryable (e.g. HTTP 503 from storage).
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = Some(retryable);
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the operation, unless one is set already.
    pub fn with_operation(mut self, op: impl Into<String>) -> Self {
        if self.context.operation.is_none() {
            self.context.operation = Some(op.into());
        }
        self
    }
    /// Sets the object key, URL or path, unless one is set already.
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        if self.context.target.is_none() {
            self.context.target = Some(target.into());
        }
        self
    }
    /// Sets the VM, unless one is set already.
    pub fn with_vm(mut self, vm: impl Into<String>) -> Self {
        if self.context.vm.is_none() {
            self.context.vm = Some(vm.into());
        }
        self
    }
    /// Sets the disk, unless one is set already.
    pub fn with_disk(mut self, disk: impl Into<String>) -> Self {
        if self.context.disk.is_none() {
            self.context.disk = Some(disk.into());
        }
        self
    }
    /// Sets the byte offset, unless one is set already.
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.context.offset.is_none() {
            self.context.offset = Some(offset);
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if !self.context.is_empty() {
            write!(f, " ({})", self.context)?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        let msg = err.to_string();
        Error::io(err, msg)
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::corrupt(format!("invalid JSON: {err}"))
    }
}

/// Adds context to `Result`s.
pub trait ResultExt<T> {
    /// Sets the operation on the error.
    fn op(self, op: &str) -> Result<T>;
    /// Sets the target (key/URL/path) on the error.
    fn target(self, target: &str) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|e| e.with_operation(op))
    }
    fn target(self, target: &str) -> Result<T> {
        self.map_err(|e| e.with_target(target))
    }
}

/// The text of `e` followed by the text of each of its sources, `outer: inner: innermost`, a
/// source whose text is already there left out.
///
/// For the errors of client libraries (reqwest, opendal, rustls), whose `Display` shows only the
/// outermost layer ("error sending request") while the cause ("invalid peer certificate") sits
/// below it. Every provider and backend renders such chains with this one function.
///
/// ```
/// use virtrigaud_core::error::source_chain;
///
/// #[derive(Debug)]
/// struct Sending(std::io::Error);
/// impl std::fmt::Display for Sending {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("error sending request")
///     }
/// }
/// impl std::error::Error for Sending {
///     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
///         Some(&self.0)
///     }
/// }
///
/// let e = Sending(std::io::Error::other("connection reset by peer"));
/// assert_eq!(source_chain(&e), "error sending request: connection reset by peer");
/// ```
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Whether a failed exchange's causes (the [`source_chain`] below `e`'s own text) say the
/// server's TLS certificate was refused: untrusted, expired, for another name, or not the
/// pinned one. `e`'s own text is not searched: a client library puts the URL there, and a
/// path may say anything.
///
/// Such a failure fails again on every retry, so the error built from it is not retryable.
pub fn is_certificate_refusal(e: &dyn std::error::Error) -> bool {
    e.source()
        .is_some_and(|c| source_chain(c).to_ascii_lowercase().contains("certificate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error layer with a text and an optional cause, like a client library's.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn source_chains_name_every_layer_once() {
        let e = Layer(
            "error sending request for url (https://h/)",
            Some(Box::new(Layer(
                "client error (Connect)",
                Some(Box::new(Layer(
                    "client error (Connect)",
                    Some(Box::new(Layer(
                        "invalid peer certificate: UnknownIssuer",
                        None,
                    ))),
                ))),
            ))),
        );
        let chain = source_chain(&e);
        assert_eq!(
            chain,
            "error sending request for url (https://h/): client error (Connect): \
             invalid peer certificate: UnknownIssuer"
        );
        assert!(is_certificate_refusal(&e));
        assert!(!is_certificate_refusal(&Layer(
            "error sending request",
            Some(Box::new(Layer("connection refused", None)))
        )));
        // The outermost text (where the URL goes) is not searched.
        assert!(!is_certificate_refusal(&Layer(
            "error sending request for url (https://h/folder/certificate-vm/disk.vmdk)",
            Some(Box::new(Layer("connection reset by peer", None)))
        )));
        assert_eq!(source_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn display_has_kind_message_and_context() {
        let e = Error::corrupt("bad L1")
            .with_operation("qcow2.open")
            .with_target("disk.qcow2")
            .with_offset(42);
        let s = e.to_string();
        assert!(s.contains("corrupt data: bad L1"), "{s}");
        assert!(s.contains("op=qcow2.open"), "{s}");
        assert!(s.contains("offset=42"), "{s}");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(!e.is_retryable());
    }

    #[test]
    fn io_errors_map_kinds_and_retryability() {
        let e = Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(e.kind(), ErrorKind::Network);
        assert!(e.is_retryable());
        let e = Error::new(ErrorKind::Storage, "503").with_retryable(true);
        assert!(e.is_retryable());
    }

    #[test]
    fn context_is_set_once() {
        let e = Error::invalid("x").with_vm("a").with_vm("b");
        assert_eq!(e.context().vm.as_deref(), Some("a"));
    }
}

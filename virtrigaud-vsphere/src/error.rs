//! Mapping of SOAP faults, task errors, HTTP statuses and transport failures to
//! [`virtrigaud_core::Error`]. Messages never contain credentials: request bodies are never
//! quoted, and URLs carry no secrets (the session travels in a cookie header).

use crate::xml::Node;
use reqwest::StatusCode;
use virtrigaud_core::error::{is_certificate_refusal, source_chain};
use virtrigaud_core::{Error, ErrorKind};

/// The kind of a vSphere fault type (`InvalidLogin`, `ManagedObjectNotFound`, …).
pub fn fault_kind(fault: &str) -> ErrorKind {
    let f = fault.strip_suffix("Fault").unwrap_or(fault);
    match f {
        "InvalidLogin" | "NotAuthenticated" | "InvalidCertificate" | "PasswordExpired" => {
            ErrorKind::Auth
        }
        "NoPermission" | "NoHost" | "RestrictedVersion" => ErrorKind::Permission,
        "ManagedObjectNotFound"
        | "NotFound"
        | "FileNotFound"
        | "InvalidDatastorePath"
        | "InvalidDatastore"
        | "NoDiskFound" => ErrorKind::NotFound,
        "DuplicateName" | "FileAlreadyExists" | "AlreadyExists" => ErrorKind::AlreadyExists,
        "InvalidPowerState"
        | "InvalidState"
        | "InvalidHostState"
        | "TaskInProgress"
        | "ConcurrentAccess"
        | "ResourceInUse"
        | "FileLocked"
        | "InsufficientResourcesFault"
        | "SnapshotFault"
        | "ToolsUnavailable" => ErrorKind::Conflict,
        "InvalidArgument" | "InvalidRequest" | "InvalidName" | "InvalidType"
        | "InvalidProperty" | "InvalidDeviceSpec" | "InvalidController" | "InvalidDiskFormat" => {
            ErrorKind::InvalidInput
        }
        "NotSupported"
        | "NotImplemented"
        | "MethodNotFound"
        | "DeviceUnsupportedForVmVersion"
        | "VmConfigIncompatibleForFaultTolerance" => ErrorKind::Unsupported,
        "RequestCanceled" => ErrorKind::Cancelled,
        "Timedout" => ErrorKind::Timeout,
        "HostCommunication" | "HostNotConnected" | "HostNotReachable" => ErrorKind::Network,
        _ => ErrorKind::Provider,
    }
}

/// The fault type named in a fault detail node (`<detail><XFault xsi:type="X">`) or in a
/// `LocalizedMethodFault`'s `fault` child.
pub fn fault_type(detail: &Node) -> Option<String> {
    if let Some(t) = &detail.xsi_type {
        return Some(t.clone());
    }
    let first = detail.children.first()?;
    first.xsi_type.clone().or_else(|| {
        Some(
            first
                .name
                .strip_suffix("Fault")
                .unwrap_or(&first.name)
                .to_string(),
        )
    })
}

/// The error of a SOAP `Fault` element.
pub fn from_soap_fault(method: &str, fault: &Node) -> Error {
    let msg = fault.text_at(&["faultstring"]).unwrap_or("").to_string();
    let ty = fault
        .child("detail")
        .and_then(fault_type)
        .unwrap_or_else(|| "unknown".into());
    let kind = fault_kind(&ty);
    let text = if msg.is_empty() {
        format!("{method} failed: {ty}")
    } else {
        format!("{method} failed: {ty}: {msg}")
    };
    Error::new(kind, text).with_operation(method.to_string())
}

/// The error of a task's `info.error` (a `LocalizedMethodFault`).
pub fn from_task_error(task: &str, err: &Node) -> Error {
    let ty = err
        .child("fault")
        .and_then(|f| f.xsi_type.clone())
        .unwrap_or_else(|| "unknown".into());
    let msg = err.text_at(&["localizedMessage"]).unwrap_or("");
    let kind = fault_kind(&ty);
    Error::new(kind, format!("task {task} failed: {ty}: {msg}")).with_operation(task.to_string())
}

/// The error of a non-success HTTP status on a data path (`/folder`, NFC).
pub fn from_status(op: &str, target: &str, status: StatusCode) -> Error {
    let (kind, retry) = match status.as_u16() {
        401 => (ErrorKind::Auth, false),
        403 => (ErrorKind::Permission, false),
        404 => (ErrorKind::NotFound, false),
        409 | 412 => (ErrorKind::Conflict, false),
        400 | 405 | 411 | 413 | 414 | 416 => (ErrorKind::InvalidInput, false),
        // ESXi throttles /folder sessions with 503.
        429 | 502 | 503 | 504 => (ErrorKind::Network, true),
        500..=599 => (ErrorKind::Provider, true),
        _ => (ErrorKind::Provider, false),
    };
    Error::new(kind, format!("{op}: HTTP {status}"))
        .with_retryable(retry)
        .with_operation(op.to_string())
        .with_target(target.to_string())
}

/// The error of a transport failure (connection, TLS, timeout).
pub fn from_transport(op: &str, target: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Network
    };
    // reqwest's Display includes the URL: ours carry no credentials.
    let chain = source_chain(&e);
    // A refused certificate stays refused: not worth a retry.
    let tls = is_certificate_refusal(&e);
    let mut msg = format!("{op}: {chain}");
    if tls {
        msg.push_str(
            " (TLS certificate refused: a self-signed host is trusted only when pinned by its \
             SHA-256 thumbprint)",
        );
    }
    Error::new(kind, msg)
        .with_retryable(!tls)
        .with_operation(op.to_string())
        .with_target(target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_to_kinds() {
        assert_eq!(fault_kind("InvalidLogin"), ErrorKind::Auth);
        assert_eq!(fault_kind("InvalidLoginFault"), ErrorKind::Auth);
        assert_eq!(fault_kind("ManagedObjectNotFound"), ErrorKind::NotFound);
        assert_eq!(fault_kind("InvalidPowerState"), ErrorKind::Conflict);
        assert_eq!(fault_kind("InvalidArgument"), ErrorKind::InvalidInput);
        assert_eq!(fault_kind("MethodNotFound"), ErrorKind::Unsupported);
        assert_eq!(fault_kind("DuplicateName"), ErrorKind::AlreadyExists);
        assert_eq!(fault_kind("SomethingNew"), ErrorKind::Provider);
    }

    #[test]
    fn soap_fault_detail_is_read() {
        let x = br#"<Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></Fault>"#;
        let n = crate::xml::parse(x).unwrap();
        let e = from_soap_fault("Login", &n);
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(e.message().contains("Login failure"));
    }
}

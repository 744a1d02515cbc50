//! virtrigaud provider for Proxmox VE (REST API subset).
//!
//! **Not implemented yet.** The type exists so that the workspace, the facade features and
//! orchestrators can be wired now; every operation returns an error of kind
//! [`ErrorKind::Unsupported`](virtrigaud_core::ErrorKind::Unsupported) and
//! [`Provider::capabilities`] reports nothing. No operation pretends to succeed.

#![warn(missing_docs)]

use async_trait::async_trait;
use virtrigaud_core::provider::not_implemented;
use virtrigaud_core::{
    Capabilities, CreatedDisk, DiskCreateSpec, OpenedDisk, PowerOp, Provider, Result, SnapshotRef,
    VmInfo, VmSpec, VmSummary,
};

/// The Proxmox provider (not implemented yet: every operation returns `Unsupported`).
#[derive(Debug, Clone)]
pub struct ProxmoxProvider {
    endpoint: String,
}

impl ProxmoxProvider {
    /// A provider for `endpoint` (connection URI or URL).
    pub fn new(endpoint: impl Into<String>) -> Self {
        ProxmoxProvider {
            endpoint: endpoint.into(),
        }
    }

    /// The endpoint this provider talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

const KIND: &str = "proxmox";

#[async_trait]
impl Provider for ProxmoxProvider {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn validate(&self) -> Result<()> {
        Err(not_implemented(KIND, "validate"))
    }
    async fn list_vms(&self) -> Result<Vec<VmSummary>> {
        Err(not_implemented(KIND, "list_vms"))
    }
    async fn describe_vm(&self, _vm: &str) -> Result<VmInfo> {
        Err(not_implemented(KIND, "describe_vm"))
    }
    async fn power(&self, _vm: &str, _op: PowerOp) -> Result<()> {
        Err(not_implemented(KIND, "power"))
    }
    async fn create_snapshot(&self, _vm: &str, _name: &str) -> Result<SnapshotRef> {
        Err(not_implemented(KIND, "create_snapshot"))
    }
    async fn delete_snapshot(&self, _vm: &str, _snapshot: &SnapshotRef) -> Result<()> {
        Err(not_implemented(KIND, "delete_snapshot"))
    }
    async fn open_disk(
        &self,
        _vm: &str,
        _disk: &str,
        _snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk> {
        Err(not_implemented(KIND, "open_disk"))
    }
    async fn create_disk(&self, _spec: &DiskCreateSpec) -> Result<CreatedDisk> {
        Err(not_implemented(KIND, "create_disk"))
    }
    async fn create_vm(&self, _spec: &VmSpec) -> Result<VmInfo> {
        Err(not_implemented(KIND, "create_vm"))
    }
    async fn delete_vm(&self, _vm: &str) -> Result<()> {
        Err(not_implemented(KIND, "delete_vm"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtrigaud_core::ErrorKind;

    #[test]
    fn every_operation_is_unsupported() {
        let p = ProxmoxProvider::new("x");
        assert_eq!(p.capabilities(), Capabilities::default());
        let e = futures_lite_block_on(p.describe_vm("vm"));
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Unsupported);
    }

    fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
        // The stub futures never wait on anything: poll once with a no-op waker.
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("stub future was pending"),
        }
    }
}

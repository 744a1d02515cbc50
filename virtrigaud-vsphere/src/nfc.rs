//! The NFC import path: a disk written as a streamOptimized VMDK through an `ImportVApp`
//! lease ([`ImportMode::NfcStreamOptimized`](crate::ImportMode)).
//!
//! `ResourcePool.ImportVApp` with a `VirtualMachineImportSpec` creates a placeholder VM
//! (`vrg-import-<vm>-<disk>`) with one disk at the final path `[ds] <vm>/<disk>.vmdk`, and
//! returns an `HttpNfcLease`. We wait for its `state` to be `ready` (or fail with its `error`),
//! take the disk's `info.deviceUrl[].url` (a `*` host means the host we talk to), and `POST`
//! the encoded bytes to it (`Content-Type: application/x-vnd.vmware-streamVmdk`) as they are
//! written, in one request. While it runs, `HttpNfcLeaseProgress` is sent every
//! [`VsphereConfig::lease_progress_interval`](crate::VsphereConfig::lease_progress_interval)
//! (default 30 s, well inside the 5-minute lease timeout), so the lease never expires. Commit
//! ends the body, calls `HttpNfcLeaseComplete`, then releases the disk: the placeholder VM is
//! unregistered and its own files deleted, the disk stays for the VM that `create_vm` makes.
//! Abort, drop or any failure calls `HttpNfcLeaseAbort` (vSphere then removes what the lease
//! created) and destroys the placeholder if it is still there (the simulator keeps it).
//!
//! What was proven where: against the govmomi simulator, the lease loop (ImportVApp, ready
//! state, device URL, progress, complete, abort) and the exact bytes POSTed (its upload handler
//! discards them; our simulator `main.go` keeps a copy, which the test compares with the
//! source through `qemu-img compare`). Not proven (the simulator does not do it): that ESXi
//! turns the stream into a VMFS disk, chunked POSTs on a real host (govc sends a length; ours
//! is unknown before the encoder ends), and device URLs on another host than the one we
//! connected to (the same TLS trust is used for them).

use crate::VsphereProvider;
use crate::client::{Client, MoRef};
use crate::datastore::DsPath;
use crate::error::{from_status, from_task_error, from_transport};
use crate::xml::Node;
use crate::xml::esc;
use async_trait::async_trait;
use bytes::Bytes;
use futures::SinkExt;
use futures::channel::mpsc;
use reqwest::header;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use virtrigaud_core::io::ByteSink;
use virtrigaud_core::{Error, ErrorKind, Result};

/// A disk being imported through an NFC lease (see the module docs).
pub struct NfcWriter {
    provider: VsphereProvider,
    lease: MoRef,
    placeholder: Option<MoRef>,
    disk: DsPath,
    capacity: u64,
    written: Arc<AtomicU64>,
    tx: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    upload: Option<JoinHandle<Result<()>>>,
    progress: Option<JoinHandle<()>>,
    done: bool,
}

impl std::fmt::Debug for NfcWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfcWriter")
            .field("lease", &self.lease.value)
            .field("disk", &self.disk.display())
            .finish_non_exhaustive()
    }
}

/// Name of the placeholder VM an import of `disk` for `vm` creates.
pub fn placeholder_name(vm: &str, disk: &str) -> String {
    format!("vrg-import-{vm}-{disk}")
}

impl NfcWriter {
    /// Starts the import: `ImportVApp`, wait for the lease, start the POST and the progress
    /// loop.
    pub(crate) async fn start(
        provider: VsphereProvider,
        vm: &str,
        disk: DsPath,
        capacity: u64,
    ) -> Result<NfcWriter> {
        if capacity == 0 || !capacity.is_multiple_of(1024) {
            return Err(Error::invalid(format!(
                "a vSphere disk is a whole number of KiB; {capacity} bytes is not"
            )));
        }
        let client = provider.client().clone();
        let name = placeholder_name(vm, disk.path.rsplit('/').next().unwrap_or("disk"));
        let pool = provider.resource_pool().await?;
        let dc = provider.datacenter().await?.clone();
        let config = format!(
            "<name>{name}</name><guestId>otherGuest64</guestId>\
             <files><vmPathName>[{ds}] {dir}/{name}.vmx</vmPathName></files>\
             <numCPUs>1</numCPUs><memoryMB>4</memoryMB>\
             <deviceChange><operation>add</operation><device xsi:type=\"{scsi}\"><key>-100</key>\
             <busNumber>0</busNumber><sharedBus>noSharing</sharedBus></device></deviceChange>\
             <deviceChange><operation>add</operation><fileOperation>create</fileOperation>\
             <device xsi:type=\"VirtualDisk\"><key>-1000</key>\
             <backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>{file}</fileName>\
             <diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>\
             <controllerKey>-100</controllerKey><unitNumber>0</unitNumber>\
             <capacityInKB>{kb}</capacityInKB><capacityInBytes>{capacity}</capacityInBytes>\
             </device></deviceChange>",
            name = esc(&name),
            ds = esc(&disk.datastore),
            dir = esc(disk.dir()),
            scsi = provider.config().scsi_model.device_type(),
            file = esc(&disk.display()),
            kb = capacity / 1024,
        );
        let inner = format!(
            "{}<spec xsi:type=\"VirtualMachineImportSpec\"><configSpec>{config}</configSpec>\
             </spec>{}",
            pool.this(),
            dc.vm_folder.xml("folder")
        );
        let n = client.call("ImportVApp", &inner).await?;
        let lease = n
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::corrupt("ImportVApp returned no lease"))?;
        let mut w = NfcWriter {
            provider,
            lease,
            placeholder: None,
            disk,
            capacity,
            written: Arc::new(AtomicU64::new(0)),
            tx: None,
            upload: None,
            progress: None,
            done: false,
        };
        match w.begin().await {
            Ok(()) => Ok(w),
            Err(e) => {
                w.abort_lease().await;
                w.done = true;
                Err(e)
            }
        }
    }

    async fn begin(&mut self) -> Result<()> {
        let client = self.provider.client().clone();
        let info = wait_ready(&client, &self.lease, "ImportVApp").await?;
        self.placeholder = info.child("entity").and_then(MoRef::from_node);
        let dev = info
            .children_named("deviceUrl")
            .find(|d| d.text_at(&["disk"]) != Some("false"))
            .ok_or_else(|| Error::corrupt("the NFC lease lists no disk URL"))?;
        let raw = dev
            .text_at(&["url"])
            .ok_or_else(|| Error::corrupt("NFC device without a URL"))?;
        let url = device_url(raw, client.sdk_url())?;
        debug!(lease = %self.lease.value, %url, "NFC lease ready");
        let req = client
            .data_request(reqwest::Method::POST, url.as_str())
            .await?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
        let target = url.to_string();
        self.upload = Some(tokio::spawn(async move {
            let resp = req
                .header(header::CONTENT_TYPE, "application/x-vnd.vmware-streamVmdk")
                .body(reqwest::Body::wrap_stream(rx))
                .send()
                .await
                .map_err(|e| from_transport("nfc.upload", &target, e))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(from_status("nfc.upload", &target, resp.status()))
            }
        }));
        self.tx = Some(tx);
        // Keep the lease alive.
        let every = client.config().lease_progress_interval;
        let (lease, written, capacity) = (self.lease.clone(), self.written.clone(), self.capacity);
        self.progress = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let pct = (written.load(Ordering::Relaxed).saturating_mul(100) / capacity).min(99);
                let inner = format!("{}<percent>{pct}</percent>", lease.this());
                if let Err(e) = client.call("HttpNfcLeaseProgress", &inner).await {
                    warn!(error = %e, "HttpNfcLeaseProgress failed");
                }
            }
        }));
        Ok(())
    }

    async fn abort_lease(&mut self) {
        self.tx = None;
        if let Some(t) = self.upload.take() {
            t.abort();
        }
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        let client = self.provider.client().clone();
        if let Err(e) = client.call("HttpNfcLeaseAbort", &self.lease.this()).await {
            debug!(error = %e, "HttpNfcLeaseAbort failed");
        }
        // vSphere removes what an aborted lease created; where it did not (the simulator),
        // the placeholder VM and its disk go here.
        if let Some(vm) = self.placeholder.clone()
            && client.properties(&vm, &["name"]).await.is_ok()
            && let Err(e) = self.provider.destroy(&vm).await
        {
            warn!(vm = %vm.value, error = %e, "could not remove the import placeholder VM");
        }
    }

    async fn push(&mut self, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        let Some(tx) = self.tx.as_mut() else {
            return Err(Error::new(
                ErrorKind::Provider,
                "NFC writer already finished",
            ));
        };
        if tx.send(Ok(data)).await.is_err() {
            let err = match self.upload.take() {
                Some(t) => match t.await {
                    Ok(Err(e)) => e,
                    _ => Error::new(ErrorKind::Network, "the NFC upload ended early"),
                },
                None => Error::new(ErrorKind::Network, "the NFC upload ended early"),
            };
            return Err(err);
        }
        self.written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        self.tx = None;
        if let Some(t) = self.upload.take() {
            t.await.map_err(|e| {
                Error::new(ErrorKind::Provider, format!("upload task failed: {e}"))
            })??;
        }
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        let client = self.provider.client().clone();
        client
            .call(
                "HttpNfcLeaseProgress",
                &format!("{}<percent>100</percent>", self.lease.this()),
            )
            .await?;
        client
            .call("HttpNfcLeaseComplete", &self.lease.this())
            .await?;
        // Release the disk from the placeholder VM.
        if let Some(vm) = self.placeholder.clone() {
            self.provider.replace(&vm, &[self.disk.display()]).await?;
        }
        Ok(())
    }
}

/// Waits until `lease` is `ready` and returns its `info`; fails with the lease's `error`.
pub async fn wait_ready(client: &Client, lease: &MoRef, op: &str) -> Result<Node> {
    let deadline = Instant::now() + client.config().task_timeout;
    let mut interval = Duration::from_millis(100);
    loop {
        let o = client
            .properties(lease, &["state", "info", "error"])
            .await?;
        match o.text("state") {
            Some("ready") => {
                return o
                    .props
                    .get("info")
                    .cloned()
                    .ok_or_else(|| Error::corrupt("ready lease without info"));
            }
            Some("error") => {
                return Err(match o.props.get("error") {
                    Some(e) => from_task_error(op, e),
                    None => Error::new(ErrorKind::Provider, "the NFC lease failed"),
                });
            }
            Some("done") => {
                return Err(Error::new(ErrorKind::Provider, "the NFC lease ended early"));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                "NFC lease never became ready",
            ));
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(client.config().task_poll_max);
    }
}

/// Keeps an export lease alive and ends it: `Complete` once the stream ended cleanly,
/// `Abort` when it is dropped before (an error, a cancelled transfer).
struct ExportLease {
    client: Arc<Client>,
    lease: MoRef,
    progress: Option<JoinHandle<()>>,
    completed: bool,
}

impl ExportLease {
    async fn complete(&mut self) -> Result<()> {
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        self.completed = true;
        self.client
            .call("HttpNfcLeaseComplete", &self.lease.this())
            .await
            .map(|_| ())
    }
}

impl Drop for ExportLease {
    fn drop(&mut self) {
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        if self.completed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, lease) = (self.client.clone(), self.lease.clone());
            rt.spawn(async move {
                let _ = client.call("HttpNfcLeaseAbort", &lease.this()).await;
            });
        }
    }
}

/// Opens disk `disk_key` of `entity` (a powered-off VM: `ExportVm`; a snapshot:
/// `ExportSnapshot`) as one sequential streamOptimized VMDK through an NFC lease. The lease is
/// kept alive by `HttpNfcLeaseProgress`, completed when the stream ends, aborted when the
/// stream is dropped early or fails. Not proven on the simulator (it has no `ExportVm`): the
/// request shapes follow the WSDL; there, the call answers `Unsupported` (MethodNotFound).
pub async fn open_export(
    client: Arc<Client>,
    entity: &MoRef,
    disk_key: i32,
) -> Result<(Option<u64>, virtrigaud_core::ByteStream)> {
    use futures::StreamExt;
    let method = if entity.ty == "VirtualMachineSnapshot" {
        "ExportSnapshot"
    } else {
        "ExportVm"
    };
    let n = client.call(method, &entity.this()).await.map_err(|e| {
        if e.kind() == ErrorKind::Unsupported {
            Error::unsupported(format!(
                "{method} is not available on this endpoint ({e}); use ExportMode::Datastore"
            ))
        } else {
            e
        }
    })?;
    let lease = n
        .child("returnval")
        .and_then(MoRef::from_node)
        .ok_or_else(|| Error::corrupt(format!("{method} returned no lease")))?;
    let mut guard = ExportLease {
        client: client.clone(),
        lease: lease.clone(),
        progress: None,
        completed: false,
    };
    let info = wait_ready(&client, &lease, method).await?;
    let urls: Vec<&Node> = info
        .children_named("deviceUrl")
        .filter(|d| d.text_at(&["disk"]) != Some("false"))
        .collect();
    let key = disk_key.to_string();
    let dev = urls
        .iter()
        .find(|d| {
            d.text_at(&["key"])
                .is_some_and(|k| k == key || k.ends_with(&format!("/{key}")))
        })
        .or(if urls.len() == 1 { urls.first() } else { None })
        .ok_or_else(|| {
            Error::not_found(format!("the export lease lists no URL for disk {disk_key}"))
        })?;
    let size = dev.parse_at::<u64>(&["fileSize"]).filter(|s| *s > 0);
    let url = device_url(
        dev.text_at(&["url"])
            .ok_or_else(|| Error::corrupt("NFC device without a URL"))?,
        client.sdk_url(),
    )?;
    let resp = client
        .data_request(reqwest::Method::GET, url.as_str())
        .await?
        .send()
        .await
        .map_err(|e| from_transport("nfc.download", url.as_str(), e))?;
    if !resp.status().is_success() {
        return Err(from_status("nfc.download", url.as_str(), resp.status()));
    }
    let every = client.config().lease_progress_interval;
    let read = Arc::new(AtomicU64::new(0));
    let (c2, l2, r2) = (client.clone(), lease.clone(), read.clone());
    guard.progress = Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let pct = match size {
                Some(s) => (r2.load(Ordering::Relaxed).saturating_mul(100) / s).min(99),
                None => 50,
            };
            let inner = format!("{}<percent>{pct}</percent>", l2.this());
            if let Err(e) = c2.call("HttpNfcLeaseProgress", &inner).await {
                warn!(error = %e, "HttpNfcLeaseProgress failed");
            }
        }
    }));
    let target = url.to_string();
    let body = resp.bytes_stream();
    let stream = futures::stream::unfold(
        (body, Some(guard), read, target),
        |(mut body, mut guard, read, target)| async move {
            match body.next().await {
                Some(Ok(b)) => {
                    read.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Some((Ok(b), (body, guard, read, target)))
                }
                Some(Err(e)) => {
                    // Dropping the guard aborts the lease.
                    drop(guard.take());
                    Some((
                        Err(from_transport("nfc.download", &target, e)),
                        (body, None, read, target),
                    ))
                }
                None => {
                    let mut g = guard.take()?;
                    match g.complete().await {
                        Ok(()) => None,
                        Err(e) => Some((Err(e), (body, None, read, target))),
                    }
                }
            }
        },
    )
    .boxed();
    Ok((size, stream))
}

/// The device URL with a `*` host replaced by the host we connected to.
pub fn device_url(raw: &str, sdk: &url::Url) -> Result<url::Url> {
    let fixed = match raw.split_once("://*") {
        Some((scheme, rest)) => {
            let host = sdk.host_str().unwrap_or("");
            let port = sdk.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{host}{port}{rest}")
        }
        None => raw.to_string(),
    };
    url::Url::parse(&fixed).map_err(|e| Error::corrupt(format!("bad NFC device URL: {e}")))
}

#[async_trait]
impl ByteSink for NfcWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self.push(data).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.abort_lease().await;
                self.done = true;
                Err(e)
            }
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let r = self.finish().await;
        if r.is_err() {
            self.abort_lease().await;
        }
        self.done = true;
        r
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.abort_lease().await;
        self.done = true;
        Ok(())
    }
}

impl Drop for NfcWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(t) = self.upload.take() {
            t.abort();
        }
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut w = NfcWriter {
                provider: self.provider.clone(),
                lease: self.lease.clone(),
                placeholder: self.placeholder.clone(),
                disk: self.disk.clone(),
                capacity: self.capacity,
                written: self.written.clone(),
                tx: None,
                upload: None,
                progress: None,
                done: true,
            };
            rt.spawn(async move { w.abort_lease().await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_host_is_ours() {
        let sdk = url::Url::parse("https://10.0.0.5:8989/sdk").unwrap();
        let u = device_url("https://*/nfc/52a/disk-0.vmdk", &sdk).unwrap();
        assert_eq!(u.as_str(), "https://10.0.0.5:8989/nfc/52a/disk-0.vmdk");
        let u = device_url("https://esx1.lab/nfc/52a/disk-0.vmdk", &sdk).unwrap();
        assert_eq!(u.host_str(), Some("esx1.lab"));
    }
}

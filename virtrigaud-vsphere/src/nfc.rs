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
//! created) and removes the placeholder if it is still there (the simulator keeps it): its
//! files one by one, never `Destroy_Task`, which on the simulator deletes the whole directory
//! with the VM's disks imported before.
//!
//! Crash safety: the placeholder's annotation carries a marker line
//! ([`placeholder_marker`]). A crash leaves the placeholder registered and holding the disk;
//! `delete_disk` (what the runner calls on a rerun) and `create_disk` with `overwrite` remove
//! it, and every import removes a marked placeholder of its own name before `ImportVApp`
//! (which would fail on the duplicate name). A VM of that name without the marker is left
//! alone (`Conflict`).
//!
//! The keep-alive loop is [`LeaseKeeper`], shared by import and export: progress every
//! interval (at most [`MAX_PROGRESS_INTERVAL`]), `Complete` on success, `Abort` on failure or
//! drop. Export device URLs are matched to disks by [`pick_device_url`].
//!
//! What was proven where: against the govmomi simulator, the lease loop (ImportVApp, ready
//! state, device URL, progress seen as the lease's `transferProgress`, complete, abort, abort
//! by drop; the simulator forgets an ended lease instead of showing `done`), the crash
//! recovery above, and the exact bytes POSTed (its upload handler
//! discards them; our simulator `main.go` keeps a copy, which the test compares with the
//! source through `qemu-img compare`). Not proven (the simulator does not do it): that ESXi
//! turns the stream into a VMFS disk, chunked POSTs on a real host (govc sends a length; ours
//! is unknown before the encoder ends), and device URLs on another host than the one we
//! connected to (the same TLS trust is used for them), and the export lease's device keys:
//! [`pick_device_url`] is unit-tested against the WSDL's `HttpNfcLeaseDeviceUrl` shape with
//! the key forms `…/<ControllerType><bus>:<unit>` (vSphere), `…/disk:<n>` (the simulator's
//! import lease) and plain device keys.

use crate::VsphereDisk;
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
    keeper: Option<LeaseKeeper>,
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

/// The first word of the annotation line that marks a VM as an import placeholder of ours.
pub const PLACEHOLDER_MARKER: &str = "virtrigaud-import-placeholder:";

/// The annotation line of the placeholder VM that imports `disk`.
pub fn placeholder_marker(disk: &DsPath) -> String {
    format!("{PLACEHOLDER_MARKER} {}", disk.display())
}

/// Whether `annotation` marks a VM as an import placeholder of ours (a line of its own).
pub fn is_placeholder(annotation: Option<&str>) -> bool {
    annotation.is_some_and(|a| a.lines().any(|l| l.trim().starts_with(PLACEHOLDER_MARKER)))
}

/// Starts an `ImportVApp` lease that creates the placeholder VM of `disk` (one thin disk of
/// `capacity` bytes at `disk`'s final path, the [`placeholder_marker`] in its annotation).
/// A placeholder of the same name left by a crashed run is removed first (only when it carries
/// the marker; another VM of that name is a `Conflict`). Returns the lease.
pub async fn start_import_lease(
    provider: &VsphereProvider,
    vm: &str,
    disk: &DsPath,
    capacity: u64,
) -> Result<MoRef> {
    if capacity == 0 || !capacity.is_multiple_of(1024) {
        return Err(Error::invalid(format!(
            "a vSphere disk is a whole number of KiB; {capacity} bytes is not"
        )));
    }
    let client = provider.client().clone();
    let name = placeholder_name(vm, disk.path.rsplit('/').next().unwrap_or("disk"));
    if provider.remove_placeholder(&name).await? {
        warn!(vm = %name, "removed the import placeholder VM that an interrupted run left");
    }
    let pool = provider.resource_pool().await?;
    let dc = provider.datacenter().await?.clone();
    let config = format!(
        "<name>{name}</name><guestId>otherGuest64</guestId>\
         <annotation>{note}</annotation>\
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
        note = esc(&format!(
            "virtrigaud NFC import in progress; removed when it ends\n{}",
            placeholder_marker(disk)
        )),
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
    n.child("returnval")
        .and_then(MoRef::from_node)
        .ok_or_else(|| Error::corrupt("ImportVApp returned no lease"))
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
        let lease = start_import_lease(&provider, vm, &disk, capacity).await?;
        let mut w = NfcWriter {
            provider,
            lease,
            placeholder: None,
            disk,
            capacity,
            written: Arc::new(AtomicU64::new(0)),
            tx: None,
            upload: None,
            keeper: None,
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
        let (written, capacity) = (self.written.clone(), self.capacity);
        self.keeper = Some(LeaseKeeper::start(
            client.clone(),
            self.lease.clone(),
            client.config().lease_progress_interval,
            move || (written.load(Ordering::Relaxed).saturating_mul(100) / capacity).min(99) as u8,
        ));
        Ok(())
    }

    async fn abort_lease(&mut self) {
        self.tx = None;
        if let Some(t) = self.upload.take() {
            t.abort();
        }
        let client = self.provider.client().clone();
        let aborted = match self.keeper.take() {
            Some(k) => k.abort().await,
            None => client
                .call("HttpNfcLeaseAbort", &self.lease.this())
                .await
                .map(|_| ()),
        };
        if let Err(e) = aborted {
            debug!(error = %e, "HttpNfcLeaseAbort failed");
        }
        // vSphere removes what an aborted lease created; where it did not (the simulator),
        // the placeholder VM and its disk go here, file by file (not Destroy_Task, which may
        // take the whole directory, with the VM's other disks, along).
        if let Some(vm) = self.placeholder.clone()
            && client.properties(&vm, &["name"]).await.is_ok()
            && let Err(e) = self.provider.replace(&vm, &[]).await
        {
            warn!(vm = %vm.value, error = %e, "could not remove the import placeholder VM");
        }
        if let Err(e) = self.provider.delete_disk_files(&self.disk).await {
            warn!(disk = %self.disk.display(), error = %e, "could not remove an aborted import");
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
        let keeper = self
            .keeper
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Provider, "NFC writer already finished"))?;
        keeper.complete().await?;
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

/// The longest time between two `HttpNfcLeaseProgress` calls, whatever the configuration says
/// (vSphere's lease timeout is 5 minutes; a minute leaves room for slow calls).
pub const MAX_PROGRESS_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps a ready `HttpNfcLease` (import or export: the same object) alive and ends it:
/// `HttpNfcLeaseProgress` every interval (at most [`MAX_PROGRESS_INTERVAL`]) with the percent
/// that `percent` reports, [`LeaseKeeper::complete`] (progress 100, then
/// `HttpNfcLeaseComplete`) on success, [`LeaseKeeper::abort`] (`HttpNfcLeaseAbort`) on failure;
/// dropped without either, it aborts the lease in the background.
pub struct LeaseKeeper {
    client: Arc<Client>,
    lease: MoRef,
    progress: Option<JoinHandle<()>>,
    calls: Arc<AtomicU64>,
    ended: bool,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("lease", &self.lease.value)
            .field("progress_calls", &self.progress_calls())
            .finish_non_exhaustive()
    }
}

impl LeaseKeeper {
    /// Starts the keep-alive loop on `lease` (which must be ready). The first progress call
    /// goes out one interval after the start.
    pub fn start(
        client: Arc<Client>,
        lease: MoRef,
        every: Duration,
        percent: impl Fn() -> u8 + Send + 'static,
    ) -> LeaseKeeper {
        let every = every.clamp(Duration::from_millis(10), MAX_PROGRESS_INTERVAL);
        let calls = Arc::new(AtomicU64::new(0));
        let (c, l, n) = (client.clone(), lease.clone(), calls.clone());
        let progress = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let inner = format!("{}<percent>{}</percent>", l.this(), percent().min(100));
                match c.call("HttpNfcLeaseProgress", &inner).await {
                    Ok(_) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!(error = %e, "HttpNfcLeaseProgress failed"),
                }
            }
        });
        LeaseKeeper {
            client,
            lease,
            progress: Some(progress),
            calls,
            ended: false,
        }
    }

    /// The lease kept alive.
    pub fn lease(&self) -> &MoRef {
        &self.lease
    }

    /// How many `HttpNfcLeaseProgress` calls succeeded so far.
    pub fn progress_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        self.ended = true;
    }

    /// Reports 100 % and completes the lease.
    pub async fn complete(mut self) -> Result<()> {
        self.stop();
        self.client
            .call(
                "HttpNfcLeaseProgress",
                &format!("{}<percent>100</percent>", self.lease.this()),
            )
            .await?;
        self.client
            .call("HttpNfcLeaseComplete", &self.lease.this())
            .await
            .map(|_| ())
    }

    /// Aborts the lease (vSphere then discards what it created).
    pub async fn abort(mut self) -> Result<()> {
        self.stop();
        self.client
            .call("HttpNfcLeaseAbort", &self.lease.this())
            .await
            .map(|_| ())
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(t) = self.progress.take() {
            t.abort();
        }
        if self.ended {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, lease) = (self.client.clone(), self.lease.clone());
            rt.spawn(async move {
                if let Err(e) = client.call("HttpNfcLeaseAbort", &lease.this()).await {
                    debug!(error = %e, "HttpNfcLeaseAbort of a dropped lease failed");
                }
            });
        }
    }
}

/// One `HttpNfcLeaseDeviceUrl` of a lease's `info.deviceUrl` (WSDL: `key`, `importKey`,
/// `url`, `sslThumbprint`, `disk`, `targetId`, `datastoreKey`, `fileSize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUrl {
    /// The immutable device id: `/vm-42/VirtualLsiLogicController0:1` on vSphere exports,
    /// `/vm-42/disk:0` in the govmomi simulator.
    pub key: String,
    /// The device by the names of an import spec (import leases only).
    pub import_key: Option<String>,
    /// Where to GET or POST the file (`*` as host means the host we talk to).
    pub url: String,
    /// Whether the file is a VMDK disk (absent: unknown).
    pub disk: Option<bool>,
    /// The file name on the target (multi-POST id).
    pub target_id: Option<String>,
    /// The file's size, when the server says (non-disk files only, per the WSDL).
    pub file_size: Option<u64>,
}

impl DeviceUrl {
    /// Reads one `deviceUrl` element; `None` without `key` or `url`.
    pub fn from_node(n: &Node) -> Option<DeviceUrl> {
        Some(DeviceUrl {
            key: n.text_at(&["key"])?.to_string(),
            import_key: n.text_at(&["importKey"]).map(str::to_string),
            url: n.text_at(&["url"])?.to_string(),
            disk: n.parse_at(&["disk"]),
            target_id: n.text_at(&["targetId"]).map(str::to_string),
            file_size: n.parse_at(&["fileSize"]),
        })
    }
}

/// The last path segment of a device key parsed as `<Name><bus>:<unit>`
/// (`VirtualLsiLogicController0:1` → (`VirtualLsiLogicController`, Some(0), 1); `disk:2` →
/// (`disk`, None, 2)).
fn key_parts(key: &str) -> Option<(&str, Option<i32>, i32)> {
    let last = key.rsplit('/').next()?;
    let (head, unit) = last.rsplit_once(':')?;
    let unit = unit.parse().ok()?;
    let name = head.trim_end_matches(|c: char| c.is_ascii_digit());
    let bus = head[name.len()..].parse().ok();
    Some((name, bus, unit))
}

fn same_controller(name: &str, controller_type: &str) -> bool {
    let strip = |s: &str| {
        let s = s.to_ascii_lowercase();
        s.strip_prefix("virtual").map(str::to_string).unwrap_or(s)
    };
    !name.is_empty() && strip(name) == strip(controller_type)
}

/// The device URL of `disks[index]` among a lease's device URLs: by device key (`…/2001`),
/// then by controller type, bus and unit number (`…/VirtualLsiLogicController0:1`), then by
/// disk order (`…/disk:1`, the simulator's form, or the index-th disk URL when there are as many
/// disk URLs as disks).
pub fn pick_device_url<'a>(
    urls: &'a [DeviceUrl],
    disks: &[VsphereDisk],
    index: usize,
) -> Option<&'a DeviceUrl> {
    let d = disks.get(index)?;
    let disk_urls: Vec<&DeviceUrl> = urls.iter().filter(|u| u.disk != Some(false)).collect();
    let key = d.key.to_string();
    if let Some(u) = disk_urls
        .iter()
        .find(|u| u.key == key || u.key.rsplit('/').next() == Some(key.as_str()))
    {
        return Some(u);
    }
    if let (Some(ct), Some(unit)) = (d.controller_type.as_deref(), d.unit_number)
        && let Some(u) = disk_urls.iter().find(|u| {
            key_parts(&u.key).is_some_and(|(name, bus, un)| {
                same_controller(name, ct)
                    && un == unit
                    && bus.unwrap_or(0) == d.bus_number.unwrap_or(0)
            })
        })
    {
        return Some(u);
    }
    let ordinal = i32::try_from(index).ok()?;
    if let Some(u) = disk_urls.iter().find(|u| {
        key_parts(&u.key)
            .is_some_and(|(name, bus, n)| name == "disk" && bus.is_none() && n == ordinal)
    }) {
        return Some(u);
    }
    (disk_urls.len() == disks.len())
        .then(|| disk_urls.get(index).copied())
        .flatten()
}

/// Opens `disks[index]` of `entity` (a powered-off VM: `ExportVm`; a snapshot:
/// `ExportSnapshot`) as one sequential streamOptimized VMDK through an NFC lease
/// ([`pick_device_url`] finds its URL). A [`LeaseKeeper`] keeps the lease alive, completes it
/// when the stream ends, aborts it when the stream is dropped early or fails. Not proven on
/// the simulator (it has no `ExportVm`): the request shapes follow the WSDL; there, the call
/// answers `Unsupported` (MethodNotFound).
pub async fn open_export(
    client: Arc<Client>,
    entity: &MoRef,
    disks: &[VsphereDisk],
    index: usize,
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
    let info = match wait_ready(&client, &lease, method).await {
        Ok(i) => i,
        Err(e) => {
            let _ = client.call("HttpNfcLeaseAbort", &lease.this()).await;
            return Err(e);
        }
    };
    let read = Arc::new(AtomicU64::new(0));
    let r2 = read.clone();
    let capacity = disks.get(index).map(|d| d.capacity).unwrap_or(0);
    // Until Complete, the lease stays alive; a guard that is dropped aborts it.
    let keeper = LeaseKeeper::start(
        client.clone(),
        lease.clone(),
        client.config().lease_progress_interval,
        // The stream is compressed: its length says little about the capacity; a bound
        // below 100 is all the server needs to see progress.
        move || match capacity {
            0 => 50,
            c => (r2.load(Ordering::Relaxed).saturating_mul(100) / c).min(99) as u8,
        },
    );
    let urls: Vec<DeviceUrl> = info
        .children_named("deviceUrl")
        .filter_map(DeviceUrl::from_node)
        .collect();
    let key = disks.get(index).map(|d| d.key).unwrap_or_default();
    let dev = pick_device_url(&urls, disks, index).ok_or_else(|| {
        Error::not_found(format!(
            "the export lease lists no URL for disk {key} (keys: {})",
            urls.iter()
                .map(|u| u.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let size = dev.file_size.filter(|s| *s > 0);
    let url = device_url(&dev.url, client.sdk_url())?;
    let resp = client
        .data_request(reqwest::Method::GET, url.as_str())
        .await?
        .send()
        .await
        .map_err(|e| from_transport("nfc.download", url.as_str(), e))?;
    if !resp.status().is_success() {
        return Err(from_status("nfc.download", url.as_str(), resp.status()));
    }
    let target = url.to_string();
    let body = resp.bytes_stream();
    let stream = futures::stream::unfold(
        (body, Some(keeper), read, target),
        |(mut body, mut keeper, read, target)| async move {
            match body.next().await {
                Some(Ok(b)) => {
                    read.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Some((Ok(b), (body, keeper, read, target)))
                }
                Some(Err(e)) => {
                    if let Some(k) = keeper.take()
                        && let Err(ae) = k.abort().await
                    {
                        debug!(error = %ae, "HttpNfcLeaseAbort failed");
                    }
                    Some((
                        Err(from_transport("nfc.download", &target, e)),
                        (body, None, read, target),
                    ))
                }
                None => {
                    let k = keeper.take()?;
                    match k.complete().await {
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
        // Its own drop stops the keep-alive loop (and aborts the lease, as does the task below).
        drop(self.keeper.take());
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
                keeper: None,
                done: true,
            };
            rt.spawn(async move { w.abort_lease().await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(key: i32, ct: &str, bus: i32, unit: i32) -> VsphereDisk {
        VsphereDisk {
            key,
            label: None,
            controller_type: Some(ct.into()),
            bus: None,
            bus_number: Some(bus),
            unit_number: Some(unit),
            file: format!("[ds] vm/d{key}.vmdk"),
            backing_type: "VirtualDiskFlatVer2BackingInfo".into(),
            capacity: 1 << 20,
            thin: None,
            datastore: None,
            has_parent: false,
            mode: None,
        }
    }

    fn url(key: &str, disk: Option<bool>) -> DeviceUrl {
        DeviceUrl {
            key: key.into(),
            import_key: None,
            url: format!("https://*/nfc/52a/{}", key.replace('/', "_")),
            disk,
            target_id: None,
            file_size: None,
        }
    }

    /// Three disks on two controllers (LSI Logic bus 0 units 0 and 1, SATA bus 0 unit 0) and
    /// an nvram file, in each key form the lease may use.
    #[test]
    fn device_urls_are_matched_to_the_right_disk() {
        let disks = [
            disk(2000, "VirtualLsiLogicController", 0, 0),
            disk(2001, "VirtualLsiLogicController", 0, 1),
            disk(16000, "VirtualAHCIController", 0, 0),
        ];
        // vSphere's export form: controller type, bus and unit, in another order than the
        // disks, with a non-disk file first.
        let urls = [
            url("/vm-42/nvram", Some(false)),
            url("/vm-42/VirtualAHCIController0:0", Some(true)),
            url("/vm-42/VirtualLsiLogicController0:1", Some(true)),
            url("/vm-42/VirtualLsiLogicController0:0", Some(true)),
        ];
        let got: Vec<&str> = (0..3)
            .map(|i| pick_device_url(&urls, &disks, i).unwrap().key.as_str())
            .collect();
        assert_eq!(
            got,
            [
                "/vm-42/VirtualLsiLogicController0:0",
                "/vm-42/VirtualLsiLogicController0:1",
                "/vm-42/VirtualAHCIController0:0"
            ]
        );
        // Another bus number is another disk.
        let other_bus = [url("/vm-42/VirtualLsiLogicController1:0", Some(true))];
        assert!(pick_device_url(&other_bus, &disks[..1], 0).is_some()); // order fallback
        assert!(pick_device_url(&other_bus, &disks[..2], 0).is_none());
        // By device key.
        let urls = [url("/vm-42/2001", None), url("/vm-42/2000", None)];
        assert_eq!(
            pick_device_url(&urls, &disks[..2], 0).unwrap().key,
            "/vm-42/2000"
        );
        // The simulator's form: disk order.
        let urls = [
            url("/vm-42/disk:0", Some(true)),
            url("/vm-42/disk:1", Some(true)),
            url("/vm-42/disk:2", Some(true)),
        ];
        assert_eq!(
            pick_device_url(&urls, &disks, 2).unwrap().key,
            "/vm-42/disk:2"
        );
        // Unknown keys, as many URLs as disks: by position.
        let urls = [url("a", Some(true)), url("b", Some(true))];
        assert_eq!(pick_device_url(&urls, &disks[..2], 1).unwrap().key, "b");
        // Unknown keys, fewer URLs than disks: no guess.
        assert!(pick_device_url(&urls, &disks, 1).is_none());
        assert!(pick_device_url(&urls, &disks, 7).is_none());
    }

    #[test]
    fn device_url_elements_are_read() {
        let n = crate::xml::parse(
            b"<deviceUrl><key>/vm-7/VirtualLsiLogicController0:0</key>\
              <importKey>/x/disk:0</importKey><url>https://*/nfc/1/d.vmdk</url>\
              <sslThumbprint></sslThumbprint><disk>true</disk><targetId>d.vmdk</targetId>\
              <fileSize>512</fileSize></deviceUrl>",
        )
        .unwrap();
        let d = DeviceUrl::from_node(&n).unwrap();
        assert_eq!(d.key, "/vm-7/VirtualLsiLogicController0:0");
        assert_eq!(d.import_key.as_deref(), Some("/x/disk:0"));
        assert_eq!(d.disk, Some(true));
        assert_eq!(d.target_id.as_deref(), Some("d.vmdk"));
        assert_eq!(d.file_size, Some(512));
        assert_eq!(
            key_parts(&d.key),
            Some(("VirtualLsiLogicController", Some(0), 0))
        );
        assert_eq!(key_parts("/vm-7/disk:3"), Some(("disk", None, 3)));
    }

    #[test]
    fn placeholder_marker_is_a_line_of_its_own() {
        let p = DsPath::parse("[ds] vm/boot.vmdk").unwrap();
        let note = format!("something\n{}", placeholder_marker(&p));
        assert!(is_placeholder(Some(&note)));
        assert!(!is_placeholder(Some(
            "about virtrigaud-import-placeholder: x"
        )));
        assert!(!is_placeholder(None));
    }

    #[test]
    fn star_host_is_ours() {
        let sdk = url::Url::parse("https://10.0.0.5:8989/sdk").unwrap();
        let u = device_url("https://*/nfc/52a/disk-0.vmdk", &sdk).unwrap();
        assert_eq!(u.as_str(), "https://10.0.0.5:8989/nfc/52a/disk-0.vmdk");
        let u = device_url("https://esx1.lab/nfc/52a/disk-0.vmdk", &sdk).unwrap();
        assert_eq!(u.host_str(), Some("esx1.lab"));
    }
}

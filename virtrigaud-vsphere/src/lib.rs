//! virtrigaud provider for VMware vSphere (vCenter or a standalone ESXi host): our own SOAP
//! subset, the datastore HTTP data path, VMs created from a spec.
//!
//! Layout, as the storage backends: [`config`] (where, how to trust, how to log in, mapping
//! defaults) / [`client`] (one method per SOAP call, sessions, tasks) / [`datastore`] (the
//! `/folder` data path: ranged reads, streamed writes) / [`vm`] and [`spec`] (hardware read from
//! and written to vSphere) / [`error`] (fault → [`ErrorKind`]) / [`tls`] (thumbprint pinning).
//!
//! What works, and where it was proven (the govmomi simulator 0.24 unless said otherwise; see
//! `tests/vcsim.rs`):
//! - login / logout / `SessionIsActive`, one re-login when the session expires mid-operation
//!   (proven by terminating the session from a second client during a transfer), wrong password
//!   → `Auth`, wrong thumbprint → refused in the TLS handshake before any password is sent;
//! - VM lookup by name, managed object id (`vm-42`), instance or BIOS UUID, inventory path
//!   (`DC0/vm/name`); `describe_vm` with CPUs, memory, firmware, guest id, annotation, every
//!   disk and NIC ([`VsphereProvider::hardware`] has what the core types cannot hold: unit
//!   numbers, controller types, thin/thick, datastores);
//! - power on / off / guest shutdown with timeout (forced off on request) / reboot (guest
//!   reboot, reset when tools do not run); snapshots (no memory, quiesced when tools run);
//! - export through `/folder`: descriptor parsed, flat/VMFS/zero extents, monolithicSparse
//!   files and a descriptor with one hosted sparse extent read with ranged GETs, several in
//!   flight (both sparse forms as `qemu-img` writes them, content digest equal to the raw
//!   source's; a sparse disk split into several extents → `Unsupported` naming a clone to one
//!   thin disk); from a snapshot, the disk as the snapshot
//!   recorded it; a disk that is already a delta chain → `Unsupported` naming consolidation;
//! - import as descriptor + flat extent with a streamed PUT (default), or as a streamOptimized
//!   VMDK encoded on the fly through an `ImportVApp` NFC lease ([`nfc`]; the bytes sent were
//!   checked with `qemu-img compare`, the lease loop with progress, complete and abort);
//!   `create_vm` with controllers per bus, NICs on mapped networks, firmware, guest id map;
//!   `delete_vm`; the runner contract (`find_disk`, `open_created_disk`, `delete_disk`,
//!   annotation marker).
//!
//! Written against the WSDL but not proven (the simulator has no `ExportVm`; there it answers
//! `Unsupported`, which is tested): the NFC *export* path ([`ExportMode::Nfc`]: `ExportVm` /
//! `ExportSnapshot` → lease → one sequential streamOptimized VMDK, progress, complete on the
//! end of the stream, abort on drop or error).
//!
//! Written against the WSDL, proven only in part: the allocation map from
//! `QueryChangedDiskAreas` (change id `*`, span by span) on a VM with changed-block tracking on
//! ([`VsphereConfig::changed_block_map`]). The simulator records `changeTrackingEnabled` but
//! answers the call with `MethodNotFound`; the tests prove the request is made there and that
//! the export then falls back to zero detection with equal digests, and check the request and
//! the `DiskChangeInfo` parser against the WSDL shapes in unit tests.
//!
//! Not implemented (each answers `Unsupported` or is not offered): warm rounds from changed
//! blocks since a change id (`changed_blocks` is false), reading disks that are delta chains (the error names consolidation), pulling from URLs
//! (`HttpNfcLeasePullFromUrls_Task`).
//!
//! Choices where the issue was silent: a VM name must be unique (else `Conflict`, use the
//! managed object id or UUID); disks of a new VM `vm` go to `[ds] vm/<disk>.vmdk` and its
//! `.vmx` next to them; virtio disks go on the SCSI controller (ParaVirtual by default); a NIC
//! keeps its source MAC as a manual address; `power(On)`/`power(Off)` on a VM already in that
//! state succeed; `Shutdown` with `force` powers off hard when VMware Tools are missing;
//! `Reboot` resets when Tools are missing; replacing a VM (`overwrite`) detaches the disks the
//! new VM is given before the old VM's files are deleted, so they survive.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod datastore;
pub mod error;
pub mod nfc;
pub mod spec;
pub mod tls;
pub mod vm;
pub mod xml;

pub use client::{Client, MoRef};
pub use config::{ExportMode, ImportMode, NicModel, ScsiModel, VsphereConfig};
pub use vm::{Hardware, VsphereDisk, VsphereNic};

use async_trait::async_trait;
use client::ObjectContent;
use datastore::{DsPath, FlatWriter, Folder};
use spec::{CreateSpec, DiskAttach, NetBacking, NicAttach};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};
use tracing::{debug, info, warn};
use virtrigaud_core::io::ImageSource;
use virtrigaud_core::{
    Capabilities, CreatedDisk, DiskCreateSpec, DiskFormat, Error, ErrorKind, OpenedDisk, PowerOp,
    PowerState, Provider, Result, SnapshotRef, VmInfo, VmSpec, VmSummary,
};
use xml::esc;

const KIND: &str = "vsphere";

/// Most areas accepted from `QueryChangedDiskAreas` for one disk (a bound on memory: 16 bytes
/// each).
const MAX_CHANGED_AREAS: usize = 4 << 20;

/// The body of `QueryChangedDiskAreas`, its elements in the WSDL's order: `_this`,
/// `snapshot` (optional), `deviceKey`, `startOffset`, `changeId`.
fn changed_areas_body(vm: &MoRef, snapshot: Option<&MoRef>, key: i32, start: u64) -> String {
    format!(
        "{}{}<deviceKey>{key}</deviceKey><startOffset>{start}</startOffset><changeId>*</changeId>",
        vm.this(),
        snapshot.map(|s| s.xml("snapshot")).unwrap_or_default()
    )
}

/// The datacenter a provider works in.
#[derive(Debug, Clone)]
pub struct Datacenter {
    /// The object.
    pub moref: MoRef,
    /// Its name (the `dcPath` of `/folder`).
    pub name: String,
    /// Its VM folder.
    pub vm_folder: MoRef,
    /// Its host folder.
    pub host_folder: MoRef,
    /// Its datastores, with names.
    pub datastores: Vec<(MoRef, String)>,
}

/// The vSphere provider.
#[derive(Debug, Clone)]
pub struct VsphereProvider {
    client: Arc<Client>,
    permits: Arc<Semaphore>,
    dc: Arc<OnceCell<Datacenter>>,
}

impl VsphereProvider {
    /// A provider for `cfg` (no network yet: [`Provider::validate`] checks it).
    pub fn new(cfg: VsphereConfig) -> Result<Self> {
        let permits = Arc::new(Semaphore::new(cfg.folder_concurrency.max(1)));
        Ok(VsphereProvider {
            client: Arc::new(Client::new(cfg)?),
            permits,
            dc: Arc::new(OnceCell::new()),
        })
    }

    /// The SOAP client.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The configuration.
    pub fn config(&self) -> &VsphereConfig {
        self.client.config()
    }

    fn cfg(&self) -> &VsphereConfig {
        self.client.config()
    }

    /// Ends the session (`SessionManager.Logout`). Sessions also expire server-side.
    pub async fn logout(&self) -> Result<()> {
        self.client.logout().await
    }

    /// The datacenter (configured, or the only one).
    pub async fn datacenter(&self) -> Result<&Datacenter> {
        self.dc
            .get_or_try_init(|| async {
                let dcs = self
                    .client
                    .list(
                        "Datacenter",
                        &["name", "vmFolder", "hostFolder", "datastore"],
                    )
                    .await?;
                let pick = match &self.cfg().datacenter {
                    Some(n) => dcs
                        .into_iter()
                        .find(|d| d.text("name") == Some(n))
                        .ok_or_else(|| Error::not_found(format!("datacenter '{n}' not found")))?,
                    None => {
                        if dcs.len() != 1 {
                            return Err(Error::invalid(format!(
                                "{} datacenters: name one in the configuration",
                                dcs.len()
                            )));
                        }
                        dcs.into_iter()
                            .next()
                            .ok_or_else(|| Error::not_found("no datacenter".to_string()))?
                    }
                };
                let mut datastores = Vec::new();
                if let Some(v) = pick.props.get("datastore") {
                    for r in v.children.iter().filter_map(MoRef::from_node) {
                        let o = self.client.properties(&r, &["name"]).await?;
                        datastores.push((r, o.text("name").unwrap_or("").to_string()));
                    }
                }
                Ok(Datacenter {
                    name: pick.text("name").unwrap_or("").to_string(),
                    vm_folder: pick
                        .moref("vmFolder")
                        .ok_or_else(|| Error::corrupt("datacenter without vmFolder"))?,
                    host_folder: pick
                        .moref("hostFolder")
                        .ok_or_else(|| Error::corrupt("datacenter without hostFolder"))?,
                    datastores,
                    moref: pick.obj,
                })
            })
            .await
    }

    async fn folder(&self) -> Result<Folder> {
        let dc = self.datacenter().await?;
        Ok(Folder::new(
            self.client.clone(),
            dc.name.clone(),
            dc.moref.clone(),
            self.permits.clone(),
        ))
    }

    /// The datastore for new disks: `placement`, the configured one, or the first.
    async fn pick_datastore(&self, placement: Option<&str>) -> Result<String> {
        let dc = self.datacenter().await?;
        let want = placement.or(self.cfg().datastore.as_deref());
        match want {
            Some(w) => dc
                .datastores
                .iter()
                .find(|(_, n)| n == w)
                .map(|(_, n)| n.clone())
                .ok_or_else(|| Error::not_found(format!("datastore '{w}' not found"))),
            None => dc
                .datastores
                .first()
                .map(|(_, n)| n.clone())
                .ok_or_else(|| Error::not_found("the datacenter has no datastore")),
        }
    }

    // --- finding VMs -----------------------------------------------------------------------

    /// Finds a VM by managed object id (`vm-42`), instance or BIOS UUID, inventory path
    /// (`DC0/vm/folder/name`) or name (which must be unique).
    pub async fn find_vm(&self, vm: &str) -> Result<MoRef> {
        let vm = vm.trim();
        if vm.is_empty() {
            return Err(Error::invalid("empty VM name"));
        }
        let nf = || Error::not_found(format!("VM '{vm}' not found")).with_vm(vm.to_string());
        if vm.starts_with("vm-") && vm[3..].chars().all(|c| c.is_ascii_digit()) {
            let r = MoRef::new("VirtualMachine", vm);
            return match self.client.properties(&r, &["name"]).await {
                Ok(o) if o.text("name").is_some() => Ok(r),
                Ok(_) => Err(nf()),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(nf()),
                Err(e) => Err(e),
            };
        }
        let si = self.client.content().await?.search_index.clone();
        if is_uuid(vm) {
            for instance in [true, false] {
                let inner = format!(
                    "{}<uuid>{}</uuid><vmSearch>true</vmSearch><instanceUuid>{instance}</instanceUuid>",
                    si.this(),
                    esc(vm)
                );
                let n = self.client.call("FindByUuid", &inner).await?;
                if let Some(r) = n.child("returnval").and_then(MoRef::from_node) {
                    return Ok(r);
                }
            }
            return Err(nf());
        }
        if vm.contains('/') {
            let inner = format!("{}<inventoryPath>{}</inventoryPath>", si.this(), esc(vm));
            let n = self.client.call("FindByInventoryPath", &inner).await?;
            return n
                .child("returnval")
                .and_then(MoRef::from_node)
                .filter(|r| r.ty == "VirtualMachine")
                .ok_or_else(nf);
        }
        let all = self.client.list("VirtualMachine", &["name"]).await?;
        let mut hits = all.into_iter().filter(|o| o.text("name") == Some(vm));
        match (hits.next(), hits.next()) {
            (Some(o), None) => Ok(o.obj),
            (None, _) => Err(nf()),
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::Conflict,
                format!("several VMs are named '{vm}': use the managed object id or UUID"),
            )),
        }
    }

    async fn vm_props(&self, vm: &str) -> Result<(MoRef, ObjectContent)> {
        let r = self.find_vm(vm).await?;
        let o = self
            .client
            .properties(&r, vm::VM_PATHS)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        Ok((r, o))
    }

    /// The hardware of a VM as vSphere describes it.
    pub async fn hardware(&self, vm: &str) -> Result<Hardware> {
        let (_, o) = self.vm_props(vm).await?;
        Ok(o.props
            .get("config.hardware.device")
            .map(vm::parse_devices)
            .unwrap_or_default())
    }

    async fn network_name(&self, nic: &VsphereNic) -> Option<String> {
        if let Some(n) = &nic.network_name {
            return Some(n.clone());
        }
        let key = nic.portgroup_key.as_ref()?;
        let r = MoRef::new("DistributedVirtualPortgroup", key.clone());
        match self.client.properties(&r, &["name"]).await {
            Ok(o) => o.text("name").map(str::to_string),
            Err(_) => Some(key.clone()),
        }
    }

    fn info_of(
        &self,
        r: &MoRef,
        o: &ObjectContent,
        hw: &Hardware,
        nets: Vec<Option<String>>,
    ) -> VmInfo {
        let firmware = match o.text("config.firmware") {
            Some("efi") => virtrigaud_core::Firmware::Uefi,
            _ => virtrigaud_core::Firmware::Bios,
        };
        VmInfo {
            id: r.value.clone(),
            name: o.text("name").unwrap_or("").to_string(),
            cpus: o
                .text("config.hardware.numCPU")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            memory_mib: o
                .text("config.hardware.memoryMB")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            firmware,
            machine: None,
            guest_os: o.text("config.guestId").map(str::to_string),
            state: vm::power_state(o.text("runtime.powerState")),
            disks: hw.disks.iter().map(VsphereDisk::info).collect(),
            nics: hw
                .nics
                .iter()
                .zip(nets)
                .map(|(n, net)| n.info(net))
                .collect(),
            annotation: o
                .text("config.annotation")
                .filter(|a| !a.is_empty())
                .map(str::to_string),
        }
    }

    async fn describe(&self, r: &MoRef) -> Result<VmInfo> {
        let o = self.client.properties(r, vm::VM_PATHS).await?;
        let hw = o
            .props
            .get("config.hardware.device")
            .map(vm::parse_devices)
            .unwrap_or_default();
        let mut nets = Vec::new();
        for n in &hw.nics {
            nets.push(self.network_name(n).await);
        }
        Ok(self.info_of(r, &o, &hw, nets))
    }

    async fn power_state(&self, r: &MoRef) -> Result<PowerState> {
        let o = self.client.properties(r, &["runtime.powerState"]).await?;
        Ok(vm::power_state(o.text("runtime.powerState")))
    }

    async fn tools_running(&self, r: &MoRef) -> bool {
        match self
            .client
            .properties(r, &["guest.toolsRunningStatus"])
            .await
        {
            Ok(o) => o.text("guest.toolsRunningStatus") == Some("guestToolsRunning"),
            Err(_) => false,
        }
    }

    async fn wait_power(&self, r: &MoRef, want: PowerState, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        let mut interval = Duration::from_millis(200);
        loop {
            if self.power_state(r).await? == want {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            tokio::time::sleep(interval.min(timeout.saturating_sub(start.elapsed()))).await;
            interval = (interval * 2).min(Duration::from_secs(2));
        }
    }

    async fn hard_off(&self, r: &MoRef) -> Result<()> {
        if self.power_state(r).await? == PowerState::Stopped {
            return Ok(());
        }
        self.client
            .run_task("PowerOffVM_Task", &r.this())
            .await
            .map(|_| ())
    }

    // --- disks -------------------------------------------------------------------------------

    /// The disk of a VM by id: device key, label (`Hard disk 1`) or backing file.
    fn pick_disk<'a>(hw: &'a Hardware, disk: &str) -> Option<&'a VsphereDisk> {
        hw.disks.iter().find(|d| {
            d.key.to_string() == disk || d.label.as_deref() == Some(disk) || d.file == disk
        })
    }

    async fn open_path(&self, path: &DsPath, id: &str) -> Result<OpenedDisk> {
        let folder = self.folder().await?;
        let v = datastore::open_disk_file(&folder, path, self.cfg().folder_concurrency).await?;
        let info = virtrigaud_core::DiskInfo {
            id: id.to_string(),
            capacity: v.capacity,
            allocation: None,
            format: Some(v.format),
            bus: None,
            location: path.display(),
        };
        Ok(OpenedDisk {
            info,
            source: ImageSource::RandomAccess(v.source),
        })
    }

    /// The areas of disk `key` that hold data, from `QueryChangedDiskAreas` with change id
    /// `*`, asked span by span until the whole `capacity` is covered. `snapshot` is required by
    /// vSphere for a running VM (the point in time the areas describe).
    pub async fn allocated_areas(
        &self,
        vm: &MoRef,
        snapshot: Option<&MoRef>,
        key: i32,
        capacity: u64,
    ) -> Result<Vec<std::ops::Range<u64>>> {
        let mut start = 0u64;
        let mut out = Vec::new();
        while start < capacity {
            let n = self
                .client
                .call(
                    "QueryChangedDiskAreas",
                    &changed_areas_body(vm, snapshot, key, start),
                )
                .await?;
            let info = vm::parse_disk_change_info(&n)?;
            let next = info.start_offset.saturating_add(info.length);
            if info.start_offset > start || next <= start {
                return Err(Error::corrupt(format!(
                    "QueryChangedDiskAreas from {start} answered the span {}+{}, which makes \
                     no progress",
                    info.start_offset, info.length
                )));
            }
            out.extend(info.areas);
            if out.len() > MAX_CHANGED_AREAS {
                return Err(Error::corrupt(format!(
                    "QueryChangedDiskAreas answered more than {MAX_CHANGED_AREAS} areas"
                )));
            }
            start = next;
        }
        Ok(out)
    }

    /// Gives `opened` the allocation map of changed-block tracking when the VM has it on.
    /// A failing query costs only speed: zero detection does the work, and a warning says why.
    async fn apply_changed_block_map(
        &self,
        vm: &MoRef,
        snapshot: Option<&MoRef>,
        key: i32,
        opened: &mut OpenedDisk,
    ) -> Result<()> {
        let on = self
            .client
            .properties(vm, &["config.changeTrackingEnabled"])
            .await?
            .text("config.changeTrackingEnabled")
            == Some("true");
        if !on {
            debug!(vm = %vm, key, "changed-block tracking off: zero detection finds the holes");
            return Ok(());
        }
        let ImageSource::RandomAccess(src) = &opened.source else {
            return Ok(());
        };
        match self
            .allocated_areas(vm, snapshot, key, opened.info.capacity)
            .await
        {
            Ok(areas) => {
                let mapped = datastore::MappedReader::new(src.clone(), areas);
                let allocated: u64 = mapped.ranges().iter().map(|r| r.end - r.start).sum();
                info!(vm = %vm, key, allocated, areas = mapped.ranges().len(),
                    "allocation map from changed-block tracking");
                opened.info.allocation = Some(allocated);
                opened.source = ImageSource::RandomAccess(Arc::new(mapped));
            }
            Err(e) if e.kind() == ErrorKind::Cancelled => return Err(e),
            Err(e) => warn!(vm = %vm, key, error = %e,
                "QueryChangedDiskAreas failed; reading the whole disk, zero detection finds the holes"),
        }
        Ok(())
    }

    /// Where the disk files of `spec` go: `[ds] <vm>/<name>.vmdk`.
    async fn disk_path(&self, spec: &DiskCreateSpec) -> Result<DsPath> {
        check_name(&spec.vm, "VM name")?;
        check_name(&spec.name, "disk name")?;
        let ds = self.pick_datastore(spec.placement.as_deref()).await?;
        Ok(DsPath {
            datastore: ds,
            path: format!("{}/{}.vmdk", spec.vm, spec.name),
        })
    }

    /// `FileManager.MakeDirectory` (an existing directory is fine).
    async fn make_directory(&self, ds: &str, dir: &str) -> Result<()> {
        let fm = self.client.content().await?.file_manager.clone();
        let dc = self.datacenter().await?.moref.clone();
        let inner = format!(
            "{}<name>[{}] {}</name>{}<createParentDirectories>true</createParentDirectories>",
            fm.this(),
            esc(ds),
            esc(dir),
            dc.xml("datacenter")
        );
        match self.client.call("MakeDirectory", &inner).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    // --- networks and placement --------------------------------------------------------------

    /// The network for a NIC whose source network is `source`: the configured mapping of it,
    /// else a vSphere network of the same name, else the default network.
    async fn resolve_network(&self, source: Option<&str>) -> Result<NetBacking> {
        let cfg = self.cfg();
        let mapped = source.and_then(|s| cfg.network_map.get(s).cloned());
        let nets = self.client.list("Network", &["name"]).await?;
        let find = |n: &str| nets.iter().find(|o| o.text("name") == Some(n)).cloned();
        let hit = match &mapped {
            // An explicit mapping must exist.
            Some(m) => find(m).ok_or_else(|| {
                Error::not_found(format!("network '{m}' (mapped from {source:?}) not found"))
            })?,
            None => match source.and_then(&find) {
                Some(h) => h,
                None => {
                    let d = cfg.default_network.as_deref().ok_or_else(|| {
                        Error::not_found(format!(
                            "no vSphere network named {source:?} and no default network: \
                             map it with network_map"
                        ))
                    })?;
                    find(d).ok_or_else(|| {
                        Error::not_found(format!("default network '{d}' not found"))
                    })?
                }
            },
        };
        let wanted = hit.text("name").unwrap_or("").to_string();
        if hit.obj.ty == "DistributedVirtualPortgroup" {
            let pg = self
                .client
                .properties(&hit.obj, &["key", "config.distributedVirtualSwitch"])
                .await?;
            let dvs = pg
                .moref("config.distributedVirtualSwitch")
                .ok_or_else(|| Error::corrupt("port group without its switch"))?;
            let sw = self.client.properties(&dvs, &["uuid"]).await?;
            return Ok(NetBacking::Distributed {
                switch_uuid: sw.text("uuid").unwrap_or("").to_string(),
                portgroup_key: pg.text("key").unwrap_or(&hit.obj.value).to_string(),
            });
        }
        Ok(NetBacking::Network {
            name: wanted,
            moref: hit.obj,
        })
    }

    pub(crate) async fn resource_pool(&self) -> Result<MoRef> {
        let pools = self
            .client
            .list("ResourcePool", &["name", "parent"])
            .await?;
        if let Some(want) = &self.cfg().resource_pool {
            return pools
                .into_iter()
                .find(|p| p.text("name") == Some(want.as_str()))
                .map(|p| p.obj)
                .ok_or_else(|| Error::not_found(format!("resource pool '{want}' not found")));
        }
        // The root pool of the first compute resource of our datacenter.
        let dc = self.datacenter().await?;
        let crs = self
            .client
            .list("ComputeResource", &["resourcePool", "parent"])
            .await?;
        for cr in crs {
            if let Some(rp) = cr.moref("resourcePool")
                && self.in_folder(&cr, &dc.host_folder).await
            {
                return Ok(rp);
            }
        }
        Err(Error::not_found("no resource pool in the datacenter"))
    }

    /// Whether `o`'s parent chain reaches `folder`.
    async fn in_folder(&self, o: &ObjectContent, folder: &MoRef) -> bool {
        let mut cur = o.moref("parent");
        for _ in 0..32 {
            let Some(p) = cur else { return false };
            if &p == folder {
                return true;
            }
            cur = match self.client.properties(&p, &["parent"]).await {
                Ok(o) => o.moref("parent"),
                Err(_) => None,
            };
        }
        false
    }

    /// Deletes a disk's descriptor, then its `-flat.vmdk` extent (a file that is gone is fine).
    pub(crate) async fn delete_disk_files(&self, path: &DsPath) -> Result<()> {
        let folder = self.folder().await?;
        // The descriptor first: without it, what is left is no disk.
        folder.delete(path).await?;
        let stem = path.path.rsplit('/').next().unwrap_or("");
        if let Some(stem) = stem.strip_suffix(".vmdk") {
            folder
                .delete(&path.sibling(&format!("{stem}-flat.vmdk")))
                .await?;
        }
        Ok(())
    }

    /// Removes the NFC import placeholder VM `name` that an interrupted import left (its
    /// files one by one, the disk it holds included). Returns whether there was one. A VM of
    /// that name without the placeholder marker ([`nfc::PLACEHOLDER_MARKER`]) is not ours:
    /// `Conflict`, and it is left alone.
    pub(crate) async fn remove_placeholder(&self, name: &str) -> Result<bool> {
        let r = match self.find_vm(name).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let o = self
            .client
            .properties(&r, &["config.annotation", "config.hardware.device"])
            .await?;
        if !nfc::is_placeholder(o.text("config.annotation")) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "a VM named '{name}' exists without virtrigaud's import-placeholder marker; \
                     it is left alone (rename or remove it)"
                ),
            ));
        }
        self.replace(&r, &[]).await?;
        // The disk it held, whether or not its file layout listed it.
        let hw = o
            .props
            .get("config.hardware.device")
            .map(vm::parse_devices)
            .unwrap_or_default();
        for d in &hw.disks {
            if let Ok(p) = DsPath::parse(&d.file) {
                self.delete_disk_files(&p).await?;
            }
        }
        Ok(true)
    }

    /// Destroys `r` with its files (`Destroy_Task`), powered off first.
    pub(crate) async fn destroy(&self, r: &MoRef) -> Result<()> {
        self.hard_off(r).await?;
        self.client.run_task("Destroy_Task", &r.this()).await?;
        Ok(())
    }

    /// Removes the VM `r` that a new VM replaces, keeping the disk files in `keep` (the new
    /// VM's disks, which a crashed earlier attempt may have attached): those are detached
    /// first, the VM is unregistered, and its other files are deleted one by one. Not
    /// `Destroy_Task`: it deletes the VM's whole directory, where the kept disks live.
    pub(crate) async fn replace(&self, r: &MoRef, keep: &[String]) -> Result<()> {
        self.hard_off(r).await?;
        let o = self
            .client
            .properties(r, &["config.hardware.device", "config.files.vmPathName"])
            .await?;
        let hw = o
            .props
            .get("config.hardware.device")
            .map(vm::parse_devices)
            .unwrap_or_default();
        let mut changes = String::new();
        for d in hw.disks.iter().filter(|d| keep.contains(&d.file)) {
            changes.push_str(&format!(
                "<deviceChange><operation>remove</operation>\
                 <device xsi:type=\"VirtualDisk\"><key>{}</key>\
                 <controllerKey>0</controllerKey><capacityInKB>0</capacityInKB></device>\
                 </deviceChange>",
                d.key
            ));
        }
        if !changes.is_empty() {
            let inner = format!("{}<spec>{changes}</spec>", r.this());
            self.client.run_task("ReconfigVM_Task", &inner).await?;
        }
        let files = self.client.properties(r, &["layoutEx.file"]).await?;
        let mut names: Vec<String> = files
            .props
            .get("layoutEx.file")
            .map(|v| {
                v.children
                    .iter()
                    .filter_map(|f| f.text_at(&["name"]).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(vmx) = o.text("config.files.vmPathName") {
            names.push(vmx.to_string());
            // The VM's companion files next to its .vmx (layoutEx does not always list them
            // with their directory).
            if let Ok(p) = DsPath::parse(vmx)
                && let Some(stem) = p
                    .path
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.strip_suffix(".vmx"))
            {
                for f in [
                    format!("{stem}.nvram"),
                    format!("{stem}.vmsd"),
                    format!("{stem}.vmxf"),
                    "vmware.log".to_string(),
                ] {
                    names.push(p.sibling(&f).display());
                }
            }
        }
        self.client.call("UnregisterVM", &r.this()).await?;
        let kept_flats: Vec<String> = keep
            .iter()
            .filter_map(|k| k.strip_suffix(".vmdk").map(|s| format!("{s}-flat.vmdk")))
            .collect();
        let folder = self.folder().await?;
        for n in names {
            if keep.contains(&n) || kept_flats.contains(&n) {
                continue;
            }
            match DsPath::parse(&n) {
                Ok(p) if p.path.contains('/') => folder.delete(&p).await?,
                // A file outside any VM directory is no file of this VM.
                _ => debug!(file = %n, "not deleting a file outside the VM's directory"),
            }
        }
        Ok(())
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// A VM or disk name used as a datastore path segment.
fn check_name(s: &str, what: &str) -> Result<()> {
    if s.is_empty()
        || s == "."
        || s == ".."
        || s.contains(['/', '\\', '[', ']'])
        || s.chars().any(char::is_control)
        || s.len() > 80
    {
        return Err(Error::invalid(format!(
            "{what} '{}' cannot name a datastore file (no / \\ [ ], at most 80 bytes)",
            s.escape_debug()
        )));
    }
    Ok(())
}

#[async_trait]
impl Provider for VsphereProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            power: true,
            snapshots: true,
            export: true,
            import: true,
            create_vm: true,
            random_access_read: true,
            pull_from_url: false,
            import_staged: false,
            changed_blocks: false,
        }
    }

    async fn validate(&self) -> Result<()> {
        self.client.login().await?;
        if !self.client.session_is_active().await.unwrap_or(true) {
            return Err(Error::new(ErrorKind::Auth, "the new session is not active"));
        }
        self.datacenter().await?;
        Ok(())
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>> {
        let all = self
            .client
            .list("VirtualMachine", &["name", "runtime.powerState"])
            .await?;
        Ok(all
            .into_iter()
            .map(|o| VmSummary {
                name: o.text("name").unwrap_or("").to_string(),
                state: vm::power_state(o.text("runtime.powerState")),
                id: o.obj.value,
            })
            .collect())
    }

    async fn describe_vm(&self, vm: &str) -> Result<VmInfo> {
        let r = self.find_vm(vm).await?;
        self.describe(&r)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))
    }

    async fn power(&self, vm: &str, op: PowerOp) -> Result<()> {
        let r = self.find_vm(vm).await?;
        let ctx = |e: Error| e.with_vm(vm.to_string()).with_operation("power");
        match op {
            PowerOp::On => {
                if self.power_state(&r).await.map_err(ctx)? == PowerState::Running {
                    return Ok(());
                }
                self.client
                    .run_task("PowerOnVM_Task", &r.this())
                    .await
                    .map_err(ctx)?;
            }
            PowerOp::Off => self.hard_off(&r).await.map_err(ctx)?,
            PowerOp::Shutdown { timeout, force } => {
                if self.power_state(&r).await.map_err(ctx)? == PowerState::Stopped {
                    return Ok(());
                }
                match self.client.call("ShutdownGuest", &r.this()).await {
                    Ok(_) => {}
                    Err(e) if force && e.kind() == ErrorKind::Conflict => {
                        warn!(vm, error = %e, "guest shutdown impossible; powering off");
                        return self.hard_off(&r).await.map_err(ctx);
                    }
                    Err(e) => return Err(ctx(e)),
                }
                if !self
                    .wait_power(&r, PowerState::Stopped, timeout)
                    .await
                    .map_err(ctx)?
                {
                    if force {
                        warn!(vm, "guest did not shut down in time; powering off");
                        self.hard_off(&r).await.map_err(ctx)?;
                    } else {
                        return Err(ctx(Error::new(
                            ErrorKind::Timeout,
                            format!("guest did not shut down within {timeout:?}"),
                        )));
                    }
                }
            }
            PowerOp::Reboot => {
                if self.tools_running(&r).await {
                    self.client
                        .call("RebootGuest", &r.this())
                        .await
                        .map_err(ctx)?;
                } else {
                    self.client
                        .run_task("ResetVM_Task", &r.this())
                        .await
                        .map_err(ctx)?;
                }
            }
        }
        Ok(())
    }

    async fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotRef> {
        let r = self.find_vm(vm).await?;
        let quiesce =
            self.power_state(&r).await? == PowerState::Running && self.tools_running(&r).await;
        let inner = format!(
            "{}<name>{}</name><description>virtrigaud export</description>\
             <memory>false</memory><quiesce>{quiesce}</quiesce>",
            r.this(),
            esc(name)
        );
        let result = self
            .client
            .run_task("CreateSnapshot_Task", &inner)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        let snap = result
            .as_ref()
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::corrupt("CreateSnapshot_Task returned no snapshot"))?;
        info!(vm, snapshot = %snap.value, quiesce, "snapshot created");
        Ok(SnapshotRef {
            id: snap.value,
            name: name.to_string(),
        })
    }

    async fn delete_snapshot(&self, vm: &str, snapshot: &SnapshotRef) -> Result<()> {
        let r = self.find_vm(vm).await?;
        let snap = MoRef::new("VirtualMachineSnapshot", snapshot.id.clone());
        let inner = format!(
            "{}<removeChildren>false</removeChildren><consolidate>true</consolidate>",
            snap.this()
        );
        match self.client.run_task("RemoveSnapshot_Task", &inner).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                debug!(vm = %r, "snapshot already gone");
                Ok(())
            }
            Err(e) => Err(e.with_vm(vm.to_string())),
        }
    }

    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk> {
        let ctx = |e: Error| {
            e.with_vm(vm.to_string())
                .with_disk(disk.to_string())
                .with_operation("open_disk")
        };
        let r = self.find_vm(vm).await.map_err(ctx)?;
        // The disk as the snapshot recorded it: the snapshot's own device list names the file
        // that was current when it was taken (the base that the snapshot froze).
        let devices = match snapshot {
            Some(s) => {
                let snap = MoRef::new("VirtualMachineSnapshot", s.id.clone());
                self.client
                    .properties(&snap, &["config.hardware.device"])
                    .await
                    .map_err(ctx)?
            }
            None => self
                .client
                .properties(&r, &["config.hardware.device"])
                .await
                .map_err(ctx)?,
        };
        let hw = devices
            .props
            .get("config.hardware.device")
            .map(vm::parse_devices)
            .unwrap_or_default();
        let d = Self::pick_disk(&hw, disk)
            .ok_or_else(|| ctx(Error::not_found(format!("the VM has no disk '{disk}'"))))?;
        if self.cfg().export_mode == ExportMode::Nfc {
            let entity = match snapshot {
                Some(s) => MoRef::new("VirtualMachineSnapshot", s.id.clone()),
                None => r.clone(),
            };
            let index = hw.disks.iter().position(|x| x.key == d.key).unwrap_or(0);
            let (size, stream) = nfc::open_export(self.client.clone(), &entity, &hw.disks, index)
                .await
                .map_err(ctx)?;
            let mut info = d.info();
            info.format = Some(DiskFormat::Vmdk(
                virtrigaud_core::format::VmdkSubformat::StreamOptimized,
            ));
            return Ok(OpenedDisk {
                info,
                source: ImageSource::from_byte_stream(size, stream),
            });
        }
        if d.has_parent {
            return Err(ctx(datastore::delta_chain(&format!("disk {}", d.file))));
        }
        let path = DsPath::parse(&d.file).map_err(ctx)?;
        let mut opened = self
            .open_path(&path, &d.key.to_string())
            .await
            .map_err(ctx)?;
        opened.info.bus = d.bus;
        if self.cfg().changed_block_map {
            let snap = snapshot.map(|s| MoRef::new("VirtualMachineSnapshot", s.id.clone()));
            self.apply_changed_block_map(&r, snap.as_ref(), d.key, &mut opened)
                .await
                .map_err(ctx)?;
        }
        Ok(opened)
    }

    async fn create_disk(&self, spec: &DiskCreateSpec) -> Result<CreatedDisk> {
        let ctx = |e: Error| {
            e.with_vm(spec.vm.clone())
                .with_disk(spec.name.clone())
                .with_operation("create_disk")
        };
        let path = self.disk_path(spec).await.map_err(ctx)?;
        let folder = self.folder().await.map_err(ctx)?;
        if !spec.overwrite && folder.size(&path).await.map_err(ctx)?.is_some() {
            return Err(ctx(Error::new(
                ErrorKind::AlreadyExists,
                format!("disk {} exists (overwrite not requested)", path.display()),
            )));
        }
        self.make_directory(&path.datastore, path.dir())
            .await
            .map_err(ctx)?;
        // A replaced disk disappears first (descriptor, extent, and the placeholder VM of an
        // interrupted NFC import that holds it).
        if spec.overwrite {
            self.delete_disk(&spec.vm, &path.display())
                .await
                .map_err(ctx)?;
        }
        if self.cfg().import_mode == ImportMode::NfcStreamOptimized {
            let w = nfc::NfcWriter::start(self.clone(), &spec.vm, path.clone(), spec.capacity)
                .await
                .map_err(ctx)?;
            return Ok(CreatedDisk {
                format: DiskFormat::Vmdk(virtrigaud_core::format::VmdkSubformat::StreamOptimized),
                location: path.display(),
                sink: Box::new(w),
            });
        }
        let w = FlatWriter::start(folder, path.clone(), spec.capacity)
            .await
            .map_err(ctx)?;
        Ok(CreatedDisk {
            format: DiskFormat::Raw,
            location: path.display(),
            sink: Box::new(w),
        })
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        let ctx = |e: Error| e.with_vm(spec.name.clone()).with_operation("create_vm");
        check_name(&spec.name, "VM name").map_err(ctx)?;
        if spec.disks.is_empty() {
            return Err(ctx(Error::invalid("a VM needs at least one disk")));
        }
        let folder = self.folder().await.map_err(ctx)?;
        let mut disks = Vec::new();
        for d in &spec.disks {
            let p = DsPath::parse(&d.location).map_err(ctx)?;
            let v = datastore::open_disk_file(&folder, &p, 1)
                .await
                .map_err(ctx)?;
            disks.push(DiskAttach {
                file: p.display(),
                capacity: v.capacity,
                bus: d.bus,
            });
        }
        let keep: Vec<String> = disks.iter().map(|d| d.file.clone()).collect();
        match self.find_vm(&spec.name).await {
            Ok(existing) if spec.overwrite => {
                info!(vm = %spec.name, "replacing the existing VM (overwrite requested)");
                self.replace(&existing, &keep).await.map_err(ctx)?;
            }
            Ok(_) => {
                return Err(ctx(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "a VM named '{}' exists (overwrite not requested)",
                        spec.name
                    ),
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        let mut nics = Vec::new();
        for n in &spec.nics {
            nics.push(NicAttach {
                backing: self
                    .resolve_network(n.network.as_deref())
                    .await
                    .map_err(ctx)?,
                mac: n.mac.clone(),
            });
        }
        let first = DsPath::parse(&disks[0].file).map_err(ctx)?;
        let vmx_dir = match first.dir() {
            "" => spec.name.clone(),
            d => d.to_string(),
        };
        let guest = spec::resolve_guest_id(
            self.cfg().guest_id_override.as_deref(),
            spec.guest_os.as_deref(),
        );
        let cs = CreateSpec {
            name: &spec.name,
            guest_id: guest,
            annotation: spec.annotation.as_deref(),
            vmx_path: format!("[{}] {}/{}.vmx", first.datastore, vmx_dir, spec.name),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            firmware: spec.firmware,
            disks,
            nics,
            scsi: self.cfg().scsi_model,
            nic_model: self.cfg().nic_model,
        };
        let config = spec::config_spec(&cs).map_err(ctx)?;
        let dc = self.datacenter().await.map_err(ctx)?.clone();
        let pool = self.resource_pool().await.map_err(ctx)?;
        let inner = format!(
            "{}<config>{config}</config>{}",
            dc.vm_folder.this(),
            pool.xml("pool")
        );
        let result = self
            .client
            .run_task("CreateVM_Task", &inner)
            .await
            .map_err(ctx)?;
        let r = result
            .as_ref()
            .and_then(MoRef::from_node)
            .ok_or_else(|| ctx(Error::corrupt("CreateVM_Task returned no VM")))?;
        info!(vm = %spec.name, id = %r.value, "VM created");
        self.describe(&r).await.map_err(ctx)
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        let r = self.find_vm(vm).await?;
        self.destroy(&r)
            .await
            .map_err(|e| e.with_vm(vm.to_string()).with_operation("delete_vm"))
    }

    async fn find_disk(&self, spec: &DiskCreateSpec) -> Result<Option<String>> {
        let path = self.disk_path(spec).await?;
        let folder = self.folder().await?;
        Ok(folder.size(&path).await?.map(|_| path.display()))
    }

    async fn open_created_disk(&self, vm: &str, location: &str) -> Result<OpenedDisk> {
        let path = DsPath::parse(location)?;
        self.open_path(&path, location)
            .await
            .map_err(|e| e.with_vm(vm.to_string()).with_disk(location.to_string()))
    }

    async fn delete_disk(&self, vm: &str, location: &str) -> Result<()> {
        let path = DsPath::parse(location)?;
        let ctx = |e: Error| e.with_vm(vm.to_string()).with_disk(location.to_string());
        // An NFC import that a crash interrupted left its placeholder VM holding the disk.
        let file = path.path.rsplit('/').next().unwrap_or("");
        match self
            .remove_placeholder(&nfc::placeholder_name(vm, file))
            .await
        {
            Ok(true) => info!(
                vm,
                disk = location,
                "removed an interrupted import's placeholder VM"
            ),
            Ok(false) => {}
            // Another VM of that name is no business of ours; the disk still goes.
            Err(e) if e.kind() == ErrorKind::Conflict => warn!(vm, error = %e, "left alone"),
            Err(e) => return Err(ctx(e)),
        }
        self.delete_disk_files(&path).await.map_err(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_areas_request_follows_the_wsdl_order() {
        let vm = MoRef::new("VirtualMachine", "vm-42");
        let snap = MoRef::new("VirtualMachineSnapshot", "snapshot-7");
        assert_eq!(
            changed_areas_body(&vm, Some(&snap), 2000, 1 << 30),
            "<_this type=\"VirtualMachine\">vm-42</_this>\
             <snapshot type=\"VirtualMachineSnapshot\">snapshot-7</snapshot>\
             <deviceKey>2000</deviceKey><startOffset>1073741824</startOffset>\
             <changeId>*</changeId>"
        );
        assert!(!changed_areas_body(&vm, None, 2000, 0).contains("snapshot"));
    }

    #[test]
    fn uuids_and_names() {
        assert!(is_uuid("b4689bed-97f0-5bcd-8a4c-07477cc8f06f"));
        assert!(!is_uuid("DC0_H0_VM0"));
        assert!(check_name("vm-1", "x").is_ok());
        assert!(check_name("../x", "x").is_err());
        assert!(check_name("[ds]", "x").is_err());
    }

    #[test]
    fn capabilities_are_honest() {
        let p = VsphereProvider::new(VsphereConfig::new("https://h/sdk", "u", "p")).unwrap();
        let c = p.capabilities();
        assert!(c.export && c.import && c.create_vm && c.random_access_read);
        assert!(!c.changed_blocks && !c.pull_from_url);
    }
}

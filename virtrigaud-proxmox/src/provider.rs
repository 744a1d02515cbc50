//! [`ProxmoxProvider`]: the [`Provider`] implementation over the API client and the SSH side.

use crate::client::{IMPORT_CONTENT_SINCE, IMPORT_FROM_SINCE, PveClient, Resource};
use crate::config::ProxmoxConfig;
use crate::export::{ReadPath, SnapshotView, read_path};
use crate::props::{Drive, Net, parse_drive, parse_net};
use crate::ssh::{SshNode, check_snapshot};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};
use virtrigaud_core::format::{DiskFormat, VmdkSubformat};
use virtrigaud_core::io::{ByteSink, ImageSource};
use virtrigaud_core::manifest::Manifest;
use virtrigaud_core::storage::StorageBackend;
use virtrigaud_core::transfer::read_manifest;
use virtrigaud_core::{
    Capabilities, CreatedDisk, DiskBus, DiskCreateSpec, DiskInfo, Error, ErrorKind, Firmware,
    NicInfo, OpenedDisk, PowerOp, PowerState, Provider, Result, SnapshotRef, StagedObject, VmInfo,
    VmSpec, VmSummary,
};

const KIND: &str = "proxmox";

/// The Proxmox VE provider.
#[derive(Debug, Clone)]
pub struct ProxmoxProvider {
    client: Arc<PveClient>,
    cfg: Arc<ProxmoxConfig>,
}

/// A VM found in the cluster.
#[derive(Debug, Clone)]
struct Found {
    node: String,
    vmid: u32,
    res: Resource,
}

impl ProxmoxProvider {
    /// A provider for `cfg` (nothing is sent until the first operation).
    pub fn new(cfg: ProxmoxConfig) -> Result<Self> {
        let cfg = Arc::new(cfg);
        Ok(ProxmoxProvider {
            client: Arc::new(PveClient::new(cfg.clone())?),
            cfg,
        })
    }

    /// The API client (one method per API call).
    pub fn client(&self) -> &PveClient {
        &self.client
    }

    /// Finds a VM by vmid or name on any node. A name held by several VMs is `InvalidInput`.
    async fn find(&self, vm: &str) -> Result<Option<Found>> {
        let all = self.client.cluster_vms().await?;
        let by_id: Option<u32> = vm.parse().ok();
        let hits: Vec<Resource> = all
            .into_iter()
            .filter(|r| Some(r.vmid) == by_id || r.name.as_deref() == Some(vm))
            .collect();
        // A vmid match wins over a VM that happens to be named like a number.
        let hit = match hits.iter().find(|r| Some(r.vmid) == by_id) {
            Some(r) => Some(r.clone()),
            None if hits.len() > 1 => {
                return Err(Error::invalid(format!(
                    "{} VMs are named {vm:?} (vmids {}); name one by its vmid",
                    hits.len(),
                    hits.iter()
                        .map(|r| r.vmid.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            None => hits.into_iter().next(),
        };
        Ok(hit.map(|r| Found {
            node: r.node.clone(),
            vmid: r.vmid,
            res: r,
        }))
    }

    async fn resolve(&self, vm: &str) -> Result<Found> {
        self.find(vm).await?.ok_or_else(|| {
            Error::not_found(format!("no VM {vm:?} in the cluster")).with_vm(vm.to_string())
        })
    }

    /// The node that stages imports and creates VMs.
    async fn node(&self) -> Result<String> {
        if let Some(n) = &self.cfg.node {
            return Ok(n.clone());
        }
        self.client
            .online_nodes()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::new(ErrorKind::Provider, "the cluster has no online node"))
    }

    async fn ssh(&self, node: &str) -> Result<SshNode> {
        let Some(ssh) = &self.cfg.ssh else {
            return Err(Error::unsupported(
                "disk reads need SSH to the node (no PVE API streams a disk out); configure ProxmoxConfig::ssh",
            ));
        };
        let host = ssh
            .node_hosts
            .get(node)
            .or(ssh.host.as_ref())
            .cloned()
            .or_else(|| self.cfg.url.host_str().map(str::to_string))
            .ok_or_else(|| Error::invalid("no SSH host for the node"))?;
        SshNode::connect(ssh, &host).await
    }

    /// The staged import file's name for a disk: `vrg-<vm>-<name>.<ext>`, with every character
    /// PVE does not take in an import file name replaced by `_`.
    fn staged_name(spec_vm: &str, name: &str, ext: &str) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("vrg-{}-{}.{ext}", clean(spec_vm), clean(name))
    }

    /// The location of a staged disk: PVE's own drive syntax, `TARGET:0,import-from=VOLID`, so
    /// that it names both the staged import volume and the storage the VM's disk goes to.
    fn location(&self, target: &str, staged: &str) -> String {
        format!("{target}:0,import-from={staged}")
    }

    fn staged_of(location: &str) -> Result<(String, String)> {
        let d = parse_drive(location)?;
        let staged = d
            .options
            .iter()
            .find(|(k, _)| k == "import-from")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                Error::invalid(format!("location {location:?} names no import-from volume"))
            })?;
        let target = d
            .storage()
            .ok_or_else(|| {
                Error::invalid(format!("location {location:?} names no target storage"))
            })?
            .to_string();
        Ok((target, staged))
    }

    /// Checks that the staging storage takes `content=import` and that no staged file of this
    /// name exists (or removes it when `overwrite`). Returns (node, storage, filename, volid).
    async fn prepare_stage(
        &self,
        spec: &DiskCreateSpec,
        ext: &str,
    ) -> Result<(String, String, String, String)> {
        self.client
            .require_version(
                IMPORT_CONTENT_SINCE,
                "staging a disk image as storage content 'import'",
            )
            .await?;
        let node = self.node().await?;
        let storage = self.cfg.import_storage.clone();
        let filename = Self::staged_name(&spec.vm, &spec.name, ext);
        let volid = format!("{storage}:import/{filename}");
        let existing = self
            .client
            .storage_content(&node, &storage, "import")
            .await?;
        if existing.iter().any(|v| v.volid == volid) {
            if !spec.overwrite {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "staged import file {volid} exists on {node} (overwrite not requested)"
                    ),
                ));
            }
            self.delete_volume(&node, &storage, &volid).await?;
        }
        Ok((node, storage, filename, volid))
    }

    /// Deletes the staged import files that `spec`'s disks were created from (a file already
    /// gone is fine; a failure is logged, never fatal: the VM holds its copies).
    async fn delete_staged_imports(&self, node: &str, spec: &VmSpec) {
        for d in &spec.disks {
            if let Ok((_, staged)) = Self::staged_of(&d.location)
                && staged.contains(":import/")
                && let Some((storage, _)) = staged.split_once(':')
                && let Err(e) = self.delete_volume(node, storage, &staged).await
                && e.kind() != ErrorKind::NotFound
            {
                warn!(volid = %staged, error = %e, "could not delete the staged import file");
            }
        }
    }

    async fn delete_volume(&self, node: &str, storage: &str, volid: &str) -> Result<()> {
        match self.client.volume_delete(node, storage, volid).await {
            Ok(Some(upid)) => self.client.wait_task(&upid).await,
            Ok(None) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads a staged object from `storage` **as it is stored** (qcow2, raw or single-extent
    /// VMDK) to the import storage, streamed with the exact `Content-Length` and the manifest's
    /// SHA-256 as PVE's `checksum`, and returns the disk's location for
    /// [`VmDiskSpec::location`](virtrigaud_core::VmDiskSpec). No byte is converted or buffered.
    pub async fn upload_object(
        &self,
        storage: &dyn StorageBackend,
        key: &str,
        spec: &DiskCreateSpec,
    ) -> Result<String> {
        let manifest = read_manifest(storage, key).await?;
        self.upload_staged(storage, key, &manifest, spec, &[]).await
    }

    async fn upload_staged(
        &self,
        storage: &dyn StorageBackend,
        key: &str,
        manifest: &Manifest,
        spec: &DiskCreateSpec,
        bandwidth: &[virtrigaud_core::Bandwidth],
    ) -> Result<String> {
        let ext = importable_ext(manifest.format)?;
        let sha = manifest_sha256(manifest)?;
        let (node, st, filename, volid) = self.prepare_stage(spec, ext).await?;
        let body =
            virtrigaud_core::limit::limit_stream(storage.get(key, None).await?, bandwidth.to_vec());
        info!(key, volid = %volid, size = manifest.stored_size, "uploading staged object to Proxmox");
        let upid = self
            .client
            .upload(
                &node,
                &st,
                &filename,
                manifest.stored_size,
                Some(&sha),
                body,
            )
            .await?;
        self.client.wait_task(&upid).await?;
        Ok(self.location(self.target_storage(spec), &volid))
    }

    /// Lets PVE fetch a staged object itself (`download-url` of a presigned GET `url`, with
    /// the manifest's SHA-256 as checksum): no disk byte passes through this process. Returns
    /// the disk's location.
    pub async fn pull_object(
        &self,
        url: &str,
        manifest: &Manifest,
        spec: &DiskCreateSpec,
    ) -> Result<String> {
        let ext = importable_ext(manifest.format)?;
        let sha = manifest_sha256(manifest)?;
        let (node, st, filename, volid) = self.prepare_stage(spec, ext).await?;
        info!(volid = %volid, "Proxmox pulls the staged object from a presigned URL");
        let upid = self
            .client
            .download_url(&node, &st, url, &filename, Some(&sha))
            .await?;
        self.client.wait_task(&upid).await?;
        Ok(self.location(self.target_storage(spec), &volid))
    }

    fn target_storage<'a>(&'a self, spec: &'a DiskCreateSpec) -> &'a str {
        spec.placement
            .as_deref()
            .unwrap_or(&self.cfg.target_storage)
    }

    async fn power_task(
        &self,
        f: &Found,
        action: &str,
        form: &[(&str, String)],
        deadline: Duration,
    ) -> Result<()> {
        let upid = self.client.vm_power(&f.node, f.vmid, action, form).await?;
        self.client.wait_task_for(&upid, deadline).await
    }

    async fn wait_state(&self, f: &Found, want: PowerState, deadline: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            if self.current_state(f).await? == want {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the HA manager did not bring VM {} to {want:?} within {deadline:?}",
                        f.vmid
                    ),
                ));
            }
            tokio::time::sleep(self.cfg.task_poll).await;
        }
    }

    async fn current_state(&self, f: &Found) -> Result<PowerState> {
        let st = self.client.vm_status(&f.node, f.vmid).await?;
        Ok(power_state(st.get("status").and_then(Value::as_str)))
    }
}

/// The extension PVE imports a staged format under; formats it cannot import are `Unsupported`.
fn importable_ext(f: DiskFormat) -> Result<&'static str> {
    match f {
        DiskFormat::Raw => Ok("raw"),
        DiskFormat::Qcow2 => Ok("qcow2"),
        DiskFormat::Vmdk(VmdkSubformat::StreamOptimized | VmdkSubformat::MonolithicSparse) => {
            Ok("vmdk")
        }
        DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat) => Err(Error::unsupported(
            "PVE imports single-extent VMDKs only; a monolithicFlat VMDK is a descriptor plus an extent",
        )),
    }
}

fn manifest_sha256(m: &Manifest) -> Result<String> {
    if !m.object_digest.algorithm.eq_ignore_ascii_case("sha256")
        && !m.object_digest.algorithm.eq_ignore_ascii_case("sha-256")
    {
        return Err(Error::unsupported(format!(
            "the manifest's object digest is {}, PVE checks sha256 here",
            m.object_digest.algorithm
        )));
    }
    Ok(m.object_digest.value.clone())
}

fn power_state(s: Option<&str>) -> PowerState {
    match s {
        Some("running") => PowerState::Running,
        Some("stopped") => PowerState::Stopped,
        Some("paused" | "suspended" | "prelaunch") => PowerState::Paused,
        _ => PowerState::Unknown,
    }
}

fn bus_of(key: &str) -> Option<(DiskBus, u32)> {
    let (bus, rest) = [
        ("scsi", DiskBus::Scsi),
        ("virtio", DiskBus::Virtio),
        ("sata", DiskBus::Sata),
        ("ide", DiskBus::Ide),
    ]
    .into_iter()
    .find_map(|(p, b)| key.strip_prefix(p).map(|r| (b, r)))?;
    if rest.is_empty() || !rest.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((bus, rest.parse().ok()?))
}

fn bus_prefix(b: DiskBus) -> Result<&'static str> {
    Ok(match b {
        DiskBus::Scsi => "scsi",
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
        DiskBus::Ide => "ide",
        DiskBus::Nvme => {
            return Err(Error::unsupported(
                "PVE has no NVMe disk bus for VMs; map the disk to scsi or virtio",
            ));
        }
    })
}

/// Memory of a config (`2048`, or PVE 8.1+'s `current=2048,…`), in MiB.
fn memory_mib(v: Option<&Value>) -> u64 {
    let s = match v {
        Some(Value::Number(n)) => return n.as_u64().unwrap_or(512),
        Some(Value::String(s)) => s.as_str(),
        _ => return 512, // PVE's default
    };
    s.split(',')
        .find_map(|p| {
            let p = p.strip_prefix("current=").unwrap_or(p);
            p.parse().ok()
        })
        .unwrap_or(512)
}

fn num(v: Option<&Value>, default: u64) -> u64 {
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(default),
        Some(Value::String(s)) => s.parse().unwrap_or(default),
        _ => default,
    }
}

/// The hardware description of a VM config. Cdroms and cloud-init drives are skipped and
/// named in the returned warnings.
pub(crate) fn vm_info(
    vmid: u32,
    name: &str,
    state: PowerState,
    config: &serde_json::Map<String, Value>,
) -> Result<(VmInfo, Vec<String>)> {
    let mut warnings = Vec::new();
    let cores = num(config.get("cores"), 1).max(1);
    let sockets = num(config.get("sockets"), 1).max(1);
    let cpus = u32::try_from(cores.saturating_mul(sockets)).unwrap_or(u32::MAX);
    let firmware = match config.get("bios").and_then(Value::as_str) {
        Some("ovmf") => Firmware::Uefi,
        _ => Firmware::Bios,
    };
    match (firmware, config.get("efidisk0").and_then(Value::as_str)) {
        (Firmware::Uefi, None) => {
            warnings.push("OVMF firmware without an efidisk0: its EFI variables are not kept".into())
        }
        (Firmware::Uefi, Some(efi)) => warnings.push(format!(
            "efidisk0 {}: the EFI variables (boot entries) are not migrated; the target starts with fresh ones",
            efi.split(',').next().unwrap_or(efi)
        )),
        _ => {}
    }
    // Boot order (`order=scsi0;ide2;net0`) first, then the rest by bus and index.
    let order: Vec<String> = config
        .get("boot")
        .and_then(Value::as_str)
        .and_then(|b| b.split(',').find_map(|p| p.strip_prefix("order=")))
        .map(|o| o.split(';').map(str::to_string).collect())
        .unwrap_or_default();
    let mut drives: Vec<(usize, DiskBus, u32, &str, Drive)> = Vec::new();
    for (key, v) in config {
        let Some((bus, idx)) = bus_of(key) else {
            continue;
        };
        let Some(s) = v.as_str() else { continue };
        let d = parse_drive(s).map_err(|e| e.with_disk(key.clone()))?;
        if d.is_cloudinit() {
            warnings.push(format!("{key}: cloud-init drive {} skipped", d.volume));
            continue;
        }
        if d.cdrom {
            warnings.push(format!("{key}: cdrom {} skipped", d.volume));
            continue;
        }
        let pos = order.iter().position(|o| o == key).unwrap_or(usize::MAX);
        drives.push((pos, bus, idx, key.as_str(), d));
    }
    let bus_rank = |b: DiskBus| b as u8;
    drives.sort_by_key(|(pos, bus, idx, _, _)| (*pos, bus_rank(*bus), *idx));
    let mut disks = Vec::new();
    for (_, bus, _, key, d) in drives {
        if d.size.is_none() {
            warnings.push(format!("{key}: no size in the config"));
        }
        let format = match d.image_format() {
            Some(f) => DiskFormat::parse(f).ok(),
            // Block storages (LVM, ZFS, Ceph) hold raw volumes.
            None => Some(DiskFormat::Raw),
        };
        disks.push(DiskInfo {
            id: key.to_string(),
            capacity: d.size.unwrap_or(0),
            allocation: None,
            format,
            bus: Some(bus),
            location: d.volume.clone(),
        });
    }
    let mut nets: Vec<(u32, Net)> = Vec::new();
    for (key, v) in config {
        let Some(idx) = key.strip_prefix("net").and_then(|r| r.parse::<u32>().ok()) else {
            continue;
        };
        let Some(s) = v.as_str() else { continue };
        nets.push((
            idx,
            parse_net(s).map_err(|e| e.with_operation(format!("parse {key}")))?,
        ));
    }
    nets.sort_by_key(|(i, _)| *i);
    let nics = nets
        .into_iter()
        .map(|(_, n)| NicInfo {
            mac: n.mac,
            model: Some(n.model),
            network: n.bridge.map(|b| match n.tag {
                Some(t) => format!("{b}.{t}"),
                None => b,
            }),
        })
        .collect();
    Ok((
        VmInfo {
            id: vmid.to_string(),
            name: name.to_string(),
            cpus,
            memory_mib: memory_mib(config.get("memory")),
            firmware,
            machine: config
                .get("machine")
                .and_then(Value::as_str)
                .map(str::to_string),
            guest_os: config
                .get("ostype")
                .and_then(Value::as_str)
                .map(str::to_string),
            state,
            disks,
            nics,
            annotation: config
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
        },
        warnings,
    ))
}

/// PVE's `ostype` for a guest OS named in another provider's vocabulary (libvirt/osinfo ids such
/// as `debian12` or `http://microsoft.com/win/10`, vSphere guest ids such as
/// `windows2019srv_64Guest`, or PVE's own values, which pass through):
///
/// | guest | ostype |
/// |---|---|
/// | Windows 11, Server 2022/2025 | `win11` |
/// | Windows 10, Server 2016/2019 | `win10` |
/// | Windows 8/8.1, Server 2012 (R2) | `win8` |
/// | Windows 7, Server 2008 R2 | `win7` |
/// | Windows Vista, Server 2008 | `w2k8` |
/// | Windows XP / 2003 / 2000 | `wxp` / `w2k3` / `w2k` |
/// | any Linux (Debian, Ubuntu, RHEL, CentOS, Rocky, Alma, Fedora, SUSE, Arch, …) | `l26` |
/// | Solaris / illumos | `solaris` |
/// | anything else or unknown | `other` |
pub fn ostype_for(guest: Option<&str>) -> &'static str {
    const PVE: &[&str] = &[
        "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11", "l24",
        "l26", "solaris",
    ];
    let Some(g) = guest else { return "other" };
    let g = g.to_ascii_lowercase();
    if let Some(p) = PVE.iter().find(|p| **p == g) {
        return p;
    }
    let has = |s: &str| g.contains(s);
    if has("win") || has("microsoft") {
        // Server years first (they hold digits the desktop versions are named by).
        if has("2025") || has("2022") {
            "win11"
        } else if has("2019") || has("2016") {
            "win10"
        } else if has("2012") {
            "win8"
        } else if has("2008r2") || has("2008-r2") || has("2k8r2") {
            "win7"
        } else if has("2008") || has("2k8") || has("vista") || has("longhorn") {
            "w2k8"
        } else if has("2003") || has("2k3") || has("net") {
            "w2k3"
        } else if has("2000") || has("2k") {
            "w2k"
        } else if has("xp") {
            "wxp"
        } else if has("11") {
            "win11"
        } else if has("10") || has("windows9") {
            "win10"
        } else if has("8") {
            "win8"
        } else if has("7") {
            "win7"
        } else {
            "win11"
        }
    } else if has("solaris") || has("illumos") || has("openindiana") {
        "solaris"
    } else if [
        "linux", "debian", "ubuntu", "rhel", "redhat", "centos", "rocky", "alma", "fedora", "suse",
        "sles", "arch", "gentoo", "oracle", "alpine", "mint", "coreos", "photon", "amazon",
    ]
    .iter()
    .any(|l| has(l))
    {
        "l26"
    } else {
        "other"
    }
}

/// Whether PVE takes `m` as a `machine` value (i440fx/q35 types, with versions).
fn pve_machine(m: &str) -> bool {
    let base = m.split("+pve").next().unwrap_or(m).trim_end_matches(".pxe");
    if matches!(base, "pc" | "q35") {
        return true;
    }
    let ver = base
        .strip_prefix("pc-i440fx-")
        .or_else(|| base.strip_prefix("pc-q35-"))
        .or_else(|| base.strip_prefix("pc-"));
    ver.is_some_and(|v| {
        let parts: Vec<&str> = v.split('.').collect();
        parts.len() >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The NIC model PVE knows for another provider's model name.
fn nic_model(m: Option<&str>) -> &'static str {
    match m.map(|s| s.to_ascii_lowercase()) {
        Some(s) if s == "e1000e" => "e1000e",
        Some(s) if s.starts_with("e1000") => "e1000",
        Some(s) if s.contains("vmxnet") => "vmxnet3",
        Some(s) if s == "rtl8139" => "rtl8139",
        _ => "virtio",
    }
}

/// The `POST /nodes/{node}/qemu` parameters for `spec` as VM `vmid`; `efi_storage` holds the
/// efidisk of a UEFI VM.
pub(crate) fn create_params(
    spec: &VmSpec,
    vmid: u32,
    default_bridge: &str,
    efi_storage: &str,
) -> Result<Vec<(&'static str, String)>> {
    let mut p: Vec<(&'static str, String)> = vec![
        ("vmid", vmid.to_string()),
        ("name", pve_name(&spec.name)),
        ("cores", spec.cpus.max(1).to_string()),
        ("sockets", "1".into()),
        ("memory", spec.memory_mib.max(16).to_string()),
        ("ostype", ostype_for(spec.guest_os.as_deref()).into()),
    ];
    if let Some(m) = &spec.machine {
        if pve_machine(m) {
            p.push(("machine", m.clone()));
        } else {
            warn!(machine = %m, "machine type unknown to PVE, leaving PVE's default");
        }
    }
    if spec.firmware == Firmware::Uefi {
        p.push(("bios", "ovmf".into()));
        p.push((
            "efidisk0",
            format!("{efi_storage}:1,efitype=4m,pre-enrolled-keys=0"),
        ));
        if spec.machine.is_none() {
            p.push(("machine", "q35".into()));
        }
    }
    if let Some(a) = &spec.annotation {
        p.push(("description", a.clone()));
    }
    let mut counters = [0u32; 4];
    let mut boot = None;
    let mut any_scsi = false;
    for (i, d) in spec.disks.iter().enumerate() {
        let prefix = bus_prefix(d.bus)?;
        let slot = match d.bus {
            DiskBus::Scsi => 0,
            DiskBus::Virtio => 1,
            DiskBus::Sata => 2,
            _ => 3,
        };
        let n = counters[slot];
        counters[slot] += 1;
        any_scsi |= d.bus == DiskBus::Scsi;
        let key: &'static str = drive_key(prefix, n)?;
        let drive = parse_drive(&d.location)?;
        if !drive.options.iter().any(|(k, _)| k == "import-from") {
            return Err(Error::invalid(format!(
                "disk {i} location {:?} is not a staged import (TARGET:0,import-from=VOLID)",
                d.location
            )));
        }
        p.push((key, d.location.clone()));
        boot.get_or_insert(key);
    }
    if any_scsi {
        p.push(("scsihw", "virtio-scsi-single".into()));
    }
    if let Some(b) = boot {
        p.push(("boot", format!("order={b}")));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let (bridge, tag) = match nic.network.as_deref() {
            Some(n) => match n.rsplit_once('.') {
                Some((b, t)) if !b.is_empty() && t.parse::<u16>().is_ok() => {
                    (b.to_string(), t.parse().ok())
                }
                _ => (n.to_string(), None),
            },
            None => (default_bridge.to_string(), None),
        };
        if bridge.is_empty()
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::invalid(format!(
                "NIC {i}: network {:?} is not a PVE bridge name (map the source network to a bridge such as vmbr0, or vmbr0.42 for VLAN 42)",
                nic.network.as_deref().unwrap_or_default()
            )));
        }
        let net = Net {
            model: nic_model(nic.model.as_deref()).into(),
            mac: nic.mac.clone(),
            bridge: Some(bridge),
            tag,
            options: vec![],
        };
        p.push((net_key(i)?, net.to_property_string()));
    }
    Ok(p)
}

/// PVE VM names are DNS names: letters, digits, `-` and `.`.
fn pve_name(n: &str) -> String {
    let s: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches(['-', '.']).to_string()
}

fn drive_key(prefix: &str, n: u32) -> Result<&'static str> {
    const SCSI: [&str; 31] = [
        "scsi0", "scsi1", "scsi2", "scsi3", "scsi4", "scsi5", "scsi6", "scsi7", "scsi8", "scsi9",
        "scsi10", "scsi11", "scsi12", "scsi13", "scsi14", "scsi15", "scsi16", "scsi17", "scsi18",
        "scsi19", "scsi20", "scsi21", "scsi22", "scsi23", "scsi24", "scsi25", "scsi26", "scsi27",
        "scsi28", "scsi29", "scsi30",
    ];
    const VIRTIO: [&str; 16] = [
        "virtio0", "virtio1", "virtio2", "virtio3", "virtio4", "virtio5", "virtio6", "virtio7",
        "virtio8", "virtio9", "virtio10", "virtio11", "virtio12", "virtio13", "virtio14",
        "virtio15",
    ];
    const SATA: [&str; 6] = ["sata0", "sata1", "sata2", "sata3", "sata4", "sata5"];
    const IDE: [&str; 4] = ["ide0", "ide1", "ide2", "ide3"];
    let table: &[&'static str] = match prefix {
        "scsi" => &SCSI,
        "virtio" => &VIRTIO,
        "sata" => &SATA,
        _ => &IDE,
    };
    table
        .get(n as usize)
        .copied()
        .ok_or_else(|| Error::invalid(format!("PVE has at most {} {prefix} disks", table.len())))
}

fn net_key(i: usize) -> Result<&'static str> {
    const NET: [&str; 32] = [
        "net0", "net1", "net2", "net3", "net4", "net5", "net6", "net7", "net8", "net9", "net10",
        "net11", "net12", "net13", "net14", "net15", "net16", "net17", "net18", "net19", "net20",
        "net21", "net22", "net23", "net24", "net25", "net26", "net27", "net28", "net29", "net30",
        "net31",
    ];
    NET.get(i)
        .copied()
        .ok_or_else(|| Error::invalid("PVE has at most 32 NICs"))
}

#[async_trait]
impl Provider for ProxmoxProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn capabilities(&self) -> Capabilities {
        let ssh = self.cfg.ssh.is_some();
        Capabilities {
            power: true,
            snapshots: true,
            export: ssh,
            import: true,
            create_vm: true,
            random_access_read: false,
            pull_from_url: true,
            import_staged: true,
            changed_blocks: false,
        }
    }

    async fn validate(&self) -> Result<()> {
        let v = self.client.version().await?;
        self.client.cluster_vms().await?;
        info!(version = %v, "Proxmox API reachable");
        Ok(())
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>> {
        let mut out: Vec<VmSummary> = self
            .client
            .cluster_vms()
            .await?
            .into_iter()
            .map(|r| VmSummary {
                id: r.vmid.to_string(),
                name: r.name.clone().unwrap_or_else(|| format!("VM {}", r.vmid)),
                state: power_state(r.status.as_deref()),
            })
            .collect();
        out.sort_by(|a, b| a.id.len().cmp(&b.id.len()).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn describe_vm(&self, vm: &str) -> Result<VmInfo> {
        let f = self.resolve(vm).await?;
        let config = self
            .client
            .vm_config(&f.node, f.vmid)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        let name = f
            .res
            .name
            .clone()
            .or_else(|| {
                config
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("VM {}", f.vmid));
        let (info, warnings) =
            vm_info(f.vmid, &name, power_state(f.res.status.as_deref()), &config)
                .map_err(|e| e.with_vm(vm.to_string()))?;
        for w in warnings {
            warn!(vm, "{w}");
        }
        Ok(info)
    }

    async fn power(&self, vm: &str, op: PowerOp) -> Result<()> {
        let f = self.resolve(vm).await?;
        let state = self.current_state(&f).await?;
        let deadline = self.cfg.task_timeout;
        let r = match op {
            PowerOp::On if state == PowerState::Running => Ok(()),
            PowerOp::On => self.power_task(&f, "start", &[], deadline).await,
            PowerOp::Off if state == PowerState::Stopped => Ok(()),
            PowerOp::Off => self.power_task(&f, "stop", &[], deadline).await,
            PowerOp::Shutdown { .. } if state == PowerState::Stopped => Ok(()),
            PowerOp::Shutdown { timeout, force } => {
                let secs = timeout.as_secs().max(1);
                let mut form = vec![("timeout", secs.to_string())];
                if force {
                    form.push(("forceStop", "1".into()));
                }
                let r = self
                    .power_task(&f, "shutdown", &form, timeout + Duration::from_secs(60))
                    .await;
                match r {
                    Err(e) if self.current_state(&f).await.ok() == Some(PowerState::Running) => {
                        Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "the guest did not shut down within {secs} s: {}",
                                e.message()
                            ),
                        ))
                    }
                    other => other,
                }
            }
            PowerOp::Reboot => self.power_task(&f, "reboot", &[], deadline).await,
        };
        // An HA-managed VM's task only queues a request for the HA manager (PVE's own
        // behaviour, not refused here): wait until the VM is where the request puts it.
        let r = match (r, f.res.hastate.is_some(), op) {
            (Ok(()), true, PowerOp::On) => self.wait_state(&f, PowerState::Running, deadline).await,
            (Ok(()), true, PowerOp::Off | PowerOp::Shutdown { .. }) => {
                self.wait_state(&f, PowerState::Stopped, deadline).await
            }
            (r, _, _) => r,
        };
        r.map_err(|e| e.with_vm(vm.to_string()).with_operation("power"))
    }

    async fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotRef> {
        check_snapshot(name)?;
        let f = self.resolve(vm).await?;
        let upid = self
            .client
            .snapshot_create(&f.node, f.vmid, name, "virtrigaud point-in-time export")
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        self.client
            .wait_task(&upid)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        Ok(SnapshotRef {
            id: name.to_string(),
            name: name.to_string(),
        })
    }

    async fn delete_snapshot(&self, vm: &str, snapshot: &SnapshotRef) -> Result<()> {
        check_snapshot(&snapshot.id)?;
        let f = self.resolve(vm).await?;
        let upid = self
            .client
            .snapshot_delete(&f.node, f.vmid, &snapshot.id)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        self.client
            .wait_task(&upid)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))
    }

    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk> {
        let info = self.describe_vm(vm).await?;
        let d = info
            .disks
            .iter()
            .find(|d| d.id == disk || d.location == disk)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("VM {vm} has no disk {disk:?}"))
                    .with_vm(vm.to_string())
                    .with_disk(disk.to_string())
            })?;
        let f = self.resolve(vm).await?;
        let storage = d
            .location
            .split_once(':')
            .map(|(s, _)| s.to_string())
            .ok_or_else(|| Error::invalid(format!("{:?} is not a volume id", d.location)))?;
        // The read path by storage type, decided before anything is read (see `export`).
        let scfg = self
            .client
            .storage_config(&storage)
            .await
            .map_err(|e| e.with_vm(vm.to_string()).with_disk(disk.to_string()))?;
        let stype = scfg
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let path = read_path(stype, &scfg, &d.location, snapshot.is_some())
            .map_err(|e| e.with_vm(vm.to_string()))?;
        let ssh = self.ssh(&f.node).await?;
        let ctx = |e: Error| e.with_vm(vm.to_string()).with_disk(disk.to_string());
        let source = match (path, snapshot) {
            (ReadPath::File, None) => {
                let path = ssh.pvesm_path(&d.location).await.map_err(ctx)?;
                let file = ssh.open_file(&path).await.map_err(ctx)?;
                ImageSource::RandomAccess(Arc::new(file))
            }
            (ReadPath::File, Some(snap)) => {
                let path = ssh.pvesm_path(&d.location).await.map_err(ctx)?;
                let file = ssh.open_file(&path).await.map_err(ctx)?;
                let view = SnapshotView::open(Arc::new(file), &snap.id)
                    .await
                    .map_err(ctx)?;
                let mut info = d.clone();
                info.format = Some(DiskFormat::Qcow2);
                return Ok(OpenedDisk {
                    info,
                    source: ImageSource::RandomAccess(Arc::new(view)),
                });
            }
            (ReadPath::Device, _) => {
                let path = ssh.pvesm_path(&d.location).await.map_err(ctx)?;
                let size = ssh.device_size(&path).await.map_err(ctx)?;
                let dev = ssh.open_device(&path, size).await.map_err(ctx)?;
                let mut info = d.clone();
                info.format = Some(DiskFormat::Raw);
                info.capacity = size;
                return Ok(OpenedDisk {
                    info,
                    source: ImageSource::RandomAccess(Arc::new(dev)),
                });
            }
            (ReadPath::ExportStream, _) => {
                let (size, stream) = ssh
                    .export(&d.location, snapshot.map(|s| s.id.as_str()))
                    .await
                    .map_err(ctx)?;
                let mut info = d.clone();
                info.format = Some(DiskFormat::Raw);
                if info.capacity == 0 {
                    info.capacity = size;
                }
                return Ok(OpenedDisk {
                    info,
                    source: ImageSource::from_byte_stream(Some(size), stream),
                });
            }
        };
        Ok(OpenedDisk { info: d, source })
    }

    async fn create_disk(&self, spec: &DiskCreateSpec) -> Result<CreatedDisk> {
        // Staged as raw: the pipeline re-encodes into the format the sink asks for, and only raw
        // has a length known before the first byte (the capacity), which the upload needs.
        let (node, storage, filename, volid) = self.prepare_stage(spec, "raw").await?;
        let (tx, rx) = mpsc::channel::<SinkMsg>(4);
        let file = futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(SinkMsg::Data(b)) => Some((Ok(b), Some(rx))),
                Some(SinkMsg::End) => None,
                Some(SinkMsg::Abort) | None => Some((Err(Error::cancelled()), None)),
            }
        })
        .boxed();
        let client = self.client.clone();
        let len = spec.capacity;
        let task = tokio::spawn(async move {
            let upid = client
                .upload(&node, &storage, &filename, len, None, file)
                .await?;
            client.wait_task(&upid).await
        });
        info!(volid = %volid, size = len, "staging a raw disk on Proxmox");
        Ok(CreatedDisk {
            format: DiskFormat::Raw,
            location: self.location(self.target_storage(spec), &volid),
            sink: Box::new(UploadSink {
                tx: Some(tx),
                task: Some(task),
                expected: len,
                written: 0,
            }),
        })
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        self.client
            .require_version(IMPORT_FROM_SINCE, "creating a VM with import-from disks")
            .await?;
        if let Some(existing) = self.find(&spec.name).await? {
            if !spec.overwrite {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "VM {} (vmid {}) exists (overwrite not requested)",
                        spec.name, existing.vmid
                    ),
                )
                .with_vm(spec.name.clone()));
            }
            self.delete_vm(&existing.vmid.to_string()).await?;
        }
        let node = self.node().await?;
        // `/cluster/nextid` is advisory: a concurrent create can take the same id first, so a
        // create refused with "already exists" is retried with a fresh id.
        let mut attempt = 0;
        let (vmid, upid) = loop {
            let vmid = self.client.next_id().await?;
            let params = create_params(
                spec,
                vmid,
                &self.cfg.default_bridge,
                &self.cfg.target_storage,
            )?;
            info!(vm = %spec.name, vmid, node = %node, "creating Proxmox VM");
            match self.client.vm_create(&node, &params).await {
                Ok(upid) => break (vmid, upid),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 5 => {
                    attempt += 1;
                    warn!(vmid, error = %e, "VM id taken meanwhile, trying the next one");
                }
                Err(e) => return Err(e.with_vm(spec.name.clone())),
            }
        };
        self.client
            .wait_task(&upid)
            .await
            .map_err(|e| e.with_vm(spec.name.clone()))?;
        // The staged import files are copies now: remove them.
        self.delete_staged_imports(&node, spec).await;
        self.describe_vm(&vmid.to_string()).await
    }

    /// From the node's API: storages (missing, disabled or inactive, or not holding `images`;
    /// `None` is the configured target storage) and bridges (`vmbr0.42`, a VLAN on `vmbr0`,
    /// checks `vmbr0`).
    async fn check_placement(
        &self,
        placements: &[Option<String>],
        networks: &[String],
    ) -> Result<virtrigaud_core::PlacementCheck> {
        let node = self.node().await?;
        let mut out = virtrigaud_core::PlacementCheck::default();
        if !placements.is_empty() {
            let storages = self.client.node_storages(&node).await?;
            for p in placements {
                let name = p.as_deref().unwrap_or(&self.cfg.target_storage);
                let off = |s: &serde_json::Value, k: &str| s[k].as_u64() == Some(0);
                match storages
                    .iter()
                    .find(|s| s["storage"].as_str() == Some(name))
                {
                    None => out.missing_placements.push(name.to_string()),
                    Some(s) if off(s, "enabled") || off(s, "active") => out
                        .missing_placements
                        .push(format!("{name} (disabled or inactive on {node})")),
                    Some(s)
                        if !s["content"]
                            .as_str()
                            .unwrap_or("")
                            .split(',')
                            .any(|c| c.trim() == "images") =>
                    {
                        out.missing_placements
                            .push(format!("{name} (holds no VM images)"))
                    }
                    Some(_) => {}
                }
            }
        }
        if !networks.is_empty() {
            let ifaces = self.client.node_networks(&node).await?;
            for n in networks {
                let bridge = match n.rsplit_once('.') {
                    Some((b, t)) if !b.is_empty() && t.parse::<u16>().is_ok() => b,
                    _ => n.as_str(),
                };
                let found = ifaces.iter().any(|i| {
                    i["iface"].as_str() == Some(bridge)
                        && i["type"]
                            .as_str()
                            .is_some_and(|t| t.to_ascii_lowercase().contains("bridge"))
                });
                if !found {
                    out.missing_networks.push(n.clone());
                }
            }
        }
        for v in [&mut out.missing_placements, &mut out.missing_networks] {
            v.sort();
            v.dedup();
        }
        Ok(out)
    }

    /// A VM that an interrupted run created (all its disks imported) is adopted by the runner:
    /// the staged import files its `create_vm` did not get to delete are removed now.
    async fn finish_adopted_vm(&self, spec: &VmSpec) -> Result<()> {
        let node = self.node().await?;
        self.delete_staged_imports(&node, spec).await;
        Ok(())
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        let f = self.resolve(vm).await?;
        if self.current_state(&f).await? != PowerState::Stopped {
            self.power_task(&f, "stop", &[], self.cfg.task_timeout)
                .await?;
        }
        let upid = self
            .client
            .vm_destroy(&f.node, f.vmid)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))?;
        self.client
            .wait_task(&upid)
            .await
            .map_err(|e| e.with_vm(vm.to_string()))
    }

    /// A staged qcow2, raw or single-extent VMDK goes to PVE as it is: pulled by PVE from the
    /// presigned URL when there is one (`download-url`), else uploaded as stored; PVE checks
    /// the manifest's SHA-256 either way. Other formats answer `None` (streamed as raw).
    async fn import_staged(
        &self,
        staged: &StagedObject<'_>,
        spec: &DiskCreateSpec,
    ) -> Result<Option<String>> {
        if importable_ext(staged.manifest.format).is_err() {
            return Ok(None);
        }
        let location = match staged.url {
            Some(url) => self.pull_object(url, staged.manifest, spec).await?,
            None => {
                self.upload_staged(
                    staged.storage,
                    staged.key,
                    staged.manifest,
                    spec,
                    staged.bandwidth,
                )
                .await?
            }
        };
        Ok(Some(location))
    }

    async fn find_disk(&self, spec: &DiskCreateSpec) -> Result<Option<String>> {
        let node = self.node().await?;
        let storage = &self.cfg.import_storage;
        let content = self
            .client
            .storage_content(&node, storage, "import")
            .await?;
        for ext in ["raw", "qcow2", "vmdk"] {
            let volid = format!(
                "{storage}:import/{}",
                Self::staged_name(&spec.vm, &spec.name, ext)
            );
            if content.iter().any(|v| v.volid == volid) {
                return Ok(Some(self.location(self.target_storage(spec), &volid)));
            }
        }
        Ok(None)
    }

    async fn open_created_disk(&self, _vm: &str, location: &str) -> Result<OpenedDisk> {
        let (_, staged) = Self::staged_of(location)?;
        let node = self.node().await?;
        let ssh = self.ssh(&node).await?;
        let path = ssh.pvesm_path(&staged).await?;
        let file = ssh.open_file(&path).await?;
        let format = staged
            .rsplit_once('.')
            .and_then(|(_, e)| DiskFormat::parse(e).ok());
        let size = virtrigaud_core::io::ReadAt::size(&file);
        Ok(OpenedDisk {
            info: DiskInfo {
                id: staged.clone(),
                capacity: if format == Some(DiskFormat::Raw) {
                    size
                } else {
                    0
                },
                allocation: None,
                format,
                bus: None,
                location: location.to_string(),
            },
            source: ImageSource::RandomAccess(Arc::new(file)),
        })
    }

    async fn delete_disk(&self, _vm: &str, location: &str) -> Result<()> {
        let (_, staged) = Self::staged_of(location)?;
        let storage = staged
            .split_once(':')
            .map(|(s, _)| s.to_string())
            .ok_or_else(|| Error::invalid(format!("{staged:?} is not a volume id")))?;
        let node = self.node().await?;
        self.delete_volume(&node, &storage, &staged).await
    }
}

enum SinkMsg {
    Data(Bytes),
    End,
    Abort,
}

/// The sink of [`ProxmoxProvider::create_disk`]: bytes go straight into the running upload
/// request. PVE writes an upload to a temporary file and moves it into the storage only when
/// the request completed, so nothing is visible before [`ByteSink::commit`], and an aborted or
/// dropped sink cuts the request (the body ends with an error, never as a complete file).
struct UploadSink {
    tx: Option<mpsc::Sender<SinkMsg>>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    expected: u64,
    written: u64,
}

impl UploadSink {
    async fn upload_error(&mut self) -> Error {
        self.tx = None;
        match self.task.take() {
            Some(t) => match t.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::new(
                    ErrorKind::Provider,
                    "upload ended before the disk was written",
                ),
                Err(e) => Error::new(ErrorKind::Provider, format!("upload task failed: {e}")),
            },
            None => Error::new(ErrorKind::Provider, "upload already finished"),
        }
    }
}

#[async_trait]
impl ByteSink for UploadSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.written += data.len() as u64;
        if self.written > self.expected {
            return Err(Error::invalid(format!(
                "disk data exceeds the announced capacity of {} bytes",
                self.expected
            )));
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(SinkMsg::Data(data)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.upload_error().await)
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if self.written != self.expected {
            let _ = self.abort_inner().await;
            return Err(Error::corrupt(format!(
                "disk has {} of its {} bytes",
                self.written, self.expected
            )));
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(SinkMsg::End).await;
        }
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| Error::new(ErrorKind::Provider, format!("upload task failed: {e}")))?,
            None => Err(Error::new(ErrorKind::Provider, "upload already finished")),
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.abort_inner().await
    }
}

impl UploadSink {
    async fn abort_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(SinkMsg::Abort).await;
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtrigaud_core::VmDiskSpec;

    fn config() -> serde_json::Map<String, Value> {
        let v = serde_json::json!({
            "cores": 2, "sockets": 2, "memory": "3072", "bios": "ovmf", "machine": "q35", "ostype": "l26",
            "efidisk0": "local-lvm:vm-100-disk-9,efitype=4m,size=4M",
            "scsi0": "local-lvm:vm-100-disk-0,iothread=1,size=32G",
            "virtio1": "local:100/vm-100-disk-1.qcow2,size=10G",
            "sata0": "local-lvm:vm-100-disk-2,ssd=1,size=8G",
            "ide2": "local:iso/debian.iso,media=cdrom,size=600M",
            "ide0": "local-lvm:vm-100-cloudinit,media=cdrom",
            "net1": "e1000=BC:24:11:00:00:02,bridge=vmbr1",
            "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=42,firewall=1",
            "boot": "order=virtio1;scsi0;net0",
            "description": "notes\nvirtrigaud-migration:abc"
        });
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn config_becomes_vm_info() {
        let (info, warnings) = vm_info(100, "vm", PowerState::Stopped, &config()).unwrap();
        assert_eq!(info.cpus, 4);
        assert_eq!(info.memory_mib, 3072);
        assert_eq!(info.firmware, Firmware::Uefi);
        assert_eq!(info.machine.as_deref(), Some("q35"));
        assert_eq!(info.guest_os.as_deref(), Some("l26"));
        let ids: Vec<_> = info.disks.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            ["virtio1", "scsi0", "sata0"],
            "boot order first, cdroms and cloud-init skipped"
        );
        assert_eq!(info.disks[2].bus, Some(DiskBus::Sata));
        assert_eq!(info.disks[2].capacity, 8 << 30);
        assert_eq!(info.disks[2].location, "local-lvm:vm-100-disk-2");
        assert_eq!(info.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(info.disks[1].capacity, 32 << 30);
        assert_eq!(info.disks[1].format, Some(DiskFormat::Raw));
        assert_eq!(info.disks[1].location, "local-lvm:vm-100-disk-0");
        assert_eq!(info.nics.len(), 2);
        assert_eq!(info.nics[0].network.as_deref(), Some("vmbr0.42"));
        assert_eq!(info.nics[1].model.as_deref(), Some("e1000"));
        assert!(info.has_marker("virtrigaud-migration:abc"));
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("efidisk0 local-lvm:vm-100-disk-9"))
        );
        assert!(warnings.iter().any(|w| w.contains("cloud-init")));
        assert!(warnings.iter().any(|w| w.contains("cdrom")));
        assert_eq!(
            memory_mib(Some(&Value::String("current=2048,balloon=0".into()))),
            2048
        );
    }

    #[test]
    fn spec_becomes_create_params() {
        let spec = VmSpec {
            name: "web 01".into(),
            cpus: 4,
            memory_mib: 4096,
            firmware: Firmware::Uefi,
            machine: Some("pc-q35-7.2".into()),
            guest_os: Some("windows2019srv_64Guest".into()),
            disks: vec![
                VmDiskSpec {
                    location: "local-lvm:0,import-from=local:import/vrg-a-d0.raw".into(),
                    bus: DiskBus::Virtio,
                    format: DiskFormat::Raw,
                },
                VmDiskSpec {
                    location: "tank:0,import-from=local:import/vrg-a-d1.qcow2".into(),
                    bus: DiskBus::Scsi,
                    format: DiskFormat::Qcow2,
                },
            ],
            nics: vec![
                NicInfo {
                    mac: Some("52:54:00:12:34:56".into()),
                    model: Some("e1000e".into()),
                    network: Some("vmbr2.7".into()),
                },
                NicInfo::default(),
            ],
            overwrite: false,
            annotation: Some("virtrigaud-migration:xyz".into()),
        };
        let p = create_params(&spec, 512, "vmbr0", "local-lvm").unwrap();
        let get = |k: &str| p.iter().find(|(x, _)| *x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("name"), Some("web-01"));
        assert_eq!(get("cores"), Some("4"));
        assert_eq!(get("ostype"), Some("win10"));
        assert_eq!(get("bios"), Some("ovmf"));
        assert!(
            get("efidisk0")
                .unwrap()
                .starts_with("local-lvm:1,efitype=4m")
        );
        assert_eq!(get("machine"), Some("pc-q35-7.2"));
        assert_eq!(
            get("virtio0"),
            Some("local-lvm:0,import-from=local:import/vrg-a-d0.raw")
        );
        assert_eq!(
            get("scsi0"),
            Some("tank:0,import-from=local:import/vrg-a-d1.qcow2")
        );
        assert_eq!(get("boot"), Some("order=virtio0"));
        assert_eq!(
            get("net0"),
            Some("e1000e=52:54:00:12:34:56,bridge=vmbr2,tag=7")
        );
        assert_eq!(get("net1"), Some("virtio,bridge=vmbr0"));
        assert_eq!(get("description"), Some("virtrigaud-migration:xyz"));
        let mut bad = spec.clone();
        bad.disks[0].location = "local-lvm:vm-1-disk-0".into();
        assert_eq!(
            create_params(&bad, 1, "vmbr0", "l").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut bad_net = spec.clone();
        bad_net.nics[0].network = Some("bridge:br-src".into());
        let e = create_params(&bad_net, 1, "vmbr0", "l").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("bridge:br-src"), "{e}");
        bad.disks[0].bus = DiskBus::Nvme;
        assert_eq!(
            create_params(&bad, 1, "vmbr0", "l").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn ostypes_and_machines() {
        assert_eq!(ostype_for(Some("debian12")), "l26");
        assert_eq!(ostype_for(Some("http://ubuntu.com/ubuntu/22.04")), "l26");
        assert_eq!(ostype_for(Some("rhel9_64Guest")), "l26");
        assert_eq!(ostype_for(Some("windows11_64Guest")), "win11");
        assert_eq!(ostype_for(Some("windows2022srvNext_64Guest")), "win11");
        assert_eq!(ostype_for(Some("windows9_64Guest")), "win10");
        assert_eq!(ostype_for(Some("win2k8r2")), "win7");
        assert_eq!(ostype_for(Some("winxppro")), "wxp");
        assert_eq!(ostype_for(Some("solaris11_64Guest")), "solaris");
        assert_eq!(ostype_for(Some("l24")), "l24");
        assert_eq!(ostype_for(Some("freebsd13_64Guest")), "other");
        assert_eq!(ostype_for(None), "other");
        assert!(
            pve_machine("q35") && pve_machine("pc-i440fx-8.1") && pve_machine("pc-q35-9.0+pve1")
        );
        assert!(!pve_machine("vmx-19") && !pve_machine("pc-q35-") && !pve_machine("virt"));
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let token = || crate::config::Auth::Token {
            id: "root@pam!t".into(),
            secret: virtrigaud_core::Secret::new("s".to_string()),
        };
        let cfg = ProxmoxConfig::new("http://127.0.0.1:8006", token()).unwrap();
        let e = ProxmoxProvider::new(cfg).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("in clear"), "{e}");
        let mut cfg = ProxmoxConfig::new("http://127.0.0.1:8006", token()).unwrap();
        cfg.allow_http = true;
        assert!(ProxmoxProvider::new(cfg).is_ok());
        let cfg = ProxmoxConfig::new("https://127.0.0.1:8006", token()).unwrap();
        assert!(ProxmoxProvider::new(cfg).is_ok());
    }

    #[test]
    fn staged_names_and_locations() {
        assert_eq!(
            ProxmoxProvider::staged_name("my vm/1", "disk.0", "raw"),
            "vrg-my_vm_1-disk_0.raw"
        );
        let (t, s) =
            ProxmoxProvider::staged_of("local-lvm:0,import-from=local:import/vrg-a-b.raw").unwrap();
        assert_eq!(
            (t.as_str(), s.as_str()),
            ("local-lvm", "local:import/vrg-a-b.raw")
        );
        assert!(ProxmoxProvider::staged_of("local-lvm:vm-1-disk-0").is_err());
    }
}

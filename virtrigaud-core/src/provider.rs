//! The [`Provider`] trait: what a hypervisor (libvirt, vSphere, Proxmox, a local image directory)
//! offers to a migration, and the serialisable data types it speaks.

use crate::format::DiskFormat;
use crate::io::{ByteSink, ImageSource};
use crate::manifest::Manifest;
use crate::storage::StorageBackend;
use crate::{Error, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Power state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running.
    Running,
    /// Powered off.
    #[default]
    Stopped,
    /// Paused or suspended.
    Paused,
    /// Unknown to the provider.
    Unknown,
}

/// Firmware of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    #[default]
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

/// Bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// virtio-blk.
    Virtio,
    /// SCSI (virtio-scsi, LSI, PVSCSI).
    Scsi,
    /// SATA / AHCI.
    Sata,
    /// IDE.
    Ide,
    /// NVMe.
    Nvme,
}

/// A VM in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Provider-specific id (libvirt UUID, vSphere moref, Proxmox vmid, directory name).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Power state.
    pub state: PowerState,
}

/// A disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Stable id within the VM (target dev such as `vda`, device key, `scsi0`, file name).
    pub id: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes allocated on the backing store, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<u64>,
    /// Image format, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Bus, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// Where the disk lives (file path, `pool/volume`, `[datastore] path`, volume id).
    pub location: String,
}

/// A network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NicInfo {
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device model (`virtio`, `e1000`, `vmxnet3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Network, bridge or port group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// The hardware description of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Provider-specific id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Machine type (`q35`, `pc-i440fx-…`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Guest OS identifier as the provider names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_os: Option<String>,
    /// Power state.
    #[serde(default)]
    pub state: PowerState,
    /// Disks, in boot order where known.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<NicInfo>,
    /// Free-text description or notes the provider keeps with the VM (libvirt
    /// `<description>`, vSphere annotation, Proxmox description), when it has any. A migration
    /// writes its marker here ([`VmSpec::annotation`]) so that it can recognise the VM as its
    /// own after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
}

impl VmInfo {
    /// Whether the annotation holds `marker` (a line of its own, see [`VmSpec::annotation`]).
    pub fn has_marker(&self, marker: &str) -> bool {
        self.annotation
            .as_deref()
            .is_some_and(|a| a.lines().any(|l| l.trim() == marker))
    }
}

/// A disk attached to a VM being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDiskSpec {
    /// The disk's location as returned by [`Provider::create_disk`] ([`CreatedDisk::location`]).
    pub location: String,
    /// Bus to attach it on.
    pub bus: DiskBus,
    /// Format of the disk.
    pub format: DiskFormat,
}

/// What to create on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name of the new VM.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Firmware.
    pub firmware: Firmware,
    /// Machine type, if it must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Guest OS identifier (target provider's vocabulary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_os: Option<String>,
    /// Disks, the first is the boot disk.
    pub disks: Vec<VmDiskSpec>,
    /// NICs with their target networks.
    pub nics: Vec<NicInfo>,
    /// Replace a VM of the same name if one exists.
    #[serde(default)]
    pub overwrite: bool,
    /// Description to store with the VM (libvirt `<description>`, vSphere annotation, Proxmox
    /// description). A provider must store it so that [`Provider::describe_vm`] returns it in
    /// [`VmInfo::annotation`]: the migration runner puts its marker line here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
}

/// A power operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOp {
    /// Power on.
    On,
    /// Hard power off.
    Off,
    /// Ask the guest to shut down; wait up to `timeout`. On expiry fail with `Timeout`, or
    /// power off hard when `force` is set.
    Shutdown {
        /// How long to wait.
        timeout: Duration,
        /// Power off hard on expiry.
        force: bool,
    },
    /// Reboot.
    Reboot,
}

/// A snapshot handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// Provider-specific id.
    pub id: String,
    /// Name.
    pub name: String,
}

/// What a provider can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Power operations.
    pub power: bool,
    /// Snapshots for point-in-time export.
    pub snapshots: bool,
    /// Disks can be read ([`Provider::open_disk`]).
    pub export: bool,
    /// Disks can be written ([`Provider::create_disk`]).
    pub import: bool,
    /// VMs can be created and deleted.
    pub create_vm: bool,
    /// Disk reads allow random access (else they are one sequential stream).
    pub random_access_read: bool,
    /// The target can pull a disk from a URL itself (presigned GET), through
    /// [`Provider::import_staged`].
    pub pull_from_url: bool,
    /// The target imports staged objects as they are stored, without this process decoding
    /// them ([`Provider::import_staged`]).
    #[serde(default)]
    pub import_staged: bool,
    /// Changed-block tracking for warm migration.
    pub changed_blocks: bool,
}

/// A disk opened for reading.
#[derive(Debug)]
pub struct OpenedDisk {
    /// What the provider knows of the disk.
    pub info: DiskInfo,
    /// Native image bytes.
    pub source: ImageSource,
}

/// Where and how to create a disk on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCreateSpec {
    /// The VM the disk belongs to (used for naming and placement).
    pub vm: String,
    /// Disk name (without extension).
    pub name: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Preferred format; the provider may choose another it supports (see [`CreatedDisk::format`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Pool, storage or datastore, in the provider's vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Replace an existing disk of the same name.
    #[serde(default)]
    pub overwrite: bool,
}

/// A disk being written. Nothing is visible until the sink is committed.
pub struct CreatedDisk {
    /// Format the sink expects.
    pub format: DiskFormat,
    /// Location to use in [`VmDiskSpec::location`].
    pub location: String,
    /// The writer.
    pub sink: Box<dyn ByteSink>,
}

impl std::fmt::Debug for CreatedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedDisk")
            .field("format", &self.format)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// A staged object offered to a target as it is stored (see [`Provider::import_staged`]).
pub struct StagedObject<'a> {
    /// The store holding it.
    pub storage: &'a dyn StorageBackend,
    /// Its key in the store.
    pub key: &'a str,
    /// Its manifest (format, sizes, object and content digests), already checked against the
    /// stored object's size.
    pub manifest: &'a Manifest,
    /// A presigned GET of the object, when the store can make one and the caller lets the
    /// target fetch it itself ([`Capabilities::pull_from_url`]).
    pub url: Option<&'a str>,
    /// Bandwidth caps for sending the object (the transfer's
    /// [`PipelineOptions::bandwidth`](crate::pipeline::PipelineOptions::bandwidth)); a target
    /// that streams it applies them ([`crate::limit::limit_stream`]).
    pub bandwidth: &'a [crate::limit::Bandwidth],
}

impl std::fmt::Debug for StagedObject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's signature is a credential: never printed.
        f.debug_struct("StagedObject")
            .field("key", &self.key)
            .field("format", &self.manifest.format)
            .field("stored_size", &self.manifest.stored_size)
            .field("url", &self.url.map(|_| "(presigned, redacted)"))
            .finish_non_exhaustive()
    }
}

/// What a target lacks of the placements and networks a migration would use
/// ([`Provider::check_placement`]); both empty when everything is there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementCheck {
    /// Placements (pools, storages, datastores) the target does not have, or cannot use
    /// (e.g. `"pool0 (inactive)"`).
    pub missing_placements: Vec<String>,
    /// Networks the target does not have.
    pub missing_networks: Vec<String>,
}

/// A hypervisor or image store that VMs move from or to.
///
/// Operations a provider cannot do return [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported)
/// and are reported as such in [`Provider::capabilities`].
#[async_trait]
pub trait Provider: Send + Sync {
    /// Short name of the provider kind (`local`, `libvirt`, `vsphere`, `proxmox`).
    fn kind(&self) -> &'static str;
    /// What this provider can do.
    fn capabilities(&self) -> Capabilities;
    /// Checks connectivity and credentials.
    async fn validate(&self) -> Result<()>;
    /// Lists VMs.
    async fn list_vms(&self) -> Result<Vec<VmSummary>>;
    /// Describes a VM's hardware.
    async fn describe_vm(&self, vm: &str) -> Result<VmInfo>;
    /// Changes the power state.
    async fn power(&self, vm: &str, op: PowerOp) -> Result<()>;
    /// Creates a snapshot for point-in-time reads.
    async fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotRef>;
    /// Deletes a snapshot and everything it created.
    async fn delete_snapshot(&self, vm: &str, snapshot: &SnapshotRef) -> Result<()>;
    /// Opens a disk for reading, from `snapshot` when given.
    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk>;
    /// Creates a disk for streamed writing.
    async fn create_disk(&self, spec: &DiskCreateSpec) -> Result<CreatedDisk>;
    /// Creates a VM with already imported disks; returns its description.
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo>;
    /// Deletes a VM (and its disks, where the provider owns them).
    async fn delete_vm(&self, vm: &str) -> Result<()>;

    /// Imports a staged object **without this process decoding it**, for a target whose
    /// hypervisor imports the staged format itself: given [`StagedObject::url`], the
    /// hypervisor fetches the object from that presigned GET (no disk byte passes through this
    /// process); without it, the object is uploaded as it is stored. Either way the target must
    /// check the manifest's object digest before the disk becomes usable. Returns the disk's
    /// location (as [`CreatedDisk::location`]), or `Ok(None)` when this target cannot take this
    /// object as it is (the default): the caller then streams it through
    /// [`Provider::create_disk`]. The disk is found, re-read and deleted like one made by
    /// `create_disk` for the same `spec`.
    async fn import_staged(
        &self,
        staged: &StagedObject<'_>,
        spec: &DiskCreateSpec,
    ) -> Result<Option<String>> {
        let _ = (staged, spec);
        Ok(None)
    }

    // --- the runner contract: find again, re-read and remove what a migration created ------

    /// Where the committed disk that [`Provider::create_disk`] makes for `spec` lives, if it
    /// exists (`None` when there is none). Name-based: the runner gives every disk it creates a
    /// name unique to the migration and records it before the call, so a disk found here after a
    /// crash is recognised as its own and replaced. Partial uploads left by a killed process
    /// must not be reported as disks (they live under temporary names, see the provider's docs).
    async fn find_disk(&self, spec: &DiskCreateSpec) -> Result<Option<String>> {
        let _ = spec;
        Err(not_implemented(self.kind(), "find_disk"))
    }

    /// Opens a disk this provider created, by the `vm` it was created for and its
    /// [`CreatedDisk::location`], before any VM uses it: the runner re-reads every imported disk
    /// and compares content digests before it creates the VM.
    async fn open_created_disk(&self, vm: &str, location: &str) -> Result<OpenedDisk> {
        let _ = (vm, location);
        Err(not_implemented(self.kind(), "open_created_disk"))
    }

    /// Deletes a disk this provider created (by `vm` and [`CreatedDisk::location`]). A disk
    /// that does not exist is not an error.
    async fn delete_disk(&self, vm: &str, location: &str) -> Result<()> {
        let _ = (vm, location);
        Err(not_implemented(self.kind(), "delete_disk"))
    }

    /// Finishes what [`Provider::create_vm`] of `spec` left undone when the process stopped
    /// after the VM existed: the runner calls it when it adopts such a VM (its marker, all its
    /// disks) instead of creating it again. A provider that stages disks apart from the VM and
    /// removes the staged copies at the end of `create_vm` removes them here. Default: nothing.
    async fn finish_adopted_vm(&self, spec: &VmSpec) -> Result<()> {
        let _ = spec;
        Ok(())
    }

    /// Checks, changing nothing, that this target has the `placements` new disks would go to
    /// (`None`: the provider's default placement) and the `networks` new NICs would join (in
    /// the form [`NicInfo::network`] uses), for a dry run. Returns what is missing. The default
    /// answers [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported): this provider cannot
    /// check, and the caller says so instead of claiming all is well.
    async fn check_placement(
        &self,
        placements: &[Option<String>],
        networks: &[String],
    ) -> Result<PlacementCheck> {
        let _ = (placements, networks);
        Err(not_implemented(self.kind(), "check_placement"))
    }
}

/// The error every operation of a provider that is not implemented yet returns.
pub fn not_implemented(provider: &str, op: &str) -> Error {
    Error::unsupported(format!(
        "the {provider} provider does not implement {op} yet"
    ))
    .with_operation(op.to_string())
}

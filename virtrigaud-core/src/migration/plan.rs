//! What to migrate and how: [`MigrationPlan`] and its option types.

use crate::digest::sha256_hex;
use crate::format::DiskFormat;
use crate::provider::{DiskBus, DiskInfo, Firmware};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How to make the source disks stable before reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
#[non_exhaustive]
pub enum PrepareSource {
    /// The default: read the disks only when the provider reports the VM stopped. A running
    /// source is refused with an error that names the other choices.
    #[default]
    RequireStopped,
    /// Read the disks as they are, even from a running VM (the copy may be inconsistent). Only
    /// when the caller has made sure nothing writes to them.
    AsIs,
    /// Gracefully shut the VM down first (hard off on expiry when `force`). The source is
    /// powered on again if the migration is rolled back.
    Shutdown {
        /// Seconds to wait for the guest.
        timeout_secs: u64,
        /// Power off hard on expiry.
        force: bool,
    },
    /// Take a snapshot and read from it (point-in-time copy of a running VM). The snapshot is
    /// removed by the cleanup, and by a rollback.
    Snapshot,
}

/// What to do with the target when a migration fails (not when it is cancelled: a cancelled
/// migration keeps its checkpoint so that it can resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnFailure {
    /// Keep everything, so that a rerun resumes (the default).
    #[default]
    Keep,
    /// Remove the target VM and the disks this migration created, restore the source's power
    /// state and delete the snapshot it took. Staged objects are kept.
    Rollback,
}

/// What to remove when the migration succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CleanupPolicy {
    /// Delete the staged objects and manifests after success. A cancelled migration with this
    /// set leaves nothing behind: what it created on the target is removed, the source is
    /// restored, and its staged objects and checkpoint are deleted (a rerun starts afresh).
    /// Without it, a cancel keeps everything a rerun needs to resume.
    pub delete_staged: bool,
    /// Delete the snapshot taken for the export.
    pub delete_snapshot: bool,
}

impl Default for CleanupPolicy {
    fn default() -> Self {
        CleanupPolicy {
            delete_staged: false,
            delete_snapshot: true,
        }
    }
}

impl CleanupPolicy {
    /// Sets whether staged objects are deleted after success.
    pub fn delete_staged(mut self, yes: bool) -> Self {
        self.delete_staged = yes;
        self
    }
    /// Sets whether the export snapshot is deleted after success.
    pub fn delete_snapshot(mut self, yes: bool) -> Self {
        self.delete_snapshot = yes;
        self
    }
}

/// What to migrate and how. Build it with [`MigrationPlan::new`] and the `with_*` setters (or
/// set the public fields); new fields get defaults, so adding one is not a breaking change.
///
/// ```
/// use virtrigaud_core::{MigrationPlan, PrepareSource};
/// let plan = MigrationPlan::new("web01", "migrations/web01")
///     .with_target_name("web01-kvm")
///     .with_network("VM Network", "br0")
///     .with_nic_model("vmxnet3", "virtio")
///     .with_prepare(PrepareSource::Snapshot)
///     .with_start_after(true);
/// assert_eq!(plan.target_name.as_deref(), Some("web01-kvm"));
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MigrationPlan {
    /// Source VM (name or id, as the source provider finds it).
    pub source_vm: String,
    /// Name of the VM on the target (defaults to the source VM's name).
    #[serde(default)]
    pub target_name: Option<String>,
    /// Storage prefix for this migration's objects and checkpoint (e.g. `migrations/web01`).
    pub prefix: String,
    /// Format of the staged objects.
    pub stored_format: DiskFormat,
    /// Preferred format on the target (provider default when `None`).
    #[serde(default)]
    pub target_format: Option<DiskFormat>,
    /// Default pool / storage / datastore on the target.
    #[serde(default)]
    pub placement: Option<String>,
    /// Per-disk placement: source datastore, pool or storage (as it appears in the source
    /// disk's location: `[ds]`, `pool/…`, `storage:…`) → target placement. Wins over
    /// `placement`.
    #[serde(default)]
    pub storage_map: BTreeMap<String, String>,
    /// Source network → target network. Unmapped networks keep their name.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    /// Source NIC model → target NIC model (`vmxnet3` → `virtio`). Unmapped models are kept.
    #[serde(default)]
    pub nic_model_map: BTreeMap<String, String>,
    /// Attach every disk on this bus instead of the source's.
    #[serde(default)]
    pub bus_override: Option<DiskBus>,
    /// Source bus (`ide`, `sata`, `scsi`, `virtio`, `nvme`) → target bus, for the disks on a
    /// mapped bus; others keep theirs. [`bus_override`](Self::bus_override) wins over it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bus_map: BTreeMap<String, DiskBus>,
    /// Use this firmware instead of the source's.
    #[serde(default)]
    pub firmware_override: Option<Firmware>,
    /// Only these source disks (ids); empty means all.
    #[serde(default)]
    pub include_disks: Vec<String>,
    /// Leave these source disks (ids) out.
    #[serde(default)]
    pub exclude_disks: Vec<String>,
    /// How to prepare the source.
    #[serde(default)]
    pub prepare: PrepareSource,
    /// Re-read every target disk after import and compare content digests, before the VM is
    /// created.
    #[serde(default = "yes")]
    pub verify_target: bool,
    /// Power the new VM on at the end.
    #[serde(default)]
    pub start_after: bool,
    /// Replace a target VM of the same name that this migration did not create. Off by
    /// default: such a VM is never touched.
    #[serde(default)]
    pub replace_existing: bool,
    /// What to do on failure.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Cleanup policy.
    #[serde(default)]
    pub cleanup: CleanupPolicy,
    /// Disks moved at once (export, import and verify of one disk run as one chain).
    #[serde(default = "two")]
    pub disk_parallelism: usize,
    /// Let a target that can fetch a URL itself ([`Capabilities::pull_from_url`], Proxmox's
    /// `download-url`) pull each staged object from a presigned GET, when the store can presign
    /// (S3) and the object is in a format the target imports as it is. On by default; turn it
    /// off when the target cannot reach the store's endpoint (the object is then uploaded).
    ///
    /// [`Capabilities::pull_from_url`]: crate::Capabilities::pull_from_url
    #[serde(default = "yes")]
    pub target_pull: bool,
    /// Deflate level (0–9) of staged objects that are compressed: a streamOptimized VMDK, the
    /// format a source that cannot tell its allocation up front (a libvirt volume stream) is
    /// staged in. Default 0 (stored deflate blocks): a staged object lives for one migration,
    /// and measured on a whole libvirt migration of 1 GiB of random data on 2 cores, level 1
    /// added 13 s of CPU (the whole migration took 8–9 s at level 0, 13–15 s at level 1). Raise
    /// it when the store is across a slow link and the disks compress well.
    #[serde(default)]
    pub staging_compression_level: u32,
}

fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}

impl MigrationPlan {
    /// A plan with defaults: qcow2 staging, provider-default target format, no mapping, a
    /// running source refused, target verified, staged objects kept, failure keeps what was
    /// done (resumable), two disks at a time.
    pub fn new(source_vm: impl Into<String>, prefix: impl Into<String>) -> Self {
        MigrationPlan {
            source_vm: source_vm.into(),
            target_name: None,
            prefix: prefix.into(),
            stored_format: DiskFormat::Qcow2,
            target_format: None,
            placement: None,
            storage_map: BTreeMap::new(),
            network_map: BTreeMap::new(),
            nic_model_map: BTreeMap::new(),
            bus_override: None,
            bus_map: BTreeMap::new(),
            firmware_override: None,
            include_disks: Vec::new(),
            exclude_disks: Vec::new(),
            prepare: PrepareSource::default(),
            verify_target: true,
            start_after: false,
            replace_existing: false,
            on_failure: OnFailure::default(),
            cleanup: CleanupPolicy::default(),
            disk_parallelism: 2,
            target_pull: true,
            staging_compression_level: 0,
        }
    }

    /// Sets whether a target that can fetch a URL pulls staged objects from presigned GETs
    /// (see [`MigrationPlan::target_pull`]).
    pub fn with_target_pull(mut self, yes: bool) -> Self {
        self.target_pull = yes;
        self
    }
    /// Sets the deflate level of compressed staged objects (see
    /// [`MigrationPlan::staging_compression_level`]; clamped to 9).
    pub fn with_staging_compression_level(mut self, level: u32) -> Self {
        self.staging_compression_level = level.min(9);
        self
    }
    /// Sets the target VM's name.
    pub fn with_target_name(mut self, name: impl Into<String>) -> Self {
        self.target_name = Some(name.into());
        self
    }
    /// Sets the staged format.
    pub fn with_stored_format(mut self, f: DiskFormat) -> Self {
        self.stored_format = f;
        self
    }
    /// Sets the preferred target format.
    pub fn with_target_format(mut self, f: DiskFormat) -> Self {
        self.target_format = Some(f);
        self
    }
    /// Sets the default target placement.
    pub fn with_placement(mut self, p: impl Into<String>) -> Self {
        self.placement = Some(p.into());
        self
    }
    /// Maps a source datastore/pool/storage to a target placement.
    pub fn with_storage(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.storage_map.insert(from.into(), to.into());
        self
    }
    /// Maps a source network to a target network.
    pub fn with_network(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.network_map.insert(from.into(), to.into());
        self
    }
    /// Maps a source NIC model to a target NIC model.
    pub fn with_nic_model(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.nic_model_map.insert(from.into(), to.into());
        self
    }
    /// Attaches every disk on `bus`.
    pub fn with_bus(mut self, bus: DiskBus) -> Self {
        self.bus_override = Some(bus);
        self
    }
    /// Uses `fw` on the target.
    pub fn with_firmware(mut self, fw: Firmware) -> Self {
        self.firmware_override = Some(fw);
        self
    }
    /// Migrates only this disk (may be called several times).
    pub fn with_disk(mut self, id: impl Into<String>) -> Self {
        self.include_disks.push(id.into());
        self
    }
    /// Leaves this disk out.
    pub fn without_disk(mut self, id: impl Into<String>) -> Self {
        self.exclude_disks.push(id.into());
        self
    }
    /// Sets how the source is prepared.
    pub fn with_prepare(mut self, p: PrepareSource) -> Self {
        self.prepare = p;
        self
    }
    /// Sets whether target disks are re-read and compared.
    pub fn with_verify_target(mut self, yes: bool) -> Self {
        self.verify_target = yes;
        self
    }
    /// Sets whether the new VM is started at the end.
    pub fn with_start_after(mut self, yes: bool) -> Self {
        self.start_after = yes;
        self
    }
    /// Sets whether a foreign target VM of the same name may be replaced.
    pub fn with_replace_existing(mut self, yes: bool) -> Self {
        self.replace_existing = yes;
        self
    }
    /// Sets the failure policy.
    pub fn with_on_failure(mut self, f: OnFailure) -> Self {
        self.on_failure = f;
        self
    }
    /// Sets the cleanup policy.
    pub fn with_cleanup(mut self, c: CleanupPolicy) -> Self {
        self.cleanup = c;
        self
    }
    /// Sets how many disks move at once.
    pub fn with_disk_parallelism(mut self, n: usize) -> Self {
        self.disk_parallelism = n;
        self
    }

    /// The target VM's name.
    pub fn target_vm_name(&self) -> &str {
        self.target_name.as_deref().unwrap_or(&self.source_vm)
    }

    /// Whether the plan moves this source disk.
    pub fn includes(&self, disk_id: &str) -> bool {
        (self.include_disks.is_empty() || self.include_disks.iter().any(|d| d == disk_id))
            && !self.exclude_disks.iter().any(|d| d == disk_id)
    }

    /// Target bus of a source disk: the override, else the bus map's entry for its bus, else
    /// its own.
    pub fn bus_for(&self, disk: &DiskInfo) -> Option<DiskBus> {
        let mapped = disk.bus.and_then(|b| {
            let name = match b {
                DiskBus::Virtio => "virtio",
                DiskBus::Scsi => "scsi",
                DiskBus::Sata => "sata",
                DiskBus::Ide => "ide",
                DiskBus::Nvme => "nvme",
            };
            self.bus_map.get(name).copied()
        });
        self.bus_override.or(mapped).or(disk.bus)
    }

    /// Target placement of a source disk: the storage map entry of its source storage, else
    /// the default placement.
    pub fn placement_for(&self, disk: &DiskInfo) -> Option<String> {
        source_storage(&disk.location)
            .and_then(|s| self.storage_map.get(s).cloned())
            .or_else(|| self.placement.clone())
    }

    /// A hash of everything that decides what this migration produces (source, target name,
    /// prefix, formats, placement, maps, disk selection, overrides). Operational settings
    /// (parallelism, verification, cleanup, failure policy, start) may change between runs of
    /// the same migration; these may not.
    pub fn identity_hash(&self) -> String {
        #[derive(Serialize)]
        struct Identity<'a> {
            source_vm: &'a str,
            target: &'a str,
            prefix: &'a str,
            stored_format: DiskFormat,
            target_format: Option<DiskFormat>,
            placement: &'a Option<String>,
            storage_map: &'a BTreeMap<String, String>,
            network_map: &'a BTreeMap<String, String>,
            nic_model_map: &'a BTreeMap<String, String>,
            bus_override: Option<DiskBus>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            bus_map: &'a BTreeMap<String, DiskBus>,
            firmware_override: Option<Firmware>,
            include_disks: &'a [String],
            exclude_disks: &'a [String],
        }
        let id = Identity {
            source_vm: &self.source_vm,
            target: self.target_vm_name(),
            prefix: self.prefix.trim_end_matches('/'),
            stored_format: self.stored_format,
            target_format: self.target_format,
            placement: &self.placement,
            storage_map: &self.storage_map,
            network_map: &self.network_map,
            nic_model_map: &self.nic_model_map,
            bus_override: self.bus_override,
            bus_map: &self.bus_map,
            firmware_override: self.firmware_override,
            include_disks: &self.include_disks,
            exclude_disks: &self.exclude_disks,
        };
        sha256_hex(&serde_json::to_vec(&id).unwrap_or_default())
    }
}

/// The storage part of a source disk location, in each provider's notation: `[ds] dir/x.vmdk`
/// → `ds`; `pool/vol` → `pool`; `storage:vm-100-disk-0` → `storage`. Absolute paths have none.
pub fn source_storage(location: &str) -> Option<&str> {
    if let Some(rest) = location.strip_prefix('[') {
        return rest.split_once(']').map(|(ds, _)| ds);
    }
    if location.starts_with('/') {
        return None;
    }
    if let Some((s, _)) = location.split_once(':') {
        return Some(s);
    }
    location.split_once('/').map(|(p, _)| p)
}

/// Makes a disk id usable in a key or a disk name: ASCII letters, digits, `-` and `_` stay,
/// anything else becomes `_`, then a short hash of the raw id follows, so that `a.b` and `a_b`
/// never share a name.
pub fn disk_slug(id: &str) -> String {
    let s: String = id
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = if s.is_empty() { "disk".to_string() } else { s };
    format!("{s}-{}", &sha256_hex(id.as_bytes())[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_unique_and_stable() {
        assert_ne!(disk_slug("a.b"), disk_slug("a_b"));
        assert_eq!(disk_slug("vda"), disk_slug("vda"));
        assert!(disk_slug("scsi0:1").starts_with("scsi0_1-"));
        assert!(disk_slug("").starts_with("disk-"));
    }

    #[test]
    fn storage_of_locations() {
        assert_eq!(source_storage("[LocalDS_0] vm/vm.vmdk"), Some("LocalDS_0"));
        assert_eq!(source_storage("default/vm.qcow2"), Some("default"));
        assert_eq!(source_storage("local-lvm:vm-100-disk-0"), Some("local-lvm"));
        assert_eq!(source_storage("/var/lib/x.img"), None);
        assert_eq!(source_storage("x.img"), None);
    }

    #[test]
    fn identity_ignores_operational_settings() {
        let a = MigrationPlan::new("vm", "p");
        let b = a.clone().with_disk_parallelism(7).with_start_after(true);
        assert_eq!(a.identity_hash(), b.identity_hash());
        let c = a.clone().with_target_name("other");
        assert_ne!(a.identity_hash(), c.identity_hash());
        let d = MigrationPlan::new("vm2", "p");
        assert_ne!(a.identity_hash(), d.identity_hash());
    }

    #[test]
    fn disk_selection() {
        let p = MigrationPlan::new("vm", "p").with_disk("a").with_disk("b");
        assert!(p.includes("a") && !p.includes("c"));
        let p = p.without_disk("a");
        assert!(!p.includes("a") && p.includes("b"));
    }
}

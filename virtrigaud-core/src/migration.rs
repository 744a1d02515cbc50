//! The migration runner: source VM → storage → target VM, in phases, resumable.
//!
//! Phases: validate → prepare the source (nothing, graceful shutdown, or a snapshot) → export
//! every disk (bounded parallelism) → import every disk → create the target VM with mapped
//! hardware (network map, placement, bus and firmware overrides) → verify (the target disks'
//! content digests equal the manifests') → clean up (staged objects and snapshots, per policy).
//!
//! Every step is idempotent and its outcome is checkpointed in the storage as
//! `<prefix>/migration.json`, so running the same migration again resumes: disks whose manifest
//! exists are not exported again, disks already imported are not imported again, a VM already
//! created is not created again.

use crate::format::DiskFormat;
use crate::manifest::manifest_key;
use crate::pipeline::PipelineOptions;
use crate::progress::Phase;
use crate::provider::{
    DiskBus, Firmware, NicInfo, PowerOp, Provider, SnapshotRef, VmDiskSpec, VmInfo, VmSpec,
};
use crate::storage::{StorageBackend, StorageExt, validate_prefix};
use crate::transfer::{
    ExportOptions, ImportOptions, digest_disk, export_disk, import_disk, read_manifest,
};
use crate::{Error, ErrorKind, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{Instrument, info, info_span};

/// How to make the source disks stable before reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum PrepareSource {
    /// Read as is (the VM is already off, or the caller took care of it).
    #[default]
    AsIs,
    /// Gracefully shut the VM down first (hard off on expiry when `force`).
    Shutdown {
        /// Seconds to wait for the guest.
        timeout_secs: u64,
        /// Power off hard on expiry.
        force: bool,
    },
    /// Take a snapshot and read from it (point-in-time copy of a running VM).
    Snapshot,
}

/// What to remove when the migration succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupPolicy {
    /// Delete the staged objects and manifests.
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

/// What to migrate and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// Source VM (name or id).
    pub source_vm: String,
    /// Name of the VM on the target (defaults to the source name).
    pub target_name: Option<String>,
    /// Storage prefix for this migration's objects (e.g. `migrations/web01`).
    pub prefix: String,
    /// Format of the staged objects.
    pub stored_format: DiskFormat,
    /// Preferred format on the target (provider default when `None`).
    pub target_format: Option<DiskFormat>,
    /// Pool / storage / datastore on the target.
    pub placement: Option<String>,
    /// Source network → target network. Unmapped networks keep their name.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    /// Attach every disk on this bus instead of the source's.
    pub bus_override: Option<DiskBus>,
    /// Use this firmware instead of the source's.
    pub firmware_override: Option<Firmware>,
    /// How to prepare the source.
    #[serde(default)]
    pub prepare: PrepareSource,
    /// Re-read every target disk after import and compare content digests.
    pub verify_target: bool,
    /// Cleanup policy.
    #[serde(default)]
    pub cleanup: CleanupPolicy,
    /// Disks exported / imported at once.
    pub disk_parallelism: usize,
}

impl MigrationPlan {
    /// A plan with defaults: qcow2 staging, provider-default target format, no mapping,
    /// source read as is, target verified, staged objects kept, two disks at a time.
    pub fn new(source_vm: impl Into<String>, prefix: impl Into<String>) -> Self {
        MigrationPlan {
            source_vm: source_vm.into(),
            target_name: None,
            prefix: prefix.into(),
            stored_format: DiskFormat::Qcow2,
            target_format: None,
            placement: None,
            network_map: BTreeMap::new(),
            bus_override: None,
            firmware_override: None,
            prepare: PrepareSource::AsIs,
            verify_target: true,
            cleanup: CleanupPolicy::default(),
            disk_parallelism: 2,
        }
    }
}

/// Per-disk checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Source disk id.
    pub id: String,
    /// Staged object key.
    pub key: String,
    /// Content digest recorded at export.
    pub content_digest: Option<String>,
    /// Location on the target once imported.
    pub target_location: Option<String>,
    /// Format on the target once imported.
    pub target_format: Option<DiskFormat>,
    /// Bus on the target.
    pub bus: Option<DiskBus>,
    /// Whether the target disk was re-read and matched.
    pub verified: bool,
}

/// The checkpoint of a migration, stored as `<prefix>/migration.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    /// The source VM's description.
    pub source: Option<VmInfo>,
    /// Snapshot taken for the export, if any.
    pub snapshot: Option<SnapshotRef>,
    /// Disks.
    pub disks: Vec<DiskState>,
    /// The VM created on the target.
    pub target_vm: Option<VmInfo>,
    /// Whether cleanup ran.
    pub cleaned_up: bool,
}

/// The outcome of a migration.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// Final state (as checkpointed).
    pub state: MigrationState,
    /// Disks exported by this run (others were already staged).
    pub exported_now: usize,
    /// Disks imported by this run (others were already imported).
    pub imported_now: usize,
}

/// A migration between two providers through a storage backend.
pub struct Migration<'a> {
    source: &'a dyn Provider,
    target: &'a dyn Provider,
    storage: &'a dyn StorageBackend,
    plan: MigrationPlan,
    pipeline: PipelineOptions,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl<'a> Migration<'a> {
    /// A migration of `plan.source_vm` from `source` to `target` through `storage`.
    pub fn new(
        source: &'a dyn Provider,
        target: &'a dyn Provider,
        storage: &'a dyn StorageBackend,
        plan: MigrationPlan,
    ) -> Self {
        Migration {
            source,
            target,
            storage,
            plan,
            pipeline: PipelineOptions::default(),
        }
    }

    /// Sets pipeline tuning, progress and cancellation for every disk transfer.
    pub fn with_pipeline(mut self, pipeline: PipelineOptions) -> Self {
        self.pipeline = pipeline;
        self
    }

    fn state_key(&self) -> String {
        format!("{}/migration.json", self.plan.prefix.trim_end_matches('/'))
    }

    /// Loads the checkpoint of this migration, if a previous run left one.
    pub async fn load_state(&self) -> Result<Option<MigrationState>> {
        let key = self.state_key();
        match self.storage.get_bytes(&key, 16 << 20).await {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                Error::corrupt(format!("invalid migration checkpoint {key}: {e}"))
            })?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn save_state(&self, state: &MigrationState) -> Result<()> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        self.storage
            .put_bytes(&self.state_key(), Bytes::from(json))
            .await
    }

    fn progress(&self, phase: Phase, label: &str) {
        if let Some(f) = &self.pipeline.progress {
            f(&crate::progress::Progress {
                phase,
                label: label.to_string(),
                position: 0,
                virtual_size: 0,
                data_bytes: 0,
                data_total: None,
                rate: 0.0,
                eta: None,
                finished: false,
            });
        }
    }

    /// Runs (or resumes) the migration.
    pub async fn run(&self) -> Result<MigrationReport> {
        let span = info_span!("migration", vm = %self.plan.source_vm, prefix = %self.plan.prefix);
        self.run_inner().instrument(span).await
    }

    async fn run_inner(&self) -> Result<MigrationReport> {
        let plan = &self.plan;
        // validate
        self.progress(Phase::Validate, &plan.source_vm);
        validate_prefix(&plan.prefix)?;
        if plan.prefix.is_empty() {
            return Err(Error::invalid(
                "a migration needs a non-empty storage prefix",
            ));
        }
        let target_name = plan
            .target_name
            .clone()
            .unwrap_or_else(|| plan.source_vm.clone());
        let mut state = self.load_state().await?.unwrap_or_default();
        if state.target_vm.is_some() && state.cleaned_up {
            info!("migration already complete");
            return Ok(MigrationReport {
                state,
                exported_now: 0,
                imported_now: 0,
            });
        }
        if state.target_vm.is_none() {
            self.source.validate().await?;
            self.target.validate().await?;
        }
        let source = match &state.source {
            Some(s) => s.clone(),
            None => {
                let s = self.source.describe_vm(&plan.source_vm).await?;
                state.source = Some(s.clone());
                state.disks = s
                    .disks
                    .iter()
                    .map(|d| DiskState {
                        id: d.id.clone(),
                        // No format extension: the stored format may fall back (see
                        // ExportOptions::fallback_format); the manifest says what it is.
                        key: format!(
                            "{}/{}.img",
                            plan.prefix.trim_end_matches('/'),
                            sanitize(&d.id)
                        ),
                        bus: plan.bus_override.or(d.bus),
                        ..Default::default()
                    })
                    .collect();
                self.save_state(&state).await?;
                s
            }
        };

        // prepare + export
        let mut exported_now = 0;
        let pending: Vec<usize> = {
            let mut v = Vec::new();
            for (i, d) in state.disks.iter().enumerate() {
                if d.target_location.is_none()
                    && !self.storage.exists(&manifest_key(&d.key)).await?
                {
                    v.push(i);
                }
            }
            v
        };
        if !pending.is_empty() {
            self.progress(Phase::Prepare, &plan.source_vm);
            match plan.prepare {
                PrepareSource::AsIs => {}
                PrepareSource::Shutdown {
                    timeout_secs,
                    force,
                } => {
                    let info = self.source.describe_vm(&plan.source_vm).await?;
                    if info.state == crate::provider::PowerState::Running {
                        self.source
                            .power(
                                &plan.source_vm,
                                PowerOp::Shutdown {
                                    timeout: Duration::from_secs(timeout_secs),
                                    force,
                                },
                            )
                            .await?;
                    }
                }
                PrepareSource::Snapshot => {
                    if state.snapshot.is_none() {
                        let name = format!("virtrigaud-{}", crate::io::unique_suffix());
                        state.snapshot =
                            Some(self.source.create_snapshot(&plan.source_vm, &name).await?);
                        self.save_state(&state).await?;
                    }
                }
            }
            let export_opts = ExportOptions {
                format: plan.stored_format,
                snapshot: state.snapshot.clone(),
                include_vm: true,
                pipeline: self.pipeline.clone(),
                ..Default::default()
            };
            let jobs = pending.iter().map(|&i| {
                let d = state.disks[i].clone();
                let opts = export_opts.clone();
                async move {
                    let r = export_disk(
                        self.source,
                        &plan.source_vm,
                        &d.id,
                        self.storage,
                        &d.key,
                        &opts,
                    )
                    .await;
                    (i, r)
                }
            });
            let results: Vec<_> = futures::stream::iter(jobs)
                .buffer_unordered(plan.disk_parallelism.max(1))
                .collect()
                .await;
            let mut first_err = None;
            for (i, r) in results {
                match r {
                    Ok(rep) => {
                        state.disks[i].content_digest = Some(rep.manifest.content_digest.value);
                        exported_now += 1;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            self.save_state(&state).await?;
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        for d in &mut state.disks {
            if d.content_digest.is_none() {
                d.content_digest = Some(
                    read_manifest(self.storage, &d.key)
                        .await?
                        .content_digest
                        .value,
                );
            }
        }

        // import
        let mut imported_now = 0;
        for i in 0..state.disks.len() {
            if state.disks[i].target_location.is_some() {
                continue;
            }
            let d = state.disks[i].clone();
            let opts = ImportOptions {
                format: plan.target_format,
                placement: plan.placement.clone(),
                overwrite: false,
                pipeline: self.pipeline.clone(),
                ..Default::default()
            };
            let rep = import_disk(
                self.storage,
                &d.key,
                self.target,
                &target_name,
                &sanitize(&d.id),
                &opts,
            )
            .await?;
            state.disks[i].target_location = Some(rep.location);
            state.disks[i].target_format = Some(rep.format);
            imported_now += 1;
            self.save_state(&state).await?;
        }

        // create the VM
        if state.target_vm.is_none() {
            let spec = VmSpec {
                name: target_name.clone(),
                cpus: source.cpus,
                memory_mib: source.memory_mib,
                firmware: plan.firmware_override.unwrap_or(source.firmware),
                machine: source.machine.clone(),
                guest_os: source.guest_os.clone(),
                disks: state
                    .disks
                    .iter()
                    .map(|d| VmDiskSpec {
                        location: d.target_location.clone().unwrap_or_default(),
                        bus: d.bus.unwrap_or(DiskBus::Virtio),
                        format: d.target_format.unwrap_or(DiskFormat::Raw),
                    })
                    .collect(),
                nics: source
                    .nics
                    .iter()
                    .map(|n| NicInfo {
                        network: n.network.as_ref().map(|net| {
                            plan.network_map
                                .get(net)
                                .cloned()
                                .unwrap_or_else(|| net.clone())
                        }),
                        ..n.clone()
                    })
                    .collect(),
                overwrite: false,
                annotation: None,
            };
            state.target_vm = Some(self.target.create_vm(&spec).await?);
            self.save_state(&state).await?;
        }

        // verify
        if plan.verify_target {
            self.progress(Phase::Verify, &target_name);
            let created = state.target_vm.clone().unwrap_or_else(|| source.clone());
            for (i, d) in state.disks.clone().iter().enumerate() {
                if d.verified {
                    continue;
                }
                let target_disk = created
                    .disks
                    .iter()
                    .find(|td| Some(&td.location) == d.target_location.as_ref())
                    .map(|td| td.id.clone())
                    .or_else(|| d.target_location.clone())
                    .unwrap_or_default();
                let digest = digest_disk(
                    self.target,
                    &created.id,
                    &target_disk,
                    &ImportOptions {
                        pipeline: self.pipeline.clone(),
                        ..Default::default()
                    },
                )
                .await?;
                if Some(&digest) != d.content_digest.as_ref() {
                    return Err(Error::new(
                        ErrorKind::ChecksumMismatch,
                        format!("target disk {target_disk} has content digest {digest}, the source had {:?}", d.content_digest),
                    )
                    .with_vm(target_name.clone())
                    .with_disk(d.id.clone()));
                }
                state.disks[i].verified = true;
            }
            self.save_state(&state).await?;
        }

        // cleanup
        self.progress(Phase::Cleanup, &plan.source_vm);
        if plan.cleanup.delete_snapshot
            && let Some(snap) = state.snapshot.take()
        {
            self.source.delete_snapshot(&plan.source_vm, &snap).await?;
        }
        if plan.cleanup.delete_staged {
            for d in &state.disks {
                self.storage.delete(&manifest_key(&d.key)).await?;
                self.storage.delete(&d.key).await?;
            }
        }
        state.cleaned_up = true;
        self.save_state(&state).await?;
        self.progress(Phase::Done, &target_name);
        Ok(MigrationReport {
            state,
            exported_now,
            imported_now,
        })
    }
}

/// Makes a disk id usable as a file or object name (`scsi0`, `vda`, `2000` stay as they are).
fn sanitize(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "disk".into() } else { s }
}

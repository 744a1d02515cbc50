//! The migration runner: source VM → storage → target VM, as an explicit, crash-safe state
//! machine.
//!
//! Phases: **validate** (plan, peers, checkpoint, target name) → **prepare** the source (refuse
//! a running VM by default; or shut it down, or snapshot it, or read it as is) → per disk, in
//! parallel up to [`MigrationPlan::disk_parallelism`]: **export** to the storage → **import**
//! into the target → **verify** (re-read the target disk, content digests equal) → **create
//! the VM** only when every disk is verified → optional **start** → **cleanup** (snapshot,
//! staged objects, per policy). On failure, [`OnFailure::Rollback`] removes what the migration
//! created and restores the source.
//!
//! Every step is recorded in the checkpoint `<prefix>/migration.json` as started before it
//! touches anything and as done with its result after; [`state`] documents how a step found
//! started after a crash is finished or replaced. The checkpoint names its plan (source
//! provider and VM, target, [`MigrationPlan::identity_hash`]): a checkpoint of another plan
//! under the same prefix is refused with [`ErrorKind::Conflict`], never reused. Only what this
//! migration created, recognised by a name that carries the migration id or by its marker line
//! in a VM's description, is ever replaced or removed.
//!
//! [`Migration`] owns its providers and storage (`Arc`s), so `run` can be spawned; its cancel
//! token ([`Migration::cancel_token`]) reaches every transfer and every provider wait. A
//! cancelled migration keeps its checkpoint and resumes on the next run.
//!
//! ```no_run
//! # async fn demo(
//! #     storage: std::sync::Arc<dyn virtrigaud_core::StorageBackend>,
//! # ) -> virtrigaud_core::Result<()> {
//! use std::sync::Arc;
//! use virtrigaud_core::{LocalProvider, Migration, MigrationPlan, PrepareSource};
//! let source = Arc::new(LocalProvider::new("/srv/images"));
//! let target = Arc::new(LocalProvider::new("/srv/new"));
//! let plan = MigrationPlan::new("web01", "migrations/web01").with_prepare(PrepareSource::AsIs);
//! let mut m = Migration::new(source, target, storage, plan);
//! let mut events = m.events();
//! tokio::spawn(async move {
//!     while let Some(e) = events.recv().await {
//!         println!("{}", serde_json::to_string(&e).unwrap_or_default());
//!     }
//! });
//! let report = tokio::spawn(async move { m.run().await }).await.expect("joined")?;
//! println!("moved {} disks", report.state.disks.len());
//! # Ok(()) }
//! ```

mod events;
pub mod lease;
mod plan;
pub mod state;

pub use events::{EventFn, MigrationEvent};
pub use plan::{CleanupPolicy, MigrationPlan, OnFailure, PrepareSource, disk_slug, source_storage};
pub use state::{
    CHECKPOINT_SCHEMA, DiskAction, DiskState, ExportRound, MigrationState, RoundKind, StepStatus,
    marker_for,
};

use crate::digest::sha256_hex;
use crate::format::DiskFormat;
use crate::manifest::{manifest_key, now_rfc3339};
use crate::pipeline::PipelineOptions;
use crate::progress::{Phase, Progress};
use crate::provider::{
    DiskBus, DiskCreateSpec, NicInfo, PowerOp, PowerState, Provider, SnapshotRef, StagedObject,
    VmDiskSpec, VmInfo, VmSpec,
};
use crate::storage::{StorageBackend, StorageExt, validate_prefix};
use crate::transfer::{
    ExportOptions, ImportOptions, digest_opened_disk, export_disk, import_disk, read_manifest,
    verify_object,
};
use crate::{Error, ErrorKind, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// How long a presigned URL handed to a target that pulls ([`MigrationPlan::target_pull`])
/// stays valid: long enough for a large disk over a slow link, well inside SigV4's 7 days.
const PULL_URL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The outcome of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Migration id.
    pub migration_id: String,
    /// Final state (as checkpointed).
    pub state: MigrationState,
    /// Disks exported by this run (others were already staged).
    pub exported_now: usize,
    /// Disks imported by this run (others were already imported).
    pub imported_now: usize,
}

/// A migration between two providers through a storage backend.
pub struct Migration {
    source: Arc<dyn Provider>,
    target: Arc<dyn Provider>,
    storage: Arc<dyn StorageBackend>,
    plan: MigrationPlan,
    pipeline: PipelineOptions,
    listeners: Vec<EventFn>,
    lease_ttl: Duration,
    encryption: Option<crate::crypt::Encryption>,
    decryption: Option<crate::crypt::Decryption>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("source", &self.source.kind())
            .field("target", &self.target.kind())
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// The checkpoint in memory, written to the storage under its lock so writes never reorder.
struct Checkpoint {
    key: String,
    state: Mutex<MigrationState>,
}

/// A run's shared context.
struct Run<'a> {
    m: &'a Migration,
    cp: Checkpoint,
    id: String,
}

impl Migration {
    /// A migration of `plan.source_vm` from `source` to `target` through `storage`.
    pub fn new(
        source: Arc<dyn Provider>,
        target: Arc<dyn Provider>,
        storage: Arc<dyn StorageBackend>,
        plan: MigrationPlan,
    ) -> Self {
        Migration {
            source,
            target,
            storage,
            plan,
            pipeline: PipelineOptions::default(),
            listeners: Vec::new(),
            lease_ttl: Duration::from_secs(60),
            encryption: None,
            decryption: None,
        }
    }

    /// Encrypts every staged disk for these recipients (see [`crate::crypt`]); the migration
    /// then needs [`Migration::with_decryption`] too, to import them.
    pub fn with_encryption(mut self, encryption: crate::crypt::Encryption) -> Self {
        self.encryption = Some(encryption);
        self
    }

    /// Identities to decrypt staged disks that were stored encrypted.
    pub fn with_decryption(mut self, decryption: crate::crypt::Decryption) -> Self {
        self.decryption = Some(decryption);
        self
    }

    /// How long the lease of a run stays valid without renewal (default 60 s; renewed every
    /// third of it). A process that dies keeps others out for at most this long (on its own
    /// host, not at all: a dead holder process is recognised).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Key of the lease.
    pub fn lease_key(&self) -> String {
        format!("{}/migration.lease", self.plan.prefix.trim_end_matches('/'))
    }

    async fn take_lease(&self) -> Result<lease::Lease> {
        validate_prefix(&self.plan.prefix)?;
        if self.plan.prefix.trim_matches('/').is_empty() {
            return Err(Error::invalid(
                "a migration needs a non-empty storage prefix",
            ));
        }
        lease::Lease::acquire(self.storage.clone(), &self.lease_key(), self.lease_ttl).await
    }

    /// Sets pipeline tuning and cancellation for every disk transfer. Its progress callback,
    /// if any, receives every transfer's progress (it is one consumer of the event stream).
    pub fn with_pipeline(mut self, pipeline: PipelineOptions) -> Self {
        self.pipeline = pipeline;
        self
    }

    /// Adds an event consumer.
    pub fn on_event(mut self, f: impl Fn(&MigrationEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(f));
        self
    }

    /// A channel that receives every event of the coming runs. Progress events are rate
    /// limited by [`PipelineOptions::progress_interval`], so the channel stays small.
    pub fn events(&mut self) -> tokio::sync::mpsc::UnboundedReceiver<MigrationEvent> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.listeners.push(Arc::new(move |e: &MigrationEvent| {
            let _ = tx.send(e.clone());
        }));
        rx
    }

    /// The token that cancels this migration (transfers, provider waits). A cancelled
    /// migration keeps its checkpoint and resumes on the next run.
    pub fn cancel_token(&self) -> CancellationToken {
        self.pipeline.cancel.clone()
    }

    /// The plan.
    pub fn plan(&self) -> &MigrationPlan {
        &self.plan
    }

    /// Key of the checkpoint.
    pub fn state_key(&self) -> String {
        format!("{}/migration.json", self.plan.prefix.trim_end_matches('/'))
    }

    /// Loads the checkpoint under this plan's prefix, if a previous run left one. A checkpoint
    /// of a newer schema is `Unsupported`; one that does not parse is `Corrupt`.
    pub async fn load_state(&self) -> Result<Option<MigrationState>> {
        let key = self.state_key();
        let b = match self.storage.get_bytes(&key, 16 << 20).await {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let state: MigrationState = serde_json::from_slice(&b)
            .map_err(|e| Error::corrupt(format!("invalid migration checkpoint {key}: {e}")))?;
        if state.schema_version > CHECKPOINT_SCHEMA {
            return Err(Error::unsupported(format!(
                "the checkpoint {key} was written by a newer virtrigaud (schema {}, this one \
                 reads {CHECKPOINT_SCHEMA}); resume it with that version",
                state.schema_version
            )));
        }
        Ok(Some(state))
    }

    fn emit(&self, e: MigrationEvent) {
        for l in &self.listeners {
            l(&e);
        }
    }

    /// Runs (or resumes) the migration.
    pub async fn run(&self) -> Result<MigrationReport> {
        let span = info_span!("migration", vm = %self.plan.source_vm, prefix = %self.plan.prefix);
        async {
            let held = match self.take_lease().await {
                Ok(l) => l,
                Err(e) => {
                    self.emit(MigrationEvent::Failed {
                        migration: String::new(),
                        kind: e.kind(),
                        message: e.to_string(),
                        rolled_back: false,
                    });
                    return Err(e);
                }
            };
            let mut run: Option<Run<'_>> = None;
            let result = self.run_inner(&mut run).await;
            // Rollback and cleanup after a failure run under the lease; it is released last.
            let out = match result {
                Ok(report) => {
                    self.emit(MigrationEvent::Finished {
                        report: Box::new(report.clone()),
                    });
                    Ok(report)
                }
                Err(e) => {
                    let mut rolled_back = false;
                    if e.kind() == ErrorKind::Cancelled
                        && self.plan.cleanup.delete_staged
                        && let Some(run) = &run
                    {
                        match run.abandon().await {
                            Ok(()) => rolled_back = true,
                            Err(ce) => {
                                warn!(error = %ce, "cleanup after the cancel failed");
                                run.warn(None, format!("cleanup after the cancel failed: {ce}"));
                            }
                        }
                    }
                    if e.kind() != ErrorKind::Cancelled
                        && self.plan.on_failure == OnFailure::Rollback
                        && let Some(run) = &run
                    {
                        match run.rollback().await {
                            Ok(()) => rolled_back = true,
                            Err(re) => {
                                warn!(error = %re, "rollback failed");
                                run.warn(None, format!("rollback failed: {re}"));
                            }
                        }
                    }
                    self.emit(MigrationEvent::Failed {
                        migration: run.as_ref().map(|r| r.id.clone()).unwrap_or_default(),
                        kind: e.kind(),
                        message: e.to_string(),
                        rolled_back,
                    });
                    Err(e)
                }
            };
            if let Err(e) = held.release().await {
                warn!(error = %e, "cannot release the migration lease");
            }
            out
        }
        .instrument(span)
        .await
    }

    /// Removes what the migration under this plan's prefix created (target VM with its
    /// marker, target disks), restores the source (power, snapshot), and records it. Staged
    /// objects are kept. A later run imports again.
    pub async fn rollback(&self) -> Result<()> {
        let held = self.take_lease().await?;
        let r = self.rollback_inner().await;
        let _ = held.release().await;
        r
    }

    async fn rollback_inner(&self) -> Result<()> {
        let state = self
            .load_state()
            .await?
            .ok_or_else(|| Error::not_found(format!("no checkpoint at {}", self.state_key())))?;
        self.check_identity(&state)?;
        let run = Run {
            m: self,
            id: state.migration_id.clone(),
            cp: Checkpoint {
                key: self.state_key(),
                state: Mutex::new(state),
            },
        };
        run.rollback().await
    }

    fn check_identity(&self, s: &MigrationState) -> Result<()> {
        let key = self.state_key();
        if s.schema_version < CHECKPOINT_SCHEMA {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{key} holds a checkpoint of an older virtrigaud (schema {}) that cannot \
                     be resumed: use another prefix, or remove it",
                    s.schema_version
                ),
            ));
        }
        if s.plan_hash != self.plan.identity_hash()
            || s.source_vm != self.plan.source_vm
            || s.source_provider != self.source.kind()
            || s.target_provider != self.target.kind()
            || s.target_name != self.plan.target_vm_name()
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{key} belongs to another migration ({} VM {:?} → {} VM {:?}, plan {}); \
                     this plan moves {} VM {:?} → {} VM {:?} (plan {}). Use another prefix, \
                     or remove the old migration's objects",
                    s.source_provider,
                    s.source_vm,
                    s.target_provider,
                    s.target_name,
                    short(&s.plan_hash),
                    self.source.kind(),
                    self.plan.source_vm,
                    self.target.kind(),
                    self.plan.target_vm_name(),
                    short(&self.plan.identity_hash()),
                ),
            ));
        }
        Ok(())
    }

    /// Races a provider call against the cancel token.
    async fn guard<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        let cancel = self.pipeline.cancel.clone();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Error::cancelled()),
            r = f => r,
        }
    }

    async fn run_inner<'a>(&'a self, slot: &mut Option<Run<'a>>) -> Result<MigrationReport> {
        let plan = &self.plan;
        validate_prefix(&plan.prefix)?;
        if self.encryption.is_some() && self.decryption.is_none() {
            return Err(Error::invalid(
                "an encrypted staging needs the identity to import it: add with_decryption \
                 (--identity FILE)",
            ));
        }
        if plan.prefix.trim_matches('/').is_empty() {
            return Err(Error::invalid(
                "a migration needs a non-empty storage prefix",
            ));
        }
        let target_name = plan.target_vm_name().to_string();
        let existing = self.load_state().await?;
        if let Some(s) = &existing {
            self.check_identity(s)?;
            if s.finished {
                info!("migration already complete");
                self.emit(MigrationEvent::PhaseFinished {
                    migration: s.migration_id.clone(),
                    phase: Phase::Done,
                    disk: None,
                    skipped: true,
                });
                return Ok(MigrationReport {
                    migration_id: s.migration_id.clone(),
                    state: s.clone(),
                    exported_now: 0,
                    imported_now: 0,
                });
            }
        }
        // A checkpoint without a source description never finished validation: start over
        // (keeping its id, which nothing carries yet).
        let fresh = existing.as_ref().is_none_or(|s| s.source.is_none());
        let mut state = existing.unwrap_or_else(|| {
            let created = now_rfc3339();
            let id = sha256_hex(
                format!(
                    "{}|{}|{}",
                    plan.identity_hash(),
                    created,
                    crate::io::unique_suffix()
                )
                .as_bytes(),
            )[..16]
                .to_string();
            MigrationState {
                schema_version: CHECKPOINT_SCHEMA,
                migration_id: id,
                plan_hash: plan.identity_hash(),
                source_provider: self.source.kind().into(),
                source_vm: plan.source_vm.clone(),
                target_provider: self.target.kind().into(),
                target_name: target_name.clone(),
                created,
                ..Default::default()
            }
        });
        state.rolled_back = false;
        let id = state.migration_id.clone();
        let run: &Run<'a> = slot.insert(Run {
            m: self,
            id: id.clone(),
            cp: Checkpoint {
                key: self.state_key(),
                state: Mutex::new(state.clone()),
            },
        });

        // ---- validate -------------------------------------------------------------------
        run.phase(Phase::Validate, None).await?;
        self.guard(self.source.validate()).await?;
        self.guard(self.target.validate()).await?;
        let info = self
            .guard(self.source.describe_vm(&plan.source_vm))
            .await
            .map_err(|e| e.with_vm(plan.source_vm.clone()))?;
        if !state.source_vm_id.is_empty() && state.source_vm_id != info.id {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the checkpoint was made for source VM id {}, but {:?} is now VM id {}",
                    state.source_vm_id, plan.source_vm, info.id
                ),
            ));
        }
        if state.prepare == StepStatus::Pending
            && plan.prepare == PrepareSource::RequireStopped
            && matches!(info.state, PowerState::Running | PowerState::Paused)
        {
            return Err(Error::invalid(format!(
                "source VM {:?} is {:?}: a running VM is not read unless the plan says how \
                 (prepare: snapshot for a point-in-time copy, shutdown to stop it first, or \
                 as_is to read it live at your own risk)",
                plan.source_vm, info.state
            ))
            .with_vm(plan.source_vm.clone()));
        }
        if state.vm_step == StepStatus::Pending {
            run.check_target_name(&target_name).await?;
        }
        if fresh {
            let disks: Vec<DiskState> = info
                .disks
                .iter()
                .filter(|d| plan.includes(&d.id))
                .map(|d| {
                    let slug = disk_slug(&d.id);
                    let key = format!("{}/{slug}.img", plan.prefix.trim_end_matches('/'));
                    DiskState {
                        id: d.id.clone(),
                        source_location: d.location.clone(),
                        key: key.clone(),
                        exports: vec![ExportRound {
                            round: 0,
                            kind: RoundKind::Full,
                            key,
                            status: StepStatus::Pending,
                            content_digest: None,
                        }],
                        target_disk_name: format!("{slug}-{}", &id[..8]),
                        placement: plan.placement_for(d),
                        bus: plan.bus_for(d),
                        ..Default::default()
                    }
                })
                .collect();
            for want in &plan.include_disks {
                if !info.disks.iter().any(|d| &d.id == want) {
                    return Err(Error::invalid(format!(
                        "the plan includes disk {want:?}, but VM {:?} has disks {:?}",
                        plan.source_vm,
                        info.disks.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()
                    )));
                }
            }
            if disks.is_empty() {
                return Err(Error::invalid(format!(
                    "the plan selects no disk of VM {:?}",
                    plan.source_vm
                )));
            }
            run.update(|s| {
                s.source_vm_id = info.id.clone();
                s.source = Some(info.clone());
                s.source_power = Some(info.state);
                s.disks = disks;
                s.cutover = true; // cold migration
            })
            .await?;
        }
        run.phase_done(Phase::Validate, None, false);

        // ---- prepare --------------------------------------------------------------------
        let needs_export = run
            .snapshot()
            .await
            .disks
            .iter()
            .any(|d| d.exports.iter().any(|r| r.status != StepStatus::Done));
        if needs_export {
            run.prepare(&info).await?;
        } else {
            run.phase_skipped(Phase::Prepare, None);
        }

        // ---- per disk: export → import → verify -----------------------------------------
        let n = run.snapshot().await.disks.len();
        // After a failure no further disk starts (the ones under way finish their step).
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        let results: Vec<Result<(bool, bool)>> = futures::stream::iter(0..n)
            .map(|i| async move {
                if failed.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok((false, false));
                }
                let r = run.disk_chain(i).await;
                if r.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                r
            })
            .buffer_unordered(plan.disk_parallelism.max(1))
            .collect()
            .await;
        let (mut exported_now, mut imported_now) = (0, 0);
        let mut first_err: Option<Error> = None;
        for r in results {
            match r {
                Ok((e, i)) => {
                    exported_now += e as usize;
                    imported_now += i as usize;
                }
                Err(e) => {
                    // A cancellation is the least informative error: prefer another.
                    if first_err
                        .as_ref()
                        .is_none_or(|f| f.kind() == ErrorKind::Cancelled)
                    {
                        first_err = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        // ---- create the VM (only now: every disk is imported and verified) ---------------
        run.create_vm(&target_name).await?;

        // ---- start ----------------------------------------------------------------------
        if plan.start_after {
            run.start_vm(&target_name).await?;
        }

        // ---- cleanup --------------------------------------------------------------------
        run.cleanup().await?;
        let state = run.snapshot().await;
        Ok(MigrationReport {
            migration_id: id,
            state,
            exported_now,
            imported_now,
        })
    }
}

/// The key of the object an import of disk `d` reads: its last export round's.
fn staged_key(d: &DiskState) -> String {
    d.exports
        .last()
        .map(|r| r.key.clone())
        .unwrap_or(d.key.clone())
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

impl Run<'_> {
    async fn snapshot(&self) -> MigrationState {
        self.cp.state.lock().await.clone()
    }

    /// Applies `f` to the state and writes the checkpoint before returning.
    async fn update(&self, f: impl FnOnce(&mut MigrationState)) -> Result<()> {
        let mut s = self.cp.state.lock().await;
        let mut next = s.clone();
        f(&mut next);
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot serialise checkpoint: {e}")))?;
        self.m
            .storage
            .put_bytes(&self.cp.key, Bytes::from(json))
            .await
            .map_err(|e| e.with_operation("save checkpoint"))?;
        // Only a recorded state is the state: a failed write leaves memory as the store has it.
        *s = next;
        Ok(())
    }

    async fn phase(&self, phase: Phase, disk: Option<&str>) -> Result<()> {
        // Validation writes nothing: a migration that never validated leaves no checkpoint.
        if disk.is_none() && phase != Phase::Validate {
            self.update(|s| s.phase = phase).await?;
        }
        self.m.emit(MigrationEvent::PhaseStarted {
            migration: self.id.clone(),
            phase,
            disk: disk.map(String::from),
        });
        Ok(())
    }

    fn phase_done(&self, phase: Phase, disk: Option<&str>, skipped: bool) {
        self.m.emit(MigrationEvent::PhaseFinished {
            migration: self.id.clone(),
            phase,
            disk: disk.map(String::from),
            skipped,
        });
    }

    fn phase_skipped(&self, phase: Phase, disk: Option<&str>) {
        self.phase_done(phase, disk, true)
    }

    fn warn(&self, disk: Option<&str>, message: String) {
        warn!(disk, "{message}");
        self.m.emit(MigrationEvent::Warning {
            migration: self.id.clone(),
            disk: disk.map(String::from),
            message,
        });
    }

    fn marker(&self) -> String {
        marker_for(&self.id)
    }

    /// Pipeline options whose progress goes to the event stream (and the caller's callback).
    fn pipeline_for(&self, disk: &str) -> PipelineOptions {
        let mut p = self.m.pipeline.clone();
        let user = p.progress.take();
        let listeners = self.m.listeners.clone();
        let (id, disk) = (self.id.clone(), disk.to_string());
        if user.is_some() || !listeners.is_empty() {
            p.progress = Some(Arc::new(move |pr: &Progress| {
                if let Some(u) = &user {
                    u(pr);
                }
                let e = MigrationEvent::Progress {
                    migration: id.clone(),
                    disk: disk.clone(),
                    progress: pr.clone(),
                };
                for l in &listeners {
                    l(&e);
                }
            }));
        }
        p
    }

    /// Refuses a target VM name that a VM not created by this migration holds.
    async fn check_target_name(&self, name: &str) -> Result<()> {
        match self.m.guard(self.m.target.describe_vm(name)).await {
            Ok(vm) if vm.has_marker(&self.marker()) => Ok(()),
            Ok(_) if self.m.plan.replace_existing => {
                self.warn(
                    None,
                    format!("target VM {name:?} exists and will be replaced (replace_existing)"),
                );
                Ok(())
            }
            Ok(_) => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "a VM named {name:?} already exists on the {} target and was not created \
                     by this migration: choose another target name, or allow replacing it",
                    self.m.target.kind()
                ),
            )
            .with_vm(name.to_string())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn prepare(&self, info: &VmInfo) -> Result<()> {
        let m = self.m;
        let vm = &m.plan.source_vm;
        let st = self.snapshot().await;
        if st.prepare == StepStatus::Done {
            self.phase_skipped(Phase::Prepare, None);
            return Ok(());
        }
        self.phase(Phase::Prepare, None).await?;
        match m.plan.prepare {
            PrepareSource::RequireStopped => {}
            PrepareSource::AsIs => {
                if matches!(info.state, PowerState::Running | PowerState::Paused) {
                    self.warn(
                        None,
                        format!(
                            "source VM {vm:?} is {:?} and is read as is: the copy may not be \
                             consistent",
                            info.state
                        ),
                    );
                }
            }
            PrepareSource::Shutdown {
                timeout_secs,
                force,
            } => {
                self.update(|s| s.prepare = StepStatus::Started).await?;
                let now = m.guard(m.source.describe_vm(vm)).await?;
                if now.state == PowerState::Running {
                    self.update(|s| s.shut_down_by_us = true).await?;
                    m.guard(m.source.power(
                        vm,
                        PowerOp::Shutdown {
                            timeout: Duration::from_secs(timeout_secs),
                            force,
                        },
                    ))
                    .await
                    .map_err(|e| e.with_vm(vm.clone()))?;
                }
            }
            PrepareSource::Snapshot => {
                if st.snapshot.is_none() {
                    let name = format!("virtrigaud-{}", self.id);
                    self.update(|s| s.prepare = StepStatus::Started).await?;
                    let snap = match m.guard(m.source.create_snapshot(vm, &name)).await {
                        Ok(s) => s,
                        // Named after this migration: a leftover of a run that stopped before
                        // recording it is this migration's own.
                        Err(e)
                            if e.kind() == ErrorKind::AlreadyExists
                                && st.prepare == StepStatus::Started =>
                        {
                            SnapshotRef {
                                id: name.clone(),
                                name,
                            }
                        }
                        Err(e) => return Err(e.with_vm(vm.clone())),
                    };
                    self.update(|s| s.snapshot = Some(snap)).await?;
                }
            }
        }
        self.update(|s| s.prepare = StepStatus::Done).await?;
        self.phase_done(Phase::Prepare, None, false);
        Ok(())
    }

    /// One disk's chain. Returns whether it exported and imported in this run.
    async fn disk_chain(&self, i: usize) -> Result<(bool, bool)> {
        let d = self.snapshot().await.disks[i].clone();
        let span = info_span!("disk", disk = %d.id);
        async {
            let (mut exported, mut imported) = (false, false);
            loop {
                let st = self.snapshot().await;
                let d = &st.disks[i];
                match d.next_action(st.cutover, self.m.plan.verify_target) {
                    DiskAction::Export(r) => {
                        exported |= self.export_round(i, r).await?;
                    }
                    DiskAction::AwaitCutover => {
                        return Err(Error::unsupported(
                            "warm migration (incremental rounds and cut-over) is not \
                             implemented yet",
                        ));
                    }
                    DiskAction::Import => {
                        self.import(i).await?;
                        imported = true;
                    }
                    DiskAction::Verify => self.verify(i).await?,
                    DiskAction::Done => {
                        if !exported && !imported {
                            self.phase_skipped(Phase::Import, Some(&d.id));
                        }
                        return Ok((exported, imported));
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Exports round `r` of disk `i`; returns whether it exported (not adopted).
    async fn export_round(&self, i: usize, r: usize) -> Result<bool> {
        let m = self.m;
        let st = self.snapshot().await;
        let d = st.disks[i].clone();
        let round = d.exports[r].clone();
        if round.kind != RoundKind::Full {
            return Err(Error::unsupported(
                "incremental export rounds (warm migration) are not implemented yet",
            ));
        }
        self.phase(Phase::Export, Some(&d.id)).await?;
        // A run that stopped inside this step may have finished it: adopt the manifest if it
        // names this source disk and snapshot and was written after the migration began.
        if round.status == StepStatus::Started
            && let Some(digest) = self.adoptable_export(&st, &d, &round.key).await
        {
            info!(key = %round.key, "adopting the export an interrupted run completed");
            self.update(|s| {
                let dd = &mut s.disks[i];
                dd.exports[r].status = StepStatus::Done;
                dd.exports[r].content_digest = Some(digest.clone());
                dd.content_digest = Some(digest);
            })
            .await?;
            self.phase_done(Phase::Export, Some(&d.id), true);
            return Ok(false);
        }
        self.update(|s| s.disks[i].exports[r].status = StepStatus::Started)
            .await?;
        let opts = ExportOptions {
            format: m.plan.stored_format,
            snapshot: st.snapshot.clone(),
            include_vm: true,
            pipeline: self.pipeline_for(&d.id),
            encode: crate::format::EncodeOptions {
                compression_level: m.plan.staging_compression_level.min(9),
                // The identity that imports the disk also lets an interrupted encrypted
                // export resume with its key (Encryption::resumable_with).
                encrypt: m.encryption.clone().map(|e| match &m.decryption {
                    Some(d) if e.resume_identity().is_none() => e.resumable_with(d.clone()),
                    _ => e,
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let rep = export_disk(
            m.source.as_ref(),
            &m.plan.source_vm,
            &d.id,
            m.storage.as_ref(),
            &round.key,
            &opts,
        )
        .await?;
        let digest = rep.manifest.content_digest.value;
        self.update(|s| {
            let dd = &mut s.disks[i];
            dd.exports[r].status = StepStatus::Done;
            dd.exports[r].content_digest = Some(digest.clone());
            dd.content_digest = Some(digest);
        })
        .await?;
        self.phase_done(Phase::Export, Some(&d.id), false);
        Ok(true)
    }

    /// The content digest of a complete export found at `key` that this migration made.
    async fn adoptable_export(
        &self,
        st: &MigrationState,
        d: &DiskState,
        key: &str,
    ) -> Option<String> {
        let m = self.m;
        let man = read_manifest(m.storage.as_ref(), key).await.ok()?;
        let src = man.source.as_ref()?;
        let ours = src.provider == m.source.kind()
            && src.vm == m.plan.source_vm
            && src.disk == d.id
            && src.snapshot == st.snapshot.as_ref().map(|s| s.name.clone())
            && man.created >= st.created;
        let size_ok = m
            .storage
            .stat(key)
            .await
            .is_ok_and(|meta| meta.size == man.stored_size);
        (ours && size_ok).then_some(man.content_digest.value)
    }

    fn create_spec(&self, st: &MigrationState, d: &DiskState) -> DiskCreateSpec {
        DiskCreateSpec {
            vm: st.target_name.clone(),
            name: d.target_disk_name.clone(),
            capacity: 0,
            format: self.m.plan.target_format,
            placement: d.placement.clone(),
            overwrite: false,
        }
    }

    async fn import(&self, i: usize) -> Result<()> {
        let m = self.m;
        let st = self.snapshot().await;
        let d = st.disks[i].clone();
        self.phase(Phase::Import, Some(&d.id)).await?;
        if d.import == StepStatus::Started {
            // The disk name carries the migration id: whatever is under it is ours.
            let spec = self.create_spec(&st, &d);
            let found = match d.target_location.clone() {
                Some(l) => Some(l),
                None => m.guard(m.target.find_disk(&spec)).await?,
            };
            if let Some(loc) = found {
                self.warn(
                    Some(&d.id),
                    format!("replacing disk {loc} that an interrupted run of this migration left"),
                );
                m.guard(m.target.delete_disk(&st.target_name, &loc)).await?;
            }
        }
        self.update(|s| {
            let dd = &mut s.disks[i];
            dd.import = StepStatus::Started;
            dd.target_location = None;
            dd.verified = false;
        })
        .await?;
        let key = staged_key(&d);
        if let Some((location, format)) = self.import_as_stored(&st, &d, &key).await? {
            self.update(|s| {
                let dd = &mut s.disks[i];
                dd.import = StepStatus::Done;
                dd.target_location = Some(location.clone());
                dd.target_format = Some(format);
            })
            .await?;
            self.phase_done(Phase::Import, Some(&d.id), false);
            return Ok(());
        }
        let opts = ImportOptions {
            format: m.plan.target_format,
            placement: d.placement.clone(),
            overwrite: false,
            pipeline: self.pipeline_for(&d.id),
            decrypt: m.decryption.clone(),
            verified_later: self.verified_later(),
            ..Default::default()
        };
        let rep = import_disk(
            m.storage.as_ref(),
            &key,
            m.target.as_ref(),
            &st.target_name,
            &d.target_disk_name,
            &opts,
        )
        .await?;
        if d.content_digest.as_deref() != Some(rep.manifest.content_digest.value.as_str()) {
            // The staged object changed under us (another writer): refuse it.
            let _ = m.target.delete_disk(&st.target_name, &rep.location).await;
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "the staged object {key} now has content digest {}, the export recorded {:?}",
                    rep.manifest.content_digest.value, d.content_digest
                ),
            )
            .with_disk(d.id.clone()));
        }
        self.update(|s| {
            let dd = &mut s.disks[i];
            dd.import = StepStatus::Done;
            dd.target_location = Some(rep.location.clone());
            dd.target_format = Some(rep.format);
        })
        .await?;
        self.phase_done(Phase::Import, Some(&d.id), false);
        Ok(())
    }

    /// Offers the staged object to a target that imports staged objects as they are stored
    /// ([`Provider::import_staged`]): pulled from a presigned GET when the plan allows it and
    /// the store can presign, else uploaded as stored. `None` when the target streams instead.
    async fn import_as_stored(
        &self,
        st: &MigrationState,
        d: &DiskState,
        key: &str,
    ) -> Result<Option<(String, DiskFormat)>> {
        let m = self.m;
        let caps = m.target.capabilities();
        if !caps.import_staged {
            return Ok(None);
        }
        let manifest = read_manifest(m.storage.as_ref(), key)
            .await
            .map_err(|e| e.with_disk(d.id.clone()))?;
        // An encrypted object is never handed to a target as it is stored (the target would
        // get ciphertext); the decoding import path answers for it.
        if m.plan.target_format.is_some_and(|f| f != manifest.format)
            || manifest.encryption.is_some()
        {
            return Ok(None);
        }
        if d.content_digest.as_deref() != Some(manifest.content_digest.value.as_str()) {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "the staged object {key} now has content digest {}, the export recorded {:?}",
                    manifest.content_digest.value, d.content_digest
                ),
            )
            .with_disk(d.id.clone()));
        }
        let size = m
            .storage
            .stat(key)
            .await
            .map_err(|e| e.with_target(key.to_string()))?
            .size;
        if size != manifest.stored_size {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "stored object {key} is {size} bytes, its manifest records {}",
                    manifest.stored_size
                ),
            )
            .with_disk(d.id.clone()));
        }
        let url = if m.plan.target_pull && caps.pull_from_url && m.storage.capabilities().presign {
            match m.storage.presign_get(key, PULL_URL_VALIDITY).await {
                Ok(u) => Some(u),
                Err(e) => {
                    self.warn(
                        Some(&d.id),
                        format!("the store cannot presign {key} ({e}); uploading it instead"),
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut spec = self.create_spec(st, d);
        spec.capacity = manifest.virtual_size;
        let staged = StagedObject {
            storage: m.storage.as_ref(),
            key,
            manifest: &manifest,
            url: url.as_deref(),
            bandwidth: &m.pipeline.bandwidth,
        };
        info!(
            key,
            pull = url.is_some(),
            "offering the staged object to the target as it is stored"
        );
        let location = m
            .guard(m.target.import_staged(&staged, &spec))
            .await
            .map_err(|e| e.with_disk(d.id.clone()))?;
        Ok(location.map(|l| (l, manifest.format)))
    }

    /// Whether the verify step will re-read the imported disks from the target, so an import
    /// can leave the SHA-256 proofs to it ([`ImportOptions::verified_later`]).
    fn verified_later(&self) -> bool {
        self.m.plan.verify_target && self.m.target.capabilities().export
    }

    async fn verify(&self, i: usize) -> Result<()> {
        let m = self.m;
        let st = self.snapshot().await;
        let d = st.disks[i].clone();
        let Some(loc) = d.target_location.clone() else {
            return Err(Error::corrupt(
                "checkpoint: imported disk without a location",
            ));
        };
        self.phase(Phase::Verify, Some(&d.id)).await?;
        let opened = match m
            .guard(m.target.open_created_disk(&st.target_name, &loc))
            .await
        {
            Ok(o) => o,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                if self.verified_later() {
                    // The import left its SHA-256 proofs to this step: prove the staged object
                    // it read instead (its bytes reached the target under chunk CRC32Cs).
                    let key = staged_key(&d);
                    verify_object(
                        m.storage.as_ref(),
                        &key,
                        &ImportOptions {
                            pipeline: self.pipeline_for(&d.id),
                            decrypt: m.decryption.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| e.with_disk(d.id.clone()))?;
                }
                self.warn(
                    Some(&d.id),
                    format!(
                        "the {} target cannot re-read a disk before its VM exists; the import \
                         was verified on the stream it read ({e})",
                        m.target.kind()
                    ),
                );
                self.update(|s| s.disks[i].verified = true).await?;
                self.phase_done(Phase::Verify, Some(&d.id), true);
                return Ok(());
            }
            Err(e) => return Err(e.with_disk(d.id.clone())),
        };
        let digest = digest_opened_disk(
            opened,
            &ImportOptions {
                pipeline: self.pipeline_for(&d.id),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.with_disk(d.id.clone()))?;
        if Some(&digest) != d.content_digest.as_ref() {
            // A disk that does not hold what was exported is removed, so a rerun imports again.
            let _ = m.target.delete_disk(&st.target_name, &loc).await;
            self.update(|s| {
                let dd = &mut s.disks[i];
                dd.import = StepStatus::Pending;
                dd.target_location = None;
            })
            .await?;
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "target disk {loc} has content digest {digest}, the source had {}",
                    d.content_digest.as_deref().unwrap_or("(none)")
                ),
            )
            .with_vm(st.target_name.clone())
            .with_disk(d.id.clone()));
        }
        self.update(|s| s.disks[i].verified = true).await?;
        self.phase_done(Phase::Verify, Some(&d.id), false);
        Ok(())
    }

    fn vm_spec(&self, st: &MigrationState, target_name: &str) -> Result<VmSpec> {
        let plan = &self.m.plan;
        let source = st
            .source
            .clone()
            .ok_or_else(|| Error::corrupt("checkpoint has no source description"))?;
        let mut disks = Vec::new();
        for d in &st.disks {
            let location = d.target_location.clone().ok_or_else(|| {
                Error::corrupt(format!("checkpoint: disk {} has no target location", d.id))
            })?;
            disks.push(VmDiskSpec {
                location,
                bus: d.bus.unwrap_or(DiskBus::Virtio),
                format: d.target_format.unwrap_or(DiskFormat::Raw),
            });
        }
        let map = |m: &std::collections::BTreeMap<String, String>, v: &Option<String>| {
            v.as_ref()
                .map(|x| m.get(x).cloned().unwrap_or_else(|| x.clone()))
        };
        Ok(VmSpec {
            name: target_name.to_string(),
            cpus: source.cpus,
            memory_mib: source.memory_mib,
            firmware: plan.firmware_override.unwrap_or(source.firmware),
            machine: source.machine.clone(),
            guest_os: source.guest_os.clone(),
            disks,
            nics: source
                .nics
                .iter()
                .map(|n| NicInfo {
                    network: map(&plan.network_map, &n.network),
                    model: map(&plan.nic_model_map, &n.model),
                    ..n.clone()
                })
                .collect(),
            overwrite: plan.replace_existing,
            annotation: Some(format!(
                "Migrated by virtrigaud from {} VM {}\n{}",
                st.source_provider,
                st.source_vm,
                self.marker()
            )),
        })
    }

    async fn create_vm(&self, target_name: &str) -> Result<()> {
        let m = self.m;
        let st = self.snapshot().await;
        if st.vm_step == StepStatus::Done {
            self.phase_skipped(Phase::CreateVm, None);
            return Ok(());
        }
        self.phase(Phase::CreateVm, None).await?;
        let spec = self.vm_spec(&st, target_name)?;
        if st.vm_step == StepStatus::Started {
            match m.guard(m.target.describe_vm(target_name)).await {
                // Ours and whole (created_vm is one call; a VM with all its disks is what it
                // made): adopt it. Ours but incomplete: replace it.
                Ok(vm) if vm.has_marker(&self.marker()) && vm.disks.len() == spec.disks.len() => {
                    info!("adopting VM {target_name:?} that an interrupted run created");
                    m.guard(m.target.finish_adopted_vm(&spec)).await?;
                    self.update(|s| {
                        s.vm_step = StepStatus::Done;
                        s.target_vm = Some(vm);
                    })
                    .await?;
                    self.phase_done(Phase::CreateVm, None, true);
                    return Ok(());
                }
                Ok(vm) if vm.has_marker(&self.marker()) => {
                    self.warn(
                        None,
                        format!(
                            "replacing VM {target_name:?} that an interrupted run of this \
                             migration left incomplete"
                        ),
                    );
                    m.guard(m.target.delete_vm(target_name)).await?;
                }
                Ok(_) if m.plan.replace_existing => {}
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "a VM named {target_name:?} appeared on the target and was not \
                             created by this migration; it is left alone"
                        ),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.update(|s| s.vm_step = StepStatus::Started).await?;
        let created = m
            .guard(m.target.create_vm(&spec))
            .await
            .map_err(|e| e.with_vm(target_name.to_string()))?;
        self.update(|s| {
            s.vm_step = StepStatus::Done;
            s.target_vm = Some(created);
        })
        .await?;
        self.phase_done(Phase::CreateVm, None, false);
        Ok(())
    }

    async fn start_vm(&self, target_name: &str) -> Result<()> {
        let m = self.m;
        if self.snapshot().await.start_step == StepStatus::Done {
            self.phase_skipped(Phase::Start, None);
            return Ok(());
        }
        self.phase(Phase::Start, None).await?;
        self.update(|s| s.start_step = StepStatus::Started).await?;
        let now = m.guard(m.target.describe_vm(target_name)).await?;
        if now.state != PowerState::Running {
            m.guard(m.target.power(target_name, PowerOp::On)).await?;
        }
        self.update(|s| s.start_step = StepStatus::Done).await?;
        self.phase_done(Phase::Start, None, false);
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        let m = self.m;
        self.phase(Phase::Cleanup, None).await?;
        let st = self.snapshot().await;
        if m.plan.cleanup.delete_snapshot
            && let Some(snap) = &st.snapshot
        {
            m.guard(m.source.delete_snapshot(&m.plan.source_vm, snap))
                .await?;
            self.update(|s| s.snapshot = None).await?;
        }
        if m.plan.cleanup.delete_staged {
            self.delete_staged(&st).await?;
        }
        self.update(|s| {
            s.cleaned_up = true;
            s.finished = true;
            s.phase = Phase::Done;
        })
        .await?;
        self.phase_done(Phase::Cleanup, None, false);
        Ok(())
    }

    /// Deletes every staged object of `st` and its manifest (a key never written is fine).
    async fn delete_staged(&self, st: &MigrationState) -> Result<()> {
        for d in &st.disks {
            for r in &d.exports {
                for key in [manifest_key(&r.key), r.key.clone()] {
                    match self.m.storage.delete(&key).await {
                        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// A cancelled migration whose plan asks for cleanup leaves nothing behind: what it created
    /// on the target is removed and the source restored ([`Run::rollback`]), then its staged
    /// objects and its checkpoint are deleted, so the same command starts afresh.
    async fn abandon(&self) -> Result<()> {
        let r = self.rollback().await;
        let st = self.snapshot().await;
        self.delete_staged(&st).await?;
        match self.m.storage.delete(&self.cp.key).await {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        r
    }

    /// Removes what this migration created on the target and restores the source. Every
    /// removal is attempted; the first error is returned.
    async fn rollback(&self) -> Result<()> {
        let m = self.m;
        self.m.emit(MigrationEvent::PhaseStarted {
            migration: self.id.clone(),
            phase: Phase::Rollback,
            disk: None,
        });
        let st = self.snapshot().await;
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r
                && e.kind() != ErrorKind::NotFound
            {
                first.get_or_insert(e);
            }
        };
        if st.vm_step != StepStatus::Pending {
            match m.target.describe_vm(&st.target_name).await {
                Ok(vm) if vm.has_marker(&self.marker()) || st.vm_step == StepStatus::Done => {
                    note(m.target.delete_vm(&st.target_name).await);
                }
                Ok(_) => self.warn(
                    None,
                    format!(
                        "VM {:?} on the target is not this migration's: left alone",
                        st.target_name
                    ),
                ),
                Err(e) => note(Err(e)),
            }
        }
        for d in &st.disks {
            if d.import == StepStatus::Pending {
                continue;
            }
            let loc = match &d.target_location {
                Some(l) => Some(l.clone()),
                None => m
                    .target
                    .find_disk(&self.create_spec(&st, d))
                    .await
                    .ok()
                    .flatten(),
            };
            if let Some(loc) = loc {
                note(m.target.delete_disk(&st.target_name, &loc).await);
            }
        }
        if st.shut_down_by_us && st.source_power == Some(PowerState::Running) {
            note(m.source.power(&m.plan.source_vm, PowerOp::On).await);
        }
        let mut snapshot_gone = true;
        if let Some(snap) = &st.snapshot {
            let r = m.source.delete_snapshot(&m.plan.source_vm, snap).await;
            snapshot_gone = r.is_ok();
            note(r);
        }
        self.update(|s| {
            s.vm_step = StepStatus::Pending;
            s.target_vm = None;
            s.start_step = StepStatus::Pending;
            for d in &mut s.disks {
                d.import = StepStatus::Pending;
                d.target_location = None;
                d.target_format = None;
                d.verified = false;
            }
            if snapshot_gone {
                s.snapshot = None;
                if s.prepare == StepStatus::Done || s.prepare == StepStatus::Started {
                    s.prepare = StepStatus::Pending;
                }
            }
            s.shut_down_by_us = false;
            s.rolled_back = true;
        })
        .await?;
        self.phase_done(Phase::Rollback, None, false);
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

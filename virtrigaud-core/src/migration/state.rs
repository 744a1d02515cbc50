//! The checkpoint of a migration: what each step did, recorded before the next step begins.
//!
//! Every step has a [`StepStatus`]. A step is marked `Started` (and the checkpoint written)
//! before it touches anything, and `Done` with its result after. When a run finds a step
//! `Started`, the previous run stopped inside it (crash, kill, cancel), and the step's record
//! says how to finish or replace it:
//!
//! | step | found `Started` after a crash |
//! |---|---|
//! | prepare: snapshot | the snapshot's name is derived from the migration id; if it exists it is adopted |
//! | prepare: shutdown | the power state is read again; a running VM is shut down again |
//! | export of a disk round | a manifest at the key whose `source` names this VM, disk and snapshot, written after the migration began, is adopted; anything else is exported again (S3 resumes its recorded parts) |
//! | import of a disk | the disk name is unique to the migration (it carries the migration id), so a disk found under it is this migration's own: it is deleted and imported again |
//! | verify of a disk | simply done again (read-only) |
//! | create the VM | a VM of the target name whose description holds this migration's marker line is its own: it is deleted and created again; any other VM is never touched |
//! | start the VM | the VM is powered on if it is not running |
//!
//! Warm migration (later): a disk has a list of export rounds, a full one and then
//! incremental ones, before a cut-over. [`DiskState::next_action`] already walks such a list;
//! today's runner creates one full round per disk and refuses incremental rounds as
//! `Unsupported`.

use crate::format::DiskFormat;
use crate::progress::Phase;
use crate::provider::{DiskBus, PowerState, SnapshotRef, VmInfo};
use serde::{Deserialize, Serialize};

/// Schema version of the checkpoint this library writes. A checkpoint written by a newer
/// schema is refused; one written by an older one cannot be resumed.
pub const CHECKPOINT_SCHEMA: u32 = 2;

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not begun.
    #[default]
    Pending,
    /// Begun and not recorded as finished: a run stopped inside it.
    Started,
    /// Finished; its result is recorded.
    Done,
}

/// What an export round reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RoundKind {
    /// The whole disk.
    Full,
    /// Only what changed since the previous round (warm migration; not implemented yet).
    Incremental {
        /// The provider's change id the round starts from.
        since: String,
    },
}

/// One export of a disk into the storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRound {
    /// Round number, from 0.
    pub round: u32,
    /// Full or incremental.
    pub kind: RoundKind,
    /// Key of the staged object.
    pub key: String,
    /// Step status.
    pub status: StepStatus,
    /// Content digest of the disk as this round stored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
}

/// What a disk's chain does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskAction {
    /// Export round `n` (index into [`DiskState::exports`]).
    Export(usize),
    /// Wait for the cut-over (warm migration: every round is done, the source is still live).
    AwaitCutover,
    /// Import the last round into the target.
    Import,
    /// Re-read the target disk and compare digests.
    Verify,
    /// Nothing left.
    Done,
}

/// Per-disk checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Source disk id.
    pub id: String,
    /// Source disk location.
    #[serde(default)]
    pub source_location: String,
    /// Staged object key (of the full round).
    pub key: String,
    /// Export rounds.
    #[serde(default)]
    pub exports: Vec<ExportRound>,
    /// Content digest of the disk (of the last round).
    pub content_digest: Option<String>,
    /// Name given to the target disk (unique to the migration: it carries the migration id).
    #[serde(default)]
    pub target_disk_name: String,
    /// Placement on the target.
    #[serde(default)]
    pub placement: Option<String>,
    /// Import step.
    #[serde(default)]
    pub import: StepStatus,
    /// Location on the target once imported.
    pub target_location: Option<String>,
    /// Format on the target once imported.
    pub target_format: Option<DiskFormat>,
    /// Bus on the target.
    pub bus: Option<DiskBus>,
    /// Whether the target disk was re-read and matched.
    pub verified: bool,
}

impl DiskState {
    /// The next step of this disk's chain. `cutover` says whether the source is final (cold
    /// migration: always; warm migration: after the cut-over), `verify` whether the plan
    /// re-reads target disks.
    pub fn next_action(&self, cutover: bool, verify: bool) -> DiskAction {
        if let Some(i) = self
            .exports
            .iter()
            .position(|r| r.status != StepStatus::Done)
        {
            return DiskAction::Export(i);
        }
        if !cutover {
            return DiskAction::AwaitCutover;
        }
        if self.import != StepStatus::Done {
            return DiskAction::Import;
        }
        if verify && !self.verified {
            return DiskAction::Verify;
        }
        DiskAction::Done
    }
}

/// The checkpoint of a migration, stored as `<prefix>/migration.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    /// [`CHECKPOINT_SCHEMA`] of the writer.
    #[serde(default)]
    pub schema_version: u32,
    /// Random id of this migration; its marker on what it creates.
    #[serde(default)]
    pub migration_id: String,
    /// [`MigrationPlan::identity_hash`](super::MigrationPlan::identity_hash) of the plan.
    #[serde(default)]
    pub plan_hash: String,
    /// Source provider kind.
    #[serde(default)]
    pub source_provider: String,
    /// Source VM as the plan names it.
    #[serde(default)]
    pub source_vm: String,
    /// Source VM id as the provider reported it.
    #[serde(default)]
    pub source_vm_id: String,
    /// Target provider kind.
    #[serde(default)]
    pub target_provider: String,
    /// Target VM name.
    #[serde(default)]
    pub target_name: String,
    /// When the migration began (RFC 3339 UTC).
    #[serde(default)]
    pub created: String,
    /// The last phase entered.
    #[serde(default = "validate_phase")]
    pub phase: Phase,
    /// The source VM's description.
    pub source: Option<VmInfo>,
    /// Power state of the source as found, before any preparation.
    #[serde(default)]
    pub source_power: Option<PowerState>,
    /// Preparation step.
    #[serde(default)]
    pub prepare: StepStatus,
    /// Whether this migration shut the source down (a rollback powers it on again).
    #[serde(default)]
    pub shut_down_by_us: bool,
    /// Snapshot taken for the export, if any (until the cleanup deletes it).
    pub snapshot: Option<SnapshotRef>,
    /// Disks.
    pub disks: Vec<DiskState>,
    /// Warm migration: whether the cut-over happened (cold migrations are cut over at once).
    #[serde(default)]
    pub cutover: bool,
    /// VM creation step.
    #[serde(default)]
    pub vm_step: StepStatus,
    /// The VM created on the target.
    pub target_vm: Option<VmInfo>,
    /// Start step (only with `start_after`).
    #[serde(default)]
    pub start_step: StepStatus,
    /// Whether cleanup ran.
    pub cleaned_up: bool,
    /// Whether a rollback removed what the migration had created.
    #[serde(default)]
    pub rolled_back: bool,
    /// Whether the migration finished.
    #[serde(default)]
    pub finished: bool,
}

fn validate_phase() -> Phase {
    Phase::Validate
}

impl MigrationState {
    /// The line a migration writes into the description of the VM it creates.
    pub fn marker(&self) -> String {
        marker_for(&self.migration_id)
    }
}

/// The marker line of migration `id`.
pub fn marker_for(id: &str) -> String {
    format!("virtrigaud-migration: {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: u32, kind: RoundKind, status: StepStatus) -> ExportRound {
        ExportRound {
            round: n,
            kind,
            key: format!("p/d.{n}"),
            status,
            content_digest: None,
        }
    }

    /// Warm migration as the state machine expresses it: a full round, incremental rounds while
    /// the source runs, then the cut-over, then import and verify.
    #[test]
    fn the_state_machine_expresses_warm_rounds() {
        let mut d = DiskState {
            exports: vec![round(0, RoundKind::Full, StepStatus::Pending)],
            ..Default::default()
        };
        assert_eq!(d.next_action(false, true), DiskAction::Export(0));
        d.exports[0].status = StepStatus::Done;
        assert_eq!(d.next_action(false, true), DiskAction::AwaitCutover);
        d.exports.push(round(
            1,
            RoundKind::Incremental {
                since: "52 1c".into(),
            },
            StepStatus::Started,
        ));
        assert_eq!(d.next_action(false, true), DiskAction::Export(1));
        d.exports[1].status = StepStatus::Done;
        assert_eq!(d.next_action(false, true), DiskAction::AwaitCutover);
        assert_eq!(d.next_action(true, true), DiskAction::Import);
        d.import = StepStatus::Started;
        assert_eq!(
            d.next_action(true, true),
            DiskAction::Import,
            "finish a started import"
        );
        d.import = StepStatus::Done;
        assert_eq!(d.next_action(true, true), DiskAction::Verify);
        assert_eq!(d.next_action(true, false), DiskAction::Done);
        d.verified = true;
        assert_eq!(d.next_action(true, true), DiskAction::Done);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<DiskState>(&json).unwrap(), d);
    }
}

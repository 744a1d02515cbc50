//! The typed event stream of a migration: phases per VM and disk, progress, warnings, and the
//! final report. Serialisable (one JSON object per event, tagged by `event`), so a command line
//! can print them as JSON lines and an orchestrator can forward them.

use crate::error::ErrorKind;
use crate::progress::{Phase, Progress};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::MigrationReport;

/// One event of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MigrationEvent {
    /// A phase began, for the whole VM (`disk: None`) or one disk. Phases have no byte totals;
    /// only [`MigrationEvent::Progress`] does.
    PhaseStarted {
        /// Migration id.
        migration: String,
        /// The phase.
        phase: Phase,
        /// The source disk id, for per-disk phases.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
    },
    /// A phase ended.
    PhaseFinished {
        /// Migration id.
        migration: String,
        /// The phase.
        phase: Phase,
        /// The source disk id, for per-disk phases.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        /// The phase had been finished by an earlier run and was skipped.
        #[serde(default)]
        skipped: bool,
    },
    /// Progress of one disk transfer (export, import or verify), with its real totals.
    Progress {
        /// Migration id.
        migration: String,
        /// Source disk id.
        disk: String,
        /// The figures.
        progress: Progress,
    },
    /// Something the operator should know (a live source read as is, a replaced leftover).
    Warning {
        /// Migration id.
        migration: String,
        /// The disk concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        /// What happened.
        message: String,
    },
    /// The migration finished; the report has every disk's digests.
    Finished {
        /// The final report.
        report: Box<MigrationReport>,
    },
    /// The migration stopped with an error.
    Failed {
        /// Migration id (empty when it failed before one was assigned).
        migration: String,
        /// Error kind.
        kind: ErrorKind,
        /// Error message (never holds a secret).
        message: String,
        /// Whether a rollback removed what the migration had created.
        rolled_back: bool,
    },
}

/// A consumer of migration events. Called from the migration's tasks: keep it short (send to
/// a channel).
pub type EventFn = Arc<dyn Fn(&MigrationEvent) + Send + Sync>;

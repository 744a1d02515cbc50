//! Progress reports: phase, bytes done and total, rate and ETA, at a bounded rate.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The phase of a migration or transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Checking inputs and peers.
    #[default]
    Validate,
    /// Shutting down or snapshotting the source.
    Prepare,
    /// Reading a disk and storing it.
    Export,
    /// Reading a stored disk and writing it to the target.
    Import,
    /// Comparing digests.
    Verify,
    /// Creating the target VM.
    CreateVm,
    /// Powering the new VM on.
    Start,
    /// Removing what a failed migration created.
    Rollback,
    /// Removing staged objects and snapshots.
    Cleanup,
    /// Finished.
    Done,
}

/// One progress report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// What is moving (disk id or key).
    pub label: String,
    /// Position in the virtual disk reached so far.
    pub position: u64,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Data bytes read from the source so far (holes excluded).
    pub data_bytes: u64,
    /// Data bytes expected, when the allocation map is known.
    pub data_total: Option<u64>,
    /// Data bytes per second since the start.
    pub rate: f64,
    /// Estimated time left.
    pub eta: Option<Duration>,
    /// Whether this is the last report of the transfer.
    pub finished: bool,
}

impl Progress {
    /// Fraction done, 0.0–1.0: by data when the allocation is known, else by position.
    pub fn fraction(&self) -> f64 {
        match self.data_total {
            Some(t) if t > 0 => (self.data_bytes as f64 / t as f64).min(1.0),
            _ if self.virtual_size > 0 => self.position as f64 / self.virtual_size as f64,
            _ => 1.0,
        }
    }
}

/// A progress callback. Called from the transfer task: keep it short (send to a channel).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Rate-limits and computes progress reports.
pub(crate) struct Reporter {
    f: Option<ProgressFn>,
    interval: Duration,
    start: Instant,
    last: Option<Instant>,
    pub(crate) p: Progress,
}

impl Reporter {
    pub(crate) fn new(
        f: Option<ProgressFn>,
        interval: Duration,
        phase: Phase,
        label: String,
        virtual_size: u64,
        data_total: Option<u64>,
    ) -> Self {
        Reporter {
            f,
            interval,
            start: Instant::now(),
            last: None,
            p: Progress {
                phase,
                label,
                position: 0,
                virtual_size,
                data_bytes: 0,
                data_total,
                rate: 0.0,
                eta: None,
                finished: false,
            },
        }
    }

    pub(crate) fn advance(&mut self, position: u64, data: u64) {
        self.p.position = self.p.position.max(position);
        self.p.data_bytes += data;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|l| now.duration_since(l) >= self.interval)
        {
            self.emit(now);
        }
    }

    fn emit(&mut self, now: Instant) {
        self.last = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64();
        if secs > 0.0 {
            self.p.rate = self.p.data_bytes as f64 / secs;
        }
        let frac = self.p.fraction();
        self.p.eta = (frac > 0.0 && frac < 1.0 && secs > 0.0)
            .then(|| Duration::from_secs_f64(secs * (1.0 - frac) / frac));
        if let Some(f) = &self.f {
            f(&self.p);
        }
    }

    pub(crate) fn finish(&mut self) {
        self.p.position = self.p.virtual_size;
        self.p.finished = true;
        self.p.eta = Some(Duration::ZERO);
        self.emit(Instant::now());
    }
}

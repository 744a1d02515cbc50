//! What a person watches: progress bars per disk (quiet when stderr is not a terminal), or
//! `--json` events, one object per line; and exit codes by error kind.
//!
//! JSON lines: every line is one [`MigrationEvent`](virtrigaud::MigrationEvent) (tagged by
//! `event`: `phase_started`, `phase_finished`, `progress`, `warning`, `finished`, `failed`)
//! with `"v": 1`, the schema version, added. Progress comes at most once a second per disk.
//! Commands other than `migrate` print one final object (`"event": "result"`).

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use virtrigaud::{ErrorKind, MigrationEvent, Progress};

/// Version of the JSON line schema.
pub const JSON_SCHEMA: u32 = 1;

/// Exit codes (documented in the README and in `--help`).
pub fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::InvalidInput => 3,
        ErrorKind::NotFound => 4,
        ErrorKind::AlreadyExists | ErrorKind::Conflict => 5,
        ErrorKind::Auth | ErrorKind::Permission => 6,
        ErrorKind::ChecksumMismatch | ErrorKind::Corrupt => 7,
        ErrorKind::Network | ErrorKind::Timeout => 8,
        ErrorKind::Unsupported => 9,
        ErrorKind::Cancelled => 130,
        _ => 1,
    }
}

/// The exit code table, for `--help`.
pub const EXIT_CODES: &str = "Exit codes: 0 success, 1 other failure, 2 usage, 3 invalid input, \
4 not found, 5 already exists or conflict (another run holds the migration), 6 authentication \
or permission, 7 checksum mismatch or corrupt data, 8 network or timeout, 9 unsupported, \
130 cancelled (Ctrl-C; run the same command again to resume).";

/// Prints one JSON line with the schema version.
pub fn json_line(mut v: serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert("v".into(), JSON_SCHEMA.into());
    }
    out_line(v);
}

/// Writes one line to stdout. A reader that went away (`virtrigaud … | head -1`) is not an
/// error, and never a panic: the work goes on, and its outcome still reaches the exit status.
pub(crate) fn out_line(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// What a plan's total bar shows: VMs finished (and failed) out of all, and the data bytes
/// moved so far, summed over every VM, disk and phase (export, import and verification each
/// move a disk's data once).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PlanTotals {
    total: usize,
    done: usize,
    failed: usize,
    /// Latest data bytes per `vm/disk` and phase.
    moved: HashMap<(String, String), u64>,
}

impl PlanTotals {
    /// Totals for a plan of `total` VMs.
    pub fn new(total: usize) -> Self {
        PlanTotals {
            total,
            ..Default::default()
        }
    }
    /// Records a progress report of `key` (`vm/disk`).
    pub fn progress(&mut self, key: &str, p: &Progress) {
        let slot = self
            .moved
            .entry((key.to_string(), format!("{:?}", p.phase)))
            .or_default();
        // A resumed transfer may report from 0 again: keep the largest figure.
        *slot = (*slot).max(p.data_bytes);
    }
    /// Records a VM that finished, successfully or not.
    pub fn vm_finished(&mut self, ok: bool) {
        self.done += 1;
        if !ok {
            self.failed += 1;
        }
    }
    /// VMs finished so far.
    pub fn done(&self) -> usize {
        self.done
    }
    /// Data bytes moved so far.
    pub fn bytes(&self) -> u64 {
        self.moved.values().sum()
    }
    /// The bar's message.
    pub fn message(&self) -> String {
        format!(
            "{}/{} VMs{}, {:.1} GiB moved",
            self.done,
            self.total,
            if self.failed > 0 {
                format!(" ({} failed)", self.failed)
            } else {
                String::new()
            },
            self.bytes() as f64 / (1u64 << 30) as f64
        )
    }
}

/// A disk's bar: the disk, the bar, data bytes done of all, then one message (phase, rate,
/// ETA).
pub const DISK_BAR: &str = "{prefix:>10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {wide_msg}";

/// Renders migration events: JSON lines, or bars on a terminal, or nothing.
pub struct Renderer {
    json: bool,
    bars: Option<(MultiProgress, Mutex<HashMap<String, ProgressBar>>)>,
    /// A plan's total bar and its figures.
    plan: Mutex<Option<(ProgressBar, PlanTotals)>>,
}

impl Renderer {
    /// A renderer for `--json` or for humans.
    pub fn new(json: bool, quiet: bool) -> Arc<Renderer> {
        let bars = (!json && !quiet && std::io::stderr().is_terminal())
            .then(|| (MultiProgress::new(), Mutex::new(HashMap::new())));
        Arc::new(Renderer {
            json,
            bars,
            plan: Mutex::new(None),
        })
    }

    /// Starts a plan's total bar (on a terminal only) for `total` VMs.
    pub fn start_plan(&self, total: usize) {
        let Some((mp, _)) = &self.bars else { return };
        let b = mp.insert(0, ProgressBar::new(total as u64));
        b.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_prefix("plan");
        let t = PlanTotals::new(total);
        b.set_message(t.message());
        if let Ok(mut p) = self.plan.lock() {
            *p = Some((b, t));
        }
    }

    /// Records a plan VM that finished.
    pub fn vm_finished(&self, ok: bool) {
        if let Ok(mut p) = self.plan.lock()
            && let Some((b, t)) = p.as_mut()
        {
            t.vm_finished(ok);
            b.set_position(t.done() as u64);
            b.set_message(t.message());
        }
    }

    fn bar(&self, disk: &str) -> Option<ProgressBar> {
        let (mp, map) = self.bars.as_ref()?;
        let mut map = map.lock().ok()?;
        Some(
            map.entry(disk.to_string())
                .or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(1000));
                    b.set_style(
                        ProgressStyle::with_template(DISK_BAR)
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.set_prefix(disk.to_string());
                    b
                })
                .clone(),
        )
    }

    /// Shows a migration event; `vm` labels it within a plan of many VMs.
    pub fn event(&self, vm: Option<&str>, e: &MigrationEvent) {
        if self.json {
            if let Ok(mut v) = serde_json::to_value(e) {
                if let (Some(vm), Some(o)) = (vm, v.as_object_mut()) {
                    o.insert("vm".into(), vm.into());
                }
                json_line(v);
            }
            return;
        }
        match e {
            MigrationEvent::Progress { disk, progress, .. } => match vm {
                Some(vm) => {
                    let key = format!("{vm}/{disk}");
                    if let Ok(mut p) = self.plan.lock()
                        && let Some((b, t)) = p.as_mut()
                    {
                        t.progress(&key, progress);
                        b.set_message(t.message());
                    }
                    self.progress(&key, progress)
                }
                None => self.progress(disk, progress),
            },
            MigrationEvent::Warning { disk, message, .. } => {
                let line = format!("warning{}: {message}", disk_suffix(disk));
                self.println(&line);
            }
            MigrationEvent::PhaseFinished {
                phase,
                disk: Some(d),
                skipped,
                ..
            } => {
                if let Some(b) = self.bar(d) {
                    b.set_message(
                        format!(
                            "{phase:?} {}",
                            if *skipped { "done before" } else { "done" }
                        )
                        .to_lowercase(),
                    );
                }
            }
            MigrationEvent::PhaseStarted {
                phase, disk: None, ..
            } => self.println(&format!("== {}", format!("{phase:?}").to_lowercase())),
            _ => {}
        }
    }

    /// Shows a transfer's progress.
    pub fn progress(&self, disk: &str, p: &Progress) {
        if let Some(b) = self.bar(disk) {
            // Data bytes when the transfer knows how many there are, else positions in the
            // virtual disk.
            let (done, total) = match p.data_total {
                Some(t) => (p.data_bytes, t),
                None => (p.position, p.virtual_size),
            };
            b.set_length(total.max(1));
            b.set_position(done.min(total));
            b.set_message(format!(
                "{} {:.0} MiB/s{}",
                format!("{:?}", p.phase).to_lowercase(),
                p.rate / (1 << 20) as f64,
                p.eta
                    .map(|d| format!(" eta {} s", d.as_secs()))
                    .unwrap_or_default()
            ));
        }
    }

    /// Prints a line above the bars (to stderr).
    pub fn println(&self, s: &str) {
        match &self.bars {
            Some((mp, _)) => {
                let _ = mp.println(s);
            }
            None if !self.json => eprintln!("{s}"),
            None => {}
        }
    }

    /// Removes the bars.
    pub fn finish(&self) {
        if let Ok(mut p) = self.plan.lock()
            && let Some((b, t)) = p.take()
        {
            b.finish_with_message(t.message());
        }
        if let Some((_, map)) = &self.bars
            && let Ok(map) = map.lock()
        {
            for b in map.values() {
                b.finish_and_clear();
            }
        }
    }
}

fn disk_suffix(d: &Option<String>) -> String {
    d.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtrigaud::Phase;

    fn progress(phase: Phase, data_bytes: u64) -> Progress {
        Progress {
            phase,
            label: String::new(),
            position: data_bytes,
            virtual_size: 1 << 30,
            data_bytes,
            data_total: Some(1 << 30),
            rate: 0.0,
            eta: None,
            finished: false,
        }
    }

    #[test]
    fn the_disk_bar_shows_bytes_and_one_message() {
        assert!(DISK_BAR.contains("{bytes") && DISK_BAR.contains("{total_bytes"));
        assert_eq!(DISK_BAR.matches("msg").count(), 1, "{DISK_BAR}");
        assert!(ProgressStyle::with_template(DISK_BAR).is_ok());
    }

    #[test]
    fn plan_totals_count_vms_and_bytes_per_disk_and_phase() {
        let mut t = PlanTotals::new(3);
        t.progress("web01/vda", &progress(Phase::Export, 100));
        t.progress("web01/vda", &progress(Phase::Export, 300));
        t.progress("web01/vda", &progress(Phase::Import, 50));
        t.progress("web02/vda", &progress(Phase::Export, 1000));
        // A resumed transfer starting over does not lower what was moved.
        t.progress("web02/vda", &progress(Phase::Export, 10));
        assert_eq!(t.bytes(), 300 + 50 + 1000);
        t.vm_finished(true);
        t.vm_finished(false);
        assert_eq!(t.done(), 2);
        assert!(
            t.message().starts_with("2/3 VMs (1 failed), "),
            "{}",
            t.message()
        );
    }
}

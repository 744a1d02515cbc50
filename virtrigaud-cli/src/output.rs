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
    println!("{v}");
}

/// Renders migration events: JSON lines, or bars on a terminal, or nothing.
pub struct Renderer {
    json: bool,
    bars: Option<(MultiProgress, Mutex<HashMap<String, ProgressBar>>)>,
}

impl Renderer {
    /// A renderer for `--json` or for humans.
    pub fn new(json: bool, quiet: bool) -> Arc<Renderer> {
        let bars = (!json && !quiet && std::io::stderr().is_terminal())
            .then(|| (MultiProgress::new(), Mutex::new(HashMap::new())));
        Arc::new(Renderer { json, bars })
    }

    fn bar(&self, disk: &str) -> Option<ProgressBar> {
        let (mp, map) = self.bars.as_ref()?;
        let mut map = map.lock().ok()?;
        Some(
            map.entry(disk.to_string())
                .or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(1000));
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>10} {msg:>8} [{bar:30}] {percent:>3}% {wide_msg}",
                        )
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
                Some(vm) => self.progress(&format!("{vm}/{disk}"), progress),
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
                        format!("{phase:?}{}", if *skipped { " (done before)" } else { "" })
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
            b.set_position((p.fraction() * 1000.0) as u64);
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

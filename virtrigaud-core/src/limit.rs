//! Bandwidth limits: a cap in bytes per second for one transfer, one migration, or the whole
//! process.
//!
//! A [`Bandwidth`] is a token bucket shared by all its clones (the `async-speed-limit` crate, a
//! well-kept implementation by the TiKV authors; no hand-made sleep loop). Who shares one, shares
//! the cap:
//!
//! * one transfer: put a fresh `Bandwidth` in that transfer's
//!   [`PipelineOptions::bandwidth`](crate::pipeline::PipelineOptions::bandwidth);
//! * one migration: put it in the options given to
//!   [`Migration::with_pipeline`](crate::migration::Migration::with_pipeline): every export,
//!   import and verification of that migration draws from it (disks in parallel share it);
//! * the whole process: give clones of one `Bandwidth` to every transfer and migration (the
//!   `virtrigaud` command's `--limit` does that).
//!
//! A transfer may carry several (its own and a shared one): it waits for each.
//! [`Bandwidth::set`] changes the cap of every clone while transfers run.
//!
//! What is counted: the data bytes a transfer *reads* from its source (a provider's disk for an
//! export, the staged object for an import, the target disk for a verification), which is the
//! network side of every backend and provider data path; holes known from an allocation map are
//! not read and cost nothing. A transfer's writes follow its reads through a bounded queue, so
//! they keep the same rate. A staged object that a target takes as it is stored (the Proxmox
//! upload) is counted as it is sent. The bucket holds 100 ms of the rate, so at most that much
//! plus one read (a few MiB) passes above the cap in any second.

use crate::{Error, Result};
use async_speed_limit::Limiter;

/// A shared bandwidth cap (bytes per second), or no cap. Clones share the cap and its budget.
#[derive(Clone)]
pub struct Bandwidth {
    limiter: Limiter,
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bandwidth")
            .field("bytes_per_second", &self.get())
            .finish()
    }
}

impl Default for Bandwidth {
    fn default() -> Self {
        Bandwidth::unlimited()
    }
}

impl Bandwidth {
    /// A cap of `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Result<Bandwidth> {
        check(bytes_per_second)?;
        Ok(Bandwidth {
            limiter: limiter(bytes_per_second as f64),
        })
    }

    /// No cap (it can be set later with [`Bandwidth::set`]).
    pub fn unlimited() -> Bandwidth {
        Bandwidth {
            limiter: limiter(f64::INFINITY),
        }
    }

    /// A cap parsed from text such as `50MiB/s`, `50M`, `1.5GB/s`, `800KiB` (see
    /// [`parse_rate`]).
    pub fn parse(text: &str) -> Result<Bandwidth> {
        Bandwidth::new(parse_rate(text)?)
    }

    /// Changes the cap of this and every clone, transfers running included; `None` lifts it.
    pub fn set(&self, bytes_per_second: Option<u64>) -> Result<()> {
        match bytes_per_second {
            Some(b) => {
                check(b)?;
                self.limiter.set_speed_limit(b as f64);
            }
            None => self.limiter.set_speed_limit(f64::INFINITY),
        }
        Ok(())
    }

    /// The cap in bytes per second, `None` when unlimited.
    pub fn get(&self) -> Option<u64> {
        let s = self.limiter.speed_limit();
        s.is_finite().then_some(s as u64)
    }

    /// Waits until `bytes` fit under the cap (at once when unlimited).
    pub async fn consume(&self, bytes: u64) {
        if bytes == 0 || self.limiter.speed_limit().is_infinite() {
            return;
        }
        self.limiter.consume(bytes as usize).await;
    }
}

/// Waits on every cap of `limits` for `bytes`.
pub async fn consume_all(limits: &[Bandwidth], bytes: u64) {
    for l in limits {
        l.consume(bytes).await;
    }
}

/// `stream` with every item waiting on every cap of `limits` before it is handed on (for data
/// sent as it is stored, outside a pipeline). No caps: the stream itself.
pub fn limit_stream(
    stream: crate::io::ByteStream,
    limits: Vec<Bandwidth>,
) -> crate::io::ByteStream {
    use futures::StreamExt;
    if limits.is_empty() {
        return stream;
    }
    let limits = std::sync::Arc::new(limits);
    stream
        .then(move |item| {
            let limits = limits.clone();
            async move {
                if let Ok(b) = &item {
                    consume_all(&limits, b.len() as u64).await;
                }
                item
            }
        })
        .boxed()
}

/// A bucket of 100 ms of the rate. A debt is slept off exactly (no minimum wait: the crate's
/// default adds a whole refill period to every wait, which refills the bucket to the brim, so
/// any time spent reading after the wait was lost and a transfer ran 2–7 % under its cap).
fn limiter(rate: f64) -> Limiter {
    Limiter::builder(rate)
        .refill(std::time::Duration::from_millis(100))
        .min_wait(std::time::Duration::ZERO)
        .build()
}

/// [`consume_all`] for the data a transfer just read, unless `cancel` fires first
/// (`Cancelled`). No caps: returns at once.
pub(crate) async fn consume_or_cancel(
    limits: &[Bandwidth],
    bytes: u64,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    if limits.is_empty() {
        return Ok(());
    }
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::cancelled()),
        _ = consume_all(limits, bytes) => Ok(()),
    }
}

fn check(bytes_per_second: u64) -> Result<()> {
    if bytes_per_second == 0 {
        return Err(Error::invalid(
            "a bandwidth limit must be at least 1 byte per second (use no limit instead of 0)",
        ));
    }
    Ok(())
}

/// Parses a rate: a number, an optional unit (`K`, `M`, `G`, `T` are powers of 1000, `Ki`,
/// `Mi`, `Gi`, `Ti` powers of 1024; a trailing `B` is allowed) and an optional `/s`. A bare
/// number is bytes per second.
pub fn parse_rate(text: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "bad rate {text:?}: use a number with an optional unit, such as 50MiB/s, 20M or \
             1.5GB/s"
        ))
    };
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v = n * mult;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("50MiB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("50 MiB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("20M").unwrap(), 20_000_000);
        assert_eq!(parse_rate("1.5GB/s").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate("800KiB").unwrap(), 800 * 1024);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        for bad in ["", "0", "-5M", "fast", "5X/s", "1e3", "0.1"] {
            let e = parse_rate(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        assert!(Bandwidth::new(0).is_err());
        assert!(Bandwidth::unlimited().set(Some(0)).is_err());
    }

    #[test]
    fn clones_share_the_cap_and_it_can_change() {
        let b = Bandwidth::new(1000).unwrap();
        let c = b.clone();
        assert_eq!(c.get(), Some(1000));
        b.set(Some(5000)).unwrap();
        assert_eq!(c.get(), Some(5000));
        c.set(None).unwrap();
        assert_eq!(b.get(), None);
        assert_eq!(Bandwidth::default().get(), None);
    }

    /// The bucket's arithmetic with a real clock: 10 reads of 100 KiB under 1 MiB/s take about
    /// a second, and two clones share the budget (the same bytes split over both take as long).
    #[tokio::test]
    async fn consuming_waits_for_the_shared_budget() {
        let b = Bandwidth::new(1 << 20).unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            b.consume(100 << 10).await;
        }
        let one = t.elapsed();
        assert!(one >= Duration::from_millis(750), "{one:?}");
        let c = b.clone();
        let t = Instant::now();
        let f = |x: Bandwidth| async move {
            for _ in 0..5 {
                x.consume(100 << 10).await;
            }
        };
        tokio::join!(f(b.clone()), f(c));
        let shared = t.elapsed();
        assert!(shared >= Duration::from_millis(750), "{shared:?}");
        // Unlimited never waits.
        let u = Bandwidth::unlimited();
        let t = Instant::now();
        u.consume(u64::MAX / 2).await;
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}

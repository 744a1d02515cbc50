//! Bandwidth limits against the real peers (`scripts/test.sh` starts them): SeaweedFS for an S3
//! export and nginx for a WebDAV read, 1 GiB of random data each under a 50 MiB/s cap, and a
//! cap changed while an export runs. These tests assert rates because the rate *is* the
//! feature; the bounds are those of the issue (45–52 MiB/s) and the machine moves these bytes
//! at several hundred MiB/s without a cap. Without the peers they print `SKIP` and pass, unless
//! `VIRTRIGAUD_IT=1`.

#![cfg(all(feature = "s3", feature = "http"))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::storage::s3::{S3Backend, S3Config};
use virtrigaud::storage::webdav::WebdavBackend;
use virtrigaud::*;

const MIB: u64 = 1 << 20;

/// One test at a time: each measures a rate, and the others' file writing would disturb it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

async fn s3() -> Option<S3Backend> {
    let endpoint = virtrigaud_testkit::peer_env("VIRTRIGAUD_S3_ENDPOINT", "seaweedfs.sh")?;
    let cfg = S3Config::new("virtrigaud-bw")
        .with_endpoint(endpoint)
        .with_region(env("VIRTRIGAUD_S3_REGION").unwrap_or_else(|| "us-east-1".into()))
        .with_credentials(
            env("VIRTRIGAUD_S3_ACCESS_KEY").unwrap_or_default(),
            env("VIRTRIGAUD_S3_SECRET_KEY").unwrap_or_default(),
        );
    let b = S3Backend::new(cfg).unwrap();
    let _ = b.create_bucket().await;
    Some(b)
}

/// A raw file of `mib` MiB of random data (nothing for zero detection to skip).
fn random_file(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
    for i in 0..mib {
        f.write_all(&virtrigaud::testdata::noise(i, MIB as usize))
            .unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    p
}

/// Progress samples: (time since start, data bytes read).
type Samples = Arc<Mutex<Vec<(Duration, u64)>>>;

fn recorder(start: Instant) -> (Samples, ProgressFn) {
    let samples: Samples = Arc::default();
    let s = samples.clone();
    let f: ProgressFn = Arc::new(move |p: &Progress| {
        s.lock().unwrap().push((start.elapsed(), p.data_bytes));
    });
    (samples, f)
}

/// The most data read in any window of one second, from the progress samples.
fn max_in_one_second(samples: &[(Duration, u64)]) -> u64 {
    let mut best = 0;
    for (i, (t0, b0)) in samples.iter().enumerate() {
        for (t1, b1) in &samples[i + 1..] {
            if *t1 - *t0 > Duration::from_secs(1) {
                break;
            }
            best = best.max(b1 - b0);
        }
    }
    best
}

fn options(cap: &Bandwidth, progress: ProgressFn) -> PipelineOptions {
    PipelineOptions {
        bandwidth: vec![cap.clone()],
        progress: Some(progress),
        progress_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// Checks the bounds: the average between 45 and 52 MiB/s, and no second above the
/// cap by more than one chunk of the pipeline (8 MiB) plus the bucket's 100 ms.
fn check_rate(what: &str, bytes: u64, took: Duration, samples: &[(Duration, u64)]) {
    let rate = mib_per_s(bytes, took);
    let burst = max_in_one_second(samples);
    eprintln!(
        "{what}: {} MiB in {took:.2?} = {rate:.1} MiB/s; most in one second {} MiB",
        bytes / MIB,
        burst / MIB
    );
    assert!((45.0..=52.0).contains(&rate), "{what}: {rate:.1} MiB/s");
    assert!(
        burst <= 50 * MIB + 8 * MIB + 5 * MIB,
        "{what}: {} MiB in one second",
        burst / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_export_holds_a_50_mib_per_second_cap() {
    let _turn = SERIAL.lock().await;
    let Some(store) = s3().await else { return };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = random_file(dir.path(), 1024);
    let cap = Bandwidth::parse("50MiB/s").unwrap();
    let start = Instant::now();
    let (samples, progress) = recorder(start);
    let opts = ExportOptions {
        format: DiskFormat::Raw,
        pipeline: options(&cap, progress),
        ..Default::default()
    };
    let r = export_image(
        ImageSource::RandomAccess(Arc::new(LocalFile::open(&file).await.unwrap())),
        Some(DiskFormat::Raw),
        &store,
        "bw/export.raw",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    let took = start.elapsed();
    assert_eq!(r.manifest.stored_size, 1024 * MIB);
    check_rate("S3 export", 1024 * MIB, took, &samples.lock().unwrap());
    store.delete("bw/export.raw").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webdav_read_holds_a_50_mib_per_second_cap() {
    let _turn = SERIAL.lock().await;
    let Some(url) = virtrigaud_testkit::peer_env("VIRTRIGAUD_WEBDAV_URL", "nginx.sh") else {
        return;
    };
    let store = WebdavBackend::from_url(&url).unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = random_file(dir.path(), 1024);
    // Stored without a cap, then read back (every byte over the network) under one.
    export_image(
        ImageSource::RandomAccess(Arc::new(LocalFile::open(&file).await.unwrap())),
        Some(DiskFormat::Raw),
        &store,
        "bw/read.raw",
        None,
        None,
        &ExportOptions {
            format: DiskFormat::Raw,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cap = Bandwidth::parse("50MiB/s").unwrap();
    let start = Instant::now();
    let (samples, progress) = recorder(start);
    let opts = ImportOptions {
        pipeline: options(&cap, progress),
        ..Default::default()
    };
    verify_object(&store, "bw/read.raw", &opts).await.unwrap();
    let took = start.elapsed();
    check_rate("WebDAV read", 1024 * MIB, took, &samples.lock().unwrap());
    store.delete("bw/read.raw").await.unwrap();
}

/// 256 MiB under 100 MiB/s, switched to 25 MiB/s at half way: the first half stays under its
/// cap and well above the second's, and the second runs at the new cap (within 10 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_changed_during_a_transfer_applies_at_once() {
    let _turn = SERIAL.lock().await;
    let Some(store) = s3().await else { return };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = random_file(dir.path(), 256);
    let cap = Bandwidth::parse("100MiB/s").unwrap();
    let start = Instant::now();
    let switched: Arc<Mutex<Option<(Duration, u64)>>> = Arc::default();
    let first_seen: Arc<Mutex<Option<(Duration, u64)>>> = Arc::default();
    let last_seen: Arc<Mutex<(Duration, u64)>> = Arc::default();
    let (c, sw, fs, ls) = (
        cap.clone(),
        switched.clone(),
        first_seen.clone(),
        last_seen.clone(),
    );
    let progress: ProgressFn = Arc::new(move |p: &Progress| {
        fs.lock()
            .unwrap()
            .get_or_insert((start.elapsed(), p.data_bytes));
        let mut l = ls.lock().unwrap();
        if p.data_bytes > l.1 {
            *l = (start.elapsed(), p.data_bytes);
        }
        let mut s = sw.lock().unwrap();
        if s.is_none() && p.data_bytes >= 128 * MIB {
            c.set(Some(25 * MIB)).unwrap();
            *s = Some((start.elapsed(), p.data_bytes));
        }
    });
    let opts = ExportOptions {
        format: DiskFormat::Raw,
        pipeline: options(&cap, progress),
        ..Default::default()
    };
    export_image(
        ImageSource::RandomAccess(Arc::new(LocalFile::open(&file).await.unwrap())),
        Some(DiskFormat::Raw),
        &store,
        "bw/change.raw",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    let (t, b) = switched.lock().unwrap().expect("the cap was switched");
    // The first half from the first progress report on (not the upload's setup).
    let (t0, b0) = first_seen.lock().unwrap().unwrap();
    let first = mib_per_s(b - b0, t - t0);
    // The second half up to the last progress report (not the upload's completion).
    let (t1, b1) = *last_seen.lock().unwrap();
    assert_eq!(b1, 256 * MIB);
    let second = mib_per_s(b1 - b, t1 - t);
    eprintln!("before the switch {first:.1} MiB/s, after {second:.1} MiB/s");
    // The first half never exceeds its cap; it may run below it on a busy machine (on CI it
    // once ran at 79 MiB/s while the disk was still writing the input), but well above the cap
    // that follows. The second half holds the new cap.
    assert!((50.0..=110.0).contains(&first), "{first:.1} MiB/s");
    assert!((22.5..=27.5).contains(&second), "{second:.1} MiB/s");
    store.delete("bw/change.raw").await.unwrap();
}

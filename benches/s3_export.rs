//! Export of a qcow2 disk to S3 (SeaweedFS) as a staged object with its manifest, timed beside
//! the usual script on the same input in the same run:
//! `qemu-img convert` to a temp raw file + `sha256sum` + `aws s3 cp`; and beside a bare
//! `aws s3 cp` of the very object the export stored (the network peer's own limit for those
//! bytes; target: the export within 1.1× of it), alternating, medians of 3.
//!
//! Targets (DESIGN.md): at most 1/3 of the script's wall time, zero temp disk, peak RSS at most
//! 128 MiB at default settings and the same for a 4× larger disk.
//!
//! ```text
//! scripts/bench-s3.sh          # installs awscli, starts SeaweedFS, runs this, stops it
//! ```
//! Then the same export encrypted with age for one recipient (feature `encryption`), medians
//! of 3, against the plain one (target: at most 10 % more wall time, peak RSS under 128 MiB).
//!
//! Inputs: `VRG_BENCH_VIRTUAL_GIB` (default 4) and `VRG_BENCH_DATA_GIB` (default 1); the RSS
//! check repeats ours on a disk 4× larger in virtual size with the same data.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::storage::s3::{S3Backend, S3Config};
use virtrigaud::{ExportOptions, export_image};

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn backend(bucket: &str) -> S3Backend {
    let cfg = S3Config::new(bucket)
        .with_endpoint(env("VIRTRIGAUD_S3_ENDPOINT").expect("endpoint"))
        .with_region(env("VIRTRIGAUD_S3_REGION").unwrap_or_else(|| "us-east-1".into()))
        .with_credentials(
            env("VIRTRIGAUD_S3_ACCESS_KEY").expect("access key"),
            env("VIRTRIGAUD_S3_SECRET_KEY").expect("secret key"),
        );
    S3Backend::new(cfg).expect("S3 config")
}

/// The child process: one export with default settings, nothing else in the process.
/// A public age key whose secret was thrown away: the encrypted rounds only need to encrypt.
const BENCH_RECIPIENT: &str = "age10df4xut4t7chqkjzatagwcjpxepmh9fcgzv8q9lqn42hsgzhnc4s6tn3f2";

fn child(image: &str, bucket: &str, key: &str, encrypt: bool) {
    virtrigaud::io::limit_allocator_retention();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = backend(bucket);
        let f = LocalFile::open(image).await.unwrap();
        let mut opts = ExportOptions::default();
        if encrypt {
            opts.encode.encrypt =
                Some(virtrigaud::crypt::Encryption::to_recipients(&[BENCH_RECIPIENT]).unwrap());
        }
        let r = export_image(
            ImageSource::RandomAccess(Arc::new(f)),
            None,
            &b,
            key,
            None,
            None,
            &opts,
        )
        .await
        .expect("export");
        println!(
            "stored {} bytes ({}), sha256 {}",
            r.manifest.stored_size, r.manifest.format, r.manifest.object_digest.value
        );
    });
}

fn random_sparse_qcow2(
    dir: &Path,
    name: &str,
    virtual_gib: u64,
    data_gib: u64,
) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let qcow = dir.join(format!("{name}.qcow2"));
    let mut f = std::fs::File::create(&raw).unwrap();
    f.set_len(virtual_gib << 30).unwrap();
    let pieces = data_gib * 16; // 64 MiB pieces
    let stride = (virtual_gib << 30) / pieces;
    let mut buf = vec![0u8; 64 << 20];
    let mut x: u64 = 0x0123_4567_89ab_cdef ^ virtual_gib;
    for i in 0..pieces {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.seek(SeekFrom::Start(i * stride)).unwrap();
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();
    qcow
}

fn sh(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

/// Runs ourselves as a child under `/usr/bin/time -v`: (wall time, peak RSS in KiB).
fn ours(image: &Path, bucket: &str, key: &str) -> (Duration, u64) {
    ours_with(image, bucket, key, &[])
}

/// [`ours`] with more arguments for the child (`--encrypt`).
fn ours_with(image: &Path, bucket: &str, key: &str, extra: &[&str]) -> (Duration, u64) {
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(exe)
        .args(["--child-export", image.to_str().unwrap(), bucket, key])
        .args(extra)
        .output()
        .unwrap();
    let wall = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {err}");
    print!("  ours: {}", String::from_utf8_lossy(&out.stdout));
    let rss = err
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("peak RSS from /usr/bin/time");
    (wall, rss)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child-export") {
        child(
            &args[i + 1],
            &args[i + 2],
            &args[i + 3],
            args.iter().any(|a| a == "--encrypt"),
        );
        return;
    }
    if env("VIRTRIGAUD_S3_ENDPOINT").is_none() {
        println!("SKIP: VIRTRIGAUD_S3_ENDPOINT not set (run scripts/bench-s3.sh)");
        return;
    }
    for tool in ["qemu-img", "aws", "sha256sum", "/usr/bin/time"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            println!("SKIP: {tool} not found");
            return;
        }
    }
    let vg: u64 = env("VRG_BENCH_VIRTUAL_GIB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dg: u64 = env("VRG_BENCH_DATA_GIB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::Builder::new()
        .prefix("vrg-s3-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let bucket = format!("vrg-bench-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(backend(&bucket).create_bucket())
        .expect("create bucket");
    println!("load before: {}", loadavg());
    let image = random_sparse_qcow2(dir.path(), "in", vg, dg);
    let qsize = std::fs::metadata(&image).unwrap().len();
    println!(
        "input: {vg} GiB virtual qcow2 with {dg} GiB random data ({} MiB file)",
        qsize >> 20
    );

    // `aws s3 cp --quiet ARGS…` against the peer, credentials in its environment.
    let endpoint = env("VIRTRIGAUD_S3_ENDPOINT").unwrap();
    let aws = |args: &[&str]| {
        let mut c = Command::new("aws");
        c.args(["s3", "cp", "--quiet", "--endpoint-url", &endpoint])
            .args(args)
            .env(
                "AWS_ACCESS_KEY_ID",
                env("VIRTRIGAUD_S3_ACCESS_KEY").unwrap(),
            )
            .env(
                "AWS_SECRET_ACCESS_KEY",
                env("VIRTRIGAUD_S3_SECRET_KEY").unwrap(),
            )
            .env(
                "AWS_DEFAULT_REGION",
                env("VIRTRIGAUD_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
            );
        c
    };

    // The usual script.
    let tmp = dir.path().join("tmp.raw");
    let t = Instant::now();
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&tmp));
    let tmp_alloc = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&tmp).unwrap().blocks() * 512
    };
    sh(Command::new("sha256sum")
        .arg(&tmp)
        .stdout(std::process::Stdio::null()));
    sh(&mut aws(&[
        tmp.to_str().unwrap(),
        &format!("s3://{bucket}/script/disk.raw"),
    ]));
    let script = t.elapsed();
    std::fs::remove_file(&tmp).unwrap();
    println!(
        "  script: {:.1} s, temp file {} MiB allocated ({} MiB apparent)",
        script.as_secs_f64(),
        tmp_alloc >> 20,
        (vg << 30) >> 20
    );

    // Ours, alternating with a bare `aws s3 cp` of the very object ours stored (downloaded once,
    // untimed): the network peer's own limit for these bytes. Medians of 3.
    let stored = dir.path().join("stored.qcow2");
    let (mut walls, mut bares, mut rss) = (Vec::new(), Vec::new(), 0);
    for r in 0..3 {
        let (wall, peak) = ours(&image, &bucket, &format!("ours/disk{r}.qcow2"));
        walls.push(wall);
        rss = rss.max(peak);
        if r == 0 {
            sh(aws(&[
                &format!("s3://{bucket}/ours/disk0.qcow2"),
                stored.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null()));
        }
        let t = Instant::now();
        sh(&mut aws(&[
            stored.to_str().unwrap(),
            &format!("s3://{bucket}/bare/disk{r}.qcow2"),
        ]));
        bares.push(t.elapsed());
        println!(
            "  round {r}: virtrigaud {:.2} s, bare aws s3 cp of the stored object ({} MiB) {:.2} s",
            wall.as_secs_f64(),
            std::fs::metadata(&stored).unwrap().len() >> 20,
            bares[r].as_secs_f64()
        );
    }
    let wall = median(walls);
    let bare = median(bares);
    std::fs::remove_file(&stored).unwrap();
    println!(
        "RESULT s3 export: script {:.1} s, virtrigaud {:.2} s, ratio {:.2} (target <= 0.33); temp disk 0 bytes; peak RSS {} MiB (target <= 128)",
        script.as_secs_f64(),
        wall.as_secs_f64(),
        wall.as_secs_f64() / script.as_secs_f64(),
        rss >> 10
    );
    println!(
        "RESULT s3 export vs bare upload: virtrigaud {:.2} s, aws s3 cp of the same stored object {:.2} s, ratio {:.2} (target <= 1.1)",
        wall.as_secs_f64(),
        bare.as_secs_f64(),
        wall.as_secs_f64() / bare.as_secs_f64()
    );
    // Encrypted (age, one X25519 recipient), alternating with the plain export (the store's
    // speed drifts as it fills, so the two are compared round by round): medians of 3.
    let (mut encs, mut plains, mut enc_rss) = (Vec::new(), Vec::new(), 0);
    for r in 0..3 {
        let (p, _) = ours(&image, &bucket, &format!("plain/disk{r}.qcow2"));
        plains.push(p);
        let (w, peak) = ours_with(
            &image,
            &bucket,
            &format!("enc/disk{r}.qcow2"),
            &["--encrypt"],
        );
        println!(
            "  encrypted round {r}: virtrigaud {:.2} s, plain just before {:.2} s",
            w.as_secs_f64(),
            p.as_secs_f64()
        );
        encs.push(w);
        enc_rss = enc_rss.max(peak);
    }
    let enc = median(encs);
    let plain = median(plains);
    println!(
        "RESULT s3 export encrypted (age): {:.2} s vs plain {:.2} s (alternating), {:+.1} % (target <= 10 %); peak RSS {} MiB (target < 128)",
        enc.as_secs_f64(),
        plain.as_secs_f64(),
        (enc.as_secs_f64() / plain.as_secs_f64() - 1.0) * 100.0,
        enc_rss >> 10
    );
    std::fs::remove_file(&image).unwrap();

    let big = random_sparse_qcow2(dir.path(), "big", vg * 4, dg);
    let (wall4, rss4) = ours(&big, &bucket, "ours/big.qcow2");
    println!(
        "RESULT s3 export {} GiB virtual: virtrigaud {:.1} s, peak RSS {} MiB (vs {} MiB at {vg} GiB)",
        vg * 4,
        wall4.as_secs_f64(),
        rss4 >> 10,
        rss >> 10
    );
    println!("load after: {}", loadavg());
}

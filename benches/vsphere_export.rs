//! Export of a vSphere disk from the datastore to a file store, timed with criterion beside the
//! usual way in the same run: `curl` of the same `-flat.vmdk` through `/folder` to a temp file,
//! then `qemu-img convert -O qcow2` into the store. The disk is 1 GiB virtual with 300 MiB of
//! data (75 runs of 4 MiB spread evenly), written to the govmomi simulator's datastore by the
//! provider first. Ours reads it with ranged `/folder` GETs (4 in flight), finds the holes by
//! zero detection and writes a qcow2 with its manifest (object SHA-256 + content digest), with
//! no temp file.
//!
//! ```text
//! scripts/bench-vsphere.sh     # starts the simulator, runs this, stops it
//! ```
//! It prints criterion's figures for both, then `RESULT …: ours …, curl + qemu-img …, ratio …`
//! (medians) and the peak RSS of one export run alone in a child process under
//! `/usr/bin/time -v`. Flat sampling, 10 samples of one run each (criterion's minimum).

use criterion::{Criterion, SamplingMode};
use std::cell::RefCell;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use virtrigaud::storage::fs::FsBackend;
use virtrigaud::vsphere::{VsphereConfig, VsphereProvider};
use virtrigaud::{DiskCreateSpec, ExportOptions, Provider, export_image};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn provider() -> VsphereProvider {
    let mut cfg = VsphereConfig::new(
        env("VIRTRIGAUD_VSPHERE_URL").unwrap(),
        env("VIRTRIGAUD_VSPHERE_USER").unwrap(),
        env("VIRTRIGAUD_VSPHERE_PASSWORD").unwrap().as_str(),
    )
    .with_thumbprint(env("VIRTRIGAUD_VSPHERE_THUMBPRINT").unwrap())
    .with_datacenter("DC0")
    .with_datastore("LocalDS_0");
    cfg.default_network = Some("VM Network".into());
    VsphereProvider::new(cfg).expect("vSphere config")
}

/// One export of the disk at `location` into `store` as `key`; returns the stored size.
async fn export_once(p: &VsphereProvider, vm: &str, location: &str, store: &FsBackend) -> u64 {
    let o = p.open_created_disk(vm, location).await.expect("open");
    let r = export_image(
        o.source,
        o.info.format,
        store,
        "big.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .expect("export");
    r.manifest.stored_size
}

/// The child process: one export with default settings, nothing else in the process.
fn child(vm: &str, location: &str, dir: &str) {
    virtrigaud::io::limit_allocator_retention();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let n = export_once(&provider(), vm, location, &FsBackend::new(dir)).await;
        println!("child stored {} MiB", n / MIB);
    });
}

/// Writes the 1 GiB / 300 MiB disk onto the datastore; returns its location.
async fn make_disk(p: &VsphereProvider, vm: &str) -> String {
    let mut c = p
        .create_disk(&DiskCreateSpec {
            vm: vm.into(),
            name: "big".into(),
            capacity: GIB,
            format: None,
            placement: None,
            overwrite: true,
        })
        .await
        .expect("create_disk");
    let mut pos = 0u64;
    for i in 0..75u64 {
        let at = i * (GIB / 75) / MIB * MIB;
        c.sink.write_zeros(at - pos).await.unwrap();
        c.sink
            .write(bytes::Bytes::from(virtrigaud::testdata::noise(i, 4 << 20)))
            .await
            .unwrap();
        pos = at + (4 << 20);
    }
    c.sink.write_zeros(GIB - pos).await.unwrap();
    c.sink.commit().await.unwrap();
    c.location
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child-export") {
        child(&args[i + 1], &args[i + 2], &args[i + 3]);
        return;
    }
    if env("VIRTRIGAUD_VSPHERE_URL").is_none() {
        println!("SKIP: VIRTRIGAUD_VSPHERE_URL not set (run scripts/bench-vsphere.sh)");
        return;
    }
    for tool in ["qemu-img", "curl", "/usr/bin/time"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            println!("SKIP: {tool} not found");
            return;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let p = provider();
    let vm = format!("vrg-bench-{}", std::process::id());
    let location = rt.block_on(make_disk(&p, &vm));
    let scratch = tempfile::Builder::new()
        .prefix("vrg-vsphere-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let flat = location
        .trim_start_matches("[LocalDS_0] ")
        .replace(".vmdk", "-flat.vmdk");
    let base = env("VIRTRIGAUD_VSPHERE_URL")
        .unwrap()
        .trim_end_matches("/sdk")
        .to_string();
    let url = format!("{base}/folder/{flat}?dcPath=DC0&dsName=LocalDS_0");
    let curl_config = format!(
        "user = \"{}:{}\"\n",
        env("VIRTRIGAUD_VSPHERE_USER").unwrap(),
        env("VIRTRIGAUD_VSPHERE_PASSWORD").unwrap()
    );

    let ours_times = RefCell::new(Vec::new());
    let theirs_times = RefCell::new(Vec::new());
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("vsphere_export_1GiB_300MiB");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(60));
    g.bench_function("ours_folder_to_qcow2", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir_in(scratch.path()).unwrap();
                let store = FsBackend::new(dir.path());
                let t = Instant::now();
                rt.block_on(export_once(&p, &vm, &location, &store));
                let d = t.elapsed();
                ours_times.borrow_mut().push(d);
                total += d;
            }
            total
        })
    });
    g.bench_function("curl_then_qemu_img_convert", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir_in(scratch.path()).unwrap();
                let raw = dir.path().join("big-flat.vmdk");
                let t = Instant::now();
                // Credentials on stdin (`-K -`), never on the command line.
                let mut curl = Command::new("curl")
                    .args(["-sf", "--cacert"])
                    .arg(env("VIRTRIGAUD_VCSIM_CERT").unwrap())
                    .args(["-K", "-", "-o"])
                    .arg(&raw)
                    .arg(&url)
                    .stdin(Stdio::piped())
                    .spawn()
                    .unwrap();
                curl.stdin
                    .take()
                    .unwrap()
                    .write_all(curl_config.as_bytes())
                    .unwrap();
                assert!(curl.wait().unwrap().success(), "curl failed");
                let st = Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(dir.path().join("big.qcow2"))
                    .status()
                    .unwrap();
                assert!(st.success());
                let d = t.elapsed();
                theirs_times.borrow_mut().push(d);
                total += d;
            }
            total
        })
    });
    g.finish();

    // Peak RSS of one export alone in a process.
    let dir = tempfile::tempdir_in(scratch.path()).unwrap();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--child-export",
            &vm,
            &location,
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {err}");
    let rss_kib: u64 = err
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("peak RSS from /usr/bin/time");
    let (o, t) = (median(&ours_times.borrow()), median(&theirs_times.borrow()));
    println!(
        "RESULT 1 GiB / 300 MiB from the simulator's datastore: ours {:.2} s, curl + qemu-img \
         {:.2} s, ratio {:.2}; peak RSS of one export {} MiB ({} runs each)",
        o.as_secs_f64(),
        t.as_secs_f64(),
        o.as_secs_f64() / t.as_secs_f64(),
        rss_kib / 1024,
        ours_times.borrow().len()
    );
    let _ = rt.block_on(p.delete_disk(&vm, &location));
}

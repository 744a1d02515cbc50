//! The native NFSv3 backend against nfs-ganesha 4.3 (VFS export), as started by
//! `scripts/peers/ganesha.sh start STATE_DIR`:
//!
//! ```text
//! scripts/peers/ganesha.sh install && scripts/peers/ganesha.sh start /tmp/st
//! source /tmp/st/ganesha.env   # VIRTRIGAUD_NFS_URL, VIRTRIGAUD_NFS_EXPORT_DIR
//! cargo test -p virtrigaud-storage --features nfs --test nfs_ganesha
//! cargo test -p virtrigaud-storage --features nfs --release --test nfs_ganesha -- --ignored --nocapture
//! ```
//!
//! Without `VIRTRIGAUD_NFS_URL` the tests print `SKIP: …` and pass, unless `VIRTRIGAUD_IT=1`.
//! `VIRTRIGAUD_NFS_EXPORT_DIR` (the exported directory on this machine) lets the tests look at
//! what the server really stored; under `VIRTRIGAUD_IT=1` it is required too, so no check is
//! ever skipped there.

#![cfg(feature = "nfs")]

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud_core::{ErrorKind, PutOptions, StorageBackend, StorageExt};
use virtrigaud_storage::nfs::{NfsBackend, NfsConfig};
use virtrigaud_testkit::{peer_env, skip, unique};

const MIB: usize = 1 << 20;

/// The peer's URL and exported directory, or `None` (SKIP).
fn peer() -> Option<(String, Option<PathBuf>)> {
    let url = peer_env("VIRTRIGAUD_NFS_URL", "ganesha.sh")?;
    let dir = std::env::var("VIRTRIGAUD_NFS_EXPORT_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    if dir.is_none() {
        skip("VIRTRIGAUD_NFS_EXPORT_DIR is not set: what the server stores is not checked");
    }
    Some((url, dir))
}

/// What the server really holds below `sub` of the export, seen on the exported directory (the
/// conformance suite's check that aborted and dropped puts leave nothing, temp files included).
/// Without the directory (never under `VIRTRIGAUD_IT=1`, see [`peer`]) nothing can be seen.
fn raw_names(export_dir: &Option<PathBuf>, sub: &str) -> virtrigaud_storage::conformance::RawNames {
    match export_dir {
        Some(d) => virtrigaud_storage::conformance::local_files(d.join(sub)),
        None => Arc::new(|_| Box::pin(async { Vec::new() })),
    }
}

fn config(url: &str) -> NfsConfig {
    NfsConfig::from_url(url).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud_core::testdata::noise(seed, len)
}

async fn read_all(b: &dyn StorageBackend, key: &str) -> Vec<u8> {
    let mut s = b.get(key, None).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// Names in a local directory (empty if it does not exist).
fn local_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_open() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let b = virtrigaud_storage::open(&url).unwrap();
    assert!(b.location().starts_with("nfs://"), "{}", b.location());
    let prefix = unique("conf");
    virtrigaud_storage::conformance::run_all(b, &prefix, raw_names(&export_dir, "")).await;
    if let Some(d) = export_dir {
        // Deletes, aborts and drops removed the directories they had created.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !d.join(&prefix).exists(),
            "{:?}",
            local_names(&d.join(&prefix))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_survives_directories_vanishing() {
    let Some((url, _)) = peer() else {
        return;
    };
    // Deleting the last key of a directory removes the directory; a listing that walks into
    // it at that moment gets NFS3ERR_STALE from the server and must walk again, not fail.
    let b = Arc::new(NfsBackend::new(config(&url)).unwrap());
    let prefix = unique("vanish");
    let stable = format!("{prefix}/stable");
    b.put_bytes(&stable, Bytes::from_static(b"stays"))
        .await
        .unwrap();
    let churn = {
        let b = b.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let key = format!("{prefix}/churn/{i}/a/b/obj");
                b.put_bytes(&key, Bytes::from_static(b"x")).await.unwrap();
                b.delete(&key).await.unwrap();
            }
        })
    };
    let mut listings = 0;
    while !churn.is_finished() {
        let got = b.list(&format!("{prefix}/")).await.unwrap();
        assert!(got.iter().any(|m| m.key == stable), "{got:?}");
        listings += 1;
    }
    churn.await.unwrap();
    println!("{listings} listings during the churn");
    assert!(
        listings > 10,
        "only {listings} listings overlapped the churn"
    );
    let got = b.list(&format!("{prefix}/")).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    b.delete(&stable).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_below_a_path_with_small_requests_and_file_sync() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let top = unique("sub");
    let mut cfg = config(&url).with_path(format!("{top}/root"));
    cfg.request_size = 256 << 10;
    cfg.concurrency = 3;
    cfg.max_connections = 4;
    cfg.stability = virtrigaud_storage::nfs::WriteStability::FileSync;
    let b: Arc<dyn StorageBackend> = Arc::new(NfsBackend::connect(cfg).await.unwrap());
    let raw = raw_names(&export_dir, &format!("{top}/root"));
    virtrigaud_storage::conformance::run_all(b, "p", raw).await;
    if let Some(d) = export_dir {
        // Only the backend root remains (deletes stop there).
        assert_eq!(local_names(&d.join(&top)), vec!["root".to_string()]);
        assert!(local_names(&d.join(&top).join("root")).is_empty());
        std::fs::remove_dir_all(d.join(&top)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_is_invisible_until_commit_and_abort_or_drop_leave_no_temp() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let b = NfsBackend::connect(config(&url)).await.unwrap();
    let prefix = unique("atomic");
    let key = format!("{prefix}/vm/disk.raw");
    let data = pattern(5 * MIB + 123, 7);

    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    s.write(Bytes::from(data.clone())).await.unwrap();
    assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(b.list(&format!("{prefix}/")).await.unwrap().is_empty());
    if let Some(d) = &export_dir {
        let names = local_names(&d.join(&prefix).join("vm"));
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(
            names[0].starts_with(".disk.raw.") && names[0].ends_with(".vrg-tmp"),
            "{names:?}"
        );
    }
    s.commit().await.unwrap();
    assert_eq!(b.stat(&key).await.unwrap().size, data.len() as u64);
    assert_eq!(read_all(&b, &key).await, data);
    if let Some(d) = &export_dir {
        let dir = d.join(&prefix).join("vm");
        assert_eq!(local_names(&dir), vec!["disk.raw".to_string()]);
        assert_eq!(std::fs::read(dir.join("disk.raw")).unwrap(), data);
    }

    // Abort: nothing left, locally either.
    let key2 = format!("{prefix}/vm/aborted.raw");
    let mut s = b.put(&key2, &PutOptions::default()).await.unwrap();
    for i in 0..6 {
        s.write(Bytes::from(pattern(MIB, i))).await.unwrap();
    }
    s.abort().await.unwrap();
    // Drop in the middle of a put with writes in flight.
    {
        let mut s = b.put(&key2, &PutOptions::default()).await.unwrap();
        for i in 0..6 {
            s.write(Bytes::from(pattern(MIB, i))).await.unwrap();
        }
    }
    assert_eq!(b.stat(&key2).await.unwrap_err().kind(), ErrorKind::NotFound);
    if let Some(d) = &export_dir {
        // The dropped put removes its temp file in the background: up to 10 s on a busy machine.
        let dir = d.join(&prefix).join("vm");
        let mut names = local_names(&dir);
        for _ in 0..100 {
            if names == ["disk.raw"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            names = local_names(&dir);
        }
        assert_eq!(names, vec!["disk.raw".to_string()]);
    }

    // overwrite: false refuses an existing target, at the start and at commit.
    let no_over = PutOptions {
        overwrite: false,
        ..Default::default()
    };
    let e = b.put(&key, &no_over).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let key3 = format!("{prefix}/vm/race.raw");
    let mut first = b.put(&key3, &no_over).await.unwrap();
    let mut second = b.put(&key3, &no_over).await.unwrap();
    first.write(Bytes::from_static(b"first")).await.unwrap();
    second.write(Bytes::from_static(b"second")).await.unwrap();
    first.commit().await.unwrap();
    let e = second.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(read_all(&b, &key3).await, b"first");
    if let Some(d) = &export_dir {
        assert_eq!(
            local_names(&d.join(&prefix).join("vm")),
            vec!["disk.raw".to_string(), "race.raw".to_string()]
        );
    }

    // A name near the 255-byte limit still gets a temp name the server accepts.
    let long_key = format!("{prefix}/vm/{}", "n".repeat(250));
    b.put_bytes(&long_key, Bytes::from_static(b"long"))
        .await
        .unwrap();
    assert_eq!(read_all(&b, &long_key).await, b"long");
    b.delete(&long_key).await.unwrap();
    let e = b
        .put_bytes(&format!("{prefix}/vm/{}", "n".repeat(300)), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");

    b.delete(&key).await.unwrap();
    b.delete(&key3).await.unwrap();
    assert!(b.list(&format!("{prefix}/")).await.unwrap().is_empty());
    if let Some(d) = &export_dir {
        assert!(!d.join(&prefix).exists(), "empty directories are removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_runs_become_holes_and_read_back_as_zeros() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let b = NfsBackend::connect(config(&url)).await.unwrap();
    let key = format!("{}/sparse.raw", unique("sparse"));
    let head = pattern(MIB + 5, 1);
    let mid = pattern(3000, 2);
    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    s.write(Bytes::from(head.clone())).await.unwrap();
    s.write_zeros(40 * MIB as u64).await.unwrap();
    s.write(Bytes::from(mid.clone())).await.unwrap();
    s.write_zeros(100).await.unwrap(); // small: written as data
    s.write_zeros(20 * MIB as u64).await.unwrap(); // trailing hole: SETATTR size
    s.commit().await.unwrap();
    let total = head.len() + 40 * MIB + mid.len() + 100 + 20 * MIB;
    assert_eq!(b.stat(&key).await.unwrap().size, total as u64);
    let got = read_all(&b, &key).await;
    assert_eq!(got.len(), total);
    assert_eq!(&got[..head.len()], &head[..]);
    assert!(
        got[head.len()..head.len() + 40 * MIB]
            .iter()
            .all(|&x| x == 0)
    );
    let m = head.len() + 40 * MIB;
    assert_eq!(&got[m..m + mid.len()], &mid[..]);
    assert!(got[m + mid.len()..].iter().all(|&x| x == 0));
    if let Some(d) = &export_dir {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(d.join(&key)).unwrap();
        assert_eq!(md.len(), total as u64);
        assert!(
            md.blocks() * 512 < 8 * MIB as u64,
            "holes were written: {} bytes allocated",
            md.blocks() * 512
        );
    }
    b.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cannot_escape_the_root() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let prefix = unique("escape");
    let b = NfsBackend::connect(config(&url).with_path(format!("{prefix}/root")))
        .await
        .unwrap();
    for key in [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a/./b",
        "a//b",
        "",
        "a\\..\\b",
    ] {
        let e = b.put(key, &PutOptions::default()).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{key:?}");
        assert_eq!(
            b.get(key, None).await.err().unwrap().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            b.stat(key).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            b.delete(key).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    assert!(b.list("../").await.is_err());
    let e = b
        .put(".x.1.vrg-tmp", &PutOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // A path inside the export with `..` is refused before anything is sent.
    assert!(NfsBackend::new(config(&url).with_path("a/../..")).is_err());
    assert!(virtrigaud_storage::open(&format!("{url}/../etc")).is_err());

    // Symbolic links planted on the server are never followed.
    let Some(d) = export_dir else {
        skip("VIRTRIGAUD_NFS_EXPORT_DIR not set: symlink checks not run");
        return;
    };
    b.put_bytes("inside.txt", Bytes::from_static(b"in"))
        .await
        .unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let root = d.join(&prefix).join("root");
    std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("file-link")).unwrap();
    assert_eq!(
        b.get("link/secret", None).await.err().unwrap().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        b.stat("file-link").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(
        b.put_bytes("link/new", Bytes::from_static(b"x"))
            .await
            .is_err()
    );
    let listed: Vec<String> = b
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(listed, vec!["inside.txt".to_string()]);
    assert_eq!(local_names(outside.path()), vec!["secret".to_string()]);
    // Files planted on the server are visible as objects.
    std::fs::create_dir_all(root.join("planted")).unwrap();
    std::fs::write(root.join("planted/obj"), b"planted").unwrap();
    std::fs::write(root.join("planted/.obj.1.vrg-tmp"), b"tmp").unwrap();
    assert_eq!(
        b.get_bytes("planted/obj", 100).await.unwrap(),
        &b"planted"[..]
    );
    let listed: Vec<String> = b
        .list("planted/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(listed, vec!["planted/obj".to_string()]);
    std::fs::remove_dir_all(d.join(&prefix)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_unix_identity_is_configurable() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let Some(d) = export_dir else {
        skip("VIRTRIGAUD_NFS_EXPORT_DIR not set");
        return;
    };
    let prefix = unique("uid");
    let b = NfsBackend::connect(config(&url).with_identity(4321, 4322))
        .await
        .unwrap();
    let key = format!("{prefix}/owned");
    b.put_bytes(&key, Bytes::from_static(b"x")).await.unwrap();
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(d.join(&key)).unwrap();
    assert_eq!((md.uid(), md.gid()), (4321, 4322));
    b.delete(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_a_quick_network_error() {
    // A port where nothing listens.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = Instant::now();
    let mut cfg = NfsConfig::new("127.0.0.1", "/vrg");
    cfg.portmapper_port = port;
    let e = NfsBackend::connect(cfg.clone()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(e.is_retryable());
    let e = NfsBackend::connect(cfg.clone().with_ports(port, port))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    // A lazily mounted backend reports it on first use.
    let b = virtrigaud_storage::open(&format!("nfs://127.0.0.1/vrg?portmapper={port}")).unwrap();
    assert_eq!(b.stat("x").await.unwrap_err().kind(), ErrorKind::Network);
    assert_eq!(
        b.put("x", &PutOptions::default())
            .await
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Network
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_export_is_not_found() {
    let Some((url, _)) = peer() else { return };
    let mut cfg = config(&url);
    cfg.export = "/no-such-export-here".into();
    let e = NfsBackend::connect(cfg).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Permission),
        "{e}"
    );
}

/// The backend survives a server restart: requests fail with `Network` while the server is
/// down, and the same backend works again once it is back (stale pooled connections are
/// replaced). Restarts the peer through `scripts/peers/ganesha.sh`, so it runs alone:
/// `cargo test … --test nfs_ganesha server_restart -- --ignored` with `VIRTRIGAUD_NFS_STATE_DIR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared ganesha peer"]
async fn server_restart_is_survived() {
    let Some((url, _)) = peer() else { return };
    let Ok(state) = std::env::var("VIRTRIGAUD_NFS_STATE_DIR") else {
        skip("VIRTRIGAUD_NFS_STATE_DIR not set: the server cannot be restarted");
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/peers/ganesha.sh");
    let peer_cmd = |cmd: &str| {
        let st = std::process::Command::new("bash")
            .args([script, cmd, &state])
            .status()
            .unwrap();
        assert!(st.success(), "ganesha.sh {cmd}");
    };
    let b = NfsBackend::connect(config(&url)).await.unwrap();
    let key = format!("{}/obj", unique("restart"));
    let data = pattern(3 * MIB, 5);
    b.put_bytes(&key, Bytes::from(data.clone())).await.unwrap();
    // Several idle pooled connections.
    assert_eq!(read_all(&b, &key).await, data);

    peer_cmd("stop");
    let t = Instant::now();
    let e = b.stat(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(e.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(5));
    peer_cmd("start");

    assert_eq!(b.stat(&key).await.unwrap().size, data.len() as u64);
    assert_eq!(read_all(&b, &key).await, data);
    b.put_bytes(&key, Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(read_all(&b, &key).await, b"after");

    // A restart between UNSTABLE writes changes the write verifier: the put must fail
    // (retryable) rather than commit data the server may have lost, and leave nothing behind.
    let key2 = format!("{key}-unstable");
    let mut s = b.put(&key2, &PutOptions::default()).await.unwrap();
    s.write(Bytes::from(pattern(4 * MIB, 1))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // let the WRITEs finish
    peer_cmd("stop");
    peer_cmd("start");
    let res = async {
        s.write(Bytes::from(pattern(4 * MIB, 2))).await?;
        s.commit().await
    }
    .await;
    let e = res.unwrap_err();
    println!("put across a restart: {e}");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.to_string().contains("verifier"), "{e}");
    assert_eq!(b.stat(&key2).await.unwrap_err().kind(), ErrorKind::NotFound);
    b.delete(&key).await.unwrap();
}

/// Throughput of a 256 MiB put and get (run with `--release -- --ignored --nocapture`).
/// `VRG_NFS_BENCH_SIZES=1,4` and `VRG_NFS_BENCH_CONCURRENCY=8` vary the request size (MiB) and
/// the requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: 256 MiB through the NFS peer"]
async fn throughput_256mib_put_and_get() {
    let Some((url, _)) = peer() else { return };
    let sizes: Vec<u32> = std::env::var("VRG_NFS_BENCH_SIZES")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let concs: Vec<usize> = std::env::var("VRG_NFS_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    const TOTAL: usize = 256 * MIB;
    // 4 MiB of random-looking data, sent 64 times (content is checked by SHA-256).
    let block = Bytes::from(pattern(4 * MIB, 99));
    let mut h = Sha256::new();
    for _ in 0..TOTAL / block.len() {
        h.update(&block);
    }
    let expect = h.finalize();
    for &mib in &sizes {
        for &conc in &concs {
            let mut cfg = config(&url).with_io(mib * MIB as u32, conc);
            cfg.max_connections = conc.max(2);
            let b = NfsBackend::connect(cfg).await.unwrap();
            let (rs, ws) = b.transfer_sizes().await.unwrap();
            let key = format!("{}/big.raw", unique("bench"));
            let t = Instant::now();
            let mut s = b
                .put(
                    &key,
                    &PutOptions {
                        size_hint: Some(TOTAL as u64),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            for _ in 0..TOTAL / block.len() {
                s.write(block.clone()).await.unwrap();
            }
            s.commit().await.unwrap();
            let put = t.elapsed();
            let t = Instant::now();
            let mut st = b.get(&key, None).await.unwrap();
            let mut got = Sha256::new();
            let mut n = 0;
            while let Some(c) = st.next().await {
                let c = c.unwrap();
                n += c.len();
                got.update(&c);
            }
            let get = t.elapsed();
            assert_eq!(n, TOTAL);
            assert_eq!(got.finalize(), expect);
            let rate = |d: Duration| TOTAL as f64 / MIB as f64 / d.as_secs_f64();
            println!(
                "NFS 256 MiB, request {mib} MiB (server allows read {} KiB / write {} KiB), \
                 {conc} in flight: put {:.0} MiB/s ({put:.2?}), get {:.0} MiB/s ({get:.2?}, incl. SHA-256)",
                rs >> 10,
                ws >> 10,
                rate(put),
                rate(get)
            );
            b.delete(&key).await.unwrap();
        }
    }
}

/// Files a put creates are 0600 on the server (a disk image holds a whole file system), or the
/// configured mode; checked on the exported directory itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_files_are_owner_only_unless_configured() {
    use std::os::unix::fs::PermissionsExt;
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let Some(d) = export_dir else {
        return skip("VIRTRIGAUD_NFS_EXPORT_DIR not set: file modes cannot be checked");
    };
    let prefix = unique("mode");
    let mode = |key: &str| std::fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o7777;
    let b = NfsBackend::new(config(&url)).unwrap();
    let key = format!("{prefix}/default.raw");
    b.put_bytes(&key, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(mode(&key), 0o600);
    let b640 = NfsBackend::new(config(&url).with_file_mode(0o640)).unwrap();
    let key640 = format!("{prefix}/group.raw");
    b640.put_bytes(&key640, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(mode(&key640), 0o640);
    b.delete(&key).await.unwrap();
    b.delete(&key640).await.unwrap();
}

/// Sets a local file's modification time `age` in the past.
fn age_file(path: &std::path::Path, age: Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

/// A process killed mid-put leaves its temporary file on the server; the next put into that
/// directory removes it once it is old (a day by default), and nothing else: not a young one
/// (a put in progress), not a file of another shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_sweeps_old_temp_files_of_its_directory() {
    let Some((url, export_dir)) = peer() else {
        return;
    };
    let Some(d) = export_dir else {
        return skip("VIRTRIGAUD_NFS_EXPORT_DIR not set: leftover temp files cannot be planted");
    };
    let prefix = unique("sweep");
    // Planted on the exported directory, as a killed process would have left them.
    let dir = d.join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let old = dir.join(".disk.raw.4242-18c3f00-7.vrg-tmp");
    let young = dir.join(".disk.raw.4242-18c3f00-8.vrg-tmp");
    let foreign = dir.join(".notes.vrg-tmp");
    for f in [&old, &young, &foreign] {
        std::fs::write(f, b"partial").unwrap();
    }
    let day = Duration::from_secs(25 * 3600);
    age_file(&old, day);
    age_file(&foreign, day);
    let b = NfsBackend::new(config(&url)).unwrap();
    b.put_bytes(&format!("{prefix}/disk.raw"), Bytes::from_static(b"new"))
        .await
        .unwrap();
    assert!(!old.exists(), "{:?}", local_names(&dir));
    assert!(
        young.exists() && foreign.exists(),
        "{:?}",
        local_names(&dir)
    );
    // Turned off: nothing more is removed, however old.
    age_file(&young, day);
    let off = NfsBackend::new(config(&url).with_temp_max_age(None)).unwrap();
    off.put_bytes(&format!("{prefix}/other.raw"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert!(young.exists(), "{:?}", local_names(&dir));
    for f in [&young, &foreign] {
        std::fs::remove_file(f).unwrap();
    }
    b.delete(&format!("{prefix}/disk.raw")).await.unwrap();
    b.delete(&format!("{prefix}/other.raw")).await.unwrap();
}

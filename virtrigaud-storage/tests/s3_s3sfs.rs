//! The S3 backend against a real peer: s3s-fs 0.14.1 served in-process on 127.0.0.1 with SigV4
//! authentication (`SimpleAuth`, one known key pair). Each test starts its own server on its
//! own temporary directory and uses a bucket of its own.
//!
//! A wrapper around the s3s service logs every request (method, path, query) so that tests can
//! observe on the server side which parts were sent. If the server cannot start, tests print
//! `SKIP: …` and pass, unless `VIRTRIGAUD_IT=1`, where they fail.

#![cfg(feature = "s3")]

use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use virtrigaud_core::io::ByteSink;
use virtrigaud_core::{ErrorKind, PutOptions, StorageBackend, StorageExt};
use virtrigaud_storage::s3::{DropPolicy, RetryConfig, S3Backend, S3Config};

const ACCESS_KEY: &str = "VRGTESTACCESSKEY";
const SECRET_KEY: &str = "vrg-test-secret-0123456789abcdef";
const MIB: usize = 1 << 20;

/// One logged request.
#[derive(Debug, Clone)]
struct Logged {
    method: String,
    path: String,
    query: String,
}

impl Logged {
    fn part_number(&self) -> Option<u32> {
        if self.method != "PUT" {
            return None;
        }
        self.query
            .split('&')
            .find_map(|kv| kv.strip_prefix("partNumber="))
            .and_then(|n| n.parse().ok())
    }
}

type Log = Arc<Mutex<Vec<Logged>>>;

/// The s3s service with a request log in front.
#[derive(Clone)]
struct Logging {
    inner: s3s::service::S3Service,
    log: Log,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Logging {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = <s3s::service::S3Service as hyper::service::Service<
        http::Request<hyper::body::Incoming>,
    >>::Future;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        self.log.lock().unwrap().push(Logged {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
        });
        hyper::service::Service::call(&self.inner, req)
    }
}

/// An s3s-fs server on 127.0.0.1 that can be stopped and restarted on the same port.
struct Peer {
    root: PathBuf,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    log: Log,
    task: Option<JoinHandle<()>>,
}

impl Peer {
    async fn start() -> Option<Peer> {
        match Peer::try_start().await {
            Ok(p) => Some(p),
            Err(e) => {
                virtrigaud_testkit::skip(&format!("the s3s-fs peer cannot start: {e}"));
                None
            }
        }
    }

    async fn try_start() -> Result<Peer, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let root = dir.path().to_path_buf();
        // A port below Linux's ephemeral range (32768+): `restart` binds it again, and an
        // outgoing connection of this process could otherwise take it meanwhile.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .subsec_nanos()
            ^ std::process::id();
        let mut listener = None;
        for i in 0..100u32 {
            let port = 20_000 + (seed.wrapping_add(i.wrapping_mul(7919)) % 12_000) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
                listener = Some(l);
                break;
            }
        }
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("bind: {e}"))?,
        };
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut p = Peer {
            root,
            _dir: dir,
            addr,
            log: Arc::default(),
            task: None,
        };
        p.serve(listener)?;
        Ok(p)
    }

    fn serve(&mut self, listener: TcpListener) -> Result<(), String> {
        let fs = s3s_fs::FileSystem::new(&self.root).map_err(|e| format!("s3s-fs: {e:?}"))?;
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let svc = Logging {
            inner: b.build(),
            log: self.log.clone(),
        };
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: stopping the server (aborting this task) drops
            // them all, like a crashed server.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        let Ok((sock, _)) = acc else { continue };
                        let svc = svc.clone();
                        conns.spawn(async move {
                            let _ = ConnBuilder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(sock), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
        Ok(())
    }

    /// Stops the server: listener closed, every connection dropped.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Starts it again on the same port and data.
    async fn restart(&mut self) {
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l).unwrap();
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot rebind {}: {last:?}", self.addr);
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn bucket(&self, name: &str) -> String {
        std::fs::create_dir(self.root.join(name)).unwrap();
        name.to_string()
    }

    fn config(&self, bucket: &str) -> S3Config {
        let mut c = S3Config::new(bucket)
            .with_endpoint(self.endpoint())
            .with_prefix("staging")
            .with_credentials(ACCESS_KEY, SECRET_KEY);
        c.retry = RetryConfig {
            max_retries: 12,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(800),
        };
        c
    }

    fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Multipart state s3s-fs keeps on disk (`.upload-<id>.json`, `.upload_id-<id>.part-<n>`).
    fn upload_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

async fn sha_of_object(b: &dyn StorageBackend, key: &str) -> (u64, Vec<u8>) {
    let mut s = b.get(key, None).await.unwrap();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        n += c.len() as u64;
        h.update(&c);
    }
    (n, h.finalize().to_vec())
}

/// Feeds `data` to a sink in uneven pieces.
async fn feed(sink: &mut dyn ByteSink, data: &[u8]) {
    let mut i = 0;
    let mut off = 0;
    while off < data.len() {
        let n = [MIB, 333_333, 3 * MIB, 17][i % 4].min(data.len() - off);
        sink.write(Bytes::copy_from_slice(&data[off..off + n]))
            .await
            .unwrap();
        off += n;
        i += 1;
    }
}

macro_rules! peer {
    () => {
        match Peer::start().await {
            Some(p) => p,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_passes_the_conformance_suite() {
    let peer = peer!();
    let bucket = peer.bucket("conformance");
    let b = S3Backend::new(peer.config(&bucket)).unwrap();
    assert_eq!(b.location(), "s3://conformance/staging");
    // What the server really holds: its files under the bucket's prefix (checkpoints
    // included; s3s-fs's own metadata files aside) and its multipart state, which `list`
    // does not show.
    let objects =
        virtrigaud_storage::conformance::local_files(peer.root.join(&bucket).join("staging"));
    let root = peer.root.clone();
    let raw: virtrigaud_storage::conformance::RawNames = Arc::new(move |prefix: String| {
        let (objects, root) = (objects.clone(), root.clone());
        Box::pin(async move {
            let mut held: Vec<String> = objects(prefix)
                .await
                .into_iter()
                .filter(|n| !n.contains(".s3s"))
                .collect();
            held.extend(
                std::fs::read_dir(&root)
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".upload")),
            );
            held
        })
    });
    virtrigaud_storage::conformance::run_all(Arc::new(b.clone()), "conf", raw).await;
    // no checkpoint, no multipart upload, no object left on the server
    assert!(peer.upload_files().is_empty(), "{:?}", peer.upload_files());
    let left: Vec<_> = files_under(&peer.root.join(&bucket))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains(".s3s"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_fast_with_auth_and_write_nothing() {
    let peer = peer!();
    let bucket = peer.bucket("wrong-creds");
    let good = S3Backend::new(peer.config(&bucket)).unwrap();
    for (ak, sk) in [
        (ACCESS_KEY, "not-the-secret-key-at-all"),
        ("UNKNOWNACCESSKEY", SECRET_KEY),
    ] {
        let mut cfg = peer.config(&bucket).with_credentials(ak, sk);
        cfg.part_size = Some(5 << 20);
        let bad = S3Backend::new(cfg).unwrap();
        peer.clear_log();
        let started = std::time::Instant::now();
        // single PutObject
        let e = bad
            .put_bytes("vm/disk.raw", Bytes::from(pattern(1000, 1)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(
            msg.contains("s3://wrong-creds/staging/vm/disk.raw"),
            "{msg}"
        );
        assert!(!msg.contains(sk) && !msg.contains(SECRET_KEY), "{msg}");
        // multipart
        let e = async {
            // (the put itself already reads the checkpoint, so it may fail first)
            let mut w = bad
                .put(
                    "vm/big.raw",
                    &PutOptions {
                        size_hint: Some(12 << 20),
                        ..Default::default()
                    },
                )
                .await?;
            w.write(Bytes::from(pattern(12 << 20, 2))).await?;
            w.commit().await
        }
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        // get through opendal
        let e = bad.get("vm/disk.raw", None).await.err().unwrap();
        assert!(
            matches!(e.kind(), ErrorKind::Auth | ErrorKind::Permission),
            "{e}"
        );
        assert!(!e.to_string().contains(sk), "{e}");
        // fail fast: no retries
        assert!(started.elapsed() < Duration::from_secs(5));
        let puts = peer
            .requests()
            .iter()
            .filter(|r| r.method == "PUT" || r.method == "POST")
            .count();
        assert!(
            puts <= 2,
            "auth failures were retried: {:?}",
            peer.requests()
        );
    }
    assert!(good.list("").await.unwrap().is_empty());
    assert!(files_under(&peer.root.join(&bucket)).is_empty());
    assert!(peer.upload_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_put_resumes_in_a_new_backend_without_resending_parts() {
    let peer = peer!();
    let bucket = peer.bucket("resume");
    let data = pattern(40 * MIB + 12345, 7);
    let expected = Sha256::digest(&data).to_vec();
    let opts = PutOptions {
        size_hint: Some(data.len() as u64),
        ..Default::default()
    };
    let cfg = |policy| {
        let mut c = peer.config(&bucket);
        c.part_size = Some(5 << 20);
        c.concurrency = 2;
        c.drop_policy = policy;
        c
    };

    // First process: three parts and a bit, then it "dies" (dropped in keep-for-resume mode).
    let first = S3Backend::new(cfg(DropPolicy::KeepForResume)).unwrap();
    let mut w = first.put_resumable("vm/disk.qcow2", &opts).await.unwrap();
    assert_eq!(w.part_size(), 5 << 20);
    feed(&mut w, &data[..17 * MIB]).await;
    w.wait_parts().await.unwrap();
    assert_eq!(w.stats().parts_uploaded, 3);
    let upload_id = w.upload_id().unwrap().to_string();
    drop(w);
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A set: a part retried after a connection reset on a loaded machine is logged twice.
    let sent_first: std::collections::BTreeSet<u32> = peer
        .requests()
        .iter()
        .filter_map(Logged::part_number)
        .collect();
    assert_eq!(sent_first.len(), 3, "{sent_first:?}");
    assert!(!peer.upload_files().is_empty(), "upload kept for resume");

    // Second process: a new backend puts the same bytes.
    peer.clear_log();
    let second = S3Backend::new(cfg(DropPolicy::Abort)).unwrap();
    let cp = second.checkpoint("vm/disk.qcow2").await.unwrap().unwrap();
    assert_eq!(cp.upload_id, upload_id);
    assert_eq!(cp.part_size, 5 << 20);
    assert_eq!(cp.parts.len(), 3);
    let mut w = second.put_resumable("vm/disk.qcow2", &opts).await.unwrap();
    assert!(w.is_resuming());
    assert_eq!(w.upload_id(), Some(upload_id.as_str()));
    feed(&mut w, &data).await;
    w.wait_parts().await.unwrap();
    let stats = w.stats();
    Box::new(w).commit().await.unwrap();
    let sent_second: Vec<u32> = {
        let mut v: Vec<u32> = peer
            .requests()
            .iter()
            .filter_map(Logged::part_number)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    // 40 MiB + a bit in 5 MiB parts = 9 parts; 1..=3 were stored by the first process.
    assert_eq!(
        sent_second,
        (4..=9).collect::<Vec<_>>(),
        "server saw these UploadParts"
    );
    assert!(
        peer.requests()
            .iter()
            .filter(|r| r.part_number().is_some())
            .all(|r| r.path == "/resume/staging/vm/disk.qcow2"),
        "{:?}",
        peer.requests()
    );
    // (counted before commit, which sends the last part)
    assert_eq!(stats.parts_skipped, 3);
    assert_eq!(stats.parts_uploaded, 5);
    assert!(
        peer.requests()
            .iter()
            .any(|r| r.query.contains("uploadId") && r.method == "GET"),
        "ListParts was asked"
    );

    // Same content as an uninterrupted put.
    let (n, sha) = sha_of_object(&second, "vm/disk.qcow2").await;
    assert_eq!(n, data.len() as u64);
    assert_eq!(sha, expected);
    second
        .put_bytes("vm/uninterrupted.qcow2", Bytes::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(
        sha_of_object(&second, "vm/uninterrupted.qcow2").await.1,
        sha
    );
    // checkpoint and upload gone
    assert!(second.checkpoint("vm/disk.qcow2").await.unwrap().is_none());
    assert!(peer.upload_files().is_empty(), "{:?}", peer.upload_files());
    let keys: Vec<String> = second
        .list("vm/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["vm/disk.qcow2", "vm/uninterrupted.qcow2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_drop_leave_no_upload_and_no_checkpoint() {
    let peer = peer!();
    let bucket = peer.bucket("abort");
    let mut cfg = peer.config(&bucket);
    cfg.part_size = Some(5 << 20);
    let b = S3Backend::new(cfg).unwrap();
    let data = pattern(12 * MIB, 3);

    // explicit abort
    let mut w = b
        .put_resumable("vm/a.raw", &PutOptions::default())
        .await
        .unwrap();
    feed(&mut w, &data).await;
    w.wait_parts().await.unwrap();
    assert!(b.checkpoint("vm/a.raw").await.unwrap().is_some());
    assert!(!peer.upload_files().is_empty());
    let id = w.upload_id().unwrap().to_string();
    Box::new(w).abort().await.unwrap();
    assert!(b.checkpoint("vm/a.raw").await.unwrap().is_none());
    assert!(peer.upload_files().is_empty(), "{:?}", peer.upload_files());
    assert_eq!(
        b.stat("vm/a.raw").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(
        b.list_parts("vm/a.raw", &id)
            .await
            .unwrap_or_default()
            .is_empty()
    );
    match b.list_multipart_uploads("").await {
        Ok(ups) => assert!(ups.is_empty(), "{ups:?}"),
        // s3s-fs 0.14.1 does not implement ListMultipartUploads (501): the on-disk check above
        // is the server-side observation.
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
    }

    // drop without commit (default policy: abort in the background)
    let mut w = b
        .put_resumable("vm/b.raw", &PutOptions::default())
        .await
        .unwrap();
    feed(&mut w, &data).await;
    w.wait_parts().await.unwrap();
    drop(w);
    let mut clean = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if peer.upload_files().is_empty() && b.checkpoint("vm/b.raw").await.unwrap().is_none() {
            clean = true;
            break;
        }
    }
    assert!(clean, "dropped writer left {:?}", peer.upload_files());
    assert!(b.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_survives_a_server_restart_by_retrying() {
    let mut peer = peer!();
    let bucket = peer.bucket("restart");
    let mut cfg = peer.config(&bucket);
    cfg.part_size = Some(5 << 20);
    cfg.concurrency = 2;
    let b = S3Backend::new(cfg).unwrap();
    let data = pattern(30 * MIB, 11);
    let mut w = b
        .put(
            "vm/disk.raw",
            &PutOptions {
                size_hint: Some(data.len() as u64),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    feed(&mut *w, &data[..11 * MIB]).await;
    peer.stop().await;
    // The server comes back 1.5 s later on the same port; meanwhile the writer keeps going and
    // its requests fail with connection refused, then succeed on retry.
    let addr = peer.addr;
    let restarter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        peer.restart().await;
        peer
    });
    let t0 = std::time::Instant::now();
    feed(&mut *w, &data[11 * MIB..]).await;
    w.commit().await.unwrap();
    // parts 3..=6 could only be stored once the server was back
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
    let peer = restarter.await.unwrap();
    let late: Vec<u32> = peer
        .requests()
        .iter()
        .filter_map(Logged::part_number)
        .collect();
    assert!(late.contains(&3) && late.contains(&6), "{late:?}");
    assert_eq!(peer.addr, addr);
    let (n, sha) = sha_of_object(&b, "vm/disk.raw").await;
    assert_eq!(n, data.len() as u64);
    assert_eq!(sha, Sha256::digest(&data).to_vec());
    assert!(peer.upload_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_get_urls_work_with_plain_http() {
    let peer = peer!();
    let bucket = peer.bucket("presign");
    let b = S3Backend::new(peer.config(&bucket)).unwrap();
    let data = pattern(3 * MIB + 5, 5);
    b.put_bytes("vm/disk 1.qcow2", Bytes::from(data.clone()))
        .await
        .unwrap();
    let url = b
        .presign_get("vm/disk 1.qcow2", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(url.starts_with(&peer.endpoint()), "{url}");
    assert!(!url.contains(SECRET_KEY));
    assert!(!format!("{b:?}").contains(SECRET_KEY));
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[..]);
    // without the signature it is refused
    let bare = url.split('?').next().unwrap();
    assert_eq!(reqwest::get(bare).await.unwrap().status(), 403);
    // overwrite: false refuses an existing object and keeps it
    let e = b
        .put(
            "vm/disk 1.qcow2",
            &PutOptions {
                overwrite: false,
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        b.stat("vm/disk 1.qcow2").await.unwrap().size,
        data.len() as u64
    );
    assert_eq!(
        b.presign_get("vm/disk 1.qcow2", Duration::from_secs(8 * 24 * 3600))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_builds_the_backend_from_aws_environment_variables() {
    let peer = peer!();
    let bucket = peer.bucket("from-env");
    // SAFETY: no other test of this binary reads or writes these variables.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT_URL", peer.endpoint());
    }
    let b = virtrigaud_storage::open("s3://from-env/some/prefix").unwrap();
    assert_eq!(b.location(), "s3://from-env/some/prefix");
    b.put_bytes("k", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert!(peer.root.join(&bucket).join("some/prefix/k").is_file());
    assert_eq!(b.get_bytes("k", 100).await.unwrap().as_ref(), b"hello");
    b.delete("k").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_checkpoint_starts_a_fresh_upload() {
    let peer = peer!();
    let bucket = peer.bucket("stale");
    let mut cfg = peer.config(&bucket);
    cfg.part_size = Some(5 << 20);
    let b = S3Backend::new(cfg).unwrap();
    // a checkpoint whose upload no longer exists on the server
    let dir = peer.root.join(&bucket).join("staging/vm");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("x.raw.upload.json"),
        r#"{"version":1,"key":"staging/vm/x.raw","upload_id":"5f0c4a4e-0000-4000-8000-000000000000","part_size":5242880,"created_unix":1,"parts":[{"number":1,"size":5242880,"md5":"00","etag":"00"}]}"#,
    )
    .unwrap();
    let data = pattern(12 * MIB, 21);
    let mut w = b
        .put_resumable("vm/x.raw", &PutOptions::default())
        .await
        .unwrap();
    assert!(!w.is_resuming());
    feed(&mut w, &data).await;
    Box::new(w).commit().await.unwrap();
    assert_eq!(
        sha_of_object(&b, "vm/x.raw").await.1,
        Sha256::digest(&data).to_vec()
    );
    assert!(b.checkpoint("vm/x.raw").await.unwrap().is_none());
    assert!(peer.upload_files().is_empty());
}

/// Throughput figures (not a timed assertion): `cargo test --features s3 --test s3_s3sfs --
/// --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_put_and_get_256_mib() {
    let peer = peer!();
    let bucket = peer.bucket("throughput");
    let b = S3Backend::new(peer.config(&bucket)).unwrap();
    let size = 256 * MIB;
    let chunk = Bytes::from(pattern(4 * MIB, 99));
    let t = std::time::Instant::now();
    let mut w = b
        .put(
            "big",
            &PutOptions {
                size_hint: Some(size as u64),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for _ in 0..size / chunk.len() {
        w.write(chunk.clone()).await.unwrap();
    }
    w.commit().await.unwrap();
    let put = t.elapsed();
    let t = std::time::Instant::now();
    let (n, _) = sha_of_object(&b, "big").await;
    let get = t.elapsed();
    assert_eq!(n, size as u64);
    let mibs = |d: Duration| size as f64 / MIB as f64 / d.as_secs_f64();
    println!(
        "s3s-fs in-process, 256 MiB: put {:.0} MiB/s ({put:?}), get+sha256 {:.0} MiB/s ({get:?})",
        mibs(put),
        mibs(get)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_special_characters_round_trip() {
    let peer = peer!();
    let bucket = peer.bucket("special-keys");
    let mut cfg = peer.config(&bucket);
    cfg.part_size = Some(5 << 20);
    let b = S3Backend::new(cfg).unwrap();
    let small = "vm 1/disk+a=b&c é~(x)[y].raw";
    b.put_bytes(small, Bytes::from_static(b"small"))
        .await
        .unwrap();
    assert_eq!(b.get_bytes(small, 100).await.unwrap().as_ref(), b"small");
    // the multipart path signs and encodes the same way
    let big = "vm 1/big+disk é.qcow2";
    let data = pattern(11 * MIB, 4);
    let mut w = b.put(big, &PutOptions::default()).await.unwrap();
    feed(&mut *w, &data).await;
    w.commit().await.unwrap();
    assert_eq!(b.stat(big).await.unwrap().size, data.len() as u64);
    let keys: Vec<String> = b
        .list("vm 1/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, [big, small]);
    b.delete(small).await.unwrap();
    b.delete(big).await.unwrap();
    assert!(b.list("").await.unwrap().is_empty());
}

/// The disk both halves of the kill test export: 48 MiB of deterministic data, in 1 MiB extents.
/// With a `pause` (the child, to be killed mid-upload) each extent is delayed and the stream
/// stalls for good after 30 MiB, so the child can never finish before the kill.
fn kill_test_source(pause: Duration, seed: u64) -> virtrigaud_core::io::ImageSource {
    let size = 48u64 << 20;
    let stream = futures::stream::unfold(0u64, move |off| async move {
        if off >= size {
            return None;
        }
        if !pause.is_zero() {
            if off >= 30 << 20 {
                futures::future::pending::<()>().await;
            }
            tokio::time::sleep(pause).await;
        }
        let bytes = Bytes::from(pattern(MIB, seed + off / MIB as u64));
        Some((
            Ok(virtrigaud_core::Extent::Data { offset: off, bytes }),
            off + MIB as u64,
        ))
    });
    virtrigaud_core::io::ImageSource::Sequential {
        size: Some(size),
        stream: stream.boxed(),
    }
}

/// The export options of the kill tests; with `identity` (an age secret key), encrypted for
/// its recipient and resumable with it.
fn kill_test_export_options(identity: Option<&str>) -> virtrigaud_core::ExportOptions {
    use virtrigaud_core::crypt::{Decryption, Encryption};
    let encrypt = identity.map(|id| {
        let dec = Decryption::from_identities_text(id).unwrap();
        let recipient = id
            .parse::<age::x25519::Identity>()
            .unwrap()
            .to_public()
            .to_string();
        Encryption::to_recipients(&[recipient])
            .unwrap()
            .resumable_with(dec)
    });
    virtrigaud_core::ExportOptions {
        format: virtrigaud_core::DiskFormat::Raw,
        include_vm: false,
        encode: virtrigaud_core::format::EncodeOptions {
            encrypt,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn kill_test_config(endpoint: &str, bucket: &str) -> S3Config {
    let mut c = S3Config::new(bucket)
        .with_endpoint(endpoint)
        .with_prefix("staging")
        .with_credentials(ACCESS_KEY, SECRET_KEY);
    c.part_size = Some(5 << 20);
    c.concurrency = 2;
    c
}

/// Child half of the kill tests: runs only when one of them spawns it (and kills it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawned by the kill tests"]
async fn kill_child_export() {
    let (Ok(endpoint), Ok(bucket), Ok(key)) = (
        std::env::var("VRG_KILL_CHILD_ENDPOINT"),
        std::env::var("VRG_KILL_CHILD_BUCKET"),
        std::env::var("VRG_KILL_CHILD_KEY"),
    ) else {
        return;
    };
    let identity = std::env::var("VRG_KILL_CHILD_IDENTITY").ok();
    let b = S3Backend::new(kill_test_config(&endpoint, &bucket)).unwrap();
    let _ = virtrigaud_core::export_image(
        kill_test_source(Duration::from_millis(60), 1000),
        None,
        &b,
        &key,
        None,
        None,
        &kill_test_export_options(identity.as_deref()),
    )
    .await;
}

/// Runs the export of `key` in a separate process and kills it with SIGKILL (no destructor
/// runs, exactly like a crash) once the checkpoint records parts; returns the part numbers
/// the checkpoint recorded. Nothing is committed by then.
async fn export_killed_midway(
    peer: &Peer,
    b: &S3Backend,
    bucket: &str,
    key: &str,
    identity: Option<&str>,
) -> Vec<u32> {
    peer.clear_log();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "kill_child_export", "--ignored", "--nocapture"])
        .env("VRG_KILL_CHILD_ENDPOINT", peer.endpoint())
        .env("VRG_KILL_CHILD_BUCKET", bucket)
        .env("VRG_KILL_CHILD_KEY", key)
        .stdout(std::process::Stdio::null());
    if let Some(id) = identity {
        cmd.env("VRG_KILL_CHILD_IDENTITY", id);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let parts = peer
            .requests()
            .iter()
            .filter_map(Logged::part_number)
            .count();
        if parts >= 4 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child finished before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the child uploaded no parts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the checkpoint (rewritten at most once a second) record parts, then kill.
    while b
        .checkpoint(key)
        .await
        .unwrap()
        .is_none_or(|cp| cp.parts.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint with parts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!b.exists(key).await.unwrap(), "no object after the kill");
    assert!(
        !b.exists(&virtrigaud_core::manifest::manifest_key(key))
            .await
            .unwrap(),
        "no manifest after the kill"
    );
    let cp = b
        .checkpoint(key)
        .await
        .unwrap()
        .expect("checkpoint left by the child");
    let recorded: Vec<u32> = cp.parts.iter().map(|p| p.number).collect();
    assert!(!recorded.is_empty(), "the checkpoint recorded parts");
    recorded
}

/// Asserts that since the log was cleared no part the checkpoint `recorded` was sent again,
/// and only a few others were.
fn only_missing_parts_sent(peer: &Peer, recorded: &[u32]) {
    let after = parts_sent(peer);
    for n in recorded {
        assert!(
            !after.contains(n),
            "part {n} was sent again: after {after:?}"
        );
    }
    assert!(
        after.len() < 10,
        "only the missing parts are sent: {after:?}"
    );
}

/// Exports the kill tests' source (pattern `seed`) to `key` with `opts`,
/// in this process and without pauses.
async fn export_kill_source(
    b: &S3Backend,
    key: &str,
    seed: u64,
    opts: &virtrigaud_core::ExportOptions,
) -> virtrigaud_core::Result<virtrigaud_core::ExportReport> {
    virtrigaud_core::export_image(
        kill_test_source(Duration::ZERO, seed),
        None,
        b,
        key,
        None,
        None,
        opts,
    )
    .await
}

/// The parts uploaded since the log was last cleared.
fn parts_sent(peer: &Peer) -> Vec<u32> {
    peer.requests()
        .iter()
        .filter_map(Logged::part_number)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_killed_mid_upload_resumes_in_a_new_process() {
    let peer = peer!();
    let bucket = peer.bucket("killed");
    let b = S3Backend::new(kill_test_config(&peer.endpoint(), &bucket)).unwrap();
    let recorded = export_killed_midway(&peer, &b, &bucket, "vm/disk.img", None).await;

    // A new process (here: a new backend) runs the same export and resumes.
    peer.clear_log();
    let resumed = export_kill_source(&b, "vm/disk.img", 1000, &kill_test_export_options(None))
        .await
        .unwrap();
    only_missing_parts_sent(&peer, &recorded);

    // The object and manifest equal an uninterrupted run's.
    let clean = export_kill_source(&b, "vm/clean.img", 1000, &kill_test_export_options(None))
        .await
        .unwrap();
    let (m1, mut m2) = (resumed.manifest, clean.manifest);
    m2.created = m1.created.clone();
    assert_eq!(m1, m2, "manifests differ beyond their creation time");
    assert_eq!(
        sha_of_object(&b, "vm/disk.img").await,
        sha_of_object(&b, "vm/clean.img").await
    );
    assert!(b.checkpoint("vm/disk.img").await.unwrap().is_none());
    assert!(peer.upload_files().is_empty(), "{:?}", peer.upload_files());
}

/// The plaintext of a stored object, decrypted with `identity` when it is encrypted.
async fn plaintext_sha(b: Arc<S3Backend>, key: &str, identity: Option<&str>) -> Vec<u8> {
    let dec =
        identity.map(|i| virtrigaud_core::crypt::Decryption::from_identities_text(i).unwrap());
    let (_, src) = virtrigaud_core::open_staged(b, key, dec.as_ref())
        .await
        .unwrap();
    let virtrigaud_core::ImageSource::RandomAccess(r) = src else {
        panic!("a staged object opens for random access")
    };
    let mut h = Sha256::new();
    let mut off = 0;
    while off < r.size() {
        let chunk = r.read_at(off, 4 << 20).await.unwrap();
        off += chunk.len() as u64;
        h.update(&chunk);
    }
    h.finalize().to_vec()
}

/// An encrypted export killed mid-upload resumes like a plain one: the rerun, holding the
/// identity, reopens the header kept beside the upload, reuses its file key and sends only the
/// missing parts; what is stored decrypts to the plain export. The header copy holds no key in
/// clear and is gone after the commit. If the source changed in between, the resumed upload
/// is refused (`Conflict`: one key must not seal two plaintexts), discarded, and the next run
/// starts over with a new key. Without the identity, the rerun starts over with a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_export_killed_mid_upload_resumes_with_its_key() {
    use age::secrecy::ExposeSecret;
    let peer = peer!();
    let bucket = peer.bucket("killed-enc");
    let b = Arc::new(S3Backend::new(kill_test_config(&peer.endpoint(), &bucket)).unwrap());
    let id = age::x25519::Identity::generate();
    let secret = id.to_string().expose_secret().to_string();
    let state_key = format!("vm/disk.img{}", virtrigaud_core::crypt::RESUME_SUFFIX);

    let recorded = export_killed_midway(&peer, &b, &bucket, "vm/disk.img", Some(&secret)).await;
    let state = b.get_bytes(&state_key, 1 << 20).await.unwrap();
    let state = String::from_utf8(state.to_vec()).unwrap();
    assert!(state.contains(&id.to_public().to_string()), "{state}");
    assert!(
        !state.contains("AGE-SECRET-KEY"),
        "no key in clear: {state}"
    );

    peer.clear_log();
    let resumed = export_kill_source(
        &b,
        "vm/disk.img",
        1000,
        &kill_test_export_options(Some(&secret)),
    )
    .await
    .unwrap();
    only_missing_parts_sent(&peer, &recorded);
    assert!(resumed.manifest.encryption.is_some());
    assert!(
        !b.exists(&state_key).await.unwrap(),
        "the header copy is removed"
    );
    assert!(b.checkpoint("vm/disk.img").await.unwrap().is_none());
    // What is stored decrypts to exactly the plain export of the same source.
    export_kill_source(&b, "vm/plain.img", 1000, &kill_test_export_options(None))
        .await
        .unwrap();
    assert_eq!(
        plaintext_sha(b.clone(), "vm/disk.img", Some(&secret)).await,
        sha_of_object(&*b, "vm/plain.img").await.1
    );
    assert_eq!(
        resumed.manifest.content_digest,
        virtrigaud_core::read_manifest(&*b, "vm/plain.img")
            .await
            .unwrap()
            .content_digest
    );

    // The source changed before the rerun: refused, the upload and header copy discarded.
    let key = "vm/changed.img";
    let state_key = format!("{key}{}", virtrigaud_core::crypt::RESUME_SUFFIX);
    export_killed_midway(&peer, &b, &bucket, key, Some(&secret)).await;
    let old_header = b.get_bytes(&state_key, 1 << 20).await.unwrap();
    let e = export_kill_source(&b, key, 7000, &kill_test_export_options(Some(&secret)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Conflict, "{e}");
    assert!(!b.exists(&state_key).await.unwrap());
    assert!(!b.exists(key).await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while b.checkpoint(key).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload is discarded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next run starts over, with a new key, and decrypts to the changed source.
    export_kill_source(&b, key, 7000, &kill_test_export_options(Some(&secret)))
        .await
        .unwrap();
    let stored_head = b.get(key, Some(0..old_header.len() as u64)).await.unwrap();
    let stored_head: Vec<Bytes> = stored_head.map(|c| c.unwrap()).collect().await;
    assert_ne!(stored_head.concat(), old_header.to_vec(), "a new header");
    export_kill_source(
        &b,
        "vm/changed-plain.img",
        7000,
        &kill_test_export_options(None),
    )
    .await
    .unwrap();
    assert_eq!(
        plaintext_sha(b.clone(), key, Some(&secret)).await,
        sha_of_object(&*b, "vm/changed-plain.img").await.1
    );

    // Without the identity the rerun cannot reopen the header: it starts over (all parts
    // sent again, under a new key), and the result still decrypts.
    let key = "vm/noid.img";
    export_killed_midway(&peer, &b, &bucket, key, Some(&secret)).await;
    let recipient_only = {
        let mut o = kill_test_export_options(None);
        o.encode.encrypt = Some(
            virtrigaud_core::crypt::Encryption::to_recipients(&[id.to_public().to_string()])
                .unwrap(),
        );
        o
    };
    peer.clear_log();
    export_kill_source(&b, key, 1000, &recipient_only)
        .await
        .unwrap();
    assert!(parts_sent(&peer).len() >= 10, "{:?}", parts_sent(&peer));
    assert_eq!(
        plaintext_sha(b.clone(), key, Some(&secret)).await,
        sha_of_object(&*b, "vm/plain.img").await.1
    );
}

/// A GET of a large object runs as long as its consumer needs: `request_timeout` bounds part
/// uploads, not object reads (an import of a big disk into a slow target reads for hours), and
/// `idle_timeout` counts only waits for the network, not a consumer's pause between reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_reads_past_the_request_and_idle_timeouts() {
    let peer = peer!();
    let bucket = peer.bucket("slowget");
    let mut cfg = peer.config(&bucket);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(1);
    let b = S3Backend::new(cfg).unwrap();
    let data = pattern(24 * MIB, 11);
    b.put_bytes("big.raw", Bytes::from(data.clone()))
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let mut s = b.get("big.raw", None).await.unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut paused = false;
    while let Some(c) = s.next().await {
        got.extend_from_slice(&c.expect("the GET stream broke"));
        if !paused {
            // far less than 24 MiB fits in the socket buffers: the rest is read after the
            // request timeout has passed
            tokio::time::sleep(Duration::from_secs(3)).await;
            paused = true;
        }
    }
    assert!(t.elapsed() > Duration::from_secs(2));
    assert_eq!(got.len(), data.len());
    assert!(got == data, "content differs");
}

/// A sparse disk in memory: zeros except a few data pieces, with its data ranges known (as
/// `SEEK_DATA` tells them for a local file).
struct SparseDisk {
    size: u64,
    pieces: Vec<(u64, Bytes)>,
}

#[async_trait::async_trait]
impl virtrigaud_core::io::ReadAt for SparseDisk {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> virtrigaud_core::Result<Bytes> {
        let end = (offset + len as u64).min(self.size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        for (at, data) in &self.pieces {
            let (s, e) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if s < e {
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
            }
        }
        Ok(Bytes::from(out))
    }

    async fn data_ranges(&self) -> virtrigaud_core::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(Some(
            self.pieces
                .iter()
                .map(|(at, d)| *at..at + d.len() as u64)
                .collect(),
        ))
    }
}

/// A thin 16 TiB disk holding 12 MiB is stored whatever its virtual size: the parts are sized
/// from what is stored (8 MiB each, a schedule of part numbers), not from the export's size
/// hint (virtual size + 1/64 + 64 MiB, which once refused it: "exceeds S3's 5 TiB limit").
/// Exported as qcow2 and verified end to end (object SHA-256, chunk digests, content digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_sixteen_tib_disk_exports_as_qcow2_in_small_parts_and_verifies() {
    let peer = peer!();
    let bucket = peer.bucket("thin16t");
    let b = S3Backend::new(peer.config(&bucket)).unwrap();
    let size = 16u64 << 40;
    let disk = SparseDisk {
        size,
        pieces: vec![
            (0, Bytes::from(pattern(6 * MIB, 61))),
            (8 << 40, Bytes::from(pattern(4 * MIB, 62))),
            (size - 2 * MIB as u64, Bytes::from(pattern(2 * MIB, 63))),
        ],
    };
    let opts = virtrigaud_core::ExportOptions {
        format: virtrigaud_core::DiskFormat::Qcow2,
        include_vm: false,
        ..Default::default()
    };
    let report = virtrigaud_core::export_image(
        virtrigaud_core::io::ImageSource::RandomAccess(Arc::new(disk)),
        None,
        &b,
        "vm/thin.qcow2",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    let m = &report.manifest;
    assert_eq!(m.virtual_size, size);
    assert_eq!(m.allocated_bytes, 12 * MIB as u64);
    assert!(
        (12 * MIB as u64..16 * MIB as u64).contains(&m.stored_size),
        "{}",
        m.stored_size
    );
    // Multipart with the schedule's first parts (8 MiB): two parts for ~12 MiB.
    let parts: std::collections::BTreeSet<u32> = peer
        .requests()
        .iter()
        .filter_map(Logged::part_number)
        .collect();
    assert_eq!(
        parts.into_iter().collect::<Vec<_>>(),
        vec![1, 2],
        "stored {} bytes",
        m.stored_size
    );
    let verified = virtrigaud_core::verify_object(
        &b,
        "vm/thin.qcow2",
        &virtrigaud_core::ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(verified.content_digest, m.content_digest);
}

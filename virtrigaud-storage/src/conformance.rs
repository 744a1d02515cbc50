//! The conformance suite every [`StorageBackend`] runs against its real peer.
//!
//! Test support: each check panics with a message on failure. Call [`run_all`] from a test with
//! a backend, a prefix of its own (so suites of several backends or runs do not collide) and a
//! [`RawNames`] hook that lists what the backend really holds (temporary files, upload state:
//! everything `list` hides), so that "an aborted or dropped put leaves nothing" is checked on
//! the store itself; [`local_files`] is the hook of a store that is a local directory. The suite
//! removes what it wrote.

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use virtrigaud_core::{ErrorKind, PutOptions, StorageBackend, StorageExt};

/// Lists every name a backend really holds under a key prefix — objects, temporary files,
/// multipart state, whatever `list` hides — as the store names them. Given by each backend's
/// test, from the peer's side (its directory on disk, or a raw listing API).
pub type RawNames = Arc<dyn Fn(String) -> BoxFuture<'static, Vec<String>> + Send + Sync>;

/// The [`RawNames`] of a store kept in the local directory `root` (the fs backend's root, an
/// NFS export or a WebDAV server's data directory seen on this machine): every file under
/// `root/<prefix>` (a prefix ending in `/` is a directory; otherwise its last segment is a
/// name prefix), hidden names included, as paths relative to `root`.
pub fn local_files(root: impl Into<PathBuf>) -> RawNames {
    let root: PathBuf = root.into();
    Arc::new(move |prefix: String| {
        let root = root.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in rd.flatten() {
                    let path = e.path();
                    let Ok(rel) = path.strip_prefix(&root) else {
                        continue;
                    };
                    let rel = rel.to_string_lossy().into_owned();
                    let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                    if is_dir {
                        if prefix.starts_with(&format!("{rel}/")) || rel.starts_with(&prefix) {
                            stack.push(path);
                        }
                    } else if rel.starts_with(&prefix) {
                        out.push(rel);
                    }
                }
            }
            out.sort();
            out
        })
    })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud_core::testdata::noise(seed, len)
}

async fn read_all(
    b: &dyn StorageBackend,
    key: &str,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let mut s = b
        .get(key, range)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap_or_else(|e| panic!("get {key} chunk: {e}")));
    }
    out
}

/// Runs every check under `prefix`; `raw` lists what the backend really holds (see
/// [`RawNames`]).
pub async fn run_all(b: Arc<dyn StorageBackend>, prefix: &str, raw: RawNames) {
    put_get_stat_delete(&*b, prefix).await;
    ranges(&*b, prefix).await;
    list_by_prefix(&*b, prefix).await;
    invisible_until_commit(&*b, prefix).await;
    abort_leaves_nothing(&*b, prefix, &raw).await;
    large_streaming_put(&*b, prefix, 64 << 20).await;
    concurrent_writers(b.clone(), prefix, 8).await;
    bad_keys_and_missing_objects(&*b, prefix).await;
    let left = b.list(&format!("{prefix}/")).await.unwrap();
    assert!(left.is_empty(), "suite left objects behind: {left:?}");
    let held = raw(format!("{prefix}/")).await;
    assert!(
        held.is_empty(),
        "suite left data behind on the store: {held:?}"
    );
}

/// Put, get, stat, overwrite, delete, delete again.
pub async fn put_get_stat_delete(b: &dyn StorageBackend, prefix: &str) {
    let key = format!("{prefix}/basic/object.bin");
    let data = pattern(100_000, 1);
    b.put_bytes(&key, Bytes::from(data.clone())).await.unwrap();
    assert_eq!(read_all(b, &key, None).await, data);
    let meta = b.stat(&key).await.unwrap();
    assert_eq!(meta.size, data.len() as u64);
    assert!(b.exists(&key).await.unwrap());
    let data2 = pattern(10, 2);
    b.put_bytes(&key, Bytes::from(data2.clone())).await.unwrap();
    assert_eq!(read_all(b, &key, None).await, data2, "overwrite");
    b.delete(&key).await.unwrap();
    assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
    b.delete(&key)
        .await
        .expect("deleting an absent object succeeds");
    let empty = format!("{prefix}/basic/empty");
    b.put_bytes(&empty, Bytes::new()).await.unwrap();
    assert_eq!(b.stat(&empty).await.unwrap().size, 0);
    assert!(read_all(b, &empty, None).await.is_empty());
    b.delete(&empty).await.unwrap();
}

/// Ranged reads: start, middle, tail, clipped end. The object is over 4 MiB and not a whole
/// number of pages, so a backend reading large objects with direct I/O (fs) gets aligned,
/// unaligned and short last reads.
pub async fn ranges(b: &dyn StorageBackend, prefix: &str) {
    let key = format!("{prefix}/range/obj");
    const LEN: u64 = (5 << 20) + 1234;
    let data = pattern(LEN as usize, 3);
    b.put_bytes(&key, Bytes::from(data.clone())).await.unwrap();
    for r in [
        0..1,
        0..4096,
        1000..1_500_000,
        4096..LEN,
        LEN - 10..LEN,
        5..5,
        0..LEN,
    ] {
        let got = read_all(b, &key, Some(r.clone())).await;
        assert_eq!(got, &data[r.start as usize..r.end as usize], "range {r:?}");
    }
    let got = read_all(b, &key, Some(LEN - 4..LEN + 100)).await;
    assert_eq!(got, &data[LEN as usize - 4..], "range clipped at the end");
    assert_eq!(read_all(b, &key, None).await, data, "whole object");
    b.delete(&key).await.unwrap();
}

/// Listing returns exactly the keys under a prefix, sorted, with sizes.
pub async fn list_by_prefix(b: &dyn StorageBackend, prefix: &str) {
    let keys = ["a/1", "a/2", "a/sub/3", "b/1"].map(|k| format!("{prefix}/list/{k}"));
    for (i, k) in keys.iter().enumerate() {
        b.put_bytes(k, Bytes::from(vec![i as u8; i + 1]))
            .await
            .unwrap();
    }
    let got = b.list(&format!("{prefix}/list/a/")).await.unwrap();
    let names: Vec<&str> = got.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(
        names,
        vec![keys[0].as_str(), keys[1].as_str(), keys[2].as_str()]
    );
    assert_eq!(got[2].size, 3);
    assert_eq!(b.list(&format!("{prefix}/list/")).await.unwrap().len(), 4);
    for k in &keys {
        b.delete(k).await.unwrap();
    }
    assert!(b.list(&format!("{prefix}/list/")).await.unwrap().is_empty());
}

/// Nothing is visible before commit.
pub async fn invisible_until_commit(b: &dyn StorageBackend, prefix: &str) {
    let key = format!("{prefix}/atomic/obj");
    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    s.write(Bytes::from(pattern(1 << 20, 4))).await.unwrap();
    if b.capabilities().atomic_put {
        assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
    }
    s.commit().await.unwrap();
    assert_eq!(b.stat(&key).await.unwrap().size, 1 << 20);
    b.delete(&key).await.unwrap();
}

/// An aborted (cancelled) put and a dropped put leave nothing behind: not on `list`, and not on
/// the store itself (`raw`: temporary files and upload state, which `list` hides).
pub async fn abort_leaves_nothing(b: &dyn StorageBackend, prefix: &str, raw: &RawNames) {
    let key = format!("{prefix}/abort/obj");
    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    for i in 0..4 {
        s.write(Bytes::from(pattern(1 << 20, i))).await.unwrap();
    }
    s.abort().await.unwrap();
    assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
    let listing = format!("{prefix}/abort/");
    let held = raw(listing.clone()).await;
    assert!(held.is_empty(), "an aborted put left {held:?} on the store");
    {
        let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
        s.write(Bytes::from(pattern(1000, 9))).await.unwrap();
    }
    assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
    // A dropped put may clean up in the background: give it up to 10 s (a loaded machine).
    // What the store holds, not what `list` shows: `list` hides temporary names.
    let mut left = raw(listing.clone()).await;
    for _ in 0..200 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        left = raw(listing.clone()).await;
    }
    assert!(left.is_empty(), "a dropped put left {left:?} on the store");
    assert!(b.list(&listing).await.unwrap().is_empty());
    assert_eq!(b.stat(&key).await.unwrap_err().kind(), ErrorKind::NotFound);
}

/// A large put streamed in uneven pieces reads back identical (by SHA-256).
pub async fn large_streaming_put(b: &dyn StorageBackend, prefix: &str, size: usize) {
    let key = format!("{prefix}/large/obj");
    let mut s = b
        .put(
            &key,
            &PutOptions {
                size_hint: Some(size as u64),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut h = Sha256::new();
    let mut written = 0usize;
    let mut i = 0u64;
    while written < size {
        let n = [1usize << 20, 333_333, 4 << 20, 1][i as usize % 4].min(size - written);
        let piece = pattern(n, 100 + i);
        h.update(&piece);
        s.write(Bytes::from(piece)).await.unwrap();
        written += n;
        i += 1;
    }
    s.commit().await.unwrap();
    let expect = h.finalize();
    let mut got = Sha256::new();
    let mut st = b.get(&key, None).await.unwrap();
    let mut n = 0usize;
    while let Some(c) = st.next().await {
        let c = c.unwrap();
        n += c.len();
        got.update(&c);
    }
    assert_eq!(n, size);
    assert_eq!(got.finalize(), expect, "large object content");
    b.delete(&key).await.unwrap();
}

/// Writers to different keys at the same time do not interfere.
pub async fn concurrent_writers(b: Arc<dyn StorageBackend>, prefix: &str, n: u64) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let b = b.clone();
        let key = format!("{prefix}/concurrent/{i}");
        tasks.push(tokio::spawn(async move {
            let data = pattern(2 << 20, 1000 + i);
            let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
            for c in data.chunks(256 << 10) {
                s.write(Bytes::copy_from_slice(c)).await.unwrap();
                tokio::task::yield_now().await;
            }
            s.commit().await.unwrap();
            (key, data)
        }));
    }
    for t in tasks {
        let (key, data) = t.await.unwrap();
        assert_eq!(read_all(&*b, &key, None).await, data, "{key}");
        b.delete(&key).await.unwrap();
    }
}

/// Keys that escape are refused; missing objects are `NotFound`.
pub async fn bad_keys_and_missing_objects(b: &dyn StorageBackend, prefix: &str) {
    for key in ["../escape", "/abs", "a/../../b", ""] {
        let e = b
            .put(key, &PutOptions::default())
            .await
            .err()
            .expect("bad key accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{key:?}");
        assert_eq!(
            b.get(key, None).await.err().unwrap().kind(),
            ErrorKind::InvalidInput
        );
    }
    let missing = format!("{prefix}/missing/none");
    assert_eq!(
        b.get(&missing, None).await.err().unwrap().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        b.stat(&missing).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

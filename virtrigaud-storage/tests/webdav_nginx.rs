//! The WebDAV backend and the plain HTTP source against nginx, as started by
//! `scripts/peers/nginx.sh start DIR` (then `source DIR/nginx.env`). Without the variables the
//! tests print `SKIP` and pass, unless `VIRTRIGAUD_IT=1` (then a missing peer, or any variable
//! a sub-test needs, fails).
#![cfg(feature = "http")]

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud_core::io::ReadAt;
use virtrigaud_core::{ErrorKind, PutOptions, StorageBackend, StorageExt};
use virtrigaud_storage::conformance;
use virtrigaud_storage::webdav::{HttpSource, RetryConfig, WebdavBackend, WebdavConfig};
use virtrigaud_testkit::{skip, unique};

struct Peer {
    url: String,
    user: String,
    password: String,
    dav_dir: std::path::PathBuf,
    http_url: String,
    http_dir: std::path::PathBuf,
}

fn peer(test: &str) -> Option<Peer> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("VIRTRIGAUD_WEBDAV_URL"),
        get("VIRTRIGAUD_WEBDAV_USER"),
        get("VIRTRIGAUD_WEBDAV_PASSWORD"),
        get("VIRTRIGAUD_WEBDAV_DATA_DIR"),
        get("VIRTRIGAUD_HTTP_URL"),
        get("VIRTRIGAUD_HTTP_DATA_DIR"),
    ) {
        (Some(url), Some(user), Some(password), Some(dd), Some(http_url), Some(hd)) => Some(Peer {
            url,
            user,
            password,
            dav_dir: dd.into(),
            http_url,
            http_dir: hd.into(),
        }),
        _ => {
            skip(&format!(
                "{test}: no nginx peer (run scripts/peers/nginx.sh start DIR and source DIR/nginx.env)"
            ));
            None
        }
    }
}

fn fast_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

fn dav(p: &Peer) -> WebdavBackend {
    WebdavBackend::new(
        WebdavConfig::new(&p.url)
            .with_basic_auth(&p.user, p.password.as_str())
            .with_retry(fast_retry()),
    )
    .unwrap()
}

/// Files below `dir` (recursively), as paths relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_nginx_webdav() {
    let Some(p) = peer("conformance_suite_on_nginx_webdav") else {
        return;
    };
    let prefix = unique("conf");
    // The suite checks aborted and dropped puts on the server's disk (temporary objects too).
    let raw = conformance::local_files(&p.dav_dir);
    conformance::run_all(Arc::new(dav(&p)), &prefix, raw).await;
    // Nothing is left on the server's disk either, temporary objects included.
    assert_eq!(files_under(&p.dav_dir.join(&prefix)), Vec::<String>::new());
}

#[tokio::test]
async fn opened_by_url_with_credentials() {
    let Some(p) = peer("opened_by_url_with_credentials") else {
        return;
    };
    let url = p.url.replacen(
        "http://",
        &format!("webdav://{}:{}@", p.user, p.password),
        1,
    );
    let b = virtrigaud_storage::open(&url).unwrap();
    assert!(!b.location().contains(&p.password));
    let key = format!("{}/o", unique("url"));
    b.put_bytes(&key, Bytes::from_static(b"via url"))
        .await
        .unwrap();
    assert_eq!(b.get_bytes(&key, 100).await.unwrap(), &b"via url"[..]);
    b.delete(&key).await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_auth_and_writes_nothing() {
    let Some(p) = peer("wrong_password_is_auth_and_writes_nothing") else {
        return;
    };
    let prefix = unique("auth");
    for create_parents in [true, false] {
        let cfg = WebdavConfig {
            create_parents,
            ..WebdavConfig::new(&p.url)
                .with_basic_auth(&p.user, "not-the-password")
                .with_retry(fast_retry())
        };
        let bad = WebdavBackend::new(cfg).unwrap();
        let t = Instant::now();
        let key = format!("{prefix}/{create_parents}/obj");
        let r = async {
            let mut s = bad.put(&key, &PutOptions::default()).await?;
            s.write(Bytes::from(vec![7u8; 1 << 20])).await?;
            s.commit().await
        }
        .await;
        let e = r.expect_err("a put with a wrong password succeeded");
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(!e.to_string().contains("not-the-password"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "Auth is not retried");
        assert_eq!(bad.stat(&key).await.unwrap_err().kind(), ErrorKind::Auth);
        assert_eq!(
            bad.list(&format!("{prefix}/")).await.unwrap_err().kind(),
            ErrorKind::Auth
        );
    }
    assert!(
        dav(&p)
            .list(&format!("{prefix}/"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(files_under(&p.dav_dir.join(&prefix)), Vec::<String>::new());
}

#[tokio::test]
async fn overwrite_false_refuses_existing_objects() {
    let Some(p) = peer("overwrite_false_refuses_existing_objects") else {
        return;
    };
    let b = dav(&p);
    let key = format!("{}/obj", unique("noover"));
    b.put_bytes(&key, Bytes::from_static(b"first"))
        .await
        .unwrap();
    let no = PutOptions {
        overwrite: false,
        ..Default::default()
    };
    // Refused at once when the object exists.
    assert_eq!(
        b.put(&key, &no).await.err().unwrap().kind(),
        ErrorKind::AlreadyExists
    );
    // Refused at commit when the object appeared during the put (HEAD, then `Overwrite: F`).
    let key2 = format!("{key}-2");
    let mut s = b.put(&key2, &no).await.unwrap();
    s.write(Bytes::from_static(b"mine")).await.unwrap();
    b.put_bytes(&key2, Bytes::from_static(b"theirs"))
        .await
        .unwrap();
    assert_eq!(
        s.commit().await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(b.get_bytes(&key2, 100).await.unwrap(), &b"theirs"[..]);
    // A new key is written.
    let key3 = format!("{key}-3");
    let mut s = b.put(&key3, &no).await.unwrap();
    s.write(Bytes::from_static(b"new")).await.unwrap();
    s.commit().await.unwrap();
    let dir = key.rsplit_once('/').unwrap().0;
    // A put never replaces a collection.
    b.put_bytes(&format!("{key}-col/inner"), Bytes::from_static(b"keep"))
        .await
        .unwrap();
    let e = b
        .put_bytes(&format!("{key}-col"), Bytes::from_static(b"over"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    b.delete(&format!("{key}-col/inner")).await.unwrap();
    let listed: Vec<String> = b
        .list(&format!("{dir}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(listed, vec![key.clone(), key2.clone(), key3.clone()]);
    for k in [&key, &key2, &key3] {
        b.delete(k).await.unwrap();
    }
    assert_eq!(files_under(&p.dav_dir.join(dir)), Vec::<String>::new());
}

#[tokio::test]
async fn plain_http_source_reads_ranges_and_refuses_writes() {
    let Some(p) = peer("plain_http_source_reads_ranges_and_refuses_writes") else {
        return;
    };
    let dir = unique("pub");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::create_dir_all(p.http_dir.join(&dir)).unwrap();
    std::fs::write(p.http_dir.join(&dir).join("disk image.raw"), &data).unwrap();
    let src = HttpSource::new(WebdavConfig::new(&p.http_url).with_retry(fast_retry())).unwrap();
    let caps = src.capabilities();
    assert!(caps.ranged_read && !caps.list && !caps.atomic_put);
    let key = format!("{dir}/disk image.raw");
    assert_eq!(src.stat(&key).await.unwrap().size, data.len() as u64);
    let r = src.reader(&key).await.unwrap();
    assert_eq!(r.size(), data.len() as u64);
    for (off, len) in [
        (0u64, 1usize),
        (4095, 8193),
        (1 << 20, 3 << 20),
        (4_999_990, 100),
    ] {
        let got = r.read_at(off, len).await.unwrap();
        let end = (off as usize + len).min(data.len());
        assert_eq!(&got[..], &data[off as usize..end], "{off}+{len}");
    }
    let mut s = src.get(&key, Some(10..20)).await.unwrap();
    let mut got = Vec::new();
    while let Some(c) = s.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(got, &data[10..20]);
    // The same file by its URL.
    let u = format!("{}{}/disk%20image.raw", p.http_url, dir);
    let r2 = HttpSource::open_url(&u).await.unwrap();
    assert_eq!(r2.read_exact_at(100, 10).await.unwrap(), &data[100..110]);
    // Missing, read-only.
    let missing = format!("{dir}/none");
    assert_eq!(
        src.stat(&missing).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        src.get(&missing, None).await.err().unwrap().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        src.reader(&missing).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        src.put(&missing, &PutOptions::default())
            .await
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        src.delete(&key).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        src.get("../etc/passwd", None).await.err().unwrap().kind(),
        ErrorKind::InvalidInput
    );
    std::fs::remove_dir_all(p.http_dir.join(&dir)).unwrap();
}

#[tokio::test]
async fn dead_server_is_network_after_bounded_retries() {
    // Needs no peer: a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = WebdavConfig::new(format!("http://127.0.0.1:{port}/dav/")).with_retry(fast_retry());
    let b = WebdavBackend::new(cfg.clone()).unwrap();
    let t = Instant::now();
    let e = b.stat("a/b").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(e.is_retryable());
    let e = b.put("a/b", &PutOptions::default()).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    let e = b.list("a/").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    let src = HttpSource::new(cfg).unwrap();
    let e = src.get("a/b", Some(0..10)).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_put_streams_with_bounded_memory() {
    let Some(p) = peer("big_put_streams_with_bounded_memory") else {
        return;
    };
    // 64 MiB (or VIRTRIGAUD_WEBDAV_BIG_MIB) in 1 MiB chunks; the writer holds at most
    // queue_depth chunks, so the object is never in memory. Throughput and the process's peak
    // RSS are printed, not asserted (other tests share the process).
    let mib: u64 = std::env::var("VIRTRIGAUD_WEBDAV_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let b = dav(&p);
    let key = format!("{}/big", unique("big"));
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let t = Instant::now();
    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    for _ in 0..mib {
        s.write(chunk.clone()).await.unwrap();
    }
    s.commit().await.unwrap();
    let put = t.elapsed();
    let t = Instant::now();
    let mut st = b.get(&key, None).await.unwrap();
    let mut n = 0u64;
    while let Some(c) = st.next().await {
        n += c.unwrap().len() as u64;
    }
    let get = t.elapsed();
    assert_eq!(n, mib << 20);
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "nginx WebDAV {mib} MiB: put {:.0} MiB/s, get {:.0} MiB/s, peak RSS of the test process {peak}",
        mib as f64 / put.as_secs_f64(),
        mib as f64 / get.as_secs_f64()
    );
    b.delete(&key).await.unwrap();
}

#[tokio::test]
async fn tls_is_verified_by_default_and_off_only_when_asked() {
    let Some(p) = peer("tls_is_verified_by_default_and_off_only_when_asked") else {
        return;
    };
    let Ok(https) = std::env::var("VIRTRIGAUD_HTTPS_URL") else {
        return skip("no VIRTRIGAUD_HTTPS_URL (nginx's TLS listener)");
    };
    let dir = unique("tls");
    std::fs::create_dir_all(p.http_dir.join(&dir)).unwrap();
    std::fs::write(p.http_dir.join(&dir).join("f"), b"over tls").unwrap();
    let key = format!("{dir}/f");
    // nginx's certificate is self-signed: refused by default.
    let strict = HttpSource::new(WebdavConfig::new(&https).with_retry(fast_retry())).unwrap();
    let t = Instant::now();
    let e = strict.stat(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(
        !e.is_retryable(),
        "a refused certificate is not retried: {e}"
    );
    assert!(e.to_string().contains("tls_verify"), "{e}");
    let e = HttpSource::open_url(&format!("{https}{key}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Accepted only when verification is turned off explicitly.
    let lax = HttpSource::new(
        WebdavConfig::new(&https)
            .with_tls_verify(false)
            .with_retry(fast_retry()),
    )
    .unwrap();
    assert_eq!(lax.stat(&key).await.unwrap().size, 8);
    assert_eq!(lax.get_bytes(&key, 100).await.unwrap(), &b"over tls"[..]);
    std::fs::remove_dir_all(p.http_dir.join(&dir)).unwrap();
}

#[tokio::test]
async fn busy_server_is_retried_then_storage_error() {
    if peer("busy_server_is_retried_then_storage_error").is_none() {
        return;
    }
    let (Ok(busy), Ok(log)) = (
        std::env::var("VIRTRIGAUD_HTTP_BUSY_URL"),
        std::env::var("VIRTRIGAUD_NGINX_ACCESS_LOG"),
    ) else {
        return skip("no VIRTRIGAUD_HTTP_BUSY_URL / VIRTRIGAUD_NGINX_ACCESS_LOG");
    };
    let src = HttpSource::new(WebdavConfig::new(&busy).with_retry(fast_retry())).unwrap();
    let key = unique("busy");
    let e = src.stat(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("503"), "{e}");
    // nginx writes its access log line after the response: wait for the third line (up to
    // 10 s on a busy machine), then a moment more to catch a fourth.
    let attempts = || {
        let text = std::fs::read_to_string(&log).unwrap();
        text.lines().filter(|l| l.contains(&key)).count()
    };
    let t = Instant::now();
    while attempts() < 3 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(attempts(), 3, "1 attempt + 2 retries");
}

#[tokio::test]
async fn slow_writer_outlives_the_idle_timeout() {
    let Some(p) = peer("slow_writer_outlives_the_idle_timeout") else {
        return;
    };
    // The server says nothing while a PUT body flows; a writer slower than the idle timeout
    // in total (but never silent that long) must still succeed.
    let cfg = WebdavConfig {
        idle_timeout: Duration::from_secs(2),
        ..WebdavConfig::new(&p.url)
            .with_basic_auth(&p.user, p.password.as_str())
            .with_retry(fast_retry())
    };
    let b = WebdavBackend::new(cfg).unwrap();
    let key = format!("{}/slow", unique("slow"));
    let mut s = b.put(&key, &PutOptions::default()).await.unwrap();
    for _ in 0..5 {
        s.write(Bytes::from(vec![1u8; 64 << 10])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    s.commit().await.unwrap();
    let plain = dav(&p);
    assert_eq!(plain.stat(&key).await.unwrap().size, 5 * (64 << 10));
    plain.delete(&key).await.unwrap();
}

#[tokio::test]
async fn slow_reader_outlives_the_idle_timeout() {
    let Some(p) = peer("slow_reader_outlives_the_idle_timeout") else {
        return;
    };
    // A consumer that pauses longer than the idle timeout between chunks (back-pressure
    // from a slow target) must still read the whole object.
    let cfg = WebdavConfig {
        idle_timeout: Duration::from_millis(1500),
        ..WebdavConfig::new(&p.url)
            .with_basic_auth(&p.user, p.password.as_str())
            .with_retry(fast_retry())
    };
    let b = WebdavBackend::new(cfg).unwrap();
    let plain = dav(&p); // setup and cleanup without the short timeout
    let key = format!("{}/obj", unique("slowread"));
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8).collect();
    plain
        .put_bytes(&key, Bytes::from(data.clone()))
        .await
        .unwrap();
    let mut s = b.get(&key, None).await.unwrap();
    let mut got = Vec::new();
    let mut pauses = 0;
    while let Some(c) = s.next().await {
        got.extend_from_slice(&c.unwrap());
        if pauses < 3 {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            pauses += 1;
        }
    }
    assert_eq!(got, data);
    plain.delete(&key).await.unwrap();
}

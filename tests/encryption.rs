//! Client-side encryption of a staged object (feature `encryption`, age format): what an
//! encrypted export stores is the age encryption of exactly what a plain export stores, as the
//! standard `age` binary (installed by `scripts/test.sh`) decrypts it; the manifest describes
//! the ciphertext and names the recipient, never a key; import and verify decrypt with an
//! identity, refuse a missing or wrong one (`Auth`) and a tampered or truncated object
//! (`ChecksumMismatch`) before anything becomes visible; round trips through SeaweedFS (S3) and
//! nginx (WebDAV) when their peers run.

#![cfg(feature = "encryption")]

use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use virtrigaud::crypt::{Decryption, Encryption};
use virtrigaud::digest::hex;
use virtrigaud::format::EncodeOptions;
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::storage::fs::FsBackend;
use virtrigaud::*;

fn age_available() -> bool {
    let hint = "scripts/test.sh installs it";
    virtrigaud_testkit::have_tool("age-keygen", hint) && virtrigaud_testkit::have_tool("age", hint)
}

/// A new age identity file in `dir`; returns its public key.
fn keygen(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .expect("age-keygen prints the public key")
}

/// `age -d -i identity -o out object`, which must succeed.
fn age_decrypt(identity: &Path, object: &Path, out: &Path) {
    let o = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg("-o")
        .arg(out)
        .arg(object)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

async fn export(
    image: &Path,
    store: &dyn StorageBackend,
    key: &str,
    encrypt: Option<Encryption>,
) -> ExportReport {
    export_image(
        ImageSource::RandomAccess(Arc::new(LocalFile::open(image).await.unwrap())),
        Some(DiskFormat::Raw),
        store,
        key,
        None,
        None,
        &ExportOptions {
            encode: EncodeOptions {
                encrypt,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_encrypted_export_is_the_age_encryption_of_the_plain_one() {
    if !age_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let recipient = keygen(t.path(), "id.txt");
    let _other = keygen(t.path(), "other.txt");
    // 12 MiB with data, text and holes.
    let image = t.path().join("disk.raw");
    let mut disk = vec![0u8; 12 << 20];
    disk[..1 << 20].copy_from_slice(&virtrigaud::testdata::noise(1, 1 << 20));
    disk[7 << 20..8 << 20].copy_from_slice(&virtrigaud::testdata::text(2, 1 << 20));
    std::fs::write(&image, &disk).unwrap();
    let store_dir = t.path().join("store");
    let store = FsBackend::new(&store_dir);

    let plain = export(&image, &store, "plain.qcow2", None).await;
    assert_eq!(plain.manifest.encryption, None);
    let enc = export(
        &image,
        &store,
        "enc.qcow2",
        Some(Encryption::to_recipients(&[&recipient]).unwrap()),
    )
    .await;
    let m = &enc.manifest;
    let info = m
        .encryption
        .as_ref()
        .expect("the manifest records the encryption");
    assert_eq!(info.scheme, "age");
    assert_eq!(info.recipients, vec![recipient.clone()]);
    assert_eq!(m.content_digest, plain.manifest.content_digest);
    assert_eq!(m.format, plain.manifest.format);
    // The digests and size describe the bytes stored: the ciphertext.
    let stored = std::fs::read(store_dir.join("enc.qcow2")).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(stored.len() as u64, m.stored_size);
    assert_eq!(hex(&Sha256::digest(&stored)), m.object_digest.value);
    assert!(m.stored_size > plain.manifest.stored_size);
    let manifest_text = std::fs::read_to_string(store_dir.join("enc.qcow2.manifest.json")).unwrap();
    assert!(!manifest_text.contains("AGE-SECRET-KEY"));

    // The standard age binary decrypts it to exactly the plain export.
    let out = t.path().join("decrypted.qcow2");
    age_decrypt(&t.path().join("id.txt"), &store_dir.join("enc.qcow2"), &out);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(store_dir.join("plain.qcow2")).unwrap()
    );
    // Another identity cannot.
    let o = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(t.path().join("other.txt"))
        .arg(store_dir.join("enc.qcow2"))
        .output()
        .unwrap();
    assert!(!o.status.success());

    // Import decrypts with the identity, to the same disk.
    let target = t.path().join("target");
    let dst = LocalProvider::new(&target);
    let with_id = |file: &str| ImportOptions {
        decrypt: Some(Decryption::from_identity_file(t.path().join(file)).unwrap()),
        ..Default::default()
    };
    let empty = |target: &Path| !target.exists() || walk(target).is_empty();
    let r = import_disk(&store, "enc.qcow2", &dst, "vm", "d0", &with_id("id.txt"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("vm").join(&r.location)).unwrap(),
        disk
    );
    verify_object(&store, "enc.qcow2", &with_id("id.txt"))
        .await
        .unwrap();
    // Without an identity, or with one that is not a recipient: Auth, nothing created.
    let target2 = t.path().join("target2");
    let dst2 = LocalProvider::new(&target2);
    for opts in [ImportOptions::default(), with_id("other.txt")] {
        let e = import_disk(&store, "enc.qcow2", &dst2, "vm", "d0", &opts)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(e.to_string().contains(&recipient), "{e}");
        assert!(empty(&target2), "{:?}", walk(&target2));
        let e = verify_object(&store, "enc.qcow2", &opts).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    }
    // A tampered chunk, and a truncated object: ChecksumMismatch, nothing created.
    let good = std::fs::read(store_dir.join("enc.qcow2")).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    for (what, bytes) in [
        ("tampered", bad),
        ("truncated", good[..good.len() - 100].to_vec()),
    ] {
        std::fs::write(store_dir.join("enc.qcow2"), &bytes).unwrap();
        let e = import_disk(&store, "enc.qcow2", &dst2, "vm", "d0", &with_id("id.txt"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{what}: {e}");
        assert!(empty(&target2), "{what}: {:?}", walk(&target2));
    }
    std::fs::write(store_dir.join("enc.qcow2"), &good).unwrap();
    // A recipient that is not an age public key is refused.
    let e = Encryption::to_recipients(&["ssh-ed25519 AAAA"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Encrypted round trips through the network peers: the content digest after decryption is
/// the source's.
#[cfg(all(feature = "s3", feature = "http"))]
#[tokio::test]
async fn encrypted_round_trips_through_s3_and_webdav() {
    if !age_available() {
        return;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(endpoint), Some(dav)) = (
        virtrigaud_testkit::peer_env("VIRTRIGAUD_S3_ENDPOINT", "seaweedfs.sh"),
        virtrigaud_testkit::peer_env("VIRTRIGAUD_WEBDAV_URL", "nginx.sh"),
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let recipient = keygen(t.path(), "id.txt");
    let image = t.path().join("disk.raw");
    let mut disk = vec![0u8; 24 << 20];
    disk[3 << 20..5 << 20].copy_from_slice(&virtrigaud::testdata::noise(9, 2 << 20));
    disk[20 << 20..21 << 20].copy_from_slice(&virtrigaud::testdata::text(4, 1 << 20));
    std::fs::write(&image, &disk).unwrap();
    let s3 = virtrigaud::storage::s3::S3Backend::new(
        virtrigaud::storage::s3::S3Config::new("virtrigaud-enc")
            .with_endpoint(endpoint)
            .with_region(env("VIRTRIGAUD_S3_REGION").unwrap_or_else(|| "us-east-1".into()))
            .with_credentials(
                env("VIRTRIGAUD_S3_ACCESS_KEY").unwrap_or_default(),
                env("VIRTRIGAUD_S3_SECRET_KEY").unwrap_or_default(),
            ),
    )
    .unwrap();
    let _ = s3.create_bucket().await;
    let webdav = virtrigaud::storage::webdav::WebdavBackend::from_url(&dav).unwrap();
    let stores: [(&str, &dyn StorageBackend); 2] = [("s3", &s3), ("webdav", &webdav)];
    for (name, store) in stores {
        let key = format!("enc-{}/d.qcow2", std::process::id());
        let enc = Encryption::to_recipients(&[&recipient]).unwrap();
        let exp = export(&image, store, &key, Some(enc)).await;
        let target = t.path().join(name);
        let r = import_disk(
            store,
            &key,
            &LocalProvider::new(&target),
            "vm",
            "d0",
            &ImportOptions {
                decrypt: Some(Decryption::from_identity_file(t.path().join("id.txt")).unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            r.manifest.content_digest, exp.manifest.content_digest,
            "{name}"
        );
        assert_eq!(
            std::fs::read(target.join("vm").join(&r.location)).unwrap(),
            disk,
            "{name}"
        );
        store
            .delete(&virtrigaud::manifest::manifest_key(&key))
            .await
            .unwrap();
        store.delete(&key).await.unwrap();
    }
}

/// An encrypted object is read by range: `open_staged` decrypts only the chunks a read covers,
/// every range equals the same range of what the `age` binary decrypts, the qcow2 decoder
/// seeks through it to the original disk, and a tampered chunk fails the reads that cover it
/// (only those) with `ChecksumMismatch`.
#[tokio::test]
async fn an_encrypted_object_is_read_by_range() {
    use virtrigaud::extent::Extent;
    if !age_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let recipient = keygen(t.path(), "id.txt");
    let image = t.path().join("disk.raw");
    let mut disk = vec![0u8; 10 << 20];
    disk[1 << 20..3 << 20].copy_from_slice(&virtrigaud::testdata::noise(3, 2 << 20));
    disk[9 << 20..(9 << 20) + 4321].copy_from_slice(&virtrigaud::testdata::text(4, 4321));
    std::fs::write(&image, &disk).unwrap();
    let store_dir = t.path().join("store");
    let store: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(&store_dir));
    let enc = Encryption::to_recipients(&[&recipient]).unwrap();
    let m = export(&image, &*store, "enc.qcow2", Some(enc))
        .await
        .manifest;
    let out = t.path().join("plain.qcow2");
    age_decrypt(&t.path().join("id.txt"), &store_dir.join("enc.qcow2"), &out);
    let plain = std::fs::read(&out).unwrap();
    let id = Decryption::from_identity_file(t.path().join("id.txt")).unwrap();

    // Without an identity: Auth naming the recipient.
    let e = open_staged(store.clone(), "enc.qcow2", None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(e.to_string().contains(&recipient), "{e}");

    let (got, src) = open_staged(store.clone(), "enc.qcow2", Some(&id))
        .await
        .unwrap();
    assert_eq!(got.content_digest, m.content_digest);
    let ImageSource::RandomAccess(r) = src else {
        panic!("an encrypted object opens for random access")
    };
    assert_eq!(r.size(), plain.len() as u64);
    let k = 64u64 << 10;
    let n = plain.len() as u64;
    for (off, len) in [
        (0, 1),
        (0, 100),
        (k - 1, 2),
        (k, k as usize),
        (3 * k + 5, 5 * k as usize + 7),
        (n - 1, 1),
        (n - 10, 100),
        (n / 2, 1 << 20),
    ] {
        let b = r.read_at(off, len).await.unwrap();
        let end = (off + len as u64).min(n) as usize;
        assert_eq!(&b[..], &plain[off as usize..end], "read of {len} at {off}");
    }
    assert!(r.read_at(n, 10).await.unwrap().is_empty());

    // The qcow2 decoder seeks through the decrypting reader to the original disk.
    let (_, content) = virtrigaud::format::decode(
        ImageSource::RandomAccess(r.clone()),
        Some(DiskFormat::Qcow2),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(content.virtual_size, disk.len() as u64);
    let mut extents = content.extents;
    let mut seen = vec![0u8; disk.len()];
    let mut covered = 0u64;
    while let Some(e) = futures::StreamExt::next(&mut extents).await {
        let e = e.unwrap();
        covered += e.len();
        if let Extent::Data { offset, bytes } = e {
            seen[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        }
    }
    assert_eq!(covered, disk.len() as u64);
    assert!(seen == disk, "the decoded disk differs from the original");

    // A tampered chunk: reads that cover it fail, the others still work.
    let mut stored = std::fs::read(store_dir.join("enc.qcow2")).unwrap();
    let header = stored.len() as u64 - (n + n.div_ceil(k) * 16);
    let chunk = 5u64;
    stored[(header + chunk * (k + 16) + 77) as usize] ^= 1;
    std::fs::write(store_dir.join("enc.qcow2"), &stored).unwrap();
    let (_, src) = open_staged(store.clone(), "enc.qcow2", Some(&id))
        .await
        .unwrap();
    let ImageSource::RandomAccess(r) = src else {
        panic!()
    };
    let e = r.read_at(chunk * k + 10, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert!(e.to_string().contains("chunk 5"), "{e}");
    assert_eq!(
        &r.read_at(0, 100).await.unwrap()[..],
        &plain[..100],
        "an intact chunk still reads"
    );
    // A truncated object: open_staged sees it differ from its manifest; read by a
    // DecryptingReader of its own, its new last chunk does not authenticate as the last.
    stored[(header + chunk * (k + 16) + 77) as usize] ^= 1;
    stored.truncate(stored.len() - 100);
    std::fs::write(store_dir.join("enc.qcow2"), &stored).unwrap();
    let e = open_staged(store.clone(), "enc.qcow2", Some(&id))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let file = Arc::new(LocalFile::open(&store_dir.join("enc.qcow2")).await.unwrap());
    let info = m.encryption.clone().unwrap();
    let r = virtrigaud::crypt::DecryptingReader::open(file, &id, &info)
        .await
        .unwrap();
    assert_eq!(&r.read_at(0, 100).await.unwrap()[..], &plain[..100]);
    let e = r.read_at(r.size() - 10, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
}

//! Client-side encryption of a staged object (feature `encryption`, age format): what an
//! encrypted export stores is the age encryption of exactly what a plain export stores, as the
//! standard `age` binary (installed by `scripts/test.sh`) decrypts it; the manifest describes
//! the ciphertext and names the recipient, never a key; import and verify of an encrypted
//! object are refused clearly before anything is created (decryption is not implemented yet).

#![cfg(feature = "encryption")]

use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use virtrigaud::crypt::Encryption;
use virtrigaud::digest::hex;
use virtrigaud::format::EncodeOptions;
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::storage::fs::FsBackend;
use virtrigaud::*;

fn age_available() -> bool {
    let ok = Command::new("age-keygen").arg("--version").output().is_ok()
        && Command::new("age").arg("--version").output().is_ok();
    if !ok {
        if std::env::var("VIRTRIGAUD_IT").as_deref() == Ok("1") {
            panic!("the age binary is missing but VIRTRIGAUD_IT=1: scripts/test.sh installs it");
        }
        eprintln!("SKIP: the age binary is not installed");
    }
    ok
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

async fn export(
    image: &Path,
    store: &FsBackend,
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
    let o = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(t.path().join("id.txt"))
        .arg("-o")
        .arg(&out)
        .arg(store_dir.join("enc.qcow2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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

    // Import and verify refuse it before anything is created, naming the recipient.
    let target = t.path().join("target");
    let dst = LocalProvider::new(&target);
    let e = import_disk(
        &store,
        "enc.qcow2",
        &dst,
        "vm",
        "d0",
        &ImportOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains(&recipient), "{e}");
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none());
    let e = verify_object(&store, "enc.qcow2", &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // A recipient that is not an age public key is refused.
    let e = Encryption::to_recipients(&["ssh-ed25519 AAAA"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

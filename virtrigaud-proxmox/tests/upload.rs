//! The streamed multipart upload (`POST /nodes/{node}/storage/{storage}/upload`,
//! `content=import`) proven byte for byte by an independent parser.
//!
//! **No real Proxmox VE is obtainable**, and fakepve refuses `content=import` uploads. So each
//! test starts `tests/multipart_server.py`: Python's standard `email` multipart parser (not our
//! code) behind a tiny HTTP server that answers the few PVE calls an upload makes. It records
//! the field order, the `checksum` fields, the `Content-Length` (and refuses chunked bodies, as
//! PVE's proxy does), and stores the file part, which the tests compare with the staged object.
//! What it cannot prove: that PVE itself accepts the body and imports the image.

mod common;

use common::unique;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use virtrigaud_core::io::LocalFile;
use virtrigaud_core::transfer::{ExportOptions, ImportOptions, export_image, import_disk};
use virtrigaud_core::{DiskCreateSpec, DiskFormat, ErrorKind, ImageSource, Provider, Secret};
use virtrigaud_proxmox::{Auth, ProxmoxConfig, ProxmoxProvider};
use virtrigaud_storage::FsBackend;

/// The parser server, killed by PID on drop.
struct Parser {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Parser {
    fn start() -> Option<Parser> {
        if !virtrigaud_testkit::have_tool("python3", "the system's python3") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/multipart_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        Some(Parser { child, port, dir })
    }

    fn provider(&self) -> ProxmoxProvider {
        let auth = Auth::Token {
            id: "root@pam!virtrigaud".into(),
            secret: Secret::new("not-checked-by-the-parser"),
        };
        let mut c = ProxmoxConfig::new(&format!("http://127.0.0.1:{}", self.port), auth).unwrap();
        c.allow_http = true; // the test server on loopback
        c.task_poll = std::time::Duration::from_millis(20);
        ProxmoxProvider::new(c).unwrap()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn report(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.file(&format!("{name}.json"))).unwrap()).unwrap()
    }
}

impl Drop for Parser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 with data and holes, staged (with its manifest) as `key` in a local directory.
async fn stage(
    dir: &Path,
    key: &str,
    format: DiskFormat,
) -> (FsBackend, virtrigaud_core::Manifest, PathBuf) {
    let img = dir.join("src.qcow2");
    let i = img.to_str().unwrap();
    common::run("qemu-img", &["create", "-q", "-f", "qcow2", i, "64M"]);
    common::run(
        "qemu-io",
        &["-c", "write -P 0xab 0 3M", "-c", "write -P 0x17 40M 5M", i],
    );
    // A run of bytes that looks like a multipart boundary inside the data.
    let raw = dir.join("boundary.bin");
    std::fs::write(&raw, b"\r\n--------virtrigaud-\r\n\r\n--").unwrap();
    common::run(
        "qemu-io",
        &["-c", &format!("write -s {} 10M 512", raw.display()), i],
    );
    let fs = FsBackend::new(dir.join("stage"));
    let src = LocalFile::open(&img).await.unwrap();
    let opts = ExportOptions {
        format,
        ..ExportOptions::default()
    };
    let r = export_image(
        ImageSource::RandomAccess(Arc::new(src)),
        None,
        &fs,
        key,
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    (fs, r.manifest, img)
}

fn spec(vm: &str, capacity: u64) -> DiskCreateSpec {
    DiskCreateSpec {
        vm: vm.into(),
        name: "disk0".into(),
        capacity,
        format: None,
        placement: None,
        overwrite: false,
    }
}

#[tokio::test]
async fn staged_object_is_uploaded_as_it_is_with_its_checksum() {
    let Some(parser) = Parser::start() else {
        return;
    };
    let p = parser.provider();
    let dir = tempfile::tempdir().unwrap();
    let (fs, manifest, _) = stage(dir.path(), "vm/d0.qcow2", DiskFormat::Qcow2).await;
    let vm = unique("up");
    let s = spec(&vm, manifest.virtual_size);
    let location = p.upload_object(&fs, "vm/d0.qcow2", &s).await.unwrap();
    let name = format!("vrg-{vm}-disk0.qcow2");
    assert_eq!(
        location,
        format!("local-lvm:0,import-from=local:import/{name}")
    );
    let r = parser.report(&name);
    assert_eq!(
        r["fields"],
        serde_json::json!(["content", "checksum-algorithm", "checksum", "filename"]),
        "field order: {r}"
    );
    assert_eq!(r["values"]["content"], "import");
    assert_eq!(r["values"]["checksum-algorithm"], "sha256");
    assert_eq!(
        r["values"]["checksum"],
        manifest.object_digest.value.as_str()
    );
    assert_eq!(r["checksum_ok"], true);
    assert_eq!(r["chunked"], false);
    assert_eq!(r["content_length"], r["body_len"]);
    assert_eq!(r["file_size"].as_u64(), Some(manifest.stored_size));
    let stored = std::fs::read(dir.path().join("stage/vm/d0.qcow2")).unwrap();
    assert!(
        std::fs::read(parser.file(&name)).unwrap() == stored,
        "file part differs from the staged object"
    );

    // Found again after a "crash", never overwritten unless asked, and deleted on request.
    assert_eq!(
        p.find_disk(&s).await.unwrap().as_deref(),
        Some(location.as_str())
    );
    let e = p.upload_object(&fs, "vm/d0.qcow2", &s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    p.upload_object(
        &fs,
        "vm/d0.qcow2",
        &DiskCreateSpec {
            overwrite: true,
            ..s.clone()
        },
    )
    .await
    .unwrap();
    p.delete_disk(&vm, &location).await.unwrap();
    assert!(!parser.file(&name).exists());
    assert_eq!(p.find_disk(&s).await.unwrap(), None);
    p.delete_disk(&vm, &location).await.unwrap(); // already gone: not an error
}

#[tokio::test]
async fn stream_optimized_vmdk_is_uploaded_too() {
    let Some(parser) = Parser::start() else {
        return;
    };
    let p = parser.provider();
    let dir = tempfile::tempdir().unwrap();
    let fmt = DiskFormat::Vmdk(virtrigaud_core::format::VmdkSubformat::StreamOptimized);
    let (fs, manifest, _) = stage(dir.path(), "d.vmdk", fmt).await;
    let vm = unique("vmdk");
    p.upload_object(&fs, "d.vmdk", &spec(&vm, manifest.virtual_size))
        .await
        .unwrap();
    let name = format!("vrg-{vm}-disk0.vmdk");
    assert_eq!(
        std::fs::read(parser.file(&name)).unwrap(),
        std::fs::read(dir.path().join("stage/d.vmdk")).unwrap()
    );
    assert_eq!(parser.report(&name)["checksum_ok"], true);
}

#[tokio::test]
async fn create_disk_streams_the_raw_disk_through_import_disk() {
    let Some(parser) = Parser::start() else {
        return;
    };
    let p = parser.provider();
    let dir = tempfile::tempdir().unwrap();
    let (fs, manifest, img) = stage(dir.path(), "d0.qcow2", DiskFormat::Qcow2).await;
    let vm = unique("raw");
    let r = import_disk(&fs, "d0.qcow2", &p, &vm, "disk0", &ImportOptions::default())
        .await
        .unwrap();
    let name = format!("vrg-{vm}-disk0.raw");
    assert_eq!(r.format, DiskFormat::Raw);
    assert_eq!(
        r.location,
        format!("local-lvm:0,import-from=local:import/{name}")
    );
    let rep = parser.report(&name);
    assert_eq!(
        rep["fields"],
        serde_json::json!(["content", "filename"]),
        "{rep}"
    );
    assert_eq!(rep["chunked"], false);
    assert_eq!(rep["file_size"].as_u64(), Some(manifest.virtual_size));
    // The staged raw file is the guest-visible content of the source image.
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(parser.file(&name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let e = import_disk(&fs, "d0.qcow2", &p, &vm, "disk0", &ImportOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
}

#[tokio::test]
async fn aborted_or_short_disk_leaves_nothing_staged() {
    let Some(parser) = Parser::start() else {
        return;
    };
    let p = parser.provider();
    let vm = unique("abort");
    let c = p.create_disk(&spec(&vm, 4 << 20)).await.unwrap();
    let mut sink = c.sink;
    sink.write(bytes::Bytes::from(vec![1u8; 1 << 20]))
        .await
        .unwrap();
    sink.abort().await.unwrap();
    let c = p.create_disk(&spec(&vm, 4 << 20)).await.unwrap();
    let mut sink = c.sink;
    sink.write(bytes::Bytes::from(vec![1u8; 1 << 20]))
        .await
        .unwrap();
    let e = sink.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let c = p.create_disk(&spec(&vm, 4 << 20)).await.unwrap();
    drop(c); // dropped without commit
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let left: Vec<_> = std::fs::read_dir(parser.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing may be staged: {left:?}");
}

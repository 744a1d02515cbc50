//! Migrations across providers with the `Migration` runner: Proxmox (fakepve API + real sshd
//! with the `pvesm` stand-in) → libvirt (a real libvirtd, scripts/peers/libvirt.sh), ending in a
//! domain that boots the migrated boot-sector disk under TCG.
//!
//! **No real Proxmox VE is obtainable.** The source VM's config comes from fakepve; its disk
//! bytes come over real SSH from a qemu-img image that the `pvesm` stand-in exports in PVE's
//! `raw+size` format. What this cannot prove: the real `pvesm export` on a real LVM volume.

mod common;

use common::{pve, sshd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud_core::{Migration, MigrationPlan, PowerOp, Provider, StorageBackend};
use virtrigaud_libvirt::LibvirtProvider;
use virtrigaud_proxmox::ProxmoxProvider;
use virtrigaud_storage::FsBackend;
use virtrigaud_testkit::libvirt::{virsh, virsh_quiet};
use virtrigaud_testkit::unique;
use virtrigaud_testkit::{BOOT_MARKER, boot_sector};

const MIB: u64 = 1 << 20;

/// Removes the test's libvirt domain and pool, fakepve VM and image file, even on panic.
struct Guard {
    uri: String,
    domain: String,
    pool: String,
    image: std::path::PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for args in [
            vec!["destroy", &self.domain],
            vec!["undefine", &self.domain, "--nvram"],
            vec!["undefine", &self.domain],
            vec!["pool-destroy", &self.pool],
        ] {
            virsh_quiet(&self.uri, &args);
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// `xml` without its `<tag …>…</tag>` elements (the runner's domain has a pty serial console).
fn without_elements(xml: &str, tag: &str) -> String {
    let mut out = xml.to_string();
    while let Some(a) = out.find(&format!("<{tag} ")) {
        let end = format!("</{tag}>");
        let Some(b) = out[a..].find(&end) else { break };
        out.replace_range(a..a + b + end.len(), "");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxmox_to_libvirt_boots_under_tcg() {
    let (Some(pve), Some(sshd)) = (pve(), sshd()) else {
        return;
    };
    let Some(uri) = common::env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let source = ProxmoxProvider::new(pve.config().with_ssh(sshd.config())).unwrap();

    // The source: a fakepve VM with a 64 MiB disk on local-lvm whose bytes (a boot sector) the
    // pvesm stand-in serves over SSH.
    let name = unique("p2l");
    let mut tries = 0;
    let vmid = loop {
        let vmid = source.client().next_id().await.unwrap();
        let form = [
            ("vmid", vmid.to_string()),
            ("name", name.clone()),
            ("cores", "1".to_string()),
            ("memory", "128".to_string()),
            ("ostype", "other".to_string()),
            ("scsi0", "local-lvm:1".to_string()),
        ];
        match source.client().vm_create(&pve.node, &form).await {
            Ok(upid) => {
                source.client().wait_task(&upid).await.unwrap();
                break vmid;
            }
            Err(e) if e.kind() == virtrigaud_core::ErrorKind::AlreadyExists && tries < 10 => {
                tries += 1
            }
            Err(e) => panic!("{e}"),
        }
    };
    let conf = source.client().vm_config(&pve.node, vmid).await.unwrap();
    let volid = conf["scsi0"]
        .as_str()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let image = sshd
        .images
        .join("local-lvm")
        .join(volid.split_once(':').unwrap().1);
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    f.write_all_at(&[0x5a; 4096], 40 * MIB).unwrap();
    drop(f);

    // The target: a transient dir pool on libvirtd, domains under TCG.
    let pool_dir = tempfile::tempdir().unwrap();
    let domain = unique("p2l-dst");
    let pool = unique("p2l-pool");
    let _guard = Guard {
        uri: uri.clone(),
        domain: domain.clone(),
        pool: pool.clone(),
        image,
    };
    virsh(
        &uri,
        &[
            "pool-create-as",
            &pool,
            "dir",
            "--target",
            pool_dir.path().to_str().unwrap(),
        ],
    );
    let target = Arc::new(LibvirtProvider::new(&uri).with_domain_type("qemu"));

    let store = tempfile::tempdir().unwrap();
    let storage: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(store.path()));
    let plan = MigrationPlan::new(&name, "migrations/p2l")
        .with_target_name(&domain)
        .with_placement(&pool);
    let report = Migration::new(Arc::new(source.clone()), target.clone(), storage, plan)
        .run()
        .await
        .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (1, 1));
    assert!(
        report.state.disks.iter().all(|d| d.verified),
        "target re-read and verified"
    );
    let described = target.describe_vm(&domain).await.unwrap();
    assert_eq!((described.cpus, described.memory_mib), (1, 128));
    assert_eq!(described.disks.len(), 1);
    assert_eq!(described.disks[0].capacity, 64 * MIB);
    assert!(described.has_marker(&report.state.marker()));

    // Boot it: a serial log added to the runner's domain, then the marker on COM1.
    let serial = pool_dir.path().join("serial.log");
    let xml = virsh(&uri, &["dumpxml", "--inactive", &domain]);
    let xml = without_elements(&without_elements(&xml, "serial"), "console");
    let xml = xml.replacen(
        "</devices>",
        &format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial></devices>",
            serial.display()
        ),
        1,
    );
    let xml_file = pool_dir.path().join("domain.xml");
    std::fs::write(&xml_file, xml).unwrap();
    virsh(&uri, &["define", xml_file.to_str().unwrap()]);
    target.power(&domain, PowerOp::On).await.unwrap();
    let t = Instant::now();
    loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(BOOT_MARKER) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no boot marker: {:?}",
            String::from_utf8_lossy(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("migrated domain booted after {:?}", t.elapsed());
    let _ = source.delete_vm(&vmid.to_string()).await;
}

/// How the staged object reaches the (fake) PVE node.
enum Via {
    /// A file store: the object is uploaded as it is stored (multipart, parsed independently).
    Upload,
    /// SeaweedFS S3: PVE pulls it from a presigned GET (`download-url`; the proxy fetches the URL
    /// as PVE would, with no credentials, since fakepve fetches nothing).
    Pull,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_to_proxmox_creates_the_matching_vm() {
    libvirt_to_proxmox(Via::Upload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_to_proxmox_through_s3_lets_pve_pull_the_staged_object() {
    libvirt_to_proxmox(Via::Pull).await;
}

fn seaweedfs(prefix: &str) -> Option<virtrigaud_storage::s3::S3Backend> {
    use virtrigaud_storage::s3::{S3Backend, S3Config};
    let endpoint = common::env("VIRTRIGAUD_S3_ENDPOINT", "seaweedfs.sh")?;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let cfg = S3Config::new("virtrigaud-test")
        .with_endpoint(endpoint)
        .with_prefix(prefix)
        .with_region("us-east-1")
        .with_credentials(
            env("VIRTRIGAUD_S3_ACCESS_KEY"),
            env("VIRTRIGAUD_S3_SECRET_KEY"),
        );
    Some(S3Backend::new(cfg).unwrap())
}

/// A libvirt source domain `<prefix>-src-…` in a transient pool `<prefix>-pool-…` (both
/// removed by the guard, the directory after them): one raw virtio disk of `size` bytes holding
/// the boot sector and the `fill` pieces at their offsets, the `hardware` elements (memory,
/// vcpu) and the `devices` after the disk. Returns the pool directory, the guard and the
/// domain's name.
fn libvirt_source(
    uri: &str,
    prefix: &str,
    size: u64,
    fill: &[(u64, &[u8])],
    hardware: &str,
    devices: &str,
) -> (tempfile::TempDir, Guard, String) {
    let pool_dir = tempfile::tempdir().unwrap();
    let pool = unique(&format!("{prefix}-pool"));
    let domain = unique(&format!("{prefix}-src"));
    let guard = Guard {
        uri: uri.to_string(),
        domain: domain.clone(),
        pool: pool.clone(),
        image: pool_dir.path().join("none"),
    };
    let disk = pool_dir.path().join("d0.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    for (at, bytes) in fill {
        f.write_all_at(bytes, *at).unwrap();
    }
    drop(f);
    virsh(
        uri,
        &[
            "pool-create-as",
            &pool,
            "dir",
            "--target",
            pool_dir.path().to_str().unwrap(),
        ],
    );
    let xml = format!(
        "<domain type='qemu'><name>{domain}</name>{hardware}\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/></disk>{devices}</devices></domain>",
        disk.display()
    );
    let xml_file = pool_dir.path().join("src.xml");
    std::fs::write(&xml_file, xml).unwrap();
    virsh(uri, &["define", xml_file.to_str().unwrap()]);
    virsh(uri, &["pool-refresh", &pool]);
    (pool_dir, guard, domain)
}

/// The tests that run the proxy on the shared import directory (where task-overrides.json
/// would reach them all) take turns.
static IMPORT_DIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn libvirt_to_proxmox(via: Via) {
    let _turn = IMPORT_DIR.lock().await;
    let (Some(pve), Some(sshd)) = (pve(), sshd()) else {
        return;
    };
    let Some(uri) = common::env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };

    // The source: a libvirt domain with one raw disk in a transient pool and one NIC.
    let import_dir = sshd.images.join("images/import");
    std::fs::create_dir_all(&import_dir).unwrap();
    let (_pool_dir, _guard, domain) = libvirt_source(
        &uri,
        "l2p",
        32 * MIB,
        &[(20 * MIB, &[0xc3; 65536][..])],
        "<memory unit='MiB'>256</memory><vcpu>2</vcpu>",
        "<interface type='bridge'><mac address='52:54:00:12:34:56'/><source bridge='br-src'/>\
         <model type='virtio'/></interface>",
    );
    let source = Arc::new(LibvirtProvider::new(&uri));
    let src_info = source.describe_vm(&domain).await.unwrap();

    // The target: Proxmox through the proxy (API: fakepve; upload: the parser) and SSH.
    let proxy = common::start_proxy(&import_dir, &pve.url);
    let mut cfg = virtrigaud_proxmox::ProxmoxConfig::new(
        &format!("http://127.0.0.1:{}", proxy.port),
        pve.token(),
    )
    .unwrap()
    .with_ssh(sshd.config());
    cfg.node = Some(pve.node.clone());
    cfg.task_poll = Duration::from_millis(50);
    cfg.allow_http = true; // the test proxy on loopback
    let target = ProxmoxProvider::new(cfg).unwrap();
    let name = unique("l2p-dst");

    let store = tempfile::tempdir().unwrap();
    let storage: Arc<dyn StorageBackend> = match via {
        Via::Upload => Arc::new(FsBackend::new(store.path())),
        Via::Pull => {
            let Some(s3) = seaweedfs(&unique("l2p-pull")) else {
                return;
            };
            s3.create_bucket().await.unwrap();
            Arc::new(s3)
        }
    };
    let plan = MigrationPlan::new(&domain, "migrations/l2p")
        .with_target_name(&name)
        // libvirt names a bridge NIC's network `bridge:NAME`.
        .with_network("bridge:br-src", "vmbr1.30");
    let report = Migration::new(source, Arc::new(target.clone()), storage.clone(), plan)
        .run()
        .await
        .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (1, 1));
    assert!(
        report.state.disks.iter().all(|d| d.verified),
        "staged disk re-read over SSH/SFTP and verified"
    );

    // The VM PVE holds: the source's hardware, the import-from drive, the mapped NIC, the marker.
    let info = target.describe_vm(&name).await.unwrap();
    let vmid: u32 = info.id.parse().unwrap();
    let conf = target.client().vm_config(&pve.node, vmid).await.unwrap();
    assert_eq!((info.cpus, info.memory_mib), (2, 256));
    assert_eq!(
        conf["machine"].as_str(),
        src_info.machine.as_deref(),
        "{conf:?}"
    );
    let drive = conf["virtio0"].as_str().unwrap();
    assert!(drive.starts_with("local-lvm:vm-"), "{drive}");
    // The disk's size is the source's. fakepve records `size=0` for an import-from drive (it
    // allocates an empty volume), so the size is read where the import really landed: the
    // volume the node serves (the proxy imported the staged file into it with qemu-img), as
    // `pvesm export` announces it over SSH. The ostype is what the documented map gives for
    // the source's guest (libvirt names none here: `other`).
    assert_eq!(info.disks.len(), 1);
    let opened = target.open_disk(&name, "virtio0", None).await.unwrap();
    assert_eq!(opened.info.capacity, 32 * MIB, "{drive}");
    assert!(
        matches!(opened.source, virtrigaud_core::ImageSource::Sequential { size: Some(s), .. } if s == 32 * MIB)
    );
    drop(opened);
    assert_eq!(
        conf["ostype"].as_str(),
        Some(virtrigaud_proxmox::provider::ostype_for(
            src_info.guest_os.as_deref()
        )),
        "{conf:?}"
    );
    assert_eq!(conf["ostype"].as_str(), Some("other"), "{conf:?}");
    assert_eq!(info.nics.len(), 1);
    assert_eq!(info.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(info.nics[0].network.as_deref(), Some("vmbr1.30"));
    assert!(
        conf["net0"]
            .as_str()
            .unwrap()
            .contains("bridge=vmbr1,tag=30"),
        "{conf:?}"
    );
    assert!(
        info.has_marker(&report.state.marker()),
        "{:?}",
        info.annotation
    );
    // The staged import file was parsed by the independent parser, verified, then deleted.
    let left: Vec<_> = std::fs::read_dir(&import_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&name) || n.contains(&domain))
        .collect();
    assert!(
        left.iter().all(|n| n.ends_with(".json")),
        "staged file left: {left:?}"
    );
    let rep: serde_json::Value = serde_json::from_slice(
        &std::fs::read(import_dir.join(left.iter().find(|n| n.ends_with(".json")).unwrap()))
            .unwrap(),
    )
    .unwrap();
    // The disk went to PVE as it was staged (a libvirt stream is staged as streamOptimized
    // VMDK, not as a raw stream of the whole capacity), with the manifest's SHA-256 that PVE
    // checks.
    let key = &report.state.disks[0].key;
    let manifest = virtrigaud_core::transfer::read_manifest(storage.as_ref(), key)
        .await
        .unwrap();
    let ext = match manifest.format {
        virtrigaud_core::DiskFormat::Qcow2 => "qcow2",
        virtrigaud_core::DiskFormat::Vmdk(_) => "vmdk",
        f => panic!("staged as {f:?}"),
    };
    let json_name = left.iter().find(|n| n.ends_with(".json")).unwrap();
    assert!(json_name.ends_with(&format!(".{ext}.json")), "{json_name}");
    assert_eq!(rep["file_size"].as_u64(), Some(manifest.stored_size));
    assert!(manifest.stored_size < 32 * MIB, "{}", manifest.stored_size);
    assert_eq!(
        rep["sha256"].as_str(),
        Some(manifest.object_digest.value.as_str())
    );
    assert_eq!(rep["checksum_ok"], true, "{rep}");
    match via {
        Via::Upload => {
            assert_eq!(rep["chunked"], false);
            assert!(rep.get("pulled").is_none(), "{rep}");
        }
        Via::Pull => {
            // Fetched by "PVE" from a presigned GET: no byte passed through the migration.
            assert_eq!(rep["pulled"], true, "{rep}");
            assert_eq!(rep["url_signed"], true, "{rep}");
        }
    }
    for n in &left {
        let _ = std::fs::remove_file(import_dir.join(n));
    }
    target.delete_vm(&info.id).await.unwrap();
}

/// Our staged import files (not the proxy's `.json` reports) for target VM `name`.
fn staged_files(import_dir: &std::path::Path, name: &str) -> Vec<String> {
    std::fs::read_dir(import_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(name) && !n.ends_with(".json"))
        .collect()
}

/// A migration that stops inside `create_vm` (after PVE made the VM, before the staged import
/// files were deleted and the checkpoint recorded it) and is run again: the rerun adopts its
/// VM and removes the staged files; a VM of the same name that the migration did not create
/// is a `Conflict` and left alone. The stop: `tests/multipart_server.py` in front of fakepve
/// shows the real, finished `qmcreate` task as running (task-overrides.json), so `create_vm`
/// fails with `Timeout` after 1 s, as a process killed there would leave it; everything else
/// (the VM create, its config and marker, the deletes) is fakepve's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_inside_create_vm_then_rerun_adopts_and_leaves_no_staged_file() {
    let _turn = IMPORT_DIR.lock().await;
    let (Some(pve), Some(sshd)) = (pve(), sshd()) else {
        return;
    };
    let Some(uri) = common::env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let import_dir = sshd.images.join("images/import");
    std::fs::create_dir_all(&import_dir).unwrap();
    let (_pool_dir, _guard, domain) = libvirt_source(
        &uri,
        "crash",
        16 * MIB,
        &[],
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>",
        "",
    );
    let source: Arc<dyn Provider> = Arc::new(LibvirtProvider::new(&uri));

    let proxy = common::start_proxy(&import_dir, &pve.url);
    let overrides = import_dir.join("task-overrides.json");
    let mut cfg = virtrigaud_proxmox::ProxmoxConfig::new(
        &format!("http://127.0.0.1:{}", proxy.port),
        pve.token(),
    )
    .unwrap()
    .with_ssh(sshd.config());
    cfg.node = Some(pve.node.clone());
    cfg.task_poll = Duration::from_millis(50);
    cfg.task_timeout = Duration::from_secs(1);
    cfg.allow_http = true; // the test proxy on loopback
    let target = Arc::new(ProxmoxProvider::new(cfg).unwrap());
    let direct = pve.provider(); // fakepve without the proxy
    let store = tempfile::tempdir().unwrap();
    let storage: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(store.path()));
    let migration = |prefix: &str, name: &str| {
        Migration::new(
            source.clone(),
            target.clone(),
            storage.clone(),
            MigrationPlan::new(&domain, prefix).with_target_name(name),
        )
    };
    let stop_inside_create_vm = |m: Migration| {
        let overrides = overrides.clone();
        async move {
            std::fs::write(&overrides, r#"{"qmcreate": {"running": true}}"#).unwrap();
            let e = m.run().await.unwrap_err();
            std::fs::remove_file(&overrides).unwrap();
            assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Timeout, "{e}");
        }
    };

    // 1. Stopped inside create_vm: the VM exists with the marker, the staged file is left.
    let name = unique("crash-dst");
    stop_inside_create_vm(migration("migrations/crash1", &name)).await;
    let made = direct.describe_vm(&name).await.unwrap();
    let marker = migration("migrations/crash1", &name)
        .load_state()
        .await
        .unwrap()
        .unwrap()
        .marker();
    assert!(made.has_marker(&marker), "{:?}", made.annotation);
    assert_eq!(staged_files(&import_dir, &name).len(), 1);
    // The rerun adopts that VM (same vmid, nothing exported or imported again) and removes
    // the staged file its create_vm did not get to.
    let r = migration("migrations/crash1", &name).run().await.unwrap();
    assert_eq!((r.exported_now, r.imported_now), (0, 0));
    assert_eq!(
        direct.describe_vm(&name).await.unwrap().id,
        made.id,
        "adopted"
    );
    assert_eq!(staged_files(&import_dir, &name), Vec::<String>::new());

    // 2. Stopped the same way, then the VM is replaced by an unrelated one of the same name.
    let name2 = unique("crash-dst2");
    stop_inside_create_vm(migration("migrations/crash2", &name2)).await;
    direct.delete_vm(&name2).await.unwrap();
    let vmid = direct.client().next_id().await.unwrap();
    let upid = direct
        .client()
        .vm_create(
            &pve.node,
            &[
                ("vmid", vmid.to_string()),
                ("name", name2.clone()),
                ("description", "not a migration's".to_string()),
            ],
        )
        .await
        .unwrap();
    direct.client().wait_task(&upid).await.unwrap();
    let before = direct.client().vm_config(&pve.node, vmid).await.unwrap();
    let e = migration("migrations/crash2", &name2)
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Conflict, "{e}");
    assert_eq!(
        direct.client().vm_config(&pve.node, vmid).await.unwrap(),
        before,
        "the unrelated VM is untouched"
    );
    assert_eq!(
        staged_files(&import_dir, &name2).len(),
        1,
        "kept for the rerun"
    );
    // Once it is gone, the rerun creates the VM and removes the staged file.
    direct.delete_vm(&vmid.to_string()).await.unwrap();
    migration("migrations/crash2", &name2).run().await.unwrap();
    assert_eq!(staged_files(&import_dir, &name2), Vec::<String>::new());

    for n in [&name, &name2] {
        direct.delete_vm(n).await.unwrap();
        for f in std::fs::read_dir(&import_dir).unwrap() {
            let f = f.unwrap().path();
            if f.to_string_lossy().contains(n.as_str()) {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

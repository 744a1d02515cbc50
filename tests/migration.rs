//! The migration runner between two local image directories, through filesystem storage.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use virtrigaud::*;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud::testdata::noise(seed, len)
}

fn sparse_file(path: &Path, size: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for i in 0..3u64 {
        f.seek(SeekFrom::Start(i * size / 3 + 4097)).unwrap();
        f.write_all(&pattern(300_000, seed + i)).unwrap();
    }
}

async fn two_disk_vm(root: &Path) -> LocalProvider {
    std::fs::create_dir_all(root.join("web01")).unwrap();
    sparse_file(&root.join("web01/root.raw"), 32 << 20, 1);
    sparse_file(&root.join("web01/data.raw"), 16 << 20, 9);
    let p = LocalProvider::new(root);
    let disk = |id: &str, loc: &str, bus| DiskInfo {
        id: id.into(),
        capacity: 0,
        allocation: None,
        format: None,
        bus: Some(bus),
        location: loc.into(),
    };
    p.write_vm(
        &VmInfo {
            annotation: None,
            id: "web01".into(),
            name: "web01".into(),
            cpus: 4,
            memory_mib: 4096,
            firmware: Firmware::Uefi,
            machine: Some("q35".into()),
            guest_os: Some("debian12".into()),
            state: PowerState::Stopped,
            disks: vec![
                disk("vda", "root.raw", DiskBus::Virtio),
                disk("sda", "data.raw", DiskBus::Sata),
            ],
            nics: vec![
                NicInfo {
                    mac: Some("52:54:00:aa:00:01".into()),
                    model: Some("virtio".into()),
                    network: Some("prod".into()),
                },
                NicInfo {
                    mac: Some("52:54:00:aa:00:02".into()),
                    model: Some("e1000".into()),
                    network: Some("backup".into()),
                },
            ],
        },
        false,
    )
    .await
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_two_disk_vm_with_mapped_hardware_and_resumes_after_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let source = two_disk_vm(&tmp.path().join("src")).await;
    let target = LocalProvider::new(tmp.path().join("dst"));
    let store: Arc<dyn StorageBackend> = Arc::new(virtrigaud::storage::FsBackend::new(
        tmp.path().join("store"),
    ));

    let mut plan = MigrationPlan::new("web01", "migrations/web01");
    plan.target_name = Some("web01-new".into());
    plan.network_map = BTreeMap::from([("prod".to_string(), "vmbr0".to_string())]);
    plan.bus_override = Some(DiskBus::Scsi);

    // A conflicting file on the target makes the second disk's import fail.
    std::fs::create_dir_all(tmp.path().join("dst/web01-new")).unwrap();
    std::fs::write(tmp.path().join("dst/web01-new/sda.raw"), b"in the way").unwrap();
    let e = Migration::new(&source, &target, &*store, plan.clone())
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let state = Migration::new(&source, &target, &*store, plan.clone())
        .load_state()
        .await
        .unwrap()
        .unwrap();
    assert!(
        state.disks[0].target_location.is_some(),
        "first disk imported before the failure"
    );
    assert!(state.disks[1].target_location.is_none());
    assert!(state.target_vm.is_none());

    // Remove the obstacle and run again: nothing is exported again, only the second disk imported.
    std::fs::remove_file(tmp.path().join("dst/web01-new/sda.raw")).unwrap();
    let report = Migration::new(&source, &target, &*store, plan.clone())
        .run()
        .await
        .unwrap();
    assert_eq!(report.exported_now, 0);
    assert_eq!(report.imported_now, 1);
    assert!(report.state.disks.iter().all(|d| d.verified));

    let vm = target.describe_vm("web01-new").await.unwrap();
    assert_eq!(vm.cpus, 4);
    assert_eq!(vm.memory_mib, 4096);
    assert_eq!(vm.firmware, Firmware::Uefi);
    assert_eq!(vm.disks.len(), 2);
    assert!(vm.disks.iter().all(|d| d.bus == Some(DiskBus::Scsi)));
    assert_eq!(vm.nics[0].network.as_deref(), Some("vmbr0"), "mapped");
    assert_eq!(
        vm.nics[1].network.as_deref(),
        Some("backup"),
        "unmapped keeps its name"
    );
    assert_eq!(vm.nics[0].mac.as_deref(), Some("52:54:00:aa:00:01"));
    for (src, dst) in [("root.raw", "vda.raw"), ("data.raw", "sda.raw")] {
        assert_eq!(
            std::fs::read(tmp.path().join("src/web01").join(src)).unwrap(),
            std::fs::read(tmp.path().join("dst/web01-new").join(dst)).unwrap()
        );
    }
    // A third run is a no-op.
    let again = Migration::new(&source, &target, &*store, plan)
        .run()
        .await
        .unwrap();
    assert_eq!((again.exported_now, again.imported_now), (0, 0));
}

#[tokio::test]
async fn unsupported_preparation_is_reported_not_faked() {
    let tmp = tempfile::tempdir().unwrap();
    let source = two_disk_vm(&tmp.path().join("src")).await;
    let target = LocalProvider::new(tmp.path().join("dst"));
    let store = virtrigaud::storage::FsBackend::new(tmp.path().join("store"));
    let mut plan = MigrationPlan::new("web01", "m/web01");
    plan.prepare = PrepareSource::Snapshot;
    let e = Migration::new(&source, &target, &store, plan)
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(!tmp.path().join("dst/web01").exists());
}

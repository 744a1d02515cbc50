//! Migrations across providers through the `Migration` runner: libvirt (a real libvirtd, see
//! `scripts/peers/libvirt.sh`, `VIRTRIGAUD_LIBVIRT_URI`) → vSphere (the govmomi simulator,
//! `VIRTRIGAUD_VSPHERE_*`), with file staging. Without both peers a test prints `SKIP: …`,
//! unless `VIRTRIGAUD_IT=1`, when it fails.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use virtrigaud_core::transfer::{ImportOptions, digest_disk};
use virtrigaud_core::{Migration, MigrationPlan, Provider, StorageBackend};
use virtrigaud_libvirt::LibvirtProvider;
use virtrigaud_storage::FsBackend;
use virtrigaud_testkit::libvirt::{DomainGuard, TestPool, virsh};
use virtrigaud_testkit::{BOOT_MARKER, boot_sector, skip, unique, write_patterned_raw};
use virtrigaud_vsphere::{VsphereConfig, VsphereProvider};

const MIB: u64 = 1 << 20;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn peers() -> Option<(String, VsphereConfig)> {
    let got = (
        var("VIRTRIGAUD_LIBVIRT_URI"),
        var("VIRTRIGAUD_VSPHERE_URL"),
        var("VIRTRIGAUD_VSPHERE_USER"),
        var("VIRTRIGAUD_VSPHERE_PASSWORD"),
        var("VIRTRIGAUD_VSPHERE_THUMBPRINT"),
    );
    match got {
        (Some(uri), Some(url), Some(user), Some(pw), Some(tp)) => {
            let mut c = VsphereConfig::new(url, user, pw.as_str())
                .with_thumbprint(tp)
                .with_datacenter("DC0")
                .with_datastore("LocalDS_0");
            c.default_network = Some("VM Network".into());
            Some((uri, c))
        }
        _ => {
            skip(
                "VIRTRIGAUD_LIBVIRT_URI or VIRTRIGAUD_VSPHERE_* are not set (start scripts/peers/libvirt.sh and vcsim.sh)",
            );
            None
        }
    }
}

/// The VM `name` as pyVmomi (VMware's Python client, installed by `vcsim.sh install`) reads it:
/// `scripts/peers/vcsim/pyvmomi_devices.py`'s JSON.
fn pyvmomi(name: &str) -> Option<serde_json::Value> {
    let Some(cmd) = var("VIRTRIGAUD_PYVMOMI") else {
        skip(
            "the pyVmomi check: VIRTRIGAUD_PYVMOMI is not set (run scripts/peers/vcsim.sh install)",
        );
        return None;
    };
    let mut parts = cmd.split_whitespace();
    let out = Command::new(parts.next().unwrap())
        .args(parts)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyVmomi: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// libvirt → vSphere: a stopped two-disk domain (qcow2 + raw with holes) becomes a vSphere VM
/// through the runner; its disks, read back through `/folder`, have the source's content
/// digests; the VM carries the migration's marker; a rerun moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_to_vsphere_through_the_runner() {
    let Some((uri, cfg)) = peers() else { return };
    let pool = TestPool::new(&uri, "x-src");
    let scratch = tempfile::tempdir().unwrap();
    let raw = pool.path("data.raw");
    write_patterned_raw(&raw, 64 * MIB);
    let tmp = scratch.path().join("q.raw");
    write_patterned_raw(&tmp, 48 * MIB);
    let q = pool.path("sys.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&tmp)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success());
    virsh(&uri, &["pool-refresh", &pool.name]);
    let src_vm = unique("x-src");
    let _g = DomainGuard::new(&uri, &src_vm);
    let disk = |p: &Path, fmt: &str, dev: &str| {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>\
             <source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
            p.display()
        )
    };
    let xml = format!(
        "<domain type='qemu'><name>{src_vm}</name><memory unit='MiB'>64</memory><vcpu>2</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{}{}\
         <interface type='network'><mac address='52:54:00:5a:1e:07'/>\
         <source network='default'/><model type='virtio'/></interface></devices></domain>",
        disk(&q, "qcow2", "vda"),
        disk(&raw, "raw", "vdb")
    );
    let xf = scratch.path().join("d.xml");
    std::fs::write(&xf, xml).unwrap();
    virsh(&uri, &["define", xf.to_str().unwrap()]);

    let source = Arc::new(LibvirtProvider::new(&uri));
    let target = Arc::new(VsphereProvider::new(cfg).unwrap());
    let dst_vm = unique("x-dst");
    let store = tempfile::tempdir().unwrap();
    let storage: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(store.path()));
    let mut plan = MigrationPlan::new(&src_vm, "migrations/x");
    plan.target_name = Some(dst_vm.clone());
    plan.placement = Some("LocalDS_0".into());
    let report = Migration::new(
        source.clone(),
        target.clone(),
        storage.clone(),
        plan.clone(),
    )
    .run()
    .await
    .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (2, 2));
    let info = target.describe_vm(&dst_vm).await.unwrap();
    assert!(info.has_marker(&report.state.marker()));
    assert_eq!((info.cpus, info.memory_mib), (2, 64));
    assert_eq!(info.disks.len(), 2);
    let src = source.describe_vm(&src_vm).await.unwrap();
    for (s, t) in src.disks.iter().zip(&info.disks) {
        assert_eq!(s.capacity, t.capacity);
        let a = digest_disk(source.as_ref(), &src_vm, &s.id, &ImportOptions::default())
            .await
            .unwrap();
        let b = digest_disk(target.as_ref(), &dst_vm, &t.id, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(a, b, "{} vs {}", s.id, t.id);
    }
    // The devices as VMware's own client (pyVmomi) reads them, against the spec.
    if let Some(v) = pyvmomi(&dst_vm) {
        assert_eq!(v["cpus"], 2, "{v}");
        assert_eq!(v["memory_mb"], 64, "{v}");
        assert_eq!(v["firmware"], "bios", "{v}");
        // The source names no OS: the documented fallback of the guest id map.
        assert_eq!(v["guest_id"], "otherGuest64", "{v}");
        let marker = report.state.marker();
        assert!(
            v["annotation"].as_str().unwrap_or("").contains(&marker),
            "{v}"
        );
        let disks = v["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2, "{v}");
        for (d, (want_cap, unit)) in disks.iter().zip([(48 * MIB, 0), (64 * MIB, 1)]) {
            assert_eq!(d["controller"], "ParaVirtualSCSIController", "{v}");
            assert_eq!(d["bus_number"], 0, "{v}");
            assert_eq!(d["unit"], unit, "{v}");
            assert_eq!(d["capacity"], want_cap, "{v}");
            assert!(
                d["file"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("[LocalDS_0] {dst_vm}/")),
                "{v}"
            );
        }
        let nics = v["nics"].as_array().unwrap();
        assert_eq!(nics.len(), 1, "{v}");
        assert_eq!(nics[0]["type"], "VirtualVmxnet3", "{v}");
        assert_eq!(nics[0]["mac"], "52:54:00:5a:1e:07", "{v}");
        assert_eq!(nics[0]["address_type"], "manual", "{v}");
        assert_eq!(nics[0]["network"], "VM Network", "{v}");
    }
    // Rerun: the checkpoint says everything is done, nothing moves, the VM stays.
    let again = Migration::new(source.clone(), target.clone(), storage.clone(), plan)
        .run()
        .await
        .unwrap();
    assert_eq!((again.exported_now, again.imported_now), (0, 0));
    assert_eq!(target.describe_vm(&dst_vm).await.unwrap().id, info.id);
    // Clean up on the simulator.
    let locations: Vec<String> = info.disks.iter().map(|d| d.location.clone()).collect();
    target.delete_vm(&dst_vm).await.unwrap();
    for l in locations {
        target.delete_disk(&dst_vm, &l).await.unwrap();
    }
}

/// vSphere → libvirt: a running vSphere VM whose datastore disk holds the boot-sector image is
/// exported from a snapshot (deleted afterwards), imported into a libvirt pool, and the new
/// domain boots under TCG and prints the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_to_libvirt_boots() {
    use virtrigaud_core::transfer::{ExportOptions, export_disk, import_disk};
    use virtrigaud_core::{
        DiskBus, DiskCreateSpec, DiskFormat, Firmware, PowerOp, PowerState, VmDiskSpec, VmSpec,
    };
    use virtrigaud_libvirt::domain_xml::DomainOptions;
    let Some((uri, cfg)) = peers() else { return };
    let vs = VsphereProvider::new(cfg).unwrap();
    let src_vm = unique("b-src");
    // The source: a 4 MiB disk with the boot sector, on a running VM.
    let mut c = vs
        .create_disk(&DiskCreateSpec {
            vm: src_vm.clone(),
            name: "boot".into(),
            capacity: 4 * MIB,
            format: None,
            placement: None,
            overwrite: false,
        })
        .await
        .unwrap();
    c.sink
        .write(bytes::Bytes::copy_from_slice(&boot_sector()))
        .await
        .unwrap();
    c.sink.write_zeros(4 * MIB - 512).await.unwrap();
    c.sink.commit().await.unwrap();
    let spec = VmSpec {
        name: src_vm.clone(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: c.location.clone(),
            bus: DiskBus::Scsi,
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        overwrite: false,
        annotation: None,
    };
    let info = vs.create_vm(&spec).await.unwrap();
    vs.power(&src_vm, PowerOp::On).await.unwrap();
    let snap = vs.create_snapshot(&src_vm, "vrg-export").await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let exp = export_disk(
        &vs,
        &src_vm,
        &info.disks[0].id,
        &storage,
        "boot.qcow2",
        &ExportOptions {
            snapshot: Some(snap.clone()),
            ..ExportOptions::default()
        },
    )
    .await;
    vs.delete_snapshot(&src_vm, &snap).await.unwrap();
    let exp = exp.unwrap();
    assert_eq!(exp.manifest.virtual_size, 4 * MIB);

    let pool = TestPool::new(&uri, "b-dst");
    let lv = LibvirtProvider::new(&uri);
    let dst_vm = unique("b-dst");
    let _g = DomainGuard::new(&uri, &dst_vm);
    let imp = import_disk(
        &storage,
        "boot.qcow2",
        &lv,
        &dst_vm,
        "vda",
        &ImportOptions {
            placement: Some(pool.name.clone()),
            ..ImportOptions::default()
        },
    )
    .await
    .unwrap();
    let serial = pool.dir.path().join("serial.log");
    let lspec = VmSpec {
        name: dst_vm.clone(),
        machine: Some("pc".into()),
        disks: vec![VmDiskSpec {
            location: imp.location.clone(),
            bus: DiskBus::Virtio,
            format: imp.format,
        }],
        ..spec.clone()
    };
    lv.create_vm_with(
        &lspec,
        &DomainOptions {
            domain_type: Some("qemu".into()),
            serial_file: Some(serial.display().to_string()),
            arch: None,
        },
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    lv.power(&dst_vm, PowerOp::On).await.unwrap();
    loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(BOOT_MARKER) {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "no boot marker after 60 s: {:?}",
            String::from_utf8_lossy(&log)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        lv.describe_vm(&dst_vm).await.unwrap().state,
        PowerState::Running
    );
    let a = digest_disk(&vs, &src_vm, &info.disks[0].id, &ImportOptions::default())
        .await
        .unwrap();
    let b = digest_disk(&lv, &dst_vm, "vda", &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(a, b);
    vs.delete_vm(&src_vm).await.unwrap();
    let _ = vs.delete_disk(&src_vm, &c.location).await;
}

/// A migration that fails midway (the target VM cannot be created: its NIC's network does not
/// exist on vSphere and no default is configured) keeps what it moved; the rerun, with the
/// network fixed, moves no disk again: it finds the imported disks by name, and creates the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_after_failure_moves_only_what_is_missing() {
    let Some((uri, cfg)) = peers() else { return };
    let pool = TestPool::new(&uri, "r-src");
    let raw = pool.path("r.raw");
    write_patterned_raw(&raw, 64 * MIB);
    virsh(&uri, &["pool-refresh", &pool.name]);
    let src_vm = unique("r-src");
    let _g = DomainGuard::new(&uri, &src_vm);
    let net = unique("nonet");
    let xml = format!(
        "<domain type='qemu'><name>{src_vm}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='network'><source network='{net}'/><model type='virtio'/></interface>\
         </devices></domain>",
        raw.display()
    );
    let xf = pool.path("d.xml");
    std::fs::write(&xf, xml).unwrap();
    virsh(&uri, &["define", xf.to_str().unwrap()]);

    let source = Arc::new(LibvirtProvider::new(&uri));
    let mut no_default = cfg.clone();
    no_default.default_network = None;
    let broken = Arc::new(VsphereProvider::new(no_default).unwrap());
    let fixed = Arc::new(VsphereProvider::new(cfg).unwrap());
    let dst_vm = unique("r-dst");
    let store = tempfile::tempdir().unwrap();
    let storage: Arc<dyn StorageBackend> = Arc::new(FsBackend::new(store.path()));
    let mut plan = MigrationPlan::new(&src_vm, "migrations/r");
    plan.target_name = Some(dst_vm.clone());
    let err = Migration::new(
        source.clone(),
        broken.clone(),
        storage.clone(),
        plan.clone(),
    )
    .run()
    .await
    .unwrap_err();
    assert_eq!(err.kind(), virtrigaud_core::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&net), "{err}");
    let e2 = fixed.describe_vm(&dst_vm).await.unwrap_err();
    assert_eq!(e2.kind(), virtrigaud_core::ErrorKind::NotFound);

    let report = Migration::new(source.clone(), fixed.clone(), storage.clone(), plan)
        .run()
        .await
        .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (0, 0));
    let info = fixed.describe_vm(&dst_vm).await.unwrap();
    assert!(info.has_marker(&report.state.marker()));
    assert_eq!(info.nics[0].network.as_deref(), Some("VM Network"));
    let a = digest_disk(source.as_ref(), &src_vm, "vda", &ImportOptions::default())
        .await
        .unwrap();
    let b = digest_disk(
        fixed.as_ref(),
        &dst_vm,
        &info.disks[0].id,
        &ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(a, b);
    let l = info.disks[0].location.clone();
    fixed.delete_vm(&dst_vm).await.unwrap();
    fixed.delete_disk(&dst_vm, &l).await.unwrap();
}

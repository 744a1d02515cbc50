//! Tests against the govmomi simulator (see `scripts/peers/vcsim.sh`).
//!
//! `VIRTRIGAUD_VSPHERE_URL`, `_USER`, `_PASSWORD` and `_THUMBPRINT` name the simulator; the
//! kill test and the task-deadline test (which needs `-task-delay`, a flag of our `main.go`)
//! start private ones from `VIRTRIGAUD_VCSIM_BIN` with `VIRTRIGAUD_VCSIM_CERT` / `_KEY`. Without them a test prints `SKIP: …` and passes, unless `VIRTRIGAUD_IT=1`, when it
//! fails.
//!
//! What the simulator (govmomi 0.24) cannot prove, and so these tests do not claim: NFC export
//! (`ExportVm` is MethodNotFound there: the lease loop is proven on the `ImportVApp` lease,
//! the device-URL matching by unit tests only), that an NFC import becomes a VMFS disk (the
//! simulator discards the bytes; our `main.go` keeps a copy that is compared with the source),
//! a lease's `done`/`error` state after Complete/Abort (the simulator forgets the lease),
//! changed-block tracking (`QueryChangedDiskAreas` is absent), real VMFS behaviour (its
//! datastore is a plain directory, its snapshots do not create delta disks; `/folder` checks no
//! session there, our `main.go` adds that check), guest shutdown/reboot need no tools), and paged property answers (it never pages:
//! `ContinueRetrievePropertiesEx` is covered by a unit test of the answer parser only).
//!
//! Every test names its VMs and disk directories uniquely and removes them.

use std::sync::Arc;
use std::time::Duration;
use virtrigaud_core::transfer::{
    ExportOptions, ImportOptions, export_disk, export_image, import_disk,
};
use virtrigaud_core::{
    DiskBus, DiskCreateSpec, DiskFormat, ErrorKind, Firmware, NicInfo, PowerOp, PowerState,
    Provider, VmDiskSpec, VmSpec,
};
use virtrigaud_storage::FsBackend;
use virtrigaud_testkit::{skip, unique};
use virtrigaud_vsphere::{VsphereConfig, VsphereProvider};

const MIB: u64 = 1 << 20;

#[derive(Clone)]
struct Env {
    url: String,
    user: String,
    password: String,
    thumbprint: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env() -> Option<Env> {
    let got = (
        var("VIRTRIGAUD_VSPHERE_URL"),
        var("VIRTRIGAUD_VSPHERE_USER"),
        var("VIRTRIGAUD_VSPHERE_PASSWORD"),
        var("VIRTRIGAUD_VSPHERE_THUMBPRINT"),
    );
    match got {
        (Some(url), Some(user), Some(password), Some(thumbprint)) => Some(Env {
            url,
            user,
            password,
            thumbprint,
        }),
        _ => {
            skip("VIRTRIGAUD_VSPHERE_* are not set (start scripts/peers/vcsim.sh)");
            None
        }
    }
}

fn config(e: &Env) -> VsphereConfig {
    VsphereConfig::new(&e.url, &e.user, e.password.as_str())
        .with_thumbprint(&e.thumbprint)
        .with_datacenter("DC0")
        .with_datastore("LocalDS_0")
}

fn provider(e: &Env) -> VsphereProvider {
    let mut c = config(e);
    c.default_network = Some("VM Network".into());
    VsphereProvider::new(c).unwrap()
}

/// A disk image with data, a hole and text: `size` bytes.
fn sample(seed: u64, size: u64) -> Vec<u8> {
    let size = size as usize;
    let mut v = vec![0u8; size];
    let n = (MIB as usize).min(size / 4);
    v[..n].copy_from_slice(&virtrigaud_core::testdata::noise(seed, n));
    let at = size / 2;
    v[at..at + n].copy_from_slice(&virtrigaud_core::testdata::text(seed, n));
    v
}

/// Writes `data` as a new disk (zero runs of 1 MiB as `write_zeros`); returns its location.
async fn write_disk(p: &VsphereProvider, vm: &str, name: &str, data: &[u8]) -> String {
    let spec = DiskCreateSpec {
        vm: vm.into(),
        name: name.into(),
        capacity: data.len() as u64,
        format: None,
        placement: None,
        overwrite: false,
    };
    let mut c = p.create_disk(&spec).await.unwrap();
    assert_eq!(c.format, DiskFormat::Raw);
    for chunk in data.chunks(MIB as usize) {
        if chunk.iter().all(|b| *b == 0) {
            c.sink.write_zeros(chunk.len() as u64).await.unwrap();
        } else {
            c.sink
                .write(bytes::Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
    }
    c.sink.commit().await.unwrap();
    c.location
}

async fn read_all(p: &VsphereProvider, vm: &str, location: &str) -> Vec<u8> {
    let o = p.open_created_disk(vm, location).await.unwrap();
    let virtrigaud_core::ImageSource::RandomAccess(r) = o.source else {
        panic!("expected random access");
    };
    assert_eq!(o.info.format, Some(DiskFormat::Raw));
    r.read_exact_at(0, r.size() as usize)
        .await
        .unwrap()
        .to_vec()
}

/// Deletes the VM (if any) and the disk files when dropped, with a client of its own (a
/// client's pooled connections belong to the runtime that made them, which is blocked here).
struct Cleanup {
    env: Env,
    vm: String,
    disks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (env, vm, disks) = (self.env.clone(), self.vm.clone(), self.disks.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let p = provider(&env);
                let _ = p.delete_vm(&vm).await;
                for d in disks {
                    let _ = p.delete_disk(&vm, &d).await;
                }
                let _ = p.logout().await;
            });
        })
        .join();
    }
}

#[tokio::test]
async fn login_list_find_and_describe() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    p.validate().await.unwrap();
    assert!(p.client().session_is_active().await.unwrap());
    let vms = p.list_vms().await.unwrap();
    let vm0 = vms
        .iter()
        .find(|v| v.name == "DC0_H0_VM0")
        .expect("the model's VM");
    let by_name = p.describe_vm("DC0_H0_VM0").await.unwrap();
    assert_eq!(by_name.id, vm0.id);
    assert!(by_name.cpus >= 1 && by_name.memory_mib >= 1);
    assert_eq!(by_name.firmware, Firmware::Bios);
    assert!(by_name.guest_os.is_some());
    let d = &by_name.disks[0];
    assert_eq!(d.location, "[LocalDS_0] DC0_H0_VM0/disk1.vmdk");
    assert_eq!(d.bus, Some(DiskBus::Scsi));
    assert!(d.capacity > 0);
    assert_eq!(by_name.nics.len(), 1);
    // A distributed port group's key is resolved to its name.
    assert_eq!(by_name.nics[0].network.as_deref(), Some("DC0_DVPG0"));
    assert!(by_name.nics[0].mac.is_some());
    let hw = p.hardware("DC0_H0_VM0").await.unwrap();
    assert_eq!(hw.disks[0].unit_number, Some(0));
    assert_eq!(
        hw.disks[0].controller_type.as_deref(),
        Some("ParaVirtualSCSIController")
    );
    assert_eq!(hw.disks[0].thin, Some(true));

    // By managed object id, inventory path and instance UUID.
    let by_id = p.describe_vm(&vm0.id).await.unwrap();
    assert_eq!(by_id.name, "DC0_H0_VM0");
    let by_path = p.describe_vm("DC0/vm/DC0_H0_VM0").await.unwrap();
    assert_eq!(by_path.id, vm0.id);
    let o = p
        .client()
        .properties(
            &virtrigaud_vsphere::MoRef::new("VirtualMachine", vm0.id.clone()),
            &["config.instanceUuid"],
        )
        .await
        .unwrap();
    let uuid = o.text("config.instanceUuid").unwrap().to_string();
    assert_eq!(p.describe_vm(&uuid).await.unwrap().id, vm0.id);

    // Things that do not exist.
    for missing in [
        "no-such-vm",
        "vm-999999",
        "DC0/vm/none",
        "00000000-0000-0000-0000-000000000000",
    ] {
        let err = p.describe_vm(missing).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{missing}: {err}");
    }
    let mut c = config(&e);
    c.datastore = Some("NoSuchDS".into());
    let p2 = VsphereProvider::new(c).unwrap();
    let err = p2
        .create_disk(&DiskCreateSpec {
            vm: unique("nods"),
            name: "d".into(),
            capacity: MIB,
            format: None,
            placement: None,
            overwrite: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    p.logout().await.unwrap();
}

#[tokio::test]
async fn credentials_and_trust() {
    let Some(e) = env() else { return };
    // Wrong password.
    let mut bad = e.clone();
    bad.password = "wrong".into();
    let err = provider(&bad).validate().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!err.to_string().contains("wrong"), "{err}");
    // Wrong thumbprint: the handshake fails, so no SOAP request (and no password) is sent.
    let mut c = config(&e);
    c.thumbprint = Some("00".repeat(32));
    let err = VsphereProvider::new(c)
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
    assert!(err.to_string().contains("thumbprint"), "{err}");
    // A refused certificate is refused again on every retry.
    assert!(!err.is_retryable(), "{err}");
    // No pin: a self-signed certificate is not trusted by the system roots.
    let mut c = config(&e);
    c.thumbprint = None;
    let err = VsphereProvider::new(c)
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("pinned by its"), "{err}");
    // Plain HTTP is refused before any connection.
    let c = VsphereConfig::new(e.url.replace("https://", "http://"), &e.user, "x");
    assert_eq!(
        VsphereProvider::new(c).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    // The password is in no Debug output.
    let p = provider(&e);
    assert!(!format!("{p:?} {:?}", config(&e)).contains(&e.password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_vm_export_import_and_snapshot() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("rt");
    let mut cleanup = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![],
    };
    let sys = sample(1, 8 * MIB);
    let data = sample(2, 6 * MIB);
    let l_sys = write_disk(&p, &vm, "sys", &sys).await;
    let l_data = write_disk(&p, &vm, "data", &data).await;
    cleanup.disks = vec![l_sys.clone(), l_data.clone()];
    assert_eq!(l_sys, format!("[LocalDS_0] {vm}/sys.vmdk"));
    assert_eq!(read_all(&p, &vm, &l_sys).await, sys);
    assert_eq!(read_all(&p, &vm, &l_data).await, data);
    let spec_sys = DiskCreateSpec {
        vm: vm.clone(),
        name: "sys".into(),
        capacity: 8 * MIB,
        format: None,
        placement: None,
        overwrite: false,
    };
    assert_eq!(p.find_disk(&spec_sys).await.unwrap(), Some(l_sys.clone()));
    let err = p.create_disk(&spec_sys).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    let spec = VmSpec {
        name: vm.clone(),
        cpus: 2,
        memory_mib: 256,
        firmware: Firmware::Uefi,
        machine: None,
        guest_os: Some("http://debian.org/debian/12".into()),
        disks: vec![
            VmDiskSpec {
                location: l_sys.clone(),
                bus: DiskBus::Virtio,
                format: DiskFormat::Raw,
            },
            VmDiskSpec {
                location: l_data.clone(),
                bus: DiskBus::Sata,
                format: DiskFormat::Raw,
            },
        ],
        nics: vec![NicInfo {
            mac: Some("00:50:56:01:02:03".into()),
            model: Some("virtio".into()),
            network: Some("VM Network".into()),
        }],
        overwrite: false,
        annotation: Some("migrated by virtrigaud\nvirtrigaud-migration: m-1".into()),
    };
    let info = p.create_vm(&spec).await.unwrap();
    assert_eq!(info.name, vm);
    assert_eq!(info.cpus, 2);
    assert_eq!(info.memory_mib, 256);
    assert_eq!(info.firmware, Firmware::Uefi);
    assert_eq!(info.guest_os.as_deref(), Some("debian12_64Guest"));
    assert!(info.has_marker("virtrigaud-migration: m-1"));
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.disks[0].location, l_sys);
    assert_eq!(info.disks[0].bus, Some(DiskBus::Scsi));
    assert_eq!(info.disks[0].capacity, 8 * MIB);
    assert_eq!(info.disks[1].bus, Some(DiskBus::Sata));
    assert_eq!(info.nics.len(), 1);
    assert_eq!(info.nics[0].model.as_deref(), Some("vmxnet3"));
    assert_eq!(info.nics[0].network.as_deref(), Some("VM Network"));
    assert_eq!(info.nics[0].mac.as_deref(), Some("00:50:56:01:02:03"));
    let hw = p.hardware(&vm).await.unwrap();
    assert_eq!(
        hw.disks[0].controller_type.as_deref(),
        Some("ParaVirtualSCSIController")
    );
    assert_eq!(
        hw.disks[1].controller_type.as_deref(),
        Some("VirtualAHCIController")
    );
    // Never replaced unless asked.
    let err = p.create_vm(&spec).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    // Changed-block tracking on. The simulator records the flag but has no
    // QueryChangedDiskAreas (it answers MethodNotFound): this proves the request is made and
    // that the export falls back to zero detection with the same content. The map itself is
    // checked against the WSDL shapes in the unit tests; no real ESXi proves it here.
    let r = p.find_vm(&vm).await.unwrap();
    p.client()
        .run_task(
            "ReconfigVM_Task",
            &format!(
                "{}<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
                r.this()
            ),
        )
        .await
        .unwrap();
    let cbt = p
        .client()
        .properties(&r, &["config.changeTrackingEnabled"])
        .await
        .unwrap();
    assert_eq!(cbt.text("config.changeTrackingEnabled"), Some("true"));
    let key: i32 = info.disks[0].id.parse().unwrap();
    let err = p.allocated_areas(&r, None, key, 8 * MIB).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("QueryChangedDiskAreas"), "{err}");

    // Export both disks to a file store, import them back under new names: same content.
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    for (disk_id, bytes, name) in [
        (info.disks[0].id.clone(), &sys, "sys2"),
        (info.disks[1].id.clone(), &data, "data2"),
    ] {
        let key = format!("{vm}/{name}.qcow2");
        let exp = export_disk(&p, &vm, &disk_id, &storage, &key, &ExportOptions::default())
            .await
            .unwrap();
        assert_eq!(exp.manifest.virtual_size, bytes.len() as u64);
        assert!(
            exp.manifest.allocated_bytes <= 2 * MIB,
            "zero space was stored as data: {}",
            exp.manifest.allocated_bytes
        );
        let imp = import_disk(&storage, &key, &p, &vm, name, &ImportOptions::default())
            .await
            .unwrap();
        cleanup.disks.push(imp.location.clone());
        assert_eq!(&read_all(&p, &vm, &imp.location).await, bytes);
    }

    // A snapshot: the disk read at the snapshot is the base.
    let snap = p.create_snapshot(&vm, "vrg-export").await.unwrap();
    let o = p
        .open_disk(&vm, &info.disks[0].id, Some(&snap))
        .await
        .unwrap();
    assert_eq!(o.info.location, l_sys);
    assert_eq!(o.info.capacity, 8 * MIB);
    p.delete_snapshot(&vm, &snap).await.unwrap();
    // Deleting twice is harmless.
    p.delete_snapshot(&vm, &snap).await.unwrap();
    let err = p.open_disk(&vm, "9999", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Replace the VM: the disks it uses survive the old VM's destruction.
    let mut again = spec.clone();
    again.overwrite = true;
    again.cpus = 1;
    let info2 = p.create_vm(&again).await.unwrap();
    assert_eq!(info2.cpus, 1);
    assert_ne!(info2.id, info.id);
    assert_eq!(read_all(&p, &vm, &l_sys).await, sys);

    p.delete_vm(&vm).await.unwrap();
    let err = p.describe_vm(&vm).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    for l in cleanup.disks.clone() {
        p.delete_disk(&vm, &l).await.unwrap();
        let err = p.open_created_disk(&vm, &l).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
    // Deleting a disk that is gone is not an error.
    p.delete_disk(&vm, &l_sys).await.unwrap();
}

#[tokio::test]
async fn power_operations() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("pw");
    let l = write_disk(&p, &vm, "d", &sample(3, 2 * MIB)).await;
    let _c = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![l.clone()],
    };
    let spec = VmSpec {
        name: vm.clone(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: l,
            bus: DiskBus::Ide,
            format: DiskFormat::Raw,
        }],
        // A libvirt network name that vSphere does not have: the default network.
        nics: vec![NicInfo {
            mac: None,
            model: Some("virtio".into()),
            network: Some("default".into()),
        }],
        overwrite: false,
        annotation: None,
    };
    let info = p.create_vm(&spec).await.unwrap();
    assert_eq!(info.state, PowerState::Stopped);
    assert_eq!(info.nics[0].network.as_deref(), Some("VM Network"));
    assert_eq!(info.disks[0].bus, Some(DiskBus::Ide));
    p.power(&vm, PowerOp::On).await.unwrap();
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Running);
    p.power(&vm, PowerOp::On).await.unwrap(); // idempotent
    p.power(&vm, PowerOp::Reboot).await.unwrap();
    p.power(
        &vm,
        PowerOp::Shutdown {
            timeout: Duration::from_secs(20),
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Stopped);
    p.power(&vm, PowerOp::On).await.unwrap();
    p.power(&vm, PowerOp::Off).await.unwrap();
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Stopped);
    p.power(&vm, PowerOp::Off).await.unwrap();
    // Delete a running VM: powered off first.
    p.power(&vm, PowerOp::On).await.unwrap();
    p.delete_vm(&vm).await.unwrap();
    let err = p.power(&vm, PowerOp::On).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_mid_transfer() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let admin = provider(&e);
    let vm = unique("sx");
    let data = sample(4, 8 * MIB);
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "d".into(),
        capacity: data.len() as u64,
        format: None,
        placement: None,
        overwrite: false,
    };
    let mut c = p.create_disk(&spec).await.unwrap();
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![c.location.clone()],
    };
    let first = p.client().session_key().expect("logged in");
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        if i == 3 {
            // A second client ends our session while the upload runs.
            admin.validate().await.unwrap();
            admin
                .client()
                .terminate_sessions(std::slice::from_ref(&first))
                .await
                .unwrap();
        }
        c.sink
            .write(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    c.sink.commit().await.unwrap();
    // The next SOAP calls find the session gone, log in again once, and go on.
    let spec_vm = VmSpec {
        name: vm.clone(),
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
    p.create_vm(&spec_vm).await.unwrap();
    let second = p.client().session_key().unwrap();
    assert_ne!(first, second, "a new session was made");
    // And mid-export: the session ends between opening the disk and reading it.
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    admin
        .client()
        .terminate_sessions(std::slice::from_ref(&second))
        .await
        .unwrap();
    let info = p.describe_vm(&vm).await.unwrap();
    let exp = export_disk(
        &p,
        &vm,
        &info.disks[0].id,
        &storage,
        "sx.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(exp.manifest.virtual_size, 8 * MIB);
    assert_ne!(p.client().session_key().unwrap(), second);
    assert_eq!(read_all(&p, &vm, &c.location).await, data);
}

#[tokio::test]
async fn delta_chains_and_bad_descriptors_are_refused() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("dc");
    let l = write_disk(&p, &vm, "base", &sample(5, MIB)).await;
    let _c = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![l.clone()],
    };
    // A delta descriptor, as a snapshot leaves it, uploaded by hand.
    let delta = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\n\
                 createType=\"vmfsSparse\"\nparentFileNameHint=\"base.vmdk\"\n\
                 RW 2048 VMFSSPARSE \"base-000001-delta.vmdk\"\n";
    put_ds_file(&p, &e, &vm, "base-000001.vmdk", delta).await;
    let loc = format!("[LocalDS_0] {vm}/base-000001.vmdk");
    let err = p.open_created_disk(&vm, &loc).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("consolidate"), "{err}");
    // A descriptor whose extent leaves its directory.
    let evil = "# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
                RW 2048 VMFS \"../other/x-flat.vmdk\"\n";
    put_ds_file(&p, &e, &vm, "evil.vmdk", evil).await;
    let err = p
        .open_created_disk(&vm, &format!("[LocalDS_0] {vm}/evil.vmdk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    // A descriptor whose flat file is shorter than it says.
    let short = "# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
                 RW 4096 VMFS \"base-flat.vmdk\"\n";
    put_ds_file(&p, &e, &vm, "short.vmdk", short).await;
    let err = p
        .open_created_disk(&vm, &format!("[LocalDS_0] {vm}/short.vmdk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    for f in ["base-000001.vmdk", "evil.vmdk", "short.vmdk"] {
        let _ = p.delete_disk(&vm, &format!("[LocalDS_0] {vm}/{f}")).await;
    }
}

#[tokio::test]
async fn aborted_and_dropped_uploads_leave_nothing() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("ab");
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "d".into(),
        capacity: 4 * MIB,
        format: None,
        placement: None,
        overwrite: false,
    };
    let mut c = p.create_disk(&spec).await.unwrap();
    c.sink
        .write(bytes::Bytes::from(sample(6, MIB)))
        .await
        .unwrap();
    c.sink.abort().await.unwrap();
    assert_eq!(p.find_disk(&spec).await.unwrap(), None);
    // Committing short is refused and cleans up too.
    let mut c = p.create_disk(&spec).await.unwrap();
    c.sink
        .write(bytes::Bytes::from(sample(6, MIB)))
        .await
        .unwrap();
    let err = c.sink.commit().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(p.find_disk(&spec).await.unwrap(), None);
    let flat = format!("[LocalDS_0] {vm}/d-flat.vmdk");
    let err = p.open_created_disk(&vm, &flat).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Odd sizes are refused up front.
    let mut odd = spec.clone();
    odd.capacity = 1000;
    assert_eq!(
        p.create_disk(&odd).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

/// A private simulator on a free port, from `VIRTRIGAUD_VCSIM_BIN` with `extra` arguments,
/// user `k` / password `kpass`, killed when the child is dropped. `None` (after a SKIP line, or
/// a panic under `VIRTRIGAUD_IT=1`) when the binary is not named or does not take `extra` (a
/// binary built before the flag existed: rebuild it with `scripts/peers/vcsim.sh start`).
async fn private_vcsim(extra: &[&str]) -> Option<(tokio::process::Child, u16)> {
    let (Some(bin), Some(cert), Some(key)) = (
        var("VIRTRIGAUD_VCSIM_BIN"),
        var("VIRTRIGAUD_VCSIM_CERT"),
        var("VIRTRIGAUD_VCSIM_KEY"),
    ) else {
        skip("VIRTRIGAUD_VCSIM_BIN/_CERT/_KEY are not set (start scripts/peers/vcsim.sh)");
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "-listen",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &cert,
            "-key",
            &key,
        ])
        .args(["-user", "k", "-pass", "kpass"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let out = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    match line {
        Some(l) if l.starts_with("URL=") => {
            // Its log is drained, so that a full pipe never blocks it.
            if let Some(mut e) = child.stderr.take() {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut e, &mut tokio::io::sink()).await;
                });
            }
            Some((child, port))
        }
        other => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            let msg = format!(
                "{bin} {extra:?} did not start ({other:?}): {err}; an old build? \
                 rebuild it with scripts/peers/vcsim.sh start"
            );
            skip(&msg);
            None
        }
    }
}

/// A private simulator, killed mid-upload: the writer fails with a clear network error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_simulator_mid_upload() {
    let Some(e) = env() else { return };
    let Some((mut child, port)) = private_vcsim(&[]).await else {
        return;
    };
    let mut c = VsphereConfig::new(format!("https://127.0.0.1:{port}/sdk"), "k", "kpass")
        .with_thumbprint(&e.thumbprint)
        .with_datacenter("DC0");
    c.default_network = Some("VM Network".into());
    let p = VsphereProvider::new(c).unwrap();
    let vm = unique("kill");
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "d".into(),
        capacity: 64 * MIB,
        format: None,
        placement: None,
        overwrite: false,
    };
    let mut w = p.create_disk(&spec).await.unwrap();
    for i in 0..4u64 {
        w.sink
            .write(bytes::Bytes::from(sample(i, MIB)))
            .await
            .unwrap();
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut err = None;
    for i in 0..60u64 {
        if let Err(e) = w.sink.write(bytes::Bytes::from(sample(i, MIB))).await {
            err = Some(e);
            break;
        }
    }
    let err = match err {
        Some(e) => e,
        None => w.sink.commit().await.unwrap_err(),
    };
    assert!(
        matches!(err.kind(), ErrorKind::Network | ErrorKind::Io),
        "{err}"
    );
    // Nothing can be created on a dead endpoint, and the failure says so.
    let err = p.list_vms().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
}

/// The NFC import path: an `ImportVApp` lease, the disk POSTed as streamOptimized VMDK, the
/// lease completed and the placeholder VM released. The simulator discards what it receives;
/// our simulator keeps a copy in `VIRTRIGAUD_VSPHERE_NFC_DIR`, compared here with the source by
/// `qemu-img compare` (an independent VMDK reader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfc_import_lease() {
    let Some(e) = env() else { return };
    let Some(nfc_dir) = var("VIRTRIGAUD_VSPHERE_NFC_DIR") else {
        skip("VIRTRIGAUD_VSPHERE_NFC_DIR is not set (start scripts/peers/vcsim.sh)");
        return;
    };
    let mut c = config(&e);
    c.import_mode = virtrigaud_vsphere::ImportMode::NfcStreamOptimized;
    c.lease_progress_interval = Duration::from_millis(50);
    let p = VsphereProvider::new(c).unwrap();
    let vm = unique("nfc");
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![format!("[LocalDS_0] {vm}/boot.vmdk")],
    };
    // A raw source with data and holes, stored with its manifest, then imported.
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("src.raw");
    std::fs::write(&raw, sample(7, 16 * MIB)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let src = virtrigaud_core::io::LocalFile::open(&raw).await.unwrap();
    virtrigaud_core::transfer::export_image(
        virtrigaud_core::ImageSource::RandomAccess(std::sync::Arc::new(src)),
        Some(DiskFormat::Raw),
        &storage,
        "src.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let imp = import_disk(
        &storage,
        "src.qcow2",
        &p,
        &vm,
        "boot",
        &ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        imp.format,
        DiskFormat::Vmdk(virtrigaud_core::format::VmdkSubformat::StreamOptimized)
    );
    assert_eq!(imp.location, format!("[LocalDS_0] {vm}/boot.vmdk"));
    // The placeholder VM is gone, the disk stays.
    let ph = virtrigaud_vsphere::nfc::placeholder_name(&vm, "boot.vmdk");
    let err = p.describe_vm(&ph).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        p.find_disk(&DiskCreateSpec {
            vm: vm.clone(),
            name: "boot".into(),
            capacity: 16 * MIB,
            format: None,
            placement: None,
            overwrite: false,
        })
        .await
        .unwrap()
        .is_some()
    );
    // What went over the wire is the source, as an independent reader sees it.
    let kept: Vec<_> = std::fs::read_dir(&nfc_dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-boot.vmdk"))
        .filter(|p| {
            std::fs::metadata(p).unwrap().modified().unwrap()
                > std::time::SystemTime::now() - Duration::from_secs(120)
        })
        .collect();
    assert!(!kept.is_empty(), "no NFC upload kept in {nfc_dir}");
    let newest = kept
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk"])
        .arg(&raw)
        .arg(newest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(newest).unwrap().len() < 8 * MIB,
        "holes were sent"
    );

    // An aborted import leaves no VM and no disk.
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "gone".into(),
        capacity: 4 * MIB,
        format: None,
        placement: None,
        overwrite: false,
    };
    let mut w = p.create_disk(&spec).await.unwrap();
    w.sink
        .write(bytes::Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // progress calls run meanwhile
    w.sink.abort().await.unwrap();
    let err = p
        .describe_vm(&virtrigaud_vsphere::nfc::placeholder_name(&vm, "gone.vmdk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(p.find_disk(&spec).await.unwrap(), None);
    // The disk imported before, in the same directory, survives the abort.
    assert_eq!(
        p.find_disk(&DiskCreateSpec {
            name: "boot".into(),
            ..spec.clone()
        })
        .await
        .unwrap(),
        Some(imp.location.clone())
    );
}

/// Figures, not a pass/fail timing: a 1 GiB disk holding 300 MiB of data, exported from the
/// simulator's datastore (`/folder` ranged reads, zero detection, qcow2) to a file store,
/// against `curl` of the same flat file plus `qemu-img convert -O qcow2`. Run with
/// `cargo test -p virtrigaud-vsphere --release --test vcsim export_figures -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: 1 GiB through the simulator, run by hand"]
async fn export_figures() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("fig");
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![format!("[LocalDS_0] {vm}/big.vmdk")],
    };
    const GIB: u64 = 1 << 30;
    let mut c = p
        .create_disk(&DiskCreateSpec {
            vm: vm.clone(),
            name: "big".into(),
            capacity: GIB,
            format: None,
            placement: None,
            overwrite: false,
        })
        .await
        .unwrap();
    // 300 MiB of data: 75 runs of 4 MiB, every 13.6 MiB.
    let mut pos = 0u64;
    for i in 0..75u64 {
        let at = i * (GIB / 75) / MIB * MIB;
        c.sink.write_zeros(at - pos).await.unwrap();
        c.sink
            .write(bytes::Bytes::from(virtrigaud_core::testdata::text(
                i,
                4 << 20,
            )))
            .await
            .unwrap();
        pos = at + (4 << 20);
    }
    c.sink.write_zeros(GIB - pos).await.unwrap();
    c.sink.commit().await.unwrap();

    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let t = std::time::Instant::now();
    let o = p.open_created_disk(&vm, &c.location).await.unwrap();
    let rep = virtrigaud_core::transfer::export_image(
        o.source,
        o.info.format,
        &storage,
        "big.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let ours = t.elapsed();
    let hwm = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("")
        .to_string();

    let base = e.url.trim_end_matches("/sdk").to_string();
    let url = format!("{base}/folder/{vm}/big-flat.vmdk?dcPath=DC0&dsName=LocalDS_0");
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("big.raw");
    let qcow = scratch.path().join("big.qcow2");
    let t = std::time::Instant::now();
    let cookie = p.client().cookie().await.unwrap();
    let st = std::process::Command::new("curl")
        .args(["-sfk", "-H"])
        .arg(format!("Cookie: {}", cookie.to_str().unwrap()))
        .arg("-o")
        .arg(&raw)
        .arg(&url)
        .status()
        .unwrap();
    assert!(st.success());
    let t_curl = t.elapsed();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());
    let theirs = t.elapsed();
    eprintln!(
        "FIGURES 1 GiB / 300 MiB data: ours {ours:?} (stored {} MiB, allocated {} MiB), \
         curl {t_curl:?} + qemu-img convert = {theirs:?}, ratio {:.2}; test process {hwm}",
        rep.manifest.stored_size / MIB,
        rep.manifest.allocated_bytes / MIB,
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
}

/// The NFC export path asks for `ExportVm`, which the simulator does not have: the answer is a
/// clear `Unsupported` naming the datastore mode, not a hang or a fake success.
#[tokio::test]
async fn nfc_export_is_unsupported_on_the_simulator() {
    let Some(e) = env() else { return };
    let mut c = config(&e);
    c.export_mode = virtrigaud_vsphere::ExportMode::Nfc;
    let p = VsphereProvider::new(c).unwrap();
    let info = p.describe_vm("DC0_H0_VM1").await.unwrap();
    let err = p
        .open_disk("DC0_H0_VM1", &info.disks[0].id, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("ExportVm"), "{err}");
    assert!(err.to_string().contains("ExportMode::Datastore"), "{err}");
}

fn nfc_config(e: &Env) -> VsphereConfig {
    let mut c = config(e);
    c.import_mode = virtrigaud_vsphere::ImportMode::NfcStreamOptimized;
    c.lease_progress_interval = Duration::from_millis(50);
    c
}

/// Writes `data` through the sink of `spec` (NFC: the simulator discards the bytes, the lease
/// and the placeholder VM are what is checked) and commits; returns the location.
async fn write_spec(p: &VsphereProvider, spec: &DiskCreateSpec, data: &[u8]) -> String {
    let mut c = p.create_disk(spec).await.unwrap();
    for chunk in data.chunks(MIB as usize) {
        c.sink
            .write(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    c.sink.commit().await.unwrap();
    c.location
}

/// An NFC import in a process that dies mid-way: its own runtime is shut down with the sink
/// forgotten, so neither an abort nor a drop runs. The lease is orphaned, the placeholder VM
/// and its disk stay on the simulator.
fn crash_mid_import(e: &Env, spec: &DiskCreateSpec) {
    let (e, spec) = (e.clone(), spec.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let p = VsphereProvider::new(nfc_config(&e)).unwrap();
            let mut c = p.create_disk(&spec).await.unwrap();
            c.sink
                .write(bytes::Bytes::from(sample(9, MIB)))
                .await
                .unwrap();
            std::mem::forget(c.sink);
        });
        rt.shutdown_background();
    })
    .join()
    .unwrap();
}

/// Runner contract of the NFC import: the placeholder VM carries a marker; after a crash, a
/// rerun that overwrites removes the stale placeholder before `ImportVApp` (which would fail
/// on the duplicate name), and `delete_disk` (what the runner calls on a rerun) removes it
/// too; a VM of that name without the marker is left alone. A disk imported before survives
/// all of it (the placeholder is removed file by file, not with `Destroy_Task`, which takes
/// the whole directory on the simulator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfc_import_after_a_crash() {
    let Some(e) = env() else { return };
    let p = VsphereProvider::new(nfc_config(&e)).unwrap();
    let vm = unique("crash");
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![
            format!("[LocalDS_0] {vm}/d.vmdk"),
            format!("[LocalDS_0] {vm}/keep.vmdk"),
        ],
    };
    let data = sample(8, 4 * MIB);
    let spec = |name: &str| DiskCreateSpec {
        vm: vm.clone(),
        name: name.into(),
        capacity: 4 * MIB,
        format: None,
        placement: None,
        overwrite: false,
    };
    let keep = write_spec(&p, &spec("keep"), &data).await;
    let ph = virtrigaud_vsphere::nfc::placeholder_name(&vm, "d.vmdk");
    let gone = |p: VsphereProvider, ph: String| async move {
        let err = p.describe_vm(&ph).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    };

    // Crash, then a rerun that overwrites.
    crash_mid_import(&e, &spec("d"));
    let left = p.describe_vm(&ph).await.unwrap();
    assert!(
        virtrigaud_vsphere::nfc::is_placeholder(left.annotation.as_deref()),
        "{:?}",
        left.annotation
    );
    let mut over = spec("d");
    over.overwrite = true;
    let loc = write_spec(&p, &over, &data).await;
    assert_eq!(loc, format!("[LocalDS_0] {vm}/d.vmdk"));
    gone(p.clone(), ph.clone()).await;

    // Crash (replacing that disk), then a rerun as the runner does it: find the disk, delete
    // it, import again.
    crash_mid_import(&e, &over);
    assert!(
        p.describe_vm(&ph).await.is_ok(),
        "the crash left no placeholder"
    );
    let found = p
        .find_disk(&spec("d"))
        .await
        .unwrap()
        .expect("the crashed disk");
    p.delete_disk(&vm, &found).await.unwrap();
    gone(p.clone(), ph.clone()).await;
    assert_eq!(p.find_disk(&spec("d")).await.unwrap(), None);
    write_spec(&p, &spec("d"), &data).await;

    // Crash, then the disk files are deleted by hand (the placeholder stays): the next
    // import removes the stale placeholder before its ImportVApp.
    crash_mid_import(&e, &over);
    let fm = p.client().content().await.unwrap().file_manager.clone();
    let dc = p.datacenter().await.unwrap().moref.clone();
    for f in ["d.vmdk", "d-flat.vmdk"] {
        let _ = p
            .client()
            .run_task(
                "DeleteDatastoreFile_Task",
                &format!(
                    "{}<name>[LocalDS_0] {vm}/{f}</name>{}",
                    fm.this(),
                    dc.xml("datacenter")
                ),
            )
            .await;
    }
    assert_eq!(p.find_disk(&spec("d")).await.unwrap(), None);
    assert!(
        p.describe_vm(&ph).await.is_ok(),
        "the crash left no placeholder"
    );
    write_spec(&p, &spec("d"), &data).await;
    gone(p.clone(), ph.clone()).await;

    // Exactly the two disks, no VM of this test left.
    assert_eq!(p.find_disk(&spec("d")).await.unwrap(), Some(loc));
    assert_eq!(p.find_disk(&spec("keep")).await.unwrap(), Some(keep));
    let ours: Vec<_> = p
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.name.contains(&vm))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");

    // A VM of the placeholder's name that is not ours blocks the import and is left alone.
    let flat = provider(&e);
    let other = write_disk(&flat, &vm, "other", &sample(10, MIB)).await;
    let squatter = virtrigaud_vsphere::nfc::placeholder_name(&vm, "x.vmdk");
    flat.create_vm(&VmSpec {
        name: squatter.clone(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: other.clone(),
            bus: DiskBus::Scsi,
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        overwrite: false,
        annotation: Some("someone else's".into()),
    })
    .await
    .unwrap();
    let err = p.create_disk(&spec("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    p.delete_disk(&vm, &format!("[LocalDS_0] {vm}/x.vmdk"))
        .await
        .unwrap();
    assert!(
        p.describe_vm(&squatter).await.is_ok(),
        "not ours, not removed"
    );
    flat.delete_vm(&squatter).await.unwrap();
    flat.delete_disk(&vm, &other).await.unwrap();
}

/// Stores `body` as `name` in `vm`'s directory of `LocalDS_0` through `/folder`, with the
/// provider's data client (the wrapped `/folder` wants the session cookie), and checks that the
/// answer is a success.
async fn put_ds_file(
    p: &VsphereProvider,
    e: &Env,
    vm: &str,
    name: &str,
    body: impl Into<reqwest::Body>,
) {
    let base = e.url.trim_end_matches("/sdk");
    let url = format!("{base}/folder/{vm}/{name}?dcPath=DC0&dsName=LocalDS_0");
    let r = p
        .client()
        .data_request(reqwest::Method::PUT, &url)
        .await
        .unwrap()
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{name}: {}", r.status());
}

/// A ready `ImportVApp` lease for `disk` of `vm`, and a keeper that reports `percent` every
/// 50 ms.
async fn kept_lease(
    p: &VsphereProvider,
    vm: &str,
    disk: &virtrigaud_vsphere::datastore::DsPath,
    percent: u8,
) -> (
    virtrigaud_vsphere::MoRef,
    virtrigaud_vsphere::nfc::LeaseKeeper,
) {
    use virtrigaud_vsphere::nfc::{LeaseKeeper, start_import_lease, wait_ready};
    let client = p.client().clone();
    let lease = start_import_lease(p, vm, disk, MIB).await.unwrap();
    wait_ready(&client, &lease, "ImportVApp").await.unwrap();
    let k = LeaseKeeper::start(
        client,
        lease.clone(),
        Duration::from_millis(50),
        move || percent,
    );
    (lease, k)
}

/// The lease keep-alive loop against the simulator's `ImportVApp` lease (the same
/// `HttpNfcLease` object as an export lease): progress is reported while it runs, `Complete`
/// and `Abort` (explicit or by drop) end it. The simulator forgets a lease once it is completed
/// or aborted (a property read answers ManagedObjectNotFound), where vSphere would show
/// `state` `done` or `error`: the test accepts only the simulator's answer, so a keeper that
/// ended nothing would fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_on_an_import_lease() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("lk");
    let base = write_disk(&p, &vm, "base", &sample(11, MIB)).await;
    let disk = virtrigaud_vsphere::datastore::DsPath {
        datastore: "LocalDS_0".into(),
        path: format!("{vm}/k.vmdk"),
    };
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![disk.display(), base.clone()],
    };
    let client = p.client().clone();
    let ended = |client: std::sync::Arc<virtrigaud_vsphere::Client>, lease| async move {
        let err = client.properties(&lease, &["state"]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    };

    // Progress while it runs, then Complete.
    let (lease, k) = kept_lease(&p, &vm, &disk, 42).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        k.progress_calls() >= 3,
        "{} progress calls",
        k.progress_calls()
    );
    let o = client
        .properties(&lease, &["transferProgress", "state"])
        .await
        .unwrap();
    assert_eq!(o.text("transferProgress"), Some("42"));
    assert_eq!(o.text("state"), Some("ready"));
    k.complete().await.unwrap();
    ended(client.clone(), lease).await;

    // Explicit abort.
    let (lease, k) = kept_lease(&p, &vm, &disk, 7).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client
            .properties(&lease, &["transferProgress"])
            .await
            .unwrap()
            .text("transferProgress"),
        Some("7")
    );
    k.abort().await.unwrap();
    ended(client.clone(), lease).await;

    // Dropped without an end: aborted in the background.
    let (lease, k) = kept_lease(&p, &vm, &disk, 1).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    drop(k);
    let mut aborted = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(err) = client.properties(&lease, &["state"]).await {
            assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            aborted = true;
            break;
        }
    }
    assert!(aborted, "the dropped keeper did not abort the lease");
    // The placeholder of the last lease: removed by delete_disk, as after a crash.
    p.delete_disk(&vm, &disk.display()).await.unwrap();
    let err = p
        .describe_vm(&virtrigaud_vsphere::nfc::placeholder_name(&vm, "k.vmdk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// Task deadlines against a private simulator whose `PowerOnVM_Task` and `ResetVM_Task` tasks
/// show "running" for a while (our `main.go`'s `-task-delay`: the simulator itself runs every
/// task before it answers). A task still running at the deadline fails with `Timeout` and is
/// cancelled: the simulator (our wrapper, as vSphere does) then shows the task as `error` with
/// `RequestCanceled`, which the client maps to `Cancelled`. A task that ends before the
/// deadline is waited for. What the simulator cannot show: that vSphere really stops the work
/// (here it was done before the task was shown running), and tasks that refuse to be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_deadline_cancels_the_task() {
    let Some(e) = env() else { return };
    let Some((mut child, port)) =
        private_vcsim(&["-task-delay", "PowerOnVM_Task=60s,ResetVM_Task=1s"]).await
    else {
        return;
    };
    let c = VsphereConfig::new(format!("https://127.0.0.1:{port}/sdk"), "k", "kpass")
        .with_thumbprint(&e.thumbprint)
        .with_datacenter("DC0");
    let p = VsphereProvider::new(c).unwrap();
    let client = p.client().clone();
    let r = p.find_vm("DC0_H0_VM0").await.unwrap();
    p.power(&r.value, PowerOp::Off).await.unwrap();

    let n = client.call("PowerOnVM_Task", &r.this()).await.unwrap();
    let task = n
        .child("returnval")
        .and_then(virtrigaud_vsphere::MoRef::from_node)
        .unwrap();
    let t0 = std::time::Instant::now();
    let err = client
        .wait_task_for(&task, "PowerOnVM_Task", Duration::from_millis(1500))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(err.to_string().contains("; cancelled"), "{err}");
    // What the simulator answered to the CancelTask: the task ended as cancelled.
    let o = client.properties(&task, &["info"]).await.unwrap();
    let info = o.props.get("info").unwrap();
    assert_eq!(info.text_at(&["state"]), Some("error"));
    assert_eq!(
        info.child("error")
            .and_then(|e| e.child("fault"))
            .and_then(|f| f.xsi_type.as_deref()),
        Some("RequestCanceled")
    );
    let err = client
        .wait_task_for(&task, "PowerOnVM_Task", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");

    // A task that runs for a second within a longer deadline is waited for.
    let n = client.call("ResetVM_Task", &r.this()).await.unwrap();
    let task = n
        .child("returnval")
        .and_then(virtrigaud_vsphere::MoRef::from_node)
        .unwrap();
    let running = client.properties(&task, &["info"]).await.unwrap();
    assert_eq!(
        running.props.get("info").unwrap().text_at(&["state"]),
        Some("running")
    );
    let t0 = std::time::Instant::now();
    client
        .wait_task_for(&task, "ResetVM_Task", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// How many snapshots VM `vm` has (the roots of its snapshot tree).
async fn snapshot_count(p: &VsphereProvider, vm: &str) -> usize {
    let r = p.find_vm(vm).await.unwrap();
    let o = p.client().properties(&r, &["snapshot"]).await.unwrap();
    o.props
        .get("snapshot")
        .map(|s| s.children_named("rootSnapshotList").count())
        .unwrap_or(0)
}

/// A file store whose disk objects fail after 1 MiB (the peer under test is the simulator; this
/// store only fails). When it fails it records how many snapshots the source VM has then.
#[derive(Clone, Debug)]
struct FailingStore {
    inner: Arc<FsBackend>,
    source: VsphereProvider,
    vm: String,
    seen_snapshots: Arc<std::sync::Mutex<Option<usize>>>,
}

struct FailingSink {
    inner: Box<dyn virtrigaud_core::io::ByteSink>,
    written: u64,
    store: FailingStore,
}

#[async_trait::async_trait]
impl virtrigaud_core::io::ByteSink for FailingSink {
    async fn write(&mut self, data: bytes::Bytes) -> virtrigaud_core::Result<()> {
        self.written += data.len() as u64;
        if self.written > MIB {
            let n = snapshot_count(&self.store.source, &self.store.vm).await;
            *self.store.seen_snapshots.lock().unwrap() = Some(n);
            return Err(virtrigaud_core::Error::new(
                ErrorKind::Io,
                "injected: the store failed midway",
            ));
        }
        self.inner.write(data).await
    }
    async fn commit(self: Box<Self>) -> virtrigaud_core::Result<()> {
        self.inner.commit().await
    }
    async fn abort(self: Box<Self>) -> virtrigaud_core::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait::async_trait]
impl virtrigaud_core::StorageBackend for FailingStore {
    fn location(&self) -> String {
        format!("failing+{}", self.inner.location())
    }
    fn capabilities(&self) -> virtrigaud_core::StorageCapabilities {
        self.inner.capabilities()
    }
    async fn put(
        &self,
        key: &str,
        opts: &virtrigaud_core::PutOptions,
    ) -> virtrigaud_core::Result<Box<dyn virtrigaud_core::io::ByteSink>> {
        let sink = self.inner.put(key, opts).await?;
        if key.ends_with(".json") || key.ends_with(".lease") {
            return Ok(sink);
        }
        Ok(Box::new(FailingSink {
            inner: sink,
            written: 0,
            store: self.clone(),
        }))
    }
    async fn get(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> virtrigaud_core::Result<virtrigaud_core::ByteStream> {
        self.inner.get(key, range).await
    }
    async fn stat(&self, key: &str) -> virtrigaud_core::Result<virtrigaud_core::ObjectMeta> {
        self.inner.stat(key).await
    }
    async fn delete(&self, key: &str) -> virtrigaud_core::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> virtrigaud_core::Result<Vec<virtrigaud_core::ObjectMeta>> {
        self.inner.list(prefix).await
    }
}

/// A VM with `disks` (name, bytes) written as flat disks, created stopped, no NIC.
async fn make_vm(p: &VsphereProvider, vm: &str, disks: &[(&str, &[u8])]) -> Vec<String> {
    let mut locs = Vec::new();
    for (name, data) in disks {
        locs.push(write_disk(p, vm, name, data).await);
    }
    p.create_vm(&VmSpec {
        name: vm.into(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: locs
            .iter()
            .map(|l| VmDiskSpec {
                location: l.clone(),
                bus: DiskBus::Scsi,
                format: DiskFormat::Raw,
            })
            .collect(),
        nics: vec![],
        overwrite: false,
        annotation: None,
    })
    .await
    .unwrap();
    locs
}

/// The snapshot the runner takes of a running vSphere VM is removed when the export into the
/// store fails midway: with `OnFailure::Rollback` by the failed run itself; with the default
/// (`Keep`, so that a rerun resumes from the same point in time) it stays, and
/// `Migration::rollback` removes it. The failing store checks that the snapshot existed while
/// the export ran. (The CLI's `export --snapshot` deletes its snapshot after the loop whether
/// or not the export worked; that path is not run here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_removed_when_the_export_fails() {
    use virtrigaud_core::{Migration, MigrationPlan, OnFailure, PrepareSource};
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("snapfail");
    let locs = make_vm(&p, &vm, &[("d", &sample(12, 8 * MIB))]).await;
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: locs,
    };
    p.power(&vm, PowerOp::On).await.unwrap();
    assert_eq!(snapshot_count(&p, &vm).await, 0);
    let dir = tempfile::tempdir().unwrap();
    let store = FailingStore {
        inner: Arc::new(FsBackend::new(dir.path())),
        source: p.clone(),
        vm: vm.clone(),
        seen_snapshots: Arc::default(),
    };
    let source: Arc<dyn Provider> = Arc::new(p.clone());
    let run = |plan: MigrationPlan| {
        Migration::new(
            source.clone(),
            source.clone(),
            Arc::new(store.clone()),
            plan,
        )
    };
    let base = MigrationPlan::new(&vm, "migrations/snapfail")
        .with_target_name(unique("snapfail-dst"))
        .with_prepare(PrepareSource::Snapshot);

    // Rollback on failure: the failed run removes its snapshot.
    let plan = base.clone().with_on_failure(OnFailure::Rollback);
    let err = run(plan).run().await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(
        store.seen_snapshots.lock().unwrap().take(),
        Some(1),
        "the export did not run from a snapshot"
    );
    assert_eq!(snapshot_count(&p, &vm).await, 0, "the snapshot was left");

    // Keep (the default): the snapshot stays for a resume; rolling back removes it.
    let m = run(base.clone());
    let err = m.run().await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(store.seen_snapshots.lock().unwrap().take(), Some(1));
    assert_eq!(snapshot_count(&p, &vm).await, 1);
    m.rollback().await.unwrap();
    assert_eq!(snapshot_count(&p, &vm).await, 0, "the snapshot was left");
    p.power(&vm, PowerOp::Off).await.unwrap();
}

/// A provider that fails the `n`-th `create_disk` once; counts the calls per disk name.
#[derive(Debug)]
struct FailNth {
    inner: VsphereProvider,
    fail_at: usize,
    calls: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Provider for FailNth {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capabilities(&self) -> virtrigaud_core::Capabilities {
        self.inner.capabilities()
    }
    async fn validate(&self) -> virtrigaud_core::Result<()> {
        self.inner.validate().await
    }
    async fn list_vms(&self) -> virtrigaud_core::Result<Vec<virtrigaud_core::VmSummary>> {
        self.inner.list_vms().await
    }
    async fn describe_vm(&self, vm: &str) -> virtrigaud_core::Result<virtrigaud_core::VmInfo> {
        self.inner.describe_vm(vm).await
    }
    async fn power(&self, vm: &str, op: PowerOp) -> virtrigaud_core::Result<()> {
        self.inner.power(vm, op).await
    }
    async fn create_snapshot(
        &self,
        vm: &str,
        name: &str,
    ) -> virtrigaud_core::Result<virtrigaud_core::SnapshotRef> {
        self.inner.create_snapshot(vm, name).await
    }
    async fn delete_snapshot(
        &self,
        vm: &str,
        s: &virtrigaud_core::SnapshotRef,
    ) -> virtrigaud_core::Result<()> {
        self.inner.delete_snapshot(vm, s).await
    }
    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        s: Option<&virtrigaud_core::SnapshotRef>,
    ) -> virtrigaud_core::Result<virtrigaud_core::OpenedDisk> {
        self.inner.open_disk(vm, disk, s).await
    }
    async fn create_disk(
        &self,
        spec: &DiskCreateSpec,
    ) -> virtrigaud_core::Result<virtrigaud_core::CreatedDisk> {
        let n = {
            let mut c = self.calls.lock().unwrap();
            c.push(spec.name.clone());
            c.len()
        };
        if n == self.fail_at {
            return Err(virtrigaud_core::Error::new(
                ErrorKind::Provider,
                "injected: create_disk fails once",
            ));
        }
        self.inner.create_disk(spec).await
    }
    async fn create_vm(&self, spec: &VmSpec) -> virtrigaud_core::Result<virtrigaud_core::VmInfo> {
        self.inner.create_vm(spec).await
    }
    async fn delete_vm(&self, vm: &str) -> virtrigaud_core::Result<()> {
        self.inner.delete_vm(vm).await
    }
    async fn find_disk(&self, spec: &DiskCreateSpec) -> virtrigaud_core::Result<Option<String>> {
        self.inner.find_disk(spec).await
    }
    async fn open_created_disk(
        &self,
        vm: &str,
        location: &str,
    ) -> virtrigaud_core::Result<virtrigaud_core::OpenedDisk> {
        self.inner.open_created_disk(vm, location).await
    }
    async fn delete_disk(&self, vm: &str, location: &str) -> virtrigaud_core::Result<()> {
        self.inner.delete_disk(vm, location).await
    }
}

/// A two-disk vSphere → vSphere migration whose first run fails creating the second disk on
/// the target: the rerun exports nothing again and imports only the second disk; the target
/// VM's disks then have the source's content digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_moves_only_the_missing_disk() {
    use virtrigaud_core::transfer::digest_disk;
    use virtrigaud_core::{Migration, MigrationPlan};
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("resume");
    let dst = unique("resume-dst");
    let locs = make_vm(
        &p,
        &vm,
        &[("a", &sample(13, 4 * MIB)), ("b", &sample(14, 6 * MIB))],
    )
    .await;
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: locs,
    };
    let mut dst_cleanup = Cleanup {
        env: e.clone(),
        vm: dst.clone(),
        disks: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn virtrigaud_core::StorageBackend> = Arc::new(FsBackend::new(dir.path()));
    let source: Arc<dyn Provider> = Arc::new(p.clone());
    let target = Arc::new(FailNth {
        inner: p.clone(),
        fail_at: 2,
        calls: Default::default(),
    });
    let plan = MigrationPlan::new(&vm, "migrations/resume").with_target_name(dst.clone());
    let err = Migration::new(
        source.clone(),
        target.clone(),
        storage.clone(),
        plan.clone(),
    )
    .run()
    .await
    .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let first: Vec<String> = target.calls.lock().unwrap().clone();
    assert_eq!(first.len(), 2, "{first:?}");
    let report = Migration::new(source.clone(), target.clone(), storage.clone(), plan)
        .run()
        .await
        .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (0, 1));
    let all: Vec<String> = target.calls.lock().unwrap().clone();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(
        all[2], first[1],
        "the rerun created another disk than the missing one"
    );
    let info = p.describe_vm(&dst).await.unwrap();
    dst_cleanup.disks = info.disks.iter().map(|d| d.location.clone()).collect();
    assert_eq!(info.disks.len(), 2);
    let src = p.describe_vm(&vm).await.unwrap();
    for (s, d) in src.disks.iter().zip(&info.disks) {
        let a = digest_disk(&p, &vm, &s.id, &ImportOptions::default())
            .await
            .unwrap();
        let b = digest_disk(&p, &dst, &d.id, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(a, b, "{} vs {}", s.location, d.location);
    }
}

/// Hosted sparse VMDKs on the datastore, as `qemu-img` (an independent writer) makes them:
/// a monolithicSparse file, and a descriptor with one `SPARSE` extent (`twoGbMaxExtentSparse`
/// of a small disk); both export with the raw source's content digest. A descriptor with
/// several sparse extents is refused with its own fix, not the snapshot-chain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_sparse_vmdks_on_the_datastore() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let vm = unique("sparse");
    let base = write_disk(&p, &vm, "base", &sample(15, MIB)).await;
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("src.raw");
    std::fs::write(&raw, sample(16, 12 * MIB)).unwrap();
    for (sub, out) in [
        ("monolithicSparse", "ms.vmdk"),
        ("twoGbMaxExtentSparse", "tg.vmdk"),
    ] {
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&raw)
            .arg(scratch.path().join(out))
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img convert {sub}");
    }
    let files = ["ms.vmdk", "tg.vmdk", "tg-s001.vmdk", "split.vmdk"];
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: std::iter::once(base)
            .chain(files.iter().map(|f| format!("[LocalDS_0] {vm}/{f}")))
            .collect(),
    };
    for f in &files[..3] {
        let body = std::fs::read(scratch.path().join(f)).unwrap();
        put_ds_file(&p, &e, &vm, f, body).await;
    }
    let tg = std::fs::read_to_string(scratch.path().join("tg.vmdk")).unwrap();
    assert!(tg.contains("SPARSE \"tg-s001.vmdk\""), "{tg}");

    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let src = virtrigaud_core::io::LocalFile::open(&raw).await.unwrap();
    let want = export_image(
        virtrigaud_core::ImageSource::RandomAccess(Arc::new(src)),
        Some(DiskFormat::Raw),
        &storage,
        "src.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap()
    .manifest
    .content_digest;
    for f in ["ms.vmdk", "tg.vmdk"] {
        let o = p
            .open_created_disk(&vm, &format!("[LocalDS_0] {vm}/{f}"))
            .await
            .unwrap();
        assert_eq!(
            o.info.format,
            Some(DiskFormat::Vmdk(
                virtrigaud_core::format::VmdkSubformat::MonolithicSparse
            )),
            "{f}"
        );
        assert_eq!(o.info.capacity, 12 * MIB, "{f}");
        let got = export_image(
            o.source,
            o.info.format,
            &storage,
            &format!("{f}.qcow2"),
            None,
            None,
            &ExportOptions::default(),
        )
        .await
        .unwrap()
        .manifest
        .content_digest;
        assert_eq!(got, want, "{f}");
    }

    // Several sparse extents: refused, naming the split disk and its fix.
    let split = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                 createType=\"twoGbMaxExtentSparse\"\n\
                 RW 4192256 SPARSE \"split-s001.vmdk\"\nRW 2048 SPARSE \"split-s002.vmdk\"\n";
    put_ds_file(&p, &e, &vm, "split.vmdk", split).await;
    let err = p
        .open_created_disk(&vm, &format!("[LocalDS_0] {vm}/split.vmdk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("2 extents") && msg.contains("vmkfstools") && !msg.contains("consolidate"),
        "{msg}"
    );
}

/// An answer larger than `max_response_bytes` fails with a clear `Corrupt` error naming the
/// bound, instead of being buffered; small answers still pass under the same bound.
#[tokio::test]
async fn oversized_answers_are_refused() {
    let Some(e) = env() else { return };
    let mut c = config(&e);
    c.max_response_bytes = 16 << 10;
    let p = VsphereProvider::new(c).unwrap();
    p.client().login().await.unwrap();
    assert!(p.client().session_is_active().await.unwrap());
    // Every VM's device list: far more than 16 KiB on the simulator's inventory.
    let err = match p
        .client()
        .list("VirtualMachine", &["config.hardware.device"])
        .await
    {
        Ok(v) => panic!("{} objects answered under a 16 KiB bound", v.len()),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("16384 bytes") && msg.contains("max_response_bytes"),
        "{msg}"
    );
    // The same question under the default bound is answered.
    let all = provider(&e)
        .client()
        .list("VirtualMachine", &["config.hardware.device"])
        .await
        .unwrap();
    assert!(all.len() >= 4);
    let _ = p.logout().await;
}

/// The digest of `data` as an export computes it (the reference for the export under test).
async fn content_digest_of(data: &[u8]) -> virtrigaud_core::manifest::DigestValue {
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("src.raw");
    std::fs::write(&raw, data).unwrap();
    let storage = FsBackend::new(scratch.path());
    let src = virtrigaud_core::io::LocalFile::open(&raw).await.unwrap();
    export_image(
        virtrigaud_core::ImageSource::RandomAccess(Arc::new(src)),
        Some(DiskFormat::Raw),
        &storage,
        "ref.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap()
    .manifest
    .content_digest
}

/// Issue #10 item 7 on the data path: a second client ends our session while an export runs,
/// after its first MiB and before its other ranged `/folder` GETs (from the progress callback,
/// which blocks the pipeline until the session is gone). The simulator's `/folder` checks no
/// session; our `main.go` answers 401 for a dead one, as vSphere does. The export logs in again
/// exactly once (the session generation moves by one, to a new key) and its content digest is
/// the source's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_between_ranged_reads() {
    let Some(e) = env() else { return };
    let p = provider(&e);
    let admin = provider(&e);
    let vm = unique("sr");
    let mut data = sample(6, 32 * MIB);
    // Data all along, so every ranged GET carries some.
    for i in (0..data.len()).step_by(4096) {
        data[i] = (i / 4096) as u8 | 1;
    }
    let l = write_disk(&p, &vm, "d", &data).await;
    let _cl = Cleanup {
        env: e.clone(),
        vm: vm.clone(),
        disks: vec![l.clone()],
    };
    admin.validate().await.unwrap();
    let o = p.open_created_disk(&vm, &l).await.unwrap();
    let before = p.client().session_key().unwrap();
    let generation = p.client().generation();
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut opts = ExportOptions::default();
    opts.pipeline.queue_depth = 1;
    opts.pipeline.progress_interval = Duration::ZERO;
    let (k, key, rt) = (
        killed.clone(),
        before.clone(),
        tokio::runtime::Handle::current(),
    );
    let admin = Arc::new(admin);
    let a = admin.clone();
    opts.pipeline.progress = Some(Arc::new(move |pr: &virtrigaud_core::progress::Progress| {
        if pr.position >= MIB
            && pr.position < pr.virtual_size / 2
            && !k.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::task::block_in_place(|| {
                rt.block_on(a.client().terminate_sessions(std::slice::from_ref(&key)))
            })
            .unwrap();
        }
    }));
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let exp = export_image(
        o.source,
        o.info.format,
        &storage,
        "sr.qcow2",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    assert!(
        killed.load(std::sync::atomic::Ordering::SeqCst),
        "never terminated"
    );
    assert_eq!(
        p.client().generation(),
        generation + 1,
        "exactly one login again"
    );
    assert_ne!(p.client().session_key().unwrap(), before);
    assert_eq!(exp.manifest.virtual_size, 32 * MIB);
    assert_eq!(exp.manifest.content_digest, content_digest_of(&data).await);
}

/// The highest number of `/folder` GETs of `path` (`DIR/FILE` on the datastore) that our
/// `main.go` saw in flight at once.
async fn folder_gets_in_flight(e: &Env, path: &str) -> usize {
    let base = e.url.trim_end_matches("/sdk");
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let url = format!("{base}/vrg/folder-inflight?path=/folder/{path}");
    let body = http.get(url).send().await.unwrap().text().await.unwrap();
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{body:?}: vcsim without the in-flight count of main.go"))
}

/// A datastore export keeps more than one and at most `folder_concurrency` ranged GETs in
/// flight (default 4; 2 when configured so), counted by our `main.go` at the simulator.
#[tokio::test]
async fn export_ranged_reads_in_flight_are_bounded() {
    let Some(e) = env() else { return };
    let mut data = sample(7, 32 * MIB);
    for i in (0..data.len()).step_by(4096) {
        data[i] = (i / 4096) as u8 | 1;
    }
    for (limit, name) in [(None, "d4"), (Some(2), "d2")] {
        let mut c = config(&e);
        if let Some(n) = limit {
            c.folder_concurrency = n;
        }
        let p = VsphereProvider::new(c).unwrap();
        let vm = unique("if");
        let l = write_disk(&p, &vm, name, &data).await;
        let _cl = Cleanup {
            env: e.clone(),
            vm: vm.clone(),
            disks: vec![l.clone()],
        };
        let o = p.open_created_disk(&vm, &l).await.unwrap();
        let store = tempfile::tempdir().unwrap();
        let storage = FsBackend::new(store.path());
        let exp = export_image(
            o.source,
            o.info.format,
            &storage,
            "if.qcow2",
            None,
            None,
            &ExportOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(exp.manifest.content_digest, content_digest_of(&data).await);
        let max = folder_gets_in_flight(&e, &format!("{vm}/{name}-flat.vmdk")).await;
        let limit = limit.unwrap_or(4);
        assert!(
            max > 1 && max <= limit,
            "{max} ranged GETs in flight at most, limit {limit}"
        );
    }
}

//! Tests against a real libvirtd (see `scripts/peers/libvirt.sh`).
//!
//! `VIRTRIGAUD_LIBVIRT_URI` (e.g. `qemu:///system`) and, for the remote test,
//! `VIRTRIGAUD_LIBVIRT_TCP_URI` (`qemu+tcp://127.0.0.1/system`) name the daemon. Without them a
//! test prints `SKIP: …` and passes, unless `VIRTRIGAUD_IT=1`, when it fails.
//!
//! Every test uses its own transient `dir` pools under a temp dir and unique domain names, and
//! removes them (guards run on panic too). Disk images are prepared with `qemu-img`; libvirt
//! objects are set up with `virsh` where the provider is not what is being tested.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use virtrigaud_core::transfer::{
    ExportOptions, ImportOptions, digest_disk, export_disk, import_disk,
};
use virtrigaud_core::{
    DiskBus, DiskCreateSpec, DiskFormat, ErrorKind, Firmware, NicInfo, PowerOp, PowerState,
    Provider, VmDiskSpec, VmSpec,
};
use virtrigaud_libvirt::LibvirtProvider;
use virtrigaud_libvirt::domain_xml::DomainOptions;
use virtrigaud_storage::FsBackend;
use virtrigaud_testkit::libvirt::{DomainGuard, TestPool, define_xml, virsh};
use virtrigaud_testkit::{BOOT_MARKER, boot_sector, peer_env, unique, write_patterned_raw};

const MIB: u64 = 1 << 20;

fn env_uri(var: &str) -> Option<String> {
    peer_env(var, "libvirt.sh")
}

fn guard(uri: &str, name: &str) -> DomainGuard {
    DomainGuard::new(uri, name)
}

fn qemu_img(args: &[&str]) {
    virtrigaud_testkit::run("qemu-img", args);
}

fn file_disk_xml(path: &Path, fmt: &str, dev: &str, bus: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>\
         <source file='{}'/><target dev='{dev}' bus='{bus}'/></disk>",
        path.display()
    )
}

fn domain_xml(name: &str, devices: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{devices}</devices></domain>"
    )
}

/// A stopped domain named after `tag` with two disks in `pool`: `vda`, a qcow2 holding the
/// 48 MiB patterned image, and `vdb`, the 64 MiB sparse patterned raw file.
fn two_disk_domain(uri: &str, pool: &TestPool, scratch: &Path, tag: &str) -> (String, DomainGuard) {
    let raw_src = pool.path("data.raw");
    write_patterned_raw(&raw_src, 64 * MIB);
    let tmp_raw = scratch.join("q.raw");
    write_patterned_raw(&tmp_raw, 48 * MIB);
    let q_src = pool.path("sys.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        tmp_raw.to_str().unwrap(),
        q_src.to_str().unwrap(),
    ]);
    pool.refresh();
    let vm = unique(tag);
    let g = guard(uri, &vm);
    define_xml(
        uri,
        scratch,
        &domain_xml(
            &vm,
            &(file_disk_xml(&q_src, "qcow2", "vda", "virtio")
                + &file_disk_xml(&raw_src, "raw", "vdb", "virtio")),
        ),
    );
    (vm, g)
}

/// A qcow2 and a sparse raw disk in pool A, exported to storage, imported into pool B (qcow2 and
/// raw), attached to a VM made with `create_vm`; content digests of source and target match,
/// the raw import stays sparse and `qemu-img compare` agrees. Through libvirt streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_qcow2_and_sparse_raw() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    round_trip(&uri, false).await;
}

/// The same through the volumes' files on this host (`with_local_files`, the default for a
/// local URI): reads see the file itself with its holes, and every disk is read and written
/// through its file, none through a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_qcow2_and_sparse_raw_through_local_files() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    assert!(LibvirtProvider::new(&uri).uses_local_files(), "{uri}");
    round_trip(&uri, true).await;
}

async fn round_trip(uri: &str, local_files: bool) {
    let uri = uri.to_string();
    let pa = TestPool::new(&uri, "rt-a");
    let pb = TestPool::new(&uri, "rt-b");
    let scratch = tempfile::tempdir().unwrap();
    let (src_vm, _g1) = two_disk_domain(&uri, &pa, scratch.path(), "rt-src");
    let (q_src, raw_src) = (pa.path("sys.qcow2"), pa.path("data.raw"));

    let p = LibvirtProvider::new(&uri).with_local_files(local_files);
    assert_eq!(p.uses_local_files(), local_files);
    p.validate().await.unwrap();
    if local_files {
        // The raw volume is its file, holes and all.
        let opened = p.open_disk(&src_vm, "vdb", None).await.unwrap();
        assert_eq!(opened.info.capacity, 64 * MIB);
        let virtrigaud_core::ImageSource::RandomAccess(file) = opened.source else {
            panic!("expected the volume's file");
        };
        assert_eq!(file.size(), 64 * MIB);
        let ranges = file.data_ranges().await.unwrap().expect("SEEK_DATA map");
        let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!(data <= 8 * MIB, "data {data} of {ranges:?}");
    } else {
        // The raw volume arrives as a sparse stream: holes are Zero extents, not bytes.
        use futures::StreamExt;
        let opened = p.open_disk(&src_vm, "vdb", None).await.unwrap();
        assert_eq!(opened.info.capacity, 64 * MIB);
        let virtrigaud_core::ImageSource::Sequential { size, mut stream } = opened.source else {
            panic!("expected a sequential source");
        };
        assert_eq!(size, Some(64 * MIB));
        let (mut data, mut holes, mut end) = (0u64, 0u64, 0u64);
        while let Some(e) = stream.next().await {
            let e = e.unwrap();
            assert_eq!(e.offset(), end, "extents must be contiguous");
            end = e.end();
            if e.is_data() {
                data += e.len();
            } else {
                holes += e.len();
            }
        }
        assert_eq!(end, 64 * MIB);
        assert!(
            holes >= 56 * MIB && data <= 8 * MIB,
            "data {data}, holes {holes}"
        );
    }
    let store_dir = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store_dir.path());
    let dst_vm = unique("rt-dst");
    let _g2 = guard(&uri, &dst_vm);
    let mut disks = Vec::new();
    for (disk, target_format) in [("vda", DiskFormat::Qcow2), ("vdb", DiskFormat::Raw)] {
        let key = format!("rt/{disk}.qcow2");
        let t = Instant::now();
        let exp = export_disk(&p, &src_vm, disk, &storage, &key, &ExportOptions::default())
            .await
            .unwrap();
        let t_exp = t.elapsed();
        let t = Instant::now();
        let imp = import_disk(
            &storage,
            &key,
            &p,
            &dst_vm,
            disk,
            &ImportOptions {
                format: Some(target_format),
                placement: Some(pb.name.clone()),
                ..ImportOptions::default()
            },
        )
        .await
        .unwrap();

        eprintln!(
            "{disk}: virtual {} MiB, allocated {} KiB, stored {} KiB; export {:?}, import {:?}",
            exp.manifest.virtual_size / MIB,
            exp.manifest.allocated_bytes / 1024,
            exp.manifest.stored_size / 1024,
            t_exp,
            t.elapsed()
        );
        assert_eq!(imp.format, target_format);
        assert!(imp.location.starts_with(&format!("{}/", pb.name)));
        assert!(
            exp.manifest.allocated_bytes < 8 * MIB,
            "holes were transferred as data: {}",
            exp.manifest.allocated_bytes
        );
        disks.push((disk, imp, exp.manifest.content_digest.value.clone()));
    }
    // An existing target volume is refused without overwrite.
    let again = p
        .create_disk(&DiskCreateSpec {
            vm: dst_vm.clone(),
            name: "vda".into(),
            capacity: 64 * MIB,
            format: Some(DiskFormat::Qcow2),
            placement: Some(pb.name.clone()),
            overwrite: false,
        })
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists, "{again}");

    let spec = VmSpec {
        annotation: None,
        name: dst_vm.clone(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: disks
            .iter()
            .map(|(_, imp, _)| VmDiskSpec {
                location: imp.location.clone(),
                bus: DiskBus::Virtio,
                format: imp.format,
            })
            .collect(),
        nics: vec![],
        overwrite: false,
    };
    let info = p.create_vm(&spec).await.unwrap();
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.disks[0].capacity, 48 * MIB);
    assert_eq!(info.disks[1].capacity, 64 * MIB);
    assert_eq!(info.disks[0].format, Some(DiskFormat::Qcow2));
    assert_eq!(info.disks[1].format, Some(DiskFormat::Raw));
    assert!(info.disks[1].allocation.unwrap() < 16 * MIB, "{info:?}");
    // Defining it again is refused without overwrite.
    let e = p.create_vm(&spec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    let opts = ImportOptions::default();
    for (i, (disk, _, manifest_digest)) in disks.iter().enumerate() {
        let src = digest_disk(&p, &src_vm, disk, &opts).await.unwrap();
        let dst = digest_disk(&p, &dst_vm, &info.disks[i].id, &opts)
            .await
            .unwrap();
        assert_eq!(&src, manifest_digest);
        assert_eq!(src, dst, "{disk}");
    }
    // Independent oracle.
    let vol_b = |loc: &str| pb.path(loc.split_once('/').unwrap().1);
    qemu_img(&[
        "compare",
        q_src.to_str().unwrap(),
        vol_b(&disks[0].1.location).to_str().unwrap(),
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        raw_src.to_str().unwrap(),
        vol_b(&disks[1].1.location).to_str().unwrap(),
    ]);
    // Each disk went the way asked: 2 written, 7 read (the shape check, 2 exports, 4 digests).
    let paths = p.data_paths();
    let (local, stream) = (
        (paths.local_reads, paths.local_writes),
        (paths.stream_reads, paths.stream_writes),
    );
    if local_files {
        assert_eq!((local, stream), ((7, 2), (0, 0)), "{paths:?}");
    } else {
        assert_eq!((local, stream), ((0, 0), (7, 2)), "{paths:?}");
    }
    p.delete_vm(&dst_vm).await.unwrap();
    p.delete_vm(&src_vm).await.unwrap();
    let e = p.describe_vm(&dst_vm).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// Describe of a domain with a qcow2 file disk, a raw pool volume on SCSI, a CD-ROM (ignored)
/// and two NICs (network and bridge), defined from XML.
#[tokio::test]
async fn describe_multi_disk_multi_nic() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pool = TestPool::new(&uri, "desc");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        pool.path("os.qcow2").to_str().unwrap(),
        "100M",
    ]);
    virsh(
        &uri,
        &[
            "vol-create-as",
            &pool.name,
            "data.raw",
            "32M",
            "--format",
            "raw",
        ],
    );
    pool.refresh();
    let name = unique("desc");
    let _g = guard(&uri, &name);
    let devices = format!(
        "{}<disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
         <source pool='{}' volume='data.raw'/><target dev='sdb' bus='scsi'/></disk>\
         <disk type='file' device='cdrom'><target dev='sdc' bus='sata'/><readonly/></disk>\
         <controller type='scsi' model='virtio-scsi'/>\
         <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/>\
         <model type='virtio'/></interface>\
         <interface type='bridge'><mac address='52:54:00:12:34:57'/><source bridge='br-vrg'/>\
         <model type='e1000'/></interface>",
        file_disk_xml(&pool.path("os.qcow2"), "qcow2", "vda", "virtio"),
        pool.name
    );
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>1536</memory>\
         <vcpu>3</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
         <devices>{devices}</devices></domain>"
    );
    let scratch = tempfile::tempdir().unwrap();
    define_xml(&uri, scratch.path(), &xml);
    let p = LibvirtProvider::new(&uri);
    let info = p.describe_vm(&name).await.unwrap();
    eprintln!("{info:#?}");
    assert_eq!(info.name, name);
    assert_eq!(info.id.len(), 36);
    assert_eq!((info.cpus, info.memory_mib), (3, 1536));
    assert_eq!(info.firmware, Firmware::Bios);
    assert!(info.machine.as_deref().unwrap().contains("q35"));
    assert_eq!(info.state, PowerState::Stopped);
    assert_eq!(info.disks.len(), 2);
    let d0 = &info.disks[0];
    assert_eq!(d0.id, "vda");
    assert_eq!(d0.bus, Some(DiskBus::Virtio));
    assert_eq!(d0.format, Some(DiskFormat::Qcow2));
    assert_eq!(d0.capacity, 100 * MIB);
    assert!(d0.allocation.unwrap() < MIB);
    assert_eq!(d0.location, pool.path("os.qcow2").display().to_string());
    let d1 = &info.disks[1];
    assert_eq!(d1.id, "sdb");
    assert_eq!(d1.bus, Some(DiskBus::Scsi));
    assert_eq!(d1.format, Some(DiskFormat::Raw));
    assert_eq!(d1.capacity, 32 * MIB);
    assert_eq!(d1.location, format!("{}/data.raw", pool.name));
    assert_eq!(info.nics.len(), 2);
    assert_eq!(info.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(info.nics[0].model.as_deref(), Some("virtio"));
    assert_eq!(info.nics[0].network.as_deref(), Some("default"));
    assert_eq!(info.nics[1].model.as_deref(), Some("e1000"));
    assert_eq!(info.nics[1].network.as_deref(), Some("bridge:br-vrg"));
    // By UUID too, and listed.
    assert_eq!(p.describe_vm(&info.id).await.unwrap().name, name);
    assert!(p.list_vms().await.unwrap().iter().any(|v| v.name == name));
    // A missing disk id.
    let e = p.open_disk(&name, "vdz", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// Errors: missing VM, pool, volume; a VM whose disk file is in no pool.
#[tokio::test]
async fn clear_errors() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let p = LibvirtProvider::new(&uri);
    let missing = unique("missing");
    let e = p.describe_vm(&missing).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    let e = p.power(&missing, PowerOp::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);

    let e = p
        .create_disk(&DiskCreateSpec {
            vm: "x".into(),
            name: "d".into(),
            capacity: MIB,
            format: None,
            placement: Some(unique("nopool")),
            overwrite: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("pool"), "{e}");

    let pool = TestPool::new(&uri, "err");
    let spec = VmSpec {
        annotation: None,
        name: unique("novol"),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: None,
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: format!("{}/absent.qcow2", pool.name),
            bus: DiskBus::Virtio,
            format: DiskFormat::Qcow2,
        }],
        nics: vec![NicInfo::default()],
        overwrite: false,
    };
    let _g = guard(&uri, &spec.name);
    let e = p.create_vm(&spec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("absent.qcow2"), "{e}");

    // A disk file outside every pool cannot be streamed.
    let outside = tempfile::tempdir().unwrap();
    let f = outside.path().join("loose.raw");
    std::fs::File::create(&f).unwrap().set_len(MIB).unwrap();
    let name = unique("loose");
    let _g2 = guard(&uri, &name);
    define_xml(
        &uri,
        outside.path(),
        &domain_xml(&name, &file_disk_xml(&f, "raw", "vda", "virtio")),
    );
    let e = p.open_disk(&name, "vda", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("pool"), "{e}");

    // Aborting an upload leaves no volume behind.
    let created = p
        .create_disk(&DiskCreateSpec {
            vm: "ab".into(),
            name: "d".into(),
            capacity: 4 * MIB,
            format: Some(DiskFormat::Raw),
            placement: Some(pool.name.clone()),
            overwrite: false,
        })
        .await
        .unwrap();
    let mut sink = created.sink;
    sink.write(bytes::Bytes::from_static(b"partial"))
        .await
        .unwrap();
    sink.abort().await.unwrap();
    pool.refresh();
    let vols = virsh(&uri, &["vol-list", &pool.name]);
    assert!(!vols.contains("ab-d.raw"), "{vols}");

    // So does dropping one without commit (cleanup runs on a background thread).
    let created = p
        .create_disk(&DiskCreateSpec {
            vm: "dr".into(),
            name: "d".into(),
            capacity: 4 * MIB,
            format: None,
            placement: Some(pool.name.clone()),
            overwrite: false,
        })
        .await
        .unwrap();
    assert_eq!(created.format, DiskFormat::Qcow2);
    assert_eq!(created.location, format!("{}/dr-d.qcow2", pool.name));
    let mut sink = created.sink;
    sink.write(bytes::Bytes::from_static(b"partial"))
        .await
        .unwrap();
    drop(sink);
    let t = Instant::now();
    loop {
        pool.refresh();
        if !virsh(&uri, &["vol-list", &pool.name]).contains("dr-d.qcow2") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "dropped upload left its volume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same export over `qemu+tcp://`: equal content digest to the local connection's.
#[tokio::test]
async fn export_over_tcp() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let Some(tcp) = env_uri("VIRTRIGAUD_LIBVIRT_TCP_URI") else {
        return;
    };
    let pool = TestPool::new(&uri, "tcp");
    let scratch = tempfile::tempdir().unwrap();
    let tmp_raw = scratch.path().join("t.raw");
    write_patterned_raw(&tmp_raw, 32 * MIB);
    let q = pool.path("t.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        tmp_raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    pool.refresh();
    let name = unique("tcp");
    let _g = guard(&uri, &name);
    define_xml(
        &uri,
        scratch.path(),
        &domain_xml(&name, &file_disk_xml(&q, "qcow2", "vda", "virtio")),
    );
    let local = LibvirtProvider::new(&uri);
    let remote = LibvirtProvider::new(&tcp);
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let exp = export_disk(
        &remote,
        &name,
        "vda",
        &storage,
        "tcp/vda.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let d_local = digest_disk(&local, &name, "vda", &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(exp.manifest.content_digest.value, d_local);
    assert_eq!(exp.manifest.source.as_ref().unwrap().provider, "libvirt");
    assert_eq!(exp.manifest.vm.as_ref().unwrap().name, name);
    // And back in over TCP, as a raw volume uploaded with a sparse stream.
    let imp = import_disk(
        &storage,
        "tcp/vda.qcow2",
        &remote,
        &name,
        "copy",
        &ImportOptions {
            format: Some(DiskFormat::Raw),
            placement: Some(pool.name.clone()),
            ..ImportOptions::default()
        },
    )
    .await
    .unwrap();
    let copy = pool.path(imp.location.split_once('/').unwrap().1);
    qemu_img(&[
        "compare",
        "-F",
        "raw",
        q.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    let allocated = std::fs::metadata(&copy).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(allocated.unwrap() < 8 * MIB, "upload was not sparse");
}

/// Boot proof: a boot sector on a 64 MiB sparse qcow2 in pool A, exported to storage, imported
/// into pool B, defined with `create_vm` (BIOS, TCG, serial to a file), started; the marker
/// appears on the serial log. Then, while it runs: a disk-only external snapshot is read
/// point-in-time and deleted (block commit + pivot), a graceful shutdown times out (the guest
/// ignores ACPI) and a forced one powers it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_proof_and_running_snapshot() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pa = TestPool::new(&uri, "boot-a");
    let pb = TestPool::new(&uri, "boot-b");
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("boot.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    drop(f);
    let src_img = pa.path("boot.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        src_img.to_str().unwrap(),
    ]);
    pa.refresh();
    let src_vm = unique("boot-src");
    let _g1 = guard(&uri, &src_vm);
    define_xml(
        &uri,
        scratch.path(),
        &domain_xml(&src_vm, &file_disk_xml(&src_img, "qcow2", "vda", "virtio")),
    );
    let p = LibvirtProvider::new(&uri);
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    export_disk(
        &p,
        &src_vm,
        "vda",
        &storage,
        "boot/vda.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let vm = unique("boot");
    let _g2 = guard(&uri, &vm);
    let imp = import_disk(
        &storage,
        "boot/vda.qcow2",
        &p,
        &vm,
        "vda",
        &ImportOptions {
            placement: Some(pb.name.clone()),
            ..ImportOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(imp.format, DiskFormat::Qcow2);
    let serial = scratch.path().join("serial.log");
    let spec = VmSpec {
        annotation: None,
        name: vm.clone(),
        cpus: 1,
        memory_mib: 64,
        firmware: Firmware::Bios,
        machine: Some("pc".into()),
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: imp.location.clone(),
            bus: DiskBus::Virtio,
            format: imp.format,
        }],
        nics: vec![],
        overwrite: false,
    };
    let info = p
        .create_vm_with(
            &spec,
            &DomainOptions {
                domain_type: Some("qemu".into()),
                serial_file: Some(serial.display().to_string()),
                arch: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(info.state, PowerState::Stopped);
    let t = Instant::now();
    p.power(&vm, PowerOp::On).await.unwrap();
    let marker = BOOT_MARKER;
    loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(marker) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no boot marker after 60 s; serial log: {:?}",
            String::from_utf8_lossy(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("boot marker seen after {:?}", t.elapsed());
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Running);

    // Reboot is a guest request (ACPI); this guest ignores it and keeps running.
    p.power(&vm, PowerOp::Reboot).await.unwrap();
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Running);

    // Point-in-time read of a running VM through an external disk-only snapshot.
    let before = digest_disk(&p, &vm, "vda", &ImportOptions::default())
        .await
        .unwrap();
    let snap = p.create_snapshot(&vm, "vrg-pit").await.unwrap();
    let during = p.describe_vm(&vm).await.unwrap();
    assert!(during.disks[0].location.ends_with(".vrg-pit"), "{during:?}");
    let exp = export_disk(
        &p,
        &vm,
        "vda",
        &storage,
        "boot/pit.qcow2",
        &ExportOptions {
            snapshot: Some(snap.clone()),
            ..ExportOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(exp.manifest.content_digest.value, before);
    assert_eq!(
        exp.manifest.source.as_ref().unwrap().snapshot.as_deref(),
        Some("vrg-pit")
    );
    p.delete_snapshot(&vm, &snap).await.unwrap();
    let after = p.describe_vm(&vm).await.unwrap();
    assert_eq!(after.disks[0].location, imp.location, "{after:?}");
    pb.refresh();
    let vols = virsh(&uri, &["vol-list", &pb.name]);
    assert!(!vols.contains("vrg-pit"), "overlay left behind: {vols}");

    // The guest halts with interrupts off: ACPI shutdown is ignored.
    let e = p
        .power(
            &vm,
            PowerOp::Shutdown {
                timeout: Duration::from_secs(2),
                force: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    p.power(
        &vm,
        PowerOp::Shutdown {
            timeout: Duration::from_secs(1),
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(p.describe_vm(&vm).await.unwrap().state, PowerState::Stopped);
    p.delete_vm(&vm).await.unwrap();
}

/// A stopped VM gets an internal snapshot; reading with it gives the same content; deleting it
/// leaves no snapshot in libvirt or in the qcow2 file.
#[tokio::test]
async fn stopped_vm_internal_snapshot() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pool = TestPool::new(&uri, "isnap");
    let scratch = tempfile::tempdir().unwrap();
    let tmp_raw = scratch.path().join("i.raw");
    write_patterned_raw(&tmp_raw, 16 * MIB);
    let q = pool.path("i.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        tmp_raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    pool.refresh();
    let name = unique("isnap");
    let _g = guard(&uri, &name);
    define_xml(
        &uri,
        scratch.path(),
        &domain_xml(&name, &file_disk_xml(&q, "qcow2", "vda", "virtio")),
    );
    let p = LibvirtProvider::new(&uri);
    let before = digest_disk(&p, &name, "vda", &ImportOptions::default())
        .await
        .unwrap();
    let snap = p.create_snapshot(&name, "vrg-int").await.unwrap();
    assert!(virsh(&uri, &["snapshot-list", &name]).contains("vrg-int"));
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let exp = export_disk(
        &p,
        &name,
        "vda",
        &storage,
        "i/vda.vmdk",
        &ExportOptions {
            snapshot: Some(snap.clone()),
            format: DiskFormat::Vmdk(virtrigaud_core::format::VmdkSubformat::StreamOptimized),
            ..ExportOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(exp.manifest.content_digest.value, before);
    assert!(
        exp.manifest.stored_size < 4 * MIB,
        "holes stored: {}",
        exp.manifest.stored_size
    );
    p.delete_snapshot(&name, &snap).await.unwrap();
    assert!(!virsh(&uri, &["snapshot-list", &name]).contains("vrg-int"));
    let e = p.delete_snapshot(&name, &snap).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("vrg-int"));
}

/// Figures (run on demand: `cargo test -p virtrigaud-libvirt --test libvirtd -- --ignored`):
/// sparse download and upload rates of a 1 GiB raw volume holding 256 MiB of data, over the
/// local socket and over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_figures() {
    use futures::StreamExt;
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let tcp = std::env::var("VIRTRIGAUD_LIBVIRT_TCP_URI").ok();
    let pool = TestPool::new(&uri, "tput");
    let size = 1024 * MIB;
    let src = pool.path("big.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    let chunk: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    for i in 0..64u64 {
        f.write_all_at(&chunk, i * 16 * MIB).unwrap();
    }
    drop(f);
    pool.refresh();
    let name = unique("tput");
    let _g = guard(&uri, &name);
    let scratch = tempfile::tempdir().unwrap();
    define_xml(
        &uri,
        scratch.path(),
        &domain_xml(&name, &file_disk_xml(&src, "raw", "vda", "virtio")),
    );
    for u in std::iter::once(uri.clone()).chain(tcp) {
        // Streams: the local URI would otherwise use the volume's file.
        let p = LibvirtProvider::new(&u).with_local_files(false);
        let t = Instant::now();
        let opened = p.open_disk(&name, "vda", None).await.unwrap();
        let virtrigaud_core::ImageSource::Sequential { mut stream, .. } = opened.source else {
            panic!()
        };
        let mut data = 0u64;
        while let Some(e) = stream.next().await {
            let e = e.unwrap();
            if e.is_data() {
                data += e.len();
            }
        }
        let el = t.elapsed().as_secs_f64();
        eprintln!(
            "download {u}: {} MiB data of 1 GiB in {el:.2} s = {:.0} MiB/s of data",
            data / MIB,
            data as f64 / MIB as f64 / el
        );
        let t = Instant::now();
        let created = p
            .create_disk(&DiskCreateSpec {
                vm: name.clone(),
                name: format!("up{}", u.len()),
                capacity: size,
                format: Some(DiskFormat::Raw),
                placement: Some(pool.name.clone()),
                overwrite: true,
            })
            .await
            .unwrap();
        let mut sink = created.sink;
        for _ in 0..64 {
            sink.write(bytes::Bytes::from(chunk.clone())).await.unwrap();
            sink.write_zeros(12 * MIB).await.unwrap();
        }
        sink.commit().await.unwrap();
        let el = t.elapsed().as_secs_f64();
        eprintln!(
            "upload {u}: 256 MiB data + 768 MiB holes in {el:.2} s = {:.0} MiB/s of data",
            256.0 / el
        );
    }
}

/// `create_vm` with UEFI, q35, a SATA disk by path and NICs on a network and a bridge; the
/// definition reads back the same; `overwrite` replaces it.
#[tokio::test]
async fn create_vm_uefi_nics_and_overwrite() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pool = TestPool::new(&uri, "uefi");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        pool.path("u.qcow2").to_str().unwrap(),
        "10M",
    ]);
    pool.refresh();
    let p = LibvirtProvider::new(&uri).with_domain_type("qemu");
    let mut spec = VmSpec {
        annotation: None,
        name: unique("uefi"),
        cpus: 2,
        memory_mib: 256,
        firmware: Firmware::Uefi,
        machine: Some("q35".into()),
        guest_os: None,
        disks: vec![VmDiskSpec {
            location: pool.path("u.qcow2").display().to_string(),
            bus: DiskBus::Sata,
            format: DiskFormat::Qcow2,
        }],
        nics: vec![
            NicInfo {
                mac: Some("52:54:00:01:02:03".into()),
                model: Some("e1000e".into()),
                network: Some("default".into()),
            },
            NicInfo {
                mac: None,
                model: None,
                network: Some("bridge:br-vrg".into()),
            },
        ],
        overwrite: false,
    };
    let _g = guard(&uri, &spec.name);
    let info = p.create_vm(&spec).await.unwrap();
    assert_eq!(info.firmware, Firmware::Uefi);
    assert!(info.machine.as_deref().unwrap().contains("q35"));
    assert_eq!((info.cpus, info.memory_mib), (2, 256));
    assert_eq!(info.disks.len(), 1);
    assert_eq!(info.disks[0].id, "sda");
    assert_eq!(info.disks[0].bus, Some(DiskBus::Sata));
    assert_eq!(info.disks[0].capacity, 10 * MIB);
    assert_eq!(info.nics.len(), 2);
    assert_eq!(info.nics[0].mac.as_deref(), Some("52:54:00:01:02:03"));
    assert_eq!(info.nics[0].model.as_deref(), Some("e1000e"));
    assert_eq!(info.nics[0].network.as_deref(), Some("default"));
    assert_eq!(info.nics[1].network.as_deref(), Some("bridge:br-vrg"));
    assert!(info.nics[1].mac.is_some(), "libvirt assigns a MAC");
    spec.overwrite = true;
    spec.cpus = 3;
    let info2 = p.create_vm(&spec).await.unwrap();
    assert_eq!(info2.cpus, 3);
    assert_ne!(info2.id, info.id);
    p.delete_vm(&spec.name).await.unwrap();
}

/// The whole migration runner on libvirt (what `examples/libvirt_migrate.rs` does): a stopped
/// domain with a qcow2 and a sparse raw disk in pool A goes through a file store into pool B as
/// a new domain with the same hardware; the runner verifies every target disk's content digest
/// against the source's; a second run finds everything done in the checkpoint and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_runner_moves_a_domain_between_pools() {
    use virtrigaud_core::{Migration, MigrationPlan};
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pa = TestPool::new(&uri, "mig-a");
    let pb = TestPool::new(&uri, "mig-b");
    let scratch = tempfile::tempdir().unwrap();
    let (src_vm, _g1) = two_disk_domain(&uri, &pa, scratch.path(), "mig-src");
    let dst_vm = unique("mig-dst");
    let _g2 = guard(&uri, &dst_vm);
    let p = LibvirtProvider::new(&uri);
    let store_dir = tempfile::tempdir().unwrap();
    let mut plan = MigrationPlan::new(&src_vm, "migrations/one");
    plan.target_name = Some(dst_vm.clone());
    plan.placement = Some(pb.name.clone());
    let pa_ = std::sync::Arc::new(LibvirtProvider::new(&uri));
    let storage_: std::sync::Arc<dyn virtrigaud_core::StorageBackend> =
        std::sync::Arc::new(FsBackend::new(store_dir.path()));
    let report = Migration::new(pa_.clone(), pa_.clone(), storage_.clone(), plan.clone())
        .run()
        .await
        .unwrap();
    assert_eq!((report.exported_now, report.imported_now), (2, 2));
    let created = report.state.target_vm.clone().expect("target VM recorded");
    assert_eq!(created.name, dst_vm);
    assert!(report.state.disks.iter().all(|d| d.verified));
    // The domain's <description> carries the migration's marker (how a rerun knows it).
    assert!(
        p.describe_vm(&dst_vm)
            .await
            .unwrap()
            .has_marker(&report.state.marker())
    );
    // The new domain exists, with both disks in pool B and the source's hardware.
    let described = p.describe_vm(&dst_vm).await.unwrap();
    assert_eq!(described.disks.len(), 2);
    for d in &described.disks {
        assert!(
            d.location.starts_with(&format!("{}/", pb.name))
                || d.location.starts_with(pb.dir.path().to_str().unwrap()),
            "disk {d:?} is not in pool {}",
            pb.name
        );
    }
    let source = p.describe_vm(&src_vm).await.unwrap();
    assert_eq!(
        (described.cpus, described.memory_mib),
        (source.cpus, source.memory_mib)
    );
    // Same content, digested again independently of the runner.
    for (s, t) in source.disks.iter().zip(&described.disks) {
        let a = digest_disk(&p, &src_vm, &s.id, &ImportOptions::default())
            .await
            .unwrap();
        let b = digest_disk(&p, &dst_vm, &t.id, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(a, b, "{} vs {}", s.id, t.id);
    }
    // Rerun: the checkpoint says everything is done.
    let again = Migration::new(pa_.clone(), pa_, storage_, plan)
        .run()
        .await
        .unwrap();
    assert_eq!((again.exported_now, again.imported_now), (0, 0));
}

/// The runner contract on libvirt: `find_disk` finds a committed volume by its spec,
/// `open_created_disk` re-reads it before any domain uses it, `delete_disk` removes it (and
/// a second delete is no error). `overwrite` keeps the old volume whole until the new one is
/// committed: an aborted overwrite leaves the old bytes, a committed one replaces them, and no
/// temporary volume is left either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_contract_and_overwrite_replaces_only_at_commit() {
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let pool = TestPool::new(&uri, "ovw");
    let p = LibvirtProvider::new(&uri);
    let spec = |overwrite| DiskCreateSpec {
        vm: String::new(),
        name: "d1".into(),
        capacity: MIB,
        format: Some(DiskFormat::Raw),
        placement: Some(pool.name.clone()),
        overwrite,
    };
    let write = |fill: u8, overwrite: bool| {
        let p = &p;
        let spec = spec(overwrite);
        async move {
            let c = p.create_disk(&spec).await.unwrap();
            let mut sink = c.sink;
            sink.write(bytes::Bytes::from(vec![fill; MIB as usize]))
                .await
                .unwrap();
            (c.location, sink)
        }
    };
    assert_eq!(p.find_disk(&spec(false)).await.unwrap(), None);
    let (loc, sink) = write(0xaa, false).await;
    sink.commit().await.unwrap();
    assert_eq!(p.find_disk(&spec(false)).await.unwrap(), Some(loc.clone()));
    let file = pool.path("d1.raw");
    let files = || {
        let mut v: Vec<String> = std::fs::read_dir(pool.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // Re-read through libvirt before any domain exists: the same digest as the file.
    let local_digest = |path: PathBuf| async move {
        let f = virtrigaud_core::io::LocalFile::open(&path).await.unwrap();
        virtrigaud_core::transfer::digest_opened_disk(
            virtrigaud_core::OpenedDisk {
                info: virtrigaud_core::DiskInfo {
                    id: "x".into(),
                    capacity: MIB,
                    allocation: None,
                    format: Some(DiskFormat::Raw),
                    bus: None,
                    location: "x".into(),
                },
                source: virtrigaud_core::ImageSource::RandomAccess(std::sync::Arc::new(f)),
            },
            &ImportOptions::default(),
        )
        .await
        .unwrap()
    };
    let reread = virtrigaud_core::transfer::digest_opened_disk(
        p.open_created_disk("", &loc).await.unwrap(),
        &ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(reread, local_digest(file.clone()).await);

    // Overwrite, aborted: the old volume is untouched meanwhile and after.
    let (loc2, sink) = write(0xbb, true).await;
    assert_eq!(loc2, loc);
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xaa; MIB as usize]);
    sink.abort().await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xaa; MIB as usize]);
    assert_eq!(files(), vec!["d1.raw".to_string()]);

    // Overwrite, committed: replaced in one rename.
    let (_, sink) = write(0xcc, true).await;
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xaa; MIB as usize]);
    sink.commit().await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xcc; MIB as usize]);
    assert_eq!(files(), vec!["d1.raw".to_string()]);
    assert_eq!(p.find_disk(&spec(false)).await.unwrap(), Some(loc.clone()));

    p.delete_disk("", &loc).await.unwrap();
    assert!(!file.exists());
    assert_eq!(p.find_disk(&spec(false)).await.unwrap(), None);
    p.delete_disk("", &loc).await.unwrap();
}

/// A user who reaches libvirtd's socket but may not open the pool's files (a member of the
/// libvirt group, say) still reads its disks: through libvirt's streams. Run as root, this test
/// defines a domain on volumes whose files only root may open, then runs
/// [`child_digests_a_disk_it_may_not_open`] as another user (nobody, in root's group, which
/// `scripts/peers/libvirt.sh` gives the socket) and checks that it read both disks through
/// streams and got the digests root gets through the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_this_process_may_not_open_is_read_through_its_stream() {
    use std::os::unix::process::CommandExt;
    let Some(uri) = env_uri("VIRTRIGAUD_LIBVIRT_URI") else {
        return;
    };
    let me = Command::new("id").arg("-u").output().expect("run id");
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        eprintln!("SKIP: needs root, to run a part of itself as another user");
        return;
    }
    let pool = TestPool::new(&uri, "noaccess");
    let scratch = tempfile::tempdir().unwrap();
    let (vm, _g) = two_disk_domain(&uri, &pool, scratch.path(), "noaccess");
    // Others may see the volumes' files (their sizes match what libvirt reports) but not open
    // them: the check that sends such a disk to its stream is the open, not the lookup.
    chmod(pool.dir.path(), 0o755);
    for f in ["sys.qcow2", "data.raw"] {
        chmod(&pool.path(f), 0o600);
    }
    let p = LibvirtProvider::new(&uri);
    let want = both_digests(&p, &vm).await;
    assert_eq!(p.data_paths().local_reads, 2, "{:?}", p.data_paths());

    // The child gets a home and a runtime directory it may write (libvirt's client may keep
    // a cache there).
    let home = tempfile::tempdir().unwrap();
    chmod(home.path(), 0o777);
    // The test binary, copied where any user may run it (the checkout may be in a home
    // directory only root enters).
    let exe = home.path().join("libvirtd-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    chmod(&exe, 0o755);
    let out = Command::new(&exe)
        .args([
            "--exact",
            "child_digests_a_disk_it_may_not_open",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VRG_CHILD_VM", &vm)
        .env("VRG_CHILD_WANT", want.join(","))
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", home.path())
        .env("XDG_CACHE_HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .uid(65534)
        .gid(0)
        .output()
        .expect("run the child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("child: 2 stream reads, 0 local reads"),
        "the child did not run its checks:\n{text}"
    );
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// The content digests of the two disks of [`two_disk_domain`]'s `vm`, as `p` reads them.
async fn both_digests(p: &LibvirtProvider, vm: &str) -> Vec<String> {
    let mut out = Vec::new();
    for disk in ["vda", "vdb"] {
        out.push(
            digest_disk(p, vm, disk, &ImportOptions::default())
                .await
                .unwrap(),
        );
    }
    out
}

/// The part of [`a_disk_this_process_may_not_open_is_read_through_its_stream`] that runs as
/// another user; it does nothing unless that test started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn child_digests_a_disk_it_may_not_open() {
    let (Ok(vm), Ok(want), Ok(uri)) = (
        std::env::var("VRG_CHILD_VM"),
        std::env::var("VRG_CHILD_WANT"),
        std::env::var("VIRTRIGAUD_LIBVIRT_URI"),
    ) else {
        return;
    };
    let p = LibvirtProvider::new(&uri);
    assert!(p.uses_local_files(), "{uri}");
    let got = both_digests(&p, &vm).await;
    assert_eq!(got.join(","), want, "digests through streams");
    let paths = p.data_paths();
    println!(
        "child: {} stream reads, {} local reads",
        paths.stream_reads, paths.local_reads
    );
    assert_eq!((paths.stream_reads, paths.local_reads), (2, 0), "{paths:?}");
}

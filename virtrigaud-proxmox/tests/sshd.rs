//! The export data paths over SSH, against a real OpenSSH sshd (scripts/peers/sshd.sh) and the
//! fakepve API (scripts/peers/fakepve.sh) for the VM configs.
//!
//! **No real Proxmox VE is obtainable.** On the node, a `pvesm` stand-in script (first on the
//! SSH session's PATH) answers `pvesm path VOLID` and `pvesm export VOLID raw+size -` from real
//! image files made by qemu-img, in PVE's output format (8-byte little-endian size, then raw),
//! and refuses per storage type what upstream pve-storage 9.1 refuses (a snapshot on dir and
//! LVM, everything on ZFS; on RBD it ignores the snapshot, as upstream does); a `blockdev`
//! stand-in answers `--getsize64` for the image files that stand in for zvol devices. What it
//! cannot prove: the real `pvesm`, LVM, ZFS and Ceph themselves (their behaviour is taken from
//! pve-storage's source). The SSH transport, host key checks, key authentication, SFTP, the
//! stream checks and the qcow2 internal snapshots (made by qemu-img) are real.

mod common;

use common::{pve, sshd, unique};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use virtrigaud_core::io::LocalFile;
use virtrigaud_core::storage::StorageBackend;
use virtrigaud_core::transfer::{ExportOptions, export_disk, export_image};
use virtrigaud_core::{DiskFormat, ErrorKind, ImageSource, Provider, SnapshotRef};
use virtrigaud_proxmox::ProxmoxProvider;
use virtrigaud_proxmox::ssh::SshNode;
use virtrigaud_storage::FsBackend;

const MIB: u64 = 1 << 20;

/// The host key test counts sshd's logins: the tests of this module take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The content digest of a local image, by exporting it like any disk.
async fn digest_of(path: &Path, scratch: &Path) -> String {
    let fs = FsBackend::new(scratch.join("ref"));
    let src = LocalFile::open(path).await.unwrap();
    let r = export_image(
        ImageSource::RandomAccess(Arc::new(src)),
        None,
        &fs,
        "ref.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    r.manifest.content_digest.value
}

/// A fakepve VM with a disk on `local-lvm` (scsi0, lvmthin: export stream), one on `local`
/// (virtio0, dir: SFTP), one on `vrg-zfs` (scsi1, zfspool: device read) and one on `vrg-rbd`
/// (scsi2, rbd: export stream), and the image files the pvesm stand-in serves for them.
struct TestVm {
    name: String,
    vmid: u32,
    lvm_file: PathBuf,
    dir_file: PathBuf,
    zfs_file: PathBuf,
    rbd_file: PathBuf,
    p: ProxmoxProvider,
}

async fn test_vm(tag: &str) -> Option<TestVm> {
    let (pve, sshd) = (pve()?, sshd()?);
    let p = ProxmoxProvider::new(pve.config().with_ssh(sshd.config())).unwrap();
    common::ensure_storage(&pve, "vrg-zfs", "zfspool", &[("pool", "vrgpool/data")]).await;
    common::ensure_storage(&pve, "vrg-rbd", "rbd", &[("pool", "vrgrbd")]).await;
    let name = unique(tag);
    // Tests run in parallel and /cluster/nextid is advisory: retry a taken id.
    let mut tries = 0;
    let vmid = loop {
        let vmid = p.client().next_id().await.unwrap();
        let form = [
            ("vmid", vmid.to_string()),
            ("name", name.clone()),
            ("scsi0", "local-lvm:1".to_string()),
            ("virtio0", "local:1,format=qcow2".to_string()),
            ("scsi1", "vrg-zfs:1".to_string()),
            ("scsi2", "vrg-rbd:1".to_string()),
        ];
        match p.client().vm_create(&pve.node, &form).await {
            Ok(upid) => {
                p.client().wait_task(&upid).await.unwrap();
                break vmid;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists && tries < 10 => tries += 1,
            Err(e) => panic!("{e}"),
        }
    };
    let conf = p.client().vm_config(&pve.node, vmid).await.unwrap();
    let vol = |k: &str| {
        conf[k]
            .as_str()
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    let (lvm, dir) = (vol("scsi0"), vol("virtio0"));
    let on = |store: &str, k: &str| {
        sshd.images
            .join(store)
            .join(vol(k).split_once(':').unwrap().1)
    };
    let (zfs_file, rbd_file) = (on("vrg-zfs", "scsi1"), on("vrg-rbd", "scsi2"));
    for f in [&zfs_file, &rbd_file] {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        let f = f.to_str().unwrap();
        common::run("qemu-img", &["create", "-q", "-f", "raw", f, "24M"]);
        common::run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 1M 1M",
                "-c",
                "write -P 0xa5 23M 1M",
                f,
            ],
        );
    }
    let lvm_file = sshd
        .images
        .join("local-lvm")
        .join(lvm.split_once(':').unwrap().1);
    let dir_file = sshd
        .images
        .join("images")
        .join(dir.split_once(':').unwrap().1);
    std::fs::create_dir_all(lvm_file.parent().unwrap()).unwrap();
    std::fs::create_dir_all(dir_file.parent().unwrap()).unwrap();
    // Block volume: raw, data with holes between. Dir volume: qcow2, data at both ends.
    let l = lvm_file.to_str().unwrap();
    common::run("qemu-img", &["create", "-q", "-f", "raw", l, "48M"]);
    common::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0xee 30M 3M",
            l,
        ],
    );
    let d = dir_file.to_str().unwrap();
    common::run("qemu-img", &["create", "-q", "-f", "qcow2", d, "80M"]);
    common::run(
        "qemu-io",
        &["-c", "write -P 0x42 0 1M", "-c", "write -P 0x99 79M 1M", d],
    );
    Some(TestVm {
        name,
        vmid,
        lvm_file,
        dir_file,
        zfs_file,
        rbd_file,
        p,
    })
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lvm_file);
        let _ = std::fs::remove_file(&self.dir_file);
        let _ = std::fs::remove_file(self.lvm_file.with_extension("cut"));
        let _ = std::fs::remove_file(&self.zfs_file);
        let _ = std::fs::remove_file(&self.rbd_file);
        let (c, vmid) = (self.p.clone(), self.vmid);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // A client of its own: the test's runtime is blocked while this runs.
            let fresh = ProxmoxProvider::new(c.client().config().clone()).unwrap();
            let _ = rt.block_on(fresh.delete_vm(&vmid.to_string()));
        })
        .join();
    }
}

#[tokio::test]
async fn export_stream_and_sftp_give_the_images_content() {
    let _turn = SERIAL.lock().await;
    let Some(vm) = test_vm("export").await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let fs = FsBackend::new(scratch.path().join("stage"));

    // scsi0 on local-lvm (lvmthin): `pvesm export … raw+size` as one sequential stream.
    let opened = vm.p.open_disk(&vm.name, "scsi0", None).await.unwrap();
    assert!(
        matches!(opened.source, ImageSource::Sequential { size: Some(s), .. } if s == 48 * MIB)
    );
    assert_eq!(opened.info.format, Some(DiskFormat::Raw));
    drop(opened);
    let r = export_disk(
        &vm.p,
        &vm.name,
        "scsi0",
        &fs,
        "scsi0.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.manifest.virtual_size, 48 * MIB);
    assert_eq!(
        r.manifest.content_digest.value,
        digest_of(&vm.lvm_file, scratch.path()).await
    );
    assert!(
        r.manifest.allocated_bytes <= 5 * MIB,
        "zero detection keeps holes free: {}",
        r.manifest.allocated_bytes
    );

    // virtio0 on local (dir): `pvesm path` + ranged SFTP reads; the qcow2 keeps its map.
    let opened = vm.p.open_disk(&vm.name, "virtio0", None).await.unwrap();
    assert!(matches!(opened.source, ImageSource::RandomAccess(_)));
    drop(opened);
    let r = export_disk(
        &vm.p,
        &vm.name,
        "virtio0",
        &fs,
        "virtio0.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.manifest.virtual_size, 80 * MIB);
    assert_eq!(
        r.manifest.content_digest.value,
        digest_of(&vm.dir_file, scratch.path()).await
    );
}

/// The content digest of one internal snapshot of a qcow2, by qemu-img (the oracle): a copy of
/// the file reverted to the snapshot (`qemu-img snapshot -a`, which also restores the size the
/// disk had then; `qemu-img convert -l` would keep today's size).
async fn snapshot_digest(qcow2: &Path, snap: &str, scratch: &Path) -> String {
    let copy = scratch.join(format!("{snap}.qcow2"));
    std::fs::copy(qcow2, &copy).unwrap();
    common::run(
        "qemu-img",
        &["snapshot", "-a", snap, copy.to_str().unwrap()],
    );
    digest_of(&copy, scratch).await
}

#[tokio::test]
async fn each_storage_type_takes_the_path_upstream_supports() {
    let _turn = SERIAL.lock().await;
    let Some(vm) = test_vm("types").await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let fs = FsBackend::new(scratch.path().join("stage"));
    let sshd = sshd().unwrap();
    let node = SshNode::connect(&sshd.config(), &sshd.host).await.unwrap();
    let volid =
        |store: &str, f: &Path| format!("{store}:{}", f.file_name().unwrap().to_str().unwrap());
    let snap = SnapshotRef {
        id: "vrgsnap".into(),
        name: "vrgsnap".into(),
    };
    let with_snap = ExportOptions {
        snapshot: Some(snap.clone()),
        ..ExportOptions::default()
    };

    // zfspool: upstream `pvesm export` has no raw format for it (the stand-in refuses as PVE
    // does), so the zvol device is read: `pvesm path`, `blockdev --getsize64`, ranged SFTP.
    let e = match node.export(&volid("vrg-zfs", &vm.zfs_file), None).await {
        Err(e) => e,
        Ok(_) => panic!("the stand-in exported a ZFS volume as raw+size"),
    };
    assert!(e.to_string().contains("ZFSPoolPlugin"), "{e}");
    let opened = vm.p.open_disk(&vm.name, "scsi1", None).await.unwrap();
    assert!(matches!(opened.source, ImageSource::RandomAccess(_)));
    assert_eq!(opened.info.capacity, 24 * MIB);
    assert_eq!(opened.info.format, Some(DiskFormat::Raw));
    drop(opened);
    let r = export_disk(
        &vm.p,
        &vm.name,
        "scsi1",
        &fs,
        "zfs.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.manifest.virtual_size, 24 * MIB);
    assert_eq!(
        r.manifest.content_digest.value,
        digest_of(&vm.zfs_file, scratch.path()).await
    );

    // rbd without a snapshot: the export stream.
    let r = export_disk(
        &vm.p,
        &vm.name,
        "scsi2",
        &fs,
        "rbd.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.manifest.content_digest.value,
        digest_of(&vm.rbd_file, scratch.path()).await
    );

    // Snapshots that upstream cannot export as raw: refused up front, naming the type, before
    // any SSH command runs; the stand-in refuses (lvmthin) or ignores (rbd) them as PVE does.
    for (disk, stype) in [("scsi0", "lvmthin"), ("scsi1", "zfspool"), ("scsi2", "rbd")] {
        let e =
            vm.p.open_disk(&vm.name, disk, Some(&snap))
                .await
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{disk}: {e}");
        assert!(e.to_string().contains(&format!("type {stype}")), "{e}");
        assert!(e.to_string().contains("prepare: shutdown"), "{e}");
    }
    let e = match node
        .export(&volid("local-lvm", &vm.lvm_file), Some("vrgsnap"))
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("the stand-in exported an lvmthin snapshot"),
    };
    assert!(e.to_string().contains("cannot export a snapshot"), "{e}");
    let (size, _) = node
        .export(&volid("vrg-rbd", &vm.rbd_file), Some("vrgsnap"))
        .await
        .unwrap();
    assert_eq!(size, 24 * MIB, "upstream's rbd export ignores --snapshot");

    // dir qcow2 with a snapshot: the qcow2's internal snapshot, read over SFTP. Data written
    // and a resize after the snapshot must not show.
    let d = vm.dir_file.to_str().unwrap();
    common::run("qemu-img", &["snapshot", "-c", "vrgsnap", d]);
    common::run(
        "qemu-io",
        &["-c", "write -P 0x77 4M 1M", "-c", "write -P 0x00 0 64k", d],
    );
    common::run("qemu-img", &["resize", "-q", d, "96M"]);
    let want = snapshot_digest(&vm.dir_file, "vrgsnap", scratch.path()).await;
    let r = export_disk(&vm.p, &vm.name, "virtio0", &fs, "dirsnap.qcow2", &with_snap)
        .await
        .unwrap();
    assert_eq!(
        r.manifest.virtual_size,
        80 * MIB,
        "the size at the snapshot"
    );
    assert_eq!(r.manifest.content_digest.value, want);
    let live = export_disk(
        &vm.p,
        &vm.name,
        "virtio0",
        &fs,
        "dirlive.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(live.manifest.virtual_size, 96 * MIB);
    assert_ne!(live.manifest.content_digest.value, want);
    // The dir stand-in refuses a snapshot export, as Plugin.pm does.
    let e = match node
        .export(
            &format!(
                "local:{}/{}",
                vm.vmid,
                vm.dir_file.file_name().unwrap().to_str().unwrap()
            ),
            Some("vrgsnap"),
        )
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("the stand-in exported a dir snapshot as raw+size"),
    };
    assert!(e.to_string().contains("not available"), "{e}");
    // A snapshot the file does not hold.
    let other = SnapshotRef {
        id: "nosuchsnap".into(),
        name: "nosuchsnap".into(),
    };
    let e =
        vm.p.open_disk(&vm.name, "virtio0", Some(&other))
            .await
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn cut_stream_is_corrupt_and_nothing_is_stored() {
    let _turn = SERIAL.lock().await;
    let Some(vm) = test_vm("cut").await else {
        return;
    };
    std::fs::write(vm.lvm_file.with_extension("cut"), b"").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let fs = FsBackend::new(scratch.path().join("stage"));
    let e = export_disk(
        &vm.p,
        &vm.name,
        "scsi0",
        &fs,
        "cut.qcow2",
        &ExportOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Network),
        "{e}"
    );
    assert!(e.to_string().contains("ended after"), "{e}");
    assert_eq!(
        fs.stat("cut.qcow2").await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "nothing committed"
    );
    assert_eq!(
        fs.stat("cut.qcow2.manifest.json").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // The raw stream itself: the short end is reported at its offset.
    let sshd = sshd().unwrap();
    let node = SshNode::connect(&sshd.config(), &sshd.host).await.unwrap();
    let volid = format!(
        "local-lvm:{}",
        vm.lvm_file.file_name().unwrap().to_str().unwrap()
    );
    let (size, mut s) = node.export(&volid, None).await.unwrap();
    assert_eq!(size, 48 * MIB);
    let mut got = 0u64;
    let err = loop {
        match s.next().await {
            Some(Ok(b)) => got += b.len() as u64,
            Some(Err(e)) => break e,
            None => panic!("a cut stream must not end cleanly"),
        }
    };
    assert_eq!(got, 24 * MIB);
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(err.context().offset, Some(24 * MIB));
    // A volume pvesm does not know: its stderr is in the error.
    let e = match node.export("local-lvm:vm-1-disk-404", None).await {
        Err(e) => e,
        Ok(_) => panic!("export of a missing volume succeeded"),
    };
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

fn accepted_logins(sshd: &common::Sshd) -> usize {
    let log = sshd.key.parent().unwrap().join("sshd.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("Accepted publickey")
        .count()
}

#[tokio::test]
async fn host_keys_and_client_keys_are_checked() {
    let _turn = SERIAL.lock().await;
    let Some(sshd) = sshd() else { return };
    // Pinned fingerprint and known_hosts both let the right server in.
    let node = SshNode::connect(&sshd.config(), &sshd.host).await.unwrap();
    assert_eq!(node.run("echo ok").await.unwrap(), b"ok\n");
    let mut kh = sshd.config();
    kh.host_key_fingerprint = None;
    kh.known_hosts = Some(sshd.known_hosts.clone());
    SshNode::connect(&kh, &sshd.host).await.unwrap();

    // A wrong pin: refused before any credential is offered (sshd logs no login).
    let before = accepted_logins(&sshd);
    let mut wrong = sshd.config();
    wrong.host_key_fingerprint = Some("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let e = SshNode::connect(&wrong, &sshd.host).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(
        e.to_string().contains("refused before authentication"),
        "{e}"
    );
    // A known_hosts file that names another key for this host: refused as well.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    common::run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            other.to_str().unwrap(),
        ],
    );
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let khf = dir.path().join("known_hosts");
    let mut it = pubkey.split_whitespace();
    let line = format!(
        "[{}]:{} {} {}\n",
        sshd.host,
        sshd.port,
        it.next().unwrap(),
        it.next().unwrap()
    );
    std::fs::write(&khf, line).unwrap();
    let mut bad_kh = sshd.config();
    bad_kh.host_key_fingerprint = None;
    bad_kh.known_hosts = Some(khf);
    let e = SshNode::connect(&bad_kh, &sshd.host).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        accepted_logins(&sshd),
        before,
        "no login may happen with a refused host key"
    );

    // The right host with a key it does not authorise: Auth.
    let mut wrong_key = sshd.config();
    wrong_key.key_file = Some(other);
    let e = SshNode::connect(&wrong_key, &sshd.host).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    // Neither a pin nor known_hosts: refused, never trust-on-first-use.
    let mut none = sshd.config();
    none.host_key_fingerprint = None;
    let e = SshNode::connect(&none, &sshd.host).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// Throughput of the two SSH data paths on 512 MiB of data, beside OpenSSH's own client
/// reading the same file (`ssh … cat`): figures, not assertions (run with `--ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn throughput_figures() {
    let _turn = SERIAL.lock().await;
    let Some(sshd) = sshd() else { return };
    let dir = sshd.images.join("local-lvm");
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("{}.raw", unique("tput"));
    let file = dir.join(&name);
    let f = file.to_str().unwrap().to_string();
    common::run("qemu-img", &["create", "-q", "-f", "raw", &f, "512M"]);
    common::run("qemu-io", &["-f", "raw", "-c", "write -P 0x6b 0 512M", &f]);
    let size = 512 * MIB;
    let mibs = |t: std::time::Duration| size as f64 / MIB as f64 / t.as_secs_f64();

    let t = std::time::Instant::now();
    let out = std::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .arg("-i")
        .arg(&sshd.key)
        .args(["-p", &sshd.port.to_string()])
        .arg(format!("{}@{}", sshd.user, sshd.host))
        .arg(format!("cat {f}"))
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.stdout.len() as u64, size);
    let openssh = t.elapsed();

    let node = SshNode::connect(&sshd.config(), &sshd.host).await.unwrap();
    let t = std::time::Instant::now();
    let (n, mut s) = node
        .export(&format!("local-lvm:{name}"), None)
        .await
        .unwrap();
    assert_eq!(n, size);
    let mut got = 0u64;
    while let Some(b) = s.next().await {
        got += b.unwrap().len() as u64;
    }
    assert_eq!(got, size);
    let export = t.elapsed();

    let sf = node.open_file(&f).await.unwrap();
    let sf = Arc::new(sf);
    let t = std::time::Instant::now();
    // Four ranged reads in flight, 4 MiB each, as the pipeline's readers issue them.
    let chunk = 4 * MIB;
    let reads = futures::stream::iter((0..size / chunk).map(|i| {
        let sf = sf.clone();
        async move {
            use virtrigaud_core::ReadAt;
            sf.read_at(i * chunk, chunk as usize).await.unwrap().len() as u64
        }
    }))
    .buffer_unordered(4);
    let total: u64 = reads.collect::<Vec<_>>().await.into_iter().sum();
    assert_eq!(total, size);
    let sftp = t.elapsed();
    eprintln!(
        "512 MiB over SSH on 127.0.0.1: OpenSSH `ssh cat` {:.0} MiB/s; pvesm export stream (russh) {:.0} MiB/s; SFTP ranged reads, 4 x 4 MiB in flight {:.0} MiB/s",
        mibs(openssh),
        mibs(export),
        mibs(sftp)
    );
    std::fs::remove_file(&file).unwrap();
}

/// Agent authentication against the real sshd: OpenSSH's own `ssh-agent` holding the client key
/// lets the node in with no key file configured; the same agent emptied gives `Auth`.
#[tokio::test]
async fn agent_authentication() {
    let _turn = SERIAL.lock().await;
    let Some(sshd) = sshd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed().as_secs() < 10, "ssh-agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let add = |args: &[&str]| {
        let o = std::process::Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    add(&[sshd.key.to_str().unwrap()]);
    // SAFETY: the tests of this file run one at a time (SERIAL) and only the agent client
    // reads this variable.
    unsafe { std::env::set_var("SSH_AUTH_SOCK", &sock) };
    let mut cfg = sshd.config();
    cfg.key_file = None;
    cfg.use_agent = true;
    let node = SshNode::connect(&cfg, &sshd.host).await.unwrap();
    assert_eq!(node.run("echo agent").await.unwrap(), b"agent\n");
    drop(node);
    add(&["-D"]);
    let e = SshNode::connect(&cfg, &sshd.host).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    // SAFETY: as above.
    unsafe { std::env::remove_var("SSH_AUTH_SOCK") };
}

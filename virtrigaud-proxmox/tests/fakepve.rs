//! The Proxmox provider's API paths against `fakepve` (scripts/peers/fakepve.sh).
//!
//! **No real Proxmox VE is obtainable.** fakepve 0.5.0 is an independent fake of the PVE 9 API
//! that checks every parameter against PVE's own API schema and answers with PVE's status codes
//! and wording (tickets, CSRF, API tokens, tasks with logs, config locks). What it cannot prove:
//! that `import-from` really copies a disk (it allocates an empty volume), that `download-url`
//! fetches the URL (it never does; the presigned URL is fetched by the test itself), and that
//! an upload with `content=import` is stored (it refuses that content: see tests/upload.rs).
//! The fake's guests (vmid 100–105) are set up by the peer script; tests that create VMs use
//! names of their own and remove them.

mod common;

use common::{pve, unique};
use futures::StreamExt;
use std::time::Duration;
use virtrigaud_core::transfer::{ExportOptions, export_image};
use virtrigaud_core::{
    DiskBus, DiskCreateSpec, DiskFormat, ErrorKind, Firmware, ImageSource, NicInfo, PowerOp,
    PowerState, Provider, Secret, SnapshotRef, VmDiskSpec, VmSpec,
};
use virtrigaud_proxmox::{Auth, ProxmoxConfig, ProxmoxProvider};

#[tokio::test]
async fn describe_and_list() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    p.validate().await.unwrap();
    let vms = p.list_vms().await.unwrap();
    assert!(
        vms.iter()
            .any(|v| v.id == "100" && v.name == "vrg-describe"),
        "{vms:?}"
    );
    let by_name = p.describe_vm("vrg-describe").await.unwrap();
    let by_id = p.describe_vm("100").await.unwrap();
    assert_eq!(by_name, by_id);
    let i = by_name;
    assert_eq!((i.cpus, i.memory_mib), (4, 3072), "cores 2 x sockets 2");
    assert_eq!(i.firmware, Firmware::Uefi);
    assert_eq!(i.machine.as_deref(), Some("q35"));
    assert_eq!(i.guest_os.as_deref(), Some("l26"));
    assert_eq!(i.state, PowerState::Stopped);
    let disks: Vec<_> = i
        .disks
        .iter()
        .map(|d| (d.id.as_str(), d.location.as_str(), d.capacity))
        .collect();
    assert_eq!(disks.len(), 2, "cdrom and cloud-init skipped: {disks:?}");
    assert!(disks.contains(&("scsi0", "local-lvm:vm-100-disk-0", 32 << 30)));
    assert!(disks.contains(&("virtio1", "local:100/vm-100-disk-1.qcow2", 10 << 30)));
    assert_eq!(
        i.disks.iter().find(|d| d.id == "virtio1").unwrap().format,
        Some(DiskFormat::Qcow2)
    );
    assert_eq!(i.nics.len(), 2);
    assert_eq!(i.nics[0].mac.as_deref(), Some("BC:24:11:00:00:01"));
    assert_eq!(i.nics[0].network.as_deref(), Some("vmbr0.42"));
    assert_eq!(i.nics[1].model.as_deref(), Some("e1000"));
    assert_eq!(i.annotation.as_deref(), Some("a test VM\nsecond line"));
    let e = p.describe_vm("no-such-vm").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = p.client().vm_config("pve1", 9999).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::NotFound,
        "PVE's 500 'does not exist': {e}"
    );
}

#[tokio::test]
async fn credentials_and_tls() {
    let Some(pve) = pve() else { return };
    // A password login (ticket + CSRF on writes): a write proves the CSRF token is sent.
    let pw = Auth::Password {
        user: pve.user.clone(),
        password: Secret::new(pve.password.clone()),
    };
    let c = ProxmoxConfig::new(&pve.url, pw)
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    assert!(
        !format!("{c:?}").contains(&pve.password),
        "password in Debug"
    );
    let p = ProxmoxProvider::new(c).unwrap();
    assert!(!p.list_vms().await.unwrap().is_empty());
    let snap = unique("pw").replace('-', "_");
    let snap = format!("s{}", &snap[snap.len() - 20..]);
    p.create_snapshot("vrg-snap", &snap).await.unwrap();
    p.delete_snapshot(
        "vrg-snap",
        &SnapshotRef {
            id: snap.clone(),
            name: snap,
        },
    )
    .await
    .unwrap();

    // Wrong token, wrong password: Auth, and the secret is in no message.
    let bad = Auth::Token {
        id: pve.token_id.clone(),
        secret: Secret::new("wrong-secret-value"),
    };
    let c = ProxmoxConfig::new(&pve.url, bad)
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    let e = ProxmoxProvider::new(c)
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.to_string().contains("wrong-secret-value"), "{e}");
    let bad = Auth::Password {
        user: pve.user.clone(),
        password: Secret::new("nope-password"),
    };
    let c = ProxmoxConfig::new(&pve.url, bad)
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    let e = ProxmoxProvider::new(c)
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.to_string().contains("nope-password"), "{e}");

    // TLS: verified by default (the fake's CA is not a system root), with the CA it verifies,
    // and a wrong pin is refused.
    let c = ProxmoxConfig::new(&pve.url, pve.token()).unwrap();
    let e = ProxmoxProvider::new(c)
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Network,
        "unverified certificate must fail: {e}"
    );
    // Refused again on every retry: not retryable, and the message says what to do.
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("fingerprint"), "{e}");
    let c = ProxmoxConfig::new(&pve.url, pve.token())
        .unwrap()
        .with_ca_file(&pve.ca);
    ProxmoxProvider::new(c).unwrap().list_vms().await.unwrap();
    let wrong = format!("00{}", &pve.fingerprint[2..]);
    let c = ProxmoxConfig::new(&pve.url, pve.token())
        .unwrap()
        .with_fingerprint(wrong);
    let e = ProxmoxProvider::new(c)
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(e.to_string().contains("not the pinned one"), "{e}");
    assert!(!e.is_retryable(), "{e}");
}

/// An expired ticket (the old instance's live 2 s) is renewed by logging in again, and a write
/// with the new ticket carries the new CSRF token.
#[tokio::test]
async fn expired_ticket_is_renewed() {
    let Some(pve) = pve() else { return };
    let pw = Auth::Password {
        user: pve.user.clone(),
        password: Secret::new(pve.password.clone()),
    };
    let mut c = ProxmoxConfig::new(&pve.old_url, pw)
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    c.task_poll = Duration::from_millis(50);
    let p = ProxmoxProvider::new(c).unwrap();
    p.list_vms().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    p.list_vms().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    p.power("vrg-power", PowerOp::Off).await.unwrap();

    // An upload after the ticket expired: the ticket is proven (and renewed) before the body
    // goes out, so the old fake answers the upload itself (it refuses content=import: PVE 8.3
    // has no such content type), not with a 401 that would cost the streamed body.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let body = futures::stream::iter([Ok(bytes::Bytes::from_static(b"0123456789"))]).boxed();
    let e = p
        .client()
        .upload(&pve.node, "local", "vrg-renew.raw", 10, None, body)
        .await
        .unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Auth, "{e}");
}

/// The ticket is renewed *ahead* of its expiry (`ticket_renew_after`): against the old fake,
/// whose tickets expire after 2 s, with renewal after 1 s, requests spread over 6 s never meet a
/// 401. The requests go through `tests/multipart_server.py` as a forwarding proxy that records
/// each request and fakepve's answer status (it alters nothing); logins and 401s are counted
/// from that record.
#[tokio::test]
async fn ticket_is_renewed_before_it_expires() {
    let Some(pve) = pve() else { return };
    let out = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(out.path(), &pve.old_url);
    let pw = Auth::Password {
        user: pve.user.clone(),
        password: Secret::new(pve.password.clone()),
    };
    let mut c = ProxmoxConfig::new(&format!("http://127.0.0.1:{}", proxy.port), pw).unwrap();
    c.allow_http = true; // the proxy on loopback
    c.ticket_renew_after = Duration::from_secs(1);
    let p = ProxmoxProvider::new(c).unwrap();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        p.list_vms().await.unwrap();
        p.describe_vm("vrg-power").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = std::fs::read_to_string(out.path().join("requests.json")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logins = lines
        .iter()
        .filter(|l| l["path"] == "/api2/json/access/ticket")
        .count();
    let unauthorized: Vec<_> = lines.iter().filter(|l| l["status"] == 401).collect();
    assert!(unauthorized.is_empty(), "{unauthorized:?}");
    assert!(lines.len() > 20, "{} requests", lines.len());
    assert!((4..=8).contains(&logins), "{logins} logins in 6 s");
}

#[tokio::test]
async fn locked_vm_and_failing_task() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    let e = p.power("vrg-locked", PowerOp::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("locked (backup)"), "{e}");
    let e = p.power("vrg-broken", PowerOp::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Provider, "{e}");
    assert!(
        e.to_string()
            .contains("TASK ERROR: kvm: -drive file=/dev/pve/vm-102-disk-0"),
        "the task log's last lines are in the error: {e}"
    );
}

/// A token without `VM.PowerMgmt`: PVE's 403 becomes `Auth` naming the path and privilege.
#[tokio::test]
async fn missing_privilege_is_auth_with_the_privilege() {
    let Some(pve) = pve() else { return };
    let (Some(id), Some(secret)) = (
        common::env("VIRTRIGAUD_PVE_AUDIT_TOKEN_ID", "fakepve.sh"),
        common::env("VIRTRIGAUD_PVE_AUDIT_TOKEN_SECRET", "fakepve.sh"),
    ) else {
        return;
    };
    let auth = Auth::Token {
        id,
        secret: Secret::new(secret),
    };
    let c = ProxmoxConfig::new(&pve.url, auth)
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    let p = ProxmoxProvider::new(c).unwrap();
    p.describe_vm("vrg-power").await.unwrap(); // VM.Audit is enough to read
    let e = p.power("vrg-power", PowerOp::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(e.to_string().contains("/vms/103, VM.PowerMgmt"), "{e}");
}

#[tokio::test]
async fn power_operations() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    p.power("vrg-power", PowerOp::On).await.unwrap();
    assert_eq!(
        p.describe_vm("vrg-power").await.unwrap().state,
        PowerState::Running
    );
    p.power("vrg-power", PowerOp::On).await.unwrap(); // already running: nothing to do
    p.power("vrg-power", PowerOp::Reboot).await.unwrap();
    p.power(
        "vrg-power",
        PowerOp::Shutdown {
            timeout: Duration::from_secs(30),
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        p.describe_vm("vrg-power").await.unwrap().state,
        PowerState::Stopped
    );
    p.power("vrg-power", PowerOp::On).await.unwrap();
    p.power("vrg-power", PowerOp::Off).await.unwrap();
    assert_eq!(
        p.describe_vm("vrg-power").await.unwrap().state,
        PowerState::Stopped
    );
}

/// A guest that ignores ACPI (fakepve's `acpi: false`): a shutdown without `force` fails with
/// `Timeout` naming the seconds waited and leaves the VM running; with `force` PVE stops it at
/// the timeout (a task warning, not an error).
#[tokio::test]
async fn shutdown_that_the_guest_ignores() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    p.power("vrg-noacpi", PowerOp::On).await.unwrap();
    let e = p
        .power(
            "vrg-noacpi",
            PowerOp::Shutdown {
                timeout: Duration::from_secs(3),
                force: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("within 3 s"), "{e}");
    assert_eq!(
        p.describe_vm("vrg-noacpi").await.unwrap().state,
        PowerState::Running
    );
    p.power(
        "vrg-noacpi",
        PowerOp::Shutdown {
            timeout: Duration::from_secs(3),
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        p.describe_vm("vrg-noacpi").await.unwrap().state,
        PowerState::Stopped
    );
}

/// An HA-managed VM: PVE turns start/stop into HA requests (`hastart`/`hastop` tasks); the
/// provider goes through them, not around them, and waits for the resulting state.
#[tokio::test]
async fn ha_managed_vm_goes_through_the_ha_manager() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    p.power("vrg-ha", PowerOp::On).await.unwrap();
    assert_eq!(
        p.describe_vm("vrg-ha").await.unwrap().state,
        PowerState::Running
    );
    let st = p.client().vm_status(&pve.node, 105).await.unwrap();
    assert_eq!(st["ha"]["managed"], 1, "{st}");
    p.power("vrg-ha", PowerOp::Off).await.unwrap();
    assert_eq!(
        p.describe_vm("vrg-ha").await.unwrap().state,
        PowerState::Stopped
    );
}

#[tokio::test]
async fn snapshots() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    let name = format!("vrg{}", std::process::id());
    let s = p.create_snapshot("vrg-snap", &name).await.unwrap();
    let list = p.client().snapshot_list("pve1", 104).await.unwrap();
    assert!(list.contains(&name), "{list:?}");
    p.delete_snapshot("vrg-snap", &s).await.unwrap();
    assert!(
        !p.client()
            .snapshot_list("pve1", 104)
            .await
            .unwrap()
            .contains(&name)
    );
    let e = p
        .create_snapshot("vrg-snap", "bad name;rm")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = p.delete_snapshot("vrg-snap", &s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// A small qcow2 image staged with its manifest in a local directory.
async fn staged_object(
    dir: &std::path::Path,
) -> (virtrigaud_storage::FsBackend, virtrigaud_core::Manifest) {
    let img = dir.join("src.qcow2");
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    common::run(
        "qemu-io",
        &["-c", "write -P 0x5a 1M 1M", img.to_str().unwrap()],
    );
    let fs = virtrigaud_storage::FsBackend::new(dir.join("stage"));
    let src = virtrigaud_core::io::LocalFile::open(&img).await.unwrap();
    let opts = ExportOptions {
        format: DiskFormat::Qcow2,
        ..ExportOptions::default()
    };
    let r = export_image(
        ImageSource::RandomAccess(std::sync::Arc::new(src)),
        None,
        &fs,
        "d0.qcow2",
        None,
        None,
        &opts,
    )
    .await
    .unwrap();
    (fs, r.manifest)
}

#[tokio::test]
async fn pulled_disk_becomes_a_vm_and_staging_is_cleaned() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    let dir = tempfile::tempdir().unwrap();
    let (_fs, manifest) = staged_object(dir.path()).await;
    let vm = unique("pull");
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "disk0".into(),
        capacity: manifest.virtual_size,
        format: None,
        placement: None,
        overwrite: false,
    };
    assert_eq!(p.find_disk(&spec).await.unwrap(), None);
    // fakepve's download-url never fetches: this proves the call PVE gets (schema-checked
    // parameters, checksum, task), not the transfer.
    let location = p
        .pull_object(
            "https://s3.example.invalid/bucket/d0.qcow2?X-Amz-Signature=abc",
            &manifest,
            &spec,
        )
        .await
        .unwrap();
    let staged = format!("local:import/vrg-{vm}-disk0.qcow2");
    assert_eq!(location, format!("local-lvm:0,import-from={staged}"));
    assert_eq!(
        p.find_disk(&spec).await.unwrap().as_deref(),
        Some(location.as_str())
    );
    let e = p
        .pull_object("https://x.invalid/o", &manifest, &spec)
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::AlreadyExists,
        "never overwritten unless asked: {e}"
    );

    let mut vspec = VmSpec {
        name: vm.clone(),
        cpus: 2,
        memory_mib: 1024,
        firmware: Firmware::Uefi,
        machine: None,
        guest_os: Some("debian12".into()),
        disks: vec![VmDiskSpec {
            location: location.clone(),
            bus: DiskBus::Scsi,
            format: DiskFormat::Qcow2,
        }],
        nics: vec![
            NicInfo {
                mac: Some("52:54:00:aa:bb:01".into()),
                model: Some("virtio".into()),
                network: Some("vmbr1.12".into()),
            },
            NicInfo {
                mac: None,
                model: Some("e1000".into()),
                network: None,
            },
        ],
        overwrite: false,
        annotation: Some(format!("migrated\nvirtrigaud-migration:{vm}")),
    };
    let _cleanup = Cleanup(pve.config(), vm.clone());
    let info = p.create_vm(&vspec).await.unwrap();
    assert_eq!(info.name, vm);
    assert_eq!((info.cpus, info.memory_mib), (2, 1024));
    assert_eq!(info.firmware, Firmware::Uefi);
    assert_eq!(info.machine.as_deref(), Some("q35"));
    assert_eq!(info.guest_os.as_deref(), Some("l26"));
    assert!(
        info.has_marker(&format!("virtrigaud-migration:{vm}")),
        "{:?}",
        info.annotation
    );
    assert_eq!(info.nics[0].network.as_deref(), Some("vmbr1.12"));
    assert_eq!(info.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:01"));
    assert_eq!(info.nics[1].network.as_deref(), Some("vmbr0"));
    assert_eq!(info.disks.len(), 1);
    assert!(
        info.disks[0].location.starts_with("local-lvm:vm-"),
        "{:?}",
        info.disks
    );
    // The VM's config as PVE stores it: the import-from drive and the efidisk.
    let vmid: u32 = info.id.parse().unwrap();
    let conf = p.client().vm_config(&pve.node, vmid).await.unwrap();
    assert!(
        conf["efidisk0"].as_str().unwrap().contains("efitype=4m"),
        "{conf:?}"
    );
    assert_eq!(
        p.find_disk(&spec).await.unwrap(),
        None,
        "staged import file deleted"
    );

    // Same name again: refused, unless overwrite.
    let e = p.create_vm(&vspec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let location = p
        .pull_object("https://x.invalid/o", &manifest, &spec)
        .await
        .unwrap();
    vspec.disks[0].location = location;
    vspec.overwrite = true;
    let again = p.create_vm(&vspec).await.unwrap();
    assert_eq!(
        p.list_vms()
            .await
            .unwrap()
            .iter()
            .filter(|v| v.name == vm)
            .count(),
        1,
        "replaced"
    );
    p.delete_vm(&again.id).await.unwrap();
    assert_eq!(
        p.describe_vm(&vm).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// Deletes the VM named `.1` when the test ends, even on panic (a client of its own: the test's
/// runtime is blocked while this runs).
struct Cleanup(ProxmoxConfig, String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let (c, name) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let p = ProxmoxProvider::new(c).unwrap();
            let _ = rt.block_on(p.delete_vm(&name));
        })
        .join();
    }
}

#[tokio::test]
async fn too_old_pve_fails_before_any_upload() {
    let Some(pve) = pve() else { return };
    let mut c = ProxmoxConfig::new(&pve.old_url, pve.token())
        .unwrap()
        .with_fingerprint(&pve.fingerprint);
    c.node = Some(pve.node.clone());
    let p = ProxmoxProvider::new(c).unwrap();
    assert_eq!(p.client().version().await.unwrap().to_string(), "8.3.2");
    let spec = DiskCreateSpec {
        vm: unique("old"),
        name: "d".into(),
        capacity: 1 << 20,
        format: None,
        placement: None,
        overwrite: false,
    };
    let e = p.create_disk(&spec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("8.4.0 or newer") && e.to_string().contains("8.3.2"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (fs, _) = staged_object(dir.path()).await;
    let e = p.upload_object(&fs, "d0.qcow2", &spec).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

/// The URL `download-url` hands PVE is a presigned GET that really returns the staged object
/// from SeaweedFS (scripts/peers/seaweedfs.sh): fetched here, since fakepve never fetches. The
/// call PVE gets carries that URL and the object's SHA-256, as its task log shows.
#[tokio::test]
async fn pull_url_is_a_presigned_get_of_the_staged_object() {
    let Some(pve) = pve() else { return };
    let Some(endpoint) = common::env("VIRTRIGAUD_S3_ENDPOINT", "seaweedfs.sh") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    use virtrigaud_core::StorageBackend;
    use virtrigaud_storage::s3::{S3Backend, S3Config};
    let cfg = S3Config::new("virtrigaud-test")
        .with_endpoint(endpoint)
        .with_prefix(unique("pve-pull"))
        .with_region("us-east-1")
        .with_credentials(
            env("VIRTRIGAUD_S3_ACCESS_KEY"),
            env("VIRTRIGAUD_S3_SECRET_KEY"),
        );
    let s3 = S3Backend::new(cfg).unwrap();
    s3.create_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.qcow2");
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"],
    );
    common::run(
        "qemu-io",
        &["-c", "write -P 0x3c 2M 2M", img.to_str().unwrap()],
    );
    let src = virtrigaud_core::io::LocalFile::open(&img).await.unwrap();
    let r = export_image(
        ImageSource::RandomAccess(std::sync::Arc::new(src)),
        None,
        &s3,
        "d0.qcow2",
        None,
        None,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let url = s3
        .presign_get("d0.qcow2", Duration::from_secs(3600))
        .await
        .unwrap();
    // What PVE would fetch: no credentials of ours, just the URL.
    let body = reqwest::get(&url).await.unwrap();
    assert!(body.status().is_success(), "{}", body.status());
    let body = body.bytes().await.unwrap();
    use sha2::Digest;
    assert_eq!(body.len() as u64, r.manifest.stored_size);
    assert_eq!(
        hex(&sha2::Sha256::digest(&body)),
        r.manifest.object_digest.value
    );

    let p = pve.provider();
    let vm = unique("pull-s3");
    let upid = p
        .client()
        .download_url(
            &pve.node,
            "local",
            &url,
            &format!("vrg-{vm}-probe.qcow2"),
            Some(&r.manifest.object_digest.value),
        )
        .await
        .unwrap();
    p.client().wait_task(&upid).await.unwrap();
    let log = p
        .client()
        .task_log_tail(&upid, 10)
        .await
        .unwrap()
        .join("\n");
    assert!(
        log.contains(&url),
        "the task fetches the presigned URL: {log}"
    );
    let spec = DiskCreateSpec {
        vm: vm.clone(),
        name: "disk0".into(),
        capacity: r.manifest.virtual_size,
        format: None,
        placement: Some("local-lvm".into()),
        overwrite: false,
    };
    let location = p.pull_object(&url, &r.manifest, &spec).await.unwrap();
    p.delete_disk(&vm, &location).await.unwrap();
    assert_eq!(p.find_disk(&spec).await.unwrap(), None);
    p.delete_disk(
        &vm,
        &format!("local-lvm:0,import-from=local:import/vrg-{vm}-probe.qcow2"),
    )
    .await
    .unwrap();
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records every tracing event's fields, as text (the warnings of the task test).
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={v:?} ", f.name()));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Task outcomes fakepve never produces (it finishes every task at once, always `OK` or an
/// error). The API runs through `tests/multipart_server.py` as a forwarding proxy in front of
/// fakepve. Real (fakepve): the VM create and start requests, their schema checks, the tasks
/// and their logs. Altered by the proxy (task-overrides.json), and only that: the `qmcreate`
/// task's exit status reads `WARNINGS: 2` and two lines holding URL credentials are appended
/// to its real log; the `qmstart` task's status reads `running` for ever.
#[tokio::test]
async fn task_warnings_are_success_and_a_deadline_is_timeout() {
    let Some(pve) = pve() else { return };
    let out = tempfile::tempdir().unwrap();
    std::fs::write(
        out.path().join("task-overrides.json"),
        serde_json::json!({
            "qmcreate": {"exitstatus": "WARNINGS: 2", "log": [
                "WARN: download https://s3.test:8333/b/k.qcow2?X-Amz-Signature=topsecret42 slow",
                "WARN: retried https://vrguser:hunter2@mirror.test/img.raw"]},
            "qmstart": {"running": true},
        })
        .to_string(),
    )
    .unwrap();
    let proxy = common::start_proxy(out.path(), &pve.url);
    let mut c =
        ProxmoxConfig::new(&format!("http://127.0.0.1:{}", proxy.port), pve.token()).unwrap();
    c.allow_http = true; // the proxy on loopback
    c.task_poll = Duration::from_millis(20);
    let p = ProxmoxProvider::new(c).unwrap();
    let name = unique("warn");
    let vmid = p.client().next_id().await.unwrap();
    let form = [("vmid", vmid.to_string()), ("name", name.clone())];
    let upid = p.client().vm_create(&pve.node, &form).await.unwrap();
    assert!(upid.contains(":qmcreate:"), "{upid}");

    // WARNINGS: n is success, and the warning is logged with the URLs redacted.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let _g = tracing::subscriber::set_default(Capture(seen.clone()));
        p.client().wait_task(&upid).await.unwrap();
    }
    let logged = seen.lock().unwrap().join("\n");
    assert!(logged.contains("WARNINGS: 2"), "{logged}");
    assert!(
        logged.contains("https://s3.test:8333/b/k.qcow2?***")
            && logged.contains("https://***@mirror.test/img.raw"),
        "{logged}"
    );
    for secret in ["topsecret42", "X-Amz-Signature", "hunter2", "vrguser"] {
        assert!(!logged.contains(secret), "{secret} logged: {logged}");
    }
    assert!(p.describe_vm(&name).await.is_ok(), "the VM really exists");

    // A task still running at its deadline is Timeout, after the deadline and not much later.
    let upid = p
        .client()
        .vm_power(&pve.node, vmid, "start", &[])
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let e = p
        .client()
        .wait_task_for(&upid, Duration::from_millis(400))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("still running after"), "{e}");
    assert!(
        t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    drop(proxy);
    pve.provider().delete_vm(&vmid.to_string()).await.unwrap();
}

/// `delete_vm` destroys the VM with its disks: the storages no longer list its volumes.
#[tokio::test]
async fn delete_vm_removes_its_disks() {
    let Some(pve) = pve() else { return };
    let p = pve.provider();
    let name = unique("delvm");
    let vmid = p.client().next_id().await.unwrap();
    let form = [
        ("vmid", vmid.to_string()),
        ("name", name.clone()),
        ("scsi0", "local-lvm:1".to_string()),
        ("virtio0", "local:1,format=qcow2".to_string()),
    ];
    let upid = p.client().vm_create(&pve.node, &form).await.unwrap();
    p.client().wait_task(&upid).await.unwrap();
    let conf = p.client().vm_config(&pve.node, vmid).await.unwrap();
    let vols: Vec<String> = ["scsi0", "virtio0"]
        .iter()
        .map(|k| {
            conf[*k]
                .as_str()
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let listed = |storage: &'static str| {
        let p = p.clone();
        let node = pve.node.clone();
        async move {
            p.client()
                .storage_content(&node, storage, "images")
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.volid)
                .collect::<Vec<_>>()
        }
    };
    let before = [listed("local-lvm").await, listed("local").await].concat();
    for v in &vols {
        assert!(before.contains(v), "{v} not listed: {before:?}");
    }
    p.delete_vm(&name).await.unwrap();
    assert_eq!(
        p.describe_vm(&name).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let after = [listed("local-lvm").await, listed("local").await].concat();
    for v in &vols {
        assert!(!after.contains(v), "{v} still listed after delete_vm");
    }
}

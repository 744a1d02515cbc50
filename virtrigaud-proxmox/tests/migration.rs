//! Migrations across providers with the `Migration` runner: Proxmox (fakepve API + real sshd
//! with the `pvesm` stand-in) → libvirt (a real libvirtd, scripts/peers/libvirt.sh), ending in a
//! domain that boots the migrated boot-sector disk under TCG.
//!
//! **No real Proxmox VE is obtainable.** The source VM's config comes from fakepve; its disk
//! bytes come over real SSH from a qemu-img image that the `pvesm` stand-in exports in PVE's
//! `raw+size` format. What this cannot prove: the real `pvesm export` on a real LVM volume.

mod common;

use common::{pve, sshd, unique};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtrigaud_core::{Migration, MigrationPlan, PowerOp, Provider, StorageBackend};
use virtrigaud_libvirt::LibvirtProvider;
use virtrigaud_proxmox::ProxmoxProvider;
use virtrigaud_storage::FsBackend;

const MIB: u64 = 1 << 20;

/// A real-mode boot sector that prints a marker on COM1 and halts.
fn boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let code: &[u8] = &[
        0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBE, 0x17, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74,
        0x03, 0xEE, 0xEB, 0xF8, 0xFA, 0xF4, 0xEB, 0xFC,
    ];
    s[..code.len()].copy_from_slice(code);
    let msg = b"VIRTRIGAUD-BOOT-OK\r\n\0";
    s[code.len()..code.len() + msg.len()].copy_from_slice(msg);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(&self.uri)
                .args(args)
                .output();
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
        if String::from_utf8_lossy(&log).contains("VIRTRIGAUD-BOOT-OK") {
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

//! Provider pairs driven through the binary with the staging in S3 (SeaweedFS,
//! `scripts/peers/seaweedfs.sh`), against the libvirt peer (`scripts/peers/libvirt.sh`): local →
//! libvirt, the migrated boot-sector disk booted under TCG, libvirt → libvirt over `qemu+tcp`,
//! and libvirt → local, each disk compared with `qemu-img compare`. A missing peer fails under
//! `VIRTRIGAUD_IT=1` and is skipped otherwise.

#![cfg(feature = "libvirt")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn peer_env(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("VIRTRIGAUD_IT").as_deref() == Ok("1") {
                panic!("{var} is not set but VIRTRIGAUD_IT=1: start scripts/peers/{script}");
            }
            eprintln!("SKIP: {var} is not set (start scripts/peers/{script})");
            None
        }
    }
}

/// The SeaweedFS peer as the binary sees it: the `AWS_*` environment.
struct S3 {
    endpoint: String,
    access: String,
    secret: String,
    region: String,
}

impl S3 {
    fn from_env() -> Option<S3> {
        let endpoint = peer_env("VIRTRIGAUD_S3_ENDPOINT", "seaweedfs.sh")?;
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Some(S3 {
            endpoint,
            access: var("VIRTRIGAUD_S3_ACCESS_KEY"),
            secret: var("VIRTRIGAUD_S3_SECRET_KEY"),
            region: std::env::var("VIRTRIGAUD_S3_REGION").unwrap_or("us-east-1".into()),
        })
    }

    /// Creates the test bucket (the command never creates buckets).
    fn create_bucket(&self, bucket: &str) {
        use virtrigaud::storage::s3::{S3Backend, S3Config};
        let cfg = S3Config::new(bucket)
            .with_endpoint(&self.endpoint)
            .with_region(&self.region)
            .with_credentials(self.access.clone(), self.secret.clone());
        let b = S3Backend::new(cfg).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(b.create_bucket())
            .unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_virtrigaud"))
            .args(args)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.access)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", &self.region)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

fn virsh(uri: &str, args: &[&str]) -> String {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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

/// A local VM `boot01`: a 16 MiB root disk holding the boot sector and 1 MiB of data at
/// 5 MiB, and an 8 MiB data disk with data at 2 MiB; no NIC (nothing to map, nothing to fail
/// at start).
fn local_vm(root: &Path) {
    use std::os::unix::fs::FileExt;
    let dir = root.join("boot01");
    std::fs::create_dir_all(&dir).unwrap();
    let data = |seed: u8| -> Vec<u8> {
        (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect()
    };
    let f = std::fs::File::create(dir.join("root.raw")).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    f.write_all_at(&data(1), 5 << 20).unwrap();
    let f = std::fs::File::create(dir.join("data.raw")).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&data(2), 2 << 20).unwrap();
    let vm = serde_json::json!({
        "id": "boot01", "name": "boot01", "cpus": 1, "memory_mib": 64, "firmware": "bios",
        "state": "stopped",
        "disks": [
            {"id": "vda", "capacity": 0, "bus": "virtio", "location": "root.raw"},
            {"id": "vdb", "capacity": 0, "bus": "virtio", "location": "data.raw"}
        ],
        "nics": []
    });
    std::fs::write(dir.join("vm.json"), serde_json::to_vec_pretty(&vm).unwrap()).unwrap();
}

fn qemu_img_compare(a: &str, b: &str) {
    let o = Command::new("qemu-img")
        .args(["compare", a, b])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The file paths of a domain's disks, in order (volumes of `pool` resolved to their files).
fn disk_paths(uri: &str, dom: &str, pool: &str) -> Vec<String> {
    virsh(uri, &["domblklist", dom, "--details"])
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("disk"))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .map(|s| {
            if s.starts_with('/') {
                s
            } else {
                virsh(uri, &["vol-path", "--pool", pool, &s])
                    .trim()
                    .to_string()
            }
        })
        .collect()
}

/// Removes the test's domains and pool, even on panic.
struct Guard {
    uri: String,
    domains: Vec<String>,
    pool: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut cmds: Vec<Vec<&str>> = Vec::new();
        for d in &self.domains {
            cmds.push(vec!["destroy", d]);
            cmds.push(vec!["undefine", d]);
        }
        cmds.push(vec!["pool-destroy", &self.pool]);
        for args in cmds {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(&self.uri)
                .args(args)
                .output();
        }
    }
}

/// Boots `dom` with a serial log in `dir` and waits for the boot sector's marker.
fn boot(uri: &str, dom: &str, dir: &Path) {
    let serial = dir.join(format!("{dom}-serial.log"));
    let mut xml = virsh(uri, &["dumpxml", "--inactive", dom]);
    for tag in ["serial", "console"] {
        while let Some(a) = xml.find(&format!("<{tag} ")) {
            let end = format!("</{tag}>");
            let Some(b) = xml[a..].find(&end) else { break };
            xml.replace_range(a..a + b + end.len(), "");
        }
    }
    let xml = xml.replacen(
        "</devices>",
        &format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial></devices>",
            serial.display()
        ),
        1,
    );
    let file = dir.join(format!("{dom}.xml"));
    std::fs::write(&file, xml).unwrap();
    virsh(uri, &["define", file.to_str().unwrap()]);
    virsh(uri, &["start", dom]);
    let t = Instant::now();
    loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains("VIRTRIGAUD-BOOT-OK") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{dom}: no boot marker after 60 s: {:?}",
            String::from_utf8_lossy(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{dom} booted the migrated disk after {:?}", t.elapsed());
    virsh(uri, &["destroy", dom]);
}

#[test]
fn local_libvirt_tcp_and_back_through_s3_and_the_migrated_disk_boots() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    let tcp = std::env::var("VIRTRIGAUD_LIBVIRT_TCP_URI").unwrap_or(uri.clone());
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clis3{}", std::process::id());
    let via = format!("s3://virtrigaud-test/{tag}");

    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let pool_dir = tempfile::Builder::new()
        .prefix("vrg-cli-s3-pool")
        .tempdir()
        .unwrap();
    virsh(
        &uri,
        &[
            "pool-create-as",
            &tag,
            "dir",
            "--target",
            pool_dir.path().to_str().unwrap(),
        ],
    );
    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
    let _guard = Guard {
        uri: uri.clone(),
        domains: vec![a.clone(), b.clone()],
        pool: tag.clone(),
    };
    let from = format!("local://{}", t.path().join("src").display());
    let lv = format!("libvirt+{uri}");
    let lv_tcp = format!("libvirt+{tcp}");

    // local → libvirt, staged in S3.
    s3.ok(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &lv,
        "--via",
        &via,
        "boot01",
        "--name",
        &a,
        "--placement",
        &tag,
    ]);
    // The staged objects are in the bucket and verify against their manifests.
    let status = s3.ok(&["--json", "status", &via]);
    assert!(status.contains("migrations/boot01"), "{status}");
    let src = t.path().join("src/boot01");
    let paths_a = disk_paths(&uri, &a, &tag);
    assert_eq!(paths_a.len(), 2, "{paths_a:?}");
    for (p, orig) in paths_a.iter().zip(["root.raw", "data.raw"]) {
        qemu_img_compare(src.join(orig).to_str().unwrap(), p);
    }
    // The migrated boot disk boots under TCG.
    boot(&uri, &a, pool_dir.path());

    // libvirt → libvirt over qemu+tcp.
    s3.ok(&[
        "migrate",
        "--from",
        &lv_tcp,
        "--to",
        &lv_tcp,
        "--via",
        &via,
        "--prefix",
        "migrations/a-to-b",
        &a,
        "--name",
        &b,
        "--placement",
        &tag,
    ]);
    let paths_b = disk_paths(&uri, &b, &tag);
    assert_eq!(paths_b.len(), 2, "{paths_b:?}");
    for (pa, pb) in paths_a.iter().zip(&paths_b) {
        assert_ne!(pa, pb);
        qemu_img_compare(pa, pb);
    }

    // libvirt → local.
    let back = t.path().join("back");
    s3.ok(&[
        "--json",
        "migrate",
        "--from",
        &lv_tcp,
        "--to",
        &format!("local://{}", back.display()),
        "--via",
        &via,
        "--prefix",
        "migrations/back",
        &b,
        "--name",
        "boot01",
    ]);
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("boot01/vm.json")).unwrap()).unwrap();
    let disks = vm["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (d, orig) in disks.iter().zip(["root.raw", "data.raw"]) {
        let p = back.join("boot01").join(d["location"].as_str().unwrap());
        qemu_img_compare(src.join(orig).to_str().unwrap(), p.to_str().unwrap());
    }
}

/// Proxmox → libvirt through the binary, staged in S3: the source VM's config from fakepve
/// (`scripts/peers/fakepve.sh`; no real PVE can be installed here), its disk bytes over real SSH
/// from the `pvesm` stand-in (`scripts/peers/sshd.sh`), the token secret from the environment.
/// The migrated boot-sector disk boots under TCG and equals the image it came from.
#[cfg(feature = "proxmox")]
#[test]
fn proxmox_to_libvirt_through_s3_boots() {
    use std::os::unix::fs::FileExt;
    use virtrigaud::proxmox::{Auth, ProxmoxConfig, ProxmoxProvider};
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    let Some(pve_url) = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh") else {
        return;
    };
    let Some(images) = peer_env("VIRTRIGAUD_PVE_SSH_IMAGES", "sshd.sh") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let (token, secret, fp, node) = (
        var("VIRTRIGAUD_PVE_TOKEN_ID"),
        var("VIRTRIGAUD_PVE_TOKEN_SECRET"),
        var("VIRTRIGAUD_PVE_FINGERPRINT"),
        var("VIRTRIGAUD_PVE_NODE"),
    );
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clip2l{}", std::process::id());

    // The source VM on fakepve, its 32 MiB disk an image file the pvesm stand-in serves.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = ProxmoxConfig::new(
        &pve_url,
        Auth::Token {
            id: token.clone(),
            secret: virtrigaud::Secret::new(secret.clone()),
        },
    )
    .unwrap()
    .with_fingerprint(&fp);
    cfg.node = Some(node.clone());
    let pve = ProxmoxProvider::new(cfg).unwrap();
    let (vmid, volid) = rt.block_on(async {
        let vmid = pve.client().next_id().await.unwrap();
        let form = [
            ("vmid", vmid.to_string()),
            ("name", tag.clone()),
            ("cores", "1".to_string()),
            ("memory", "128".to_string()),
            ("ostype", "other".to_string()),
            ("scsi0", "local-lvm:1".to_string()),
        ];
        let upid = pve.client().vm_create(&node, &form).await.unwrap();
        pve.client().wait_task(&upid).await.unwrap();
        let conf = pve.client().vm_config(&node, vmid).await.unwrap();
        let volid = conf["scsi0"]
            .as_str()
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        (vmid, volid)
    });
    struct PveGuard<'a>(
        &'a ProxmoxProvider,
        &'a tokio::runtime::Runtime,
        u32,
        PathBuf,
    );
    impl Drop for PveGuard<'_> {
        fn drop(&mut self) {
            let _ = self.1.block_on(self.0.delete_vm(&self.2.to_string()));
            let _ = std::fs::remove_file(&self.3);
        }
    }
    use std::path::PathBuf;
    use virtrigaud::Provider;
    let image = Path::new(&images)
        .join("local-lvm")
        .join(volid.split_once(':').unwrap().1);
    let _pve_guard = PveGuard(&pve, &rt, vmid, image.clone());
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    f.write_all_at(&[0x5a; 8192], 20 << 20).unwrap();
    drop(f);

    // The target pool on libvirtd.
    let pool_dir = tempfile::Builder::new()
        .prefix("vrg-cli-p2l-pool")
        .tempdir()
        .unwrap();
    virsh(
        &uri,
        &[
            "pool-create-as",
            &tag,
            "dir",
            "--target",
            pool_dir.path().to_str().unwrap(),
        ],
    );
    let dom = format!("{tag}-dst");
    let _guard = Guard {
        uri: uri.clone(),
        domains: vec![dom.clone()],
        pool: tag.clone(),
    };
    let host = pve_url.trim_start_matches("https://");
    let from = format!(
        "proxmox://{token}@{host}/{node}?fingerprint={fp}&ssh_host={}&ssh_port={}&ssh_user={}\
         &ssh_key={}&ssh_fingerprint={}",
        var("VIRTRIGAUD_PVE_SSH_HOST"),
        var("VIRTRIGAUD_PVE_SSH_PORT"),
        var("VIRTRIGAUD_PVE_SSH_USER"),
        var("VIRTRIGAUD_PVE_SSH_KEY"),
        var("VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT"),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_virtrigaud"))
        .args([
            "migrate",
            "--from",
            &from,
            "--to",
            &format!("libvirt+{uri}"),
            "--via",
            &format!("s3://virtrigaud-test/{tag}"),
            &tag,
            "--name",
            &dom,
            "--placement",
            &tag,
        ])
        .env("VIRTRIGAUD_PROXMOX_PASSWORD", &secret)
        .env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", &s3.access)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret)
        .env("AWS_REGION", &s3.region)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let paths = disk_paths(&uri, &dom, &tag);
    assert_eq!(paths.len(), 1, "{paths:?}");
    qemu_img_compare(image.to_str().unwrap(), &paths[0]);
    boot(&uri, &dom, pool_dir.path());
}

/// local → Proxmox through the binary, staged in S3: PVE pulls each staged disk from a
/// presigned GET. fakepve fetches nothing, so its API is reached through
/// `virtrigaud-proxmox/tests/multipart_server.py`, which forwards every call and, for
/// `download-url`, fetches the URL as PVE would (no credentials of its own) into the directory
/// the `pvesm` stand-in serves over SSH, where the migration re-reads and verifies it.
#[cfg(feature = "proxmox")]
#[test]
fn local_to_proxmox_through_s3_pve_pulls_the_disks() {
    use virtrigaud::proxmox::{Auth, ProxmoxConfig, ProxmoxProvider};
    let Some(s3) = S3::from_env() else { return };
    let Some(pve_url) = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh") else {
        return;
    };
    let Some(images) = peer_env("VIRTRIGAUD_PVE_SSH_IMAGES", "sshd.sh") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let (token, secret, node) = (
        var("VIRTRIGAUD_PVE_TOKEN_ID"),
        var("VIRTRIGAUD_PVE_TOKEN_SECRET"),
        var("VIRTRIGAUD_PVE_NODE"),
    );
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clil2p{}", std::process::id());
    let import_dir = Path::new(&images).join("images/import");
    std::fs::create_dir_all(&import_dir).unwrap();

    // The forwarding proxy (prints its port).
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../virtrigaud-proxmox/tests/multipart_server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(&import_dir)
        .arg(&pve_url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _proxy = Kill(child);
    let port: u16 = line.trim().parse().unwrap();

    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let to = format!(
        "proxmox://{token}@127.0.0.1:{port}/{node}?allow_http=1&ssh_host={}&ssh_port={}\
         &ssh_user={}&ssh_key={}&ssh_fingerprint={}",
        var("VIRTRIGAUD_PVE_SSH_HOST"),
        var("VIRTRIGAUD_PVE_SSH_PORT"),
        var("VIRTRIGAUD_PVE_SSH_USER"),
        var("VIRTRIGAUD_PVE_SSH_KEY"),
        var("VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT"),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_virtrigaud"))
        .args([
            "--json",
            "migrate",
            "--from",
            &format!("local://{}", t.path().join("src").display()),
            "--to",
            &to,
            "--via",
            &format!("s3://virtrigaud-test/{tag}"),
            "boot01",
            "--name",
            &tag,
        ])
        .env("VIRTRIGAUD_PROXMOX_PASSWORD", &secret)
        .env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", &s3.access)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret)
        .env("AWS_REGION", &s3.region)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // Whatever happened, remove the VM the migration may have created.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = ProxmoxConfig::new(
        &pve_url,
        Auth::Token {
            id: token.clone(),
            secret: virtrigaud::Secret::new(secret.clone()),
        },
    )
    .unwrap()
    .with_fingerprint(var("VIRTRIGAUD_PVE_FINGERPRINT"));
    cfg.node = Some(node.clone());
    let pve = ProxmoxProvider::new(cfg).unwrap();
    use virtrigaud::Provider;
    let info = rt.block_on(pve.describe_vm(&tag));
    if let Ok(i) = &info {
        let _ = rt.block_on(pve.delete_vm(&i.id));
    }
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info = info.unwrap();
    assert_eq!(info.disks.len(), 2, "{info:?}");
    assert!(
        info.annotation
            .as_deref()
            .unwrap_or("")
            .contains("virtrigaud-migration:"),
        "{info:?}"
    );
    // Every disk was pulled by "PVE" from a presigned GET, checked against its SHA-256, and
    // verified by the migration over SSH (the finished report says verified).
    let reports: Vec<serde_json::Value> = std::fs::read_dir(&import_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(&tag) && p.to_string_lossy().ends_with(".json"))
        .map(|p| {
            let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let _ = std::fs::remove_file(&p);
            v
        })
        .collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert_eq!(r["pulled"], true, "{r}");
        assert_eq!(r["url_signed"], true, "{r}");
        assert_eq!(r["checksum_ok"], true, "{r}");
    }
    let finished = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event: {out}"));
    let disks = finished["report"]["state"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{finished}");
    assert!(disks.iter().all(|d| d["verified"] == true), "{finished}");
}

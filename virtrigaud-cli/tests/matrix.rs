//! Provider pairs driven through the binary with the staging in S3 (SeaweedFS,
//! `scripts/peers/seaweedfs.sh`), against the libvirt peer (`scripts/peers/libvirt.sh`): local →
//! libvirt, the migrated boot-sector disk booted under TCG, libvirt → libvirt over `qemu+tcp`,
//! and libvirt → local, each disk compared with `qemu-img compare`; Proxmox (fakepve + the SSH
//! stand-in) → libvirt and local → Proxmox; and two rings through the hypervisors, each pair of
//! libvirt, vSphere (the govmomi simulator) and Proxmox in both directions, ending in a boot.
//! A missing peer fails under `VIRTRIGAUD_IT=1` and is skipped otherwise.
//! No real Proxmox VE is available here: Proxmox runs on fakepve and a `pvesm` stand-in.

#![cfg(feature = "libvirt")]

mod common;

use common::{peer_env, virsh};
use virtrigaud_testkit::{BOOT_MARKER, boot_sector};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

    /// Creates the test bucket (the command never creates buckets), once per bucket and
    /// process: the tests run at once, and one CreateBucket is all the store needs to see.
    fn create_bucket(&self, bucket: &str) {
        static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
        if created.iter().any(|b| b == bucket) {
            return;
        }
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
        created.push(bucket.to_string());
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

impl S3 {
    /// Every key under `prefix` of `bucket`.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use virtrigaud::StorageBackend;
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
            .block_on(b.list(prefix))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }
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

/// Migrates `dom` from `from` to a local VM `boot01` under `back` (prefix `migrations/back` of
/// `via`) and compares its two disks with `local_vm`'s sources in `src`.
fn back_to_local(s3: &S3, from: &str, via: &str, dom: &str, back: &Path, src: &Path) {
    s3.ok(&[
        "--json",
        "migrate",
        "--from",
        from,
        "--to",
        &format!("local://{}", back.display()),
        "--via",
        via,
        "--prefix",
        "migrations/back",
        dom,
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

/// The `result` line of a `--json` command's output.
fn result_line(out: &str) -> serde_json::Value {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or_else(|| panic!("no result line: {out}"))
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

/// A transient dir pool named `pool` in a temporary directory, and the test's domains in it:
/// all removed on drop, even on panic (the domains and pool first, the directory last).
struct Guard {
    uri: String,
    domains: Vec<String>,
    pool: String,
    dir: tempfile::TempDir,
}

impl Guard {
    /// Creates the pool `tag` in a new directory named after `prefix`.
    fn pool(uri: &str, tag: &str, prefix: &str, domains: Vec<String>) -> Guard {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        virsh(
            uri,
            &[
                "pool-create-as",
                tag,
                "dir",
                "--target",
                dir.path().to_str().unwrap(),
            ],
        );
        Guard {
            uri: uri.to_string(),
            domains,
            pool: tag.to_string(),
            dir,
        }
    }

    /// The pool's directory.
    fn dir(&self) -> &tempfile::TempDir {
        &self.dir
    }
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
    // The test libvirtd has no networks: NICs (checked before booting) are dropped for the boot.
    for tag in ["serial", "console", "interface"] {
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
        if String::from_utf8_lossy(&log).contains(BOOT_MARKER) {
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
    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
    let guard = Guard::pool(&uri, &tag, "vrg-cli-s3-pool", vec![a.clone(), b.clone()]);
    let pool_dir = guard.dir();
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
    back_to_local(&s3, &lv_tcp, &via, &b, &back, &src);
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
    let (vmid, volid) = rt.block_on(pve_create_vm(&pve, &node, &tag));
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
    let dom = format!("{tag}-dst");
    let guard = Guard::pool(&uri, &tag, "vrg-cli-p2l-pool", vec![dom.clone()]);
    let pool_dir = guard.dir();
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
    let Some(s3) = S3::from_env() else { return };
    let Some(pve) = PveProxy::start() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clil2p{}", std::process::id());
    let _pve_guard = ProviderGuard {
        provider: std::sync::Arc::new(PveProxy::provider()),
        vms: vec![tag.clone()],
    };
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    migrate(
        &s3,
        &format!("local://{}", t.path().join("src").display()),
        &pve.url,
        &format!("s3://virtrigaud-test/{tag}"),
        "boot01",
        &tag,
        &[],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    use virtrigaud::Provider;
    let info = rt.block_on(PveProxy::provider().describe_vm(&tag)).unwrap();
    assert_eq!(info.disks.len(), 2, "{info:?}");
    assert!(
        info.annotation
            .as_deref()
            .unwrap_or("")
            .contains("virtrigaud-migration:"),
        "{info:?}"
    );
    // Every disk was pulled by "PVE" from a presigned GET and checked against its SHA-256
    // (`migrate` checked that the report says every disk verified, re-read over SSH).
    let reports = pve.pulls(&tag);
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert_eq!(r["pulled"], true, "{r}");
        assert_eq!(r["url_signed"], true, "{r}");
        assert_eq!(r["checksum_ok"], true, "{r}");
    }
}

/// Every secret and endpoint the binary may need, from the peers' environment, for
/// [`migrate`]: the S3 staging, the vSphere password, the Proxmox token secret.
fn peer_secrets(cmd: &mut Command, s3: &S3) {
    cmd.env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", &s3.access)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret)
        .env("AWS_REGION", &s3.region);
    for (k, from) in [
        ("VIRTRIGAUD_VSPHERE_PASSWORD", "VIRTRIGAUD_VSPHERE_PASSWORD"),
        ("VIRTRIGAUD_PROXMOX_PASSWORD", "VIRTRIGAUD_PVE_TOKEN_SECRET"),
    ] {
        if let Ok(v) = std::env::var(from) {
            cmd.env(k, v);
        }
    }
}

/// `virtrigaud --json migrate --from FROM --to TO --via VIA VM --name NAME EXTRA…`, which must
/// succeed and report every disk verified; returns the finished event.
/// Creates VM `name` on fakepve (1 core, 128 MiB, a 1 GiB `scsi0` volume on `local-lvm`);
/// returns its id and the disk's volume id.
#[cfg(feature = "proxmox")]
async fn pve_create_vm(
    pve: &virtrigaud::proxmox::ProxmoxProvider,
    node: &str,
    name: &str,
) -> (u32, String) {
    let vmid = pve.client().next_id().await.unwrap();
    let form = [
        ("vmid", vmid.to_string()),
        ("name", name.to_string()),
        ("cores", "1".to_string()),
        ("memory", "128".to_string()),
        ("ostype", "other".to_string()),
        ("scsi0", "local-lvm:1".to_string()),
    ];
    let upid = pve.client().vm_create(node, &form).await.unwrap();
    pve.client().wait_task(&upid).await.unwrap();
    let conf = pve.client().vm_config(node, vmid).await.unwrap();
    let volid = conf["scsi0"]
        .as_str()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    (vmid, volid)
}

/// Runs the binary with `args` and the peers' secrets in its environment; returns its exit code
/// and its stdout followed by its stderr.
fn output_with_secrets(s3: &S3, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtrigaud"));
    cmd.args(args).stdin(Stdio::null());
    peer_secrets(&mut cmd, s3);
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn migrate(
    s3: &S3,
    from: &str,
    to: &str,
    via: &str,
    vm: &str,
    name: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtrigaud"));
    cmd.args([
        "--json", "migrate", "--from", from, "--to", to, "--via", via, vm, "--name", name,
    ])
    .args(extra)
    .stdin(Stdio::null());
    peer_secrets(&mut cmd, s3);
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{from} -> {to}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let finished = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event: {out}"));
    let disks = finished["report"]["state"]["disks"].as_array().unwrap();
    assert!(!disks.is_empty(), "{finished}");
    assert!(disks.iter().all(|d| d["verified"] == true), "{finished}");
    finished
}

/// A libvirt domain `name` in `pool` (directory `dir`): a 16 MiB qcow2 boot disk holding the
/// boot sector and 1 MiB of data at 5 MiB, and a virtio NIC with a fixed MAC on network
/// `default`; returns the disk's path.
fn libvirt_boot_domain(uri: &str, pool: &str, dir: &Path, name: &str) -> String {
    use std::os::unix::fs::FileExt;
    let raw = dir.join("boot.raw.tmp");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&boot_sector(), 0).unwrap();
    f.write_all_at(&virtrigaud::testdata::noise(7, 1 << 20), 5 << 20)
        .unwrap();
    drop(f);
    let disk = dir.join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();
    virsh(uri, &["pool-refresh", pool]);
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='network'><mac address='{RING_MAC}'/><source network='default'/>\
         <model type='virtio'/></interface></devices></domain>",
        disk.display()
    );
    let x = dir.join(format!("{name}.xml.tmp"));
    std::fs::write(&x, xml).unwrap();
    virsh(uri, &["define", x.to_str().unwrap()]);
    std::fs::remove_file(&x).unwrap();
    disk.to_string_lossy().into_owned()
}

/// The MAC the ring's source NIC has, carried through every hop.
const RING_MAC: &str = "52:54:00:7a:00:01";

/// Checks that the final domain's NIC kept the source's MAC and came back onto `default`.
fn ring_nic_came_back(uri: &str, dom: &str) {
    let l = virsh(uri, &["domiflist", dom]);
    let row = l
        .lines()
        .find(|r| r.contains(RING_MAC))
        .unwrap_or_else(|| panic!("{dom} lost the NIC {RING_MAC}: {l}"));
    assert!(row.contains("default"), "{l}");
}

/// The vSphere peer as a `vsphere://` URL, and a provider to clean up with.
#[cfg(feature = "vsphere")]
fn vsphere_peer() -> Option<(String, virtrigaud::vsphere::VsphereProvider)> {
    let url = common::vsphere_url()?;
    let var = |k: &str| std::env::var(k).unwrap();
    let cfg = virtrigaud::vsphere::VsphereConfig::new(
        var("VIRTRIGAUD_VSPHERE_URL"),
        var("VIRTRIGAUD_VSPHERE_USER"),
        var("VIRTRIGAUD_VSPHERE_PASSWORD").as_str(),
    )
    .with_thumbprint(var("VIRTRIGAUD_VSPHERE_THUMBPRINT"))
    .with_datacenter("DC0")
    .with_datastore("LocalDS_0");
    Some((
        format!("{url}&datastore=LocalDS_0"),
        virtrigaud::vsphere::VsphereProvider::new(cfg).unwrap(),
    ))
}

/// Deletes the named VMs and their disks from a provider, even on panic.
struct ProviderGuard {
    provider: std::sync::Arc<dyn virtrigaud::Provider>,
    vms: Vec<String>,
}

impl Drop for ProviderGuard {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for vm in &self.vms {
            rt.block_on(async {
                if let Ok(info) = self.provider.describe_vm(vm).await {
                    let _ = self.provider.delete_vm(&info.id).await;
                    for d in &info.disks {
                        let _ = self.provider.delete_disk(vm, &d.location).await;
                    }
                }
            });
        }
    }
}

/// libvirt → vSphere → libvirt through the binary, staged in S3: the boot-sector disk goes to
/// the simulator's datastore and back, equals its source (`qemu-img compare`), keeps its NIC
/// (MAC, networks mapped both ways) and boots under TCG.
#[cfg(feature = "vsphere")]
#[test]
fn libvirt_vsphere_and_back_through_s3_boots() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    let Some((vs, vsphere)) = vsphere_peer() else {
        return;
    };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clil2v{}", std::process::id());
    let (src, back) = (format!("{tag}-src"), format!("{tag}-back"));
    let guard = Guard::pool(
        &uri,
        &tag,
        "vrg-cli-l2v-pool",
        vec![src.clone(), back.clone()],
    );
    let pool_dir = guard.dir();
    let _vs_guard = ProviderGuard {
        provider: std::sync::Arc::new(vsphere),
        vms: vec![tag.clone()],
    };
    let source = libvirt_boot_domain(&uri, &tag, pool_dir.path(), &src);
    let lv = format!("libvirt+{uri}");
    let via = |leg: &str| format!("s3://virtrigaud-test/{tag}/{leg}");
    migrate(
        &s3,
        &lv,
        &vs,
        &via("to-vsphere"),
        &src,
        &tag,
        &["--network-map", "default=VM Network"],
    );
    migrate(
        &s3,
        &vs,
        &lv,
        &via("back"),
        &tag,
        &back,
        &["--network-map", "VM Network=default", "--placement", &tag],
    );
    let paths = disk_paths(&uri, &back, &tag);
    assert_eq!(paths.len(), 1, "{paths:?}");
    qemu_img_compare(&source, &paths[0]);
    ring_nic_came_back(&uri, &back);
    boot(&uri, &back, pool_dir.path());
}

/// The Proxmox peer reached through `virtrigaud-proxmox/tests/multipart_server.py`: fakepve's
/// API with what fakepve does not do played as PVE would (fetching `download-url`s, importing
/// `import-from` drives into the files the `pvesm` stand-in serves over SSH).
#[cfg(feature = "proxmox")]
struct PveProxy {
    /// `proxmox://…` through the proxy, with the SSH stand-in for exports.
    url: String,
    /// Where pulled and uploaded import files land.
    import_dir: std::path::PathBuf,
    child: std::process::Child,
}

#[cfg(feature = "proxmox")]
impl PveProxy {
    fn start() -> Option<PveProxy> {
        let pve_url = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh")?;
        let images = peer_env("VIRTRIGAUD_PVE_SSH_IMAGES", "sshd.sh")?;
        let var = |k: &str| std::env::var(k).unwrap();
        let import_dir = Path::new(&images).join("images/import");
        std::fs::create_dir_all(&import_dir).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../virtrigaud-proxmox/tests/multipart_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&import_dir)
            .arg(&pve_url)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let url = format!(
            "proxmox://{}@127.0.0.1:{port}/{}?allow_http=1&ssh_host={}&ssh_port={}\
             &ssh_user={}&ssh_key={}&ssh_fingerprint={}",
            var("VIRTRIGAUD_PVE_TOKEN_ID"),
            var("VIRTRIGAUD_PVE_NODE"),
            var("VIRTRIGAUD_PVE_SSH_HOST"),
            var("VIRTRIGAUD_PVE_SSH_PORT"),
            var("VIRTRIGAUD_PVE_SSH_USER"),
            var("VIRTRIGAUD_PVE_SSH_KEY"),
            var("VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT"),
        );
        Some(PveProxy {
            url,
            import_dir,
            child,
        })
    }

    /// A provider straight to fakepve (for cleaning up).
    fn provider() -> virtrigaud::proxmox::ProxmoxProvider {
        use virtrigaud::proxmox::{Auth, ProxmoxConfig, ProxmoxProvider};
        let var = |k: &str| std::env::var(k).unwrap();
        let mut cfg = ProxmoxConfig::new(
            &var("VIRTRIGAUD_PVE_URL"),
            Auth::Token {
                id: var("VIRTRIGAUD_PVE_TOKEN_ID"),
                secret: virtrigaud::Secret::new(var("VIRTRIGAUD_PVE_TOKEN_SECRET")),
            },
        )
        .unwrap()
        .with_fingerprint(var("VIRTRIGAUD_PVE_FINGERPRINT"));
        cfg.node = Some(var("VIRTRIGAUD_PVE_NODE"));
        ProxmoxProvider::new(cfg).unwrap()
    }

    /// The pull reports of the import files whose names contain `tag` (removed as read).
    fn pulls(&self, tag: &str) -> Vec<serde_json::Value> {
        std::fs::read_dir(&self.import_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(tag) && p.to_string_lossy().ends_with(".json"))
            .map(|p| {
                let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                let _ = std::fs::remove_file(&p);
                v
            })
            .collect()
    }
}

#[cfg(feature = "proxmox")]
impl Drop for PveProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// libvirt → Proxmox → vSphere → Proxmox → libvirt through the binary, staged in S3: each
/// Proxmox import pulled by "PVE" from a presigned GET (checked against its SHA-256), each
/// Proxmox export over real SSH from the `pvesm` stand-in; the disk that comes back equals its
/// source, keeps its NIC (MAC, networks mapped at every hop) and boots under TCG.
#[cfg(all(feature = "proxmox", feature = "vsphere"))]
#[test]
fn libvirt_proxmox_vsphere_proxmox_libvirt_through_s3_boots() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    let Some((vs, vsphere)) = vsphere_peer() else {
        return;
    };
    let Some(pve) = PveProxy::start() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("cliring{}", std::process::id());
    let (src, back) = (format!("{tag}-src"), format!("{tag}-back"));
    let (pve1, vs1, pve2) = (
        format!("{tag}-pve1"),
        format!("{tag}-vs"),
        format!("{tag}-pve2"),
    );
    let guard = Guard::pool(
        &uri,
        &tag,
        "vrg-cli-ring-pool",
        vec![src.clone(), back.clone()],
    );
    let pool_dir = guard.dir();
    let _vs_guard = ProviderGuard {
        provider: std::sync::Arc::new(vsphere),
        vms: vec![vs1.clone()],
    };
    let _pve_guard = ProviderGuard {
        provider: std::sync::Arc::new(PveProxy::provider()),
        vms: vec![pve1.clone(), pve2.clone()],
    };
    let source = libvirt_boot_domain(&uri, &tag, pool_dir.path(), &src);
    let lv = format!("libvirt+{uri}");
    let via = |leg: &str| format!("s3://virtrigaud-test/{tag}/{leg}");
    migrate(
        &s3,
        &lv,
        &pve.url,
        &via("l2p"),
        &src,
        &pve1,
        &["--network-map", "default=vmbr0"],
    );
    migrate(
        &s3,
        &pve.url,
        &vs,
        &via("p2v"),
        &pve1,
        &vs1,
        &["--network-map", "vmbr0=VM Network"],
    );
    migrate(
        &s3,
        &vs,
        &pve.url,
        &via("v2p"),
        &vs1,
        &pve2,
        &["--network-map", "VM Network=vmbr0"],
    );
    migrate(
        &s3,
        &pve.url,
        &lv,
        &via("p2l"),
        &pve2,
        &back,
        &["--network-map", "vmbr0=default", "--placement", &tag],
    );
    // Both Proxmox imports were pulled by "PVE" from presigned GETs, checksums checked.
    let pulls = pve.pulls(&tag);
    assert_eq!(pulls.len(), 2, "{pulls:?}");
    for r in &pulls {
        assert_eq!(r["pulled"], true, "{r}");
        assert_eq!(r["url_signed"], true, "{r}");
        assert_eq!(r["checksum_ok"], true, "{r}");
    }
    let paths = disk_paths(&uri, &back, &tag);
    assert_eq!(paths.len(), 1, "{paths:?}");
    qemu_img_compare(&source, &paths[0]);
    ring_nic_came_back(&uri, &back);
    boot(&uri, &back, pool_dir.path());
}

/// `migrate --dry-run` through the binary, staged in S3, against libvirtd (and the vSphere
/// simulator when built with it): a missing target pool (`--placement` and a `--storage-map`
/// target), a missing target network (libvirt → libvirt keeps an unmapped network's name, and
/// the test libvirtd has none), a source disk that cannot be read, each a non-zero exit naming
/// it, with the disks and maps printed; a complete plan passes. Nothing is written: no key under
/// the migration's S3 prefix, no volume or domain on the target.
#[test]
fn dry_run_checks_disks_placements_and_networks_and_writes_nothing() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clidry{}", std::process::id());
    let via = format!("s3://virtrigaud-test/{tag}");
    let (src, gone, dst) = (
        format!("{tag}-src"),
        format!("{tag}-gone"),
        format!("{tag}-dst"),
    );
    let guard = Guard::pool(
        &uri,
        &tag,
        "vrg-cli-dry-pool",
        vec![src.clone(), gone.clone(), dst.clone()],
    );
    let pool_dir = guard.dir().path().to_path_buf();
    libvirt_boot_domain(&uri, &tag, &pool_dir, &src);
    // A domain whose disk file does not exist: described fine, unreadable.
    let x = pool_dir.join("gone.xml.tmp");
    std::fs::write(
        &x,
        format!(
            "<domain type='qemu'><name>{gone}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            pool_dir.join("no-such-disk.raw").display()
        ),
    )
    .unwrap();
    virsh(&uri, &["define", x.to_str().unwrap()]);
    std::fs::remove_file(&x).unwrap();
    let vols_before = virsh(&uri, &["vol-list", &tag]);
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let local = format!("local://{}", t.path().join("src").display());
    let back = t.path().join("back");
    let lv = format!("libvirt+{uri}");
    let dry = |from: &str, to: &str, vm: &str, extra: &[&str]| -> (Option<i32>, String) {
        let mut args = vec![
            "migrate",
            "--dry-run",
            "--from",
            from,
            "--to",
            to,
            "--via",
            &via,
            vm,
            "--name",
            &dst,
        ];
        args.extend_from_slice(extra);
        let o = s3.run(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    };
    // local → libvirt: the default placement and a storage-map target missing.
    let missing_pool = format!("{tag}-nopool");
    let (code, out) = dry(&local, &lv, "boot01", &["--placement", &missing_pool]);
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains(&format!(
            "no placement (pool, storage, datastore) \"{missing_pool}\""
        )),
        "{out}"
    );
    assert!(
        out.contains("disk vda") && out.contains("disk vdb"),
        "{out}"
    );
    let (code, out) = dry(
        &local,
        &lv,
        "boot01",
        &[
            "--placement",
            &tag,
            "--storage-map",
            &format!("ds1={missing_pool}"),
        ],
    );
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains(&missing_pool) && out.contains("storage map: ds1="),
        "{out}"
    );
    // The same with the pool there: no problem, every disk read.
    let (code, out) = dry(&local, &lv, "boot01", &["--placement", &tag]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("readable").count(), 2, "{out}");
    assert!(out.contains("no problem found"), "{out}");
    // libvirt → libvirt: the unmapped network keeps its name, which this libvirtd lacks; a
    // mapped one that is missing too; a host bridge is not checked.
    let (code, out) = dry(&lv, &lv, &src, &["--placement", &tag]);
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("no network \"default\""), "{out}");
    assert!(
        out.contains(&format!("nic  {RING_MAC} default → default")),
        "{out}"
    );
    let (code, out) = dry(
        &lv,
        &lv,
        &src,
        &[
            "--placement",
            &tag,
            "--network-map",
            &format!("default={tag}-net"),
        ],
    );
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains(&format!("no network \"{tag}-net\"")), "{out}");
    let (code, out) = dry(
        &lv,
        &lv,
        &src,
        &[
            "--placement",
            &tag,
            "--network-map",
            "default=bridge:br-vrg",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    // libvirt → local: the source disk cannot be read.
    let (code, out) = dry(&lv, &format!("local://{}", back.display()), &gone, &[]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("disk vda: cannot open and read it"), "{out}");
    // Nothing written anywhere.
    assert_eq!(
        s3.keys("virtrigaud-test", &format!("{tag}/")),
        Vec::<String>::new()
    );
    assert_eq!(virsh(&uri, &["vol-list", &tag]), vols_before);
    let doms = virsh(&uri, &["list", "--all", "--name"]);
    assert!(!doms.lines().any(|l| l.trim() == dst), "{doms}");
    assert!(!back.join(&dst).exists());
}

/// vSphere (simulator) → local through the binary, staged in S3, after dry runs: a VM migrated
/// there from a local directory, powered on, is a problem without `--snapshot`/`--shutdown`
/// (exit 3) and none with `--snapshot` (its disks opened and first blocks read over NFC); a
/// vSphere target says it cannot check its placements. Nothing staged by the dry runs. Then,
/// powered off, it migrates back to a local directory equal to the first source.
#[cfg(feature = "vsphere")]
#[test]
fn vsphere_to_local_through_s3_after_a_dry_run_of_the_running_vm() {
    let Some(s3) = S3::from_env() else { return };
    let Some((vs, vsphere)) = vsphere_peer() else {
        return;
    };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clidryvs{}", std::process::id());
    let provider: std::sync::Arc<dyn virtrigaud::Provider> = std::sync::Arc::new(vsphere);
    let _guard = ProviderGuard {
        provider: provider.clone(),
        vms: vec![tag.clone()],
    };
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let local = format!("local://{}", t.path().join("src").display());
    // local → vSphere (dry run): the simulator cannot check its placements.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtrigaud"));
    cmd.args([
        "migrate",
        "--dry-run",
        "--from",
        &local,
        "--to",
        &vs,
        "--via",
        &format!("s3://virtrigaud-test/{tag}/dry"),
        "boot01",
        "--name",
        &tag,
    ])
    .stdin(Stdio::null());
    peer_secrets(&mut cmd, &s3);
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("cannot check"), "{out}");
    migrate(
        &s3,
        &local,
        &vs,
        &format!("s3://virtrigaud-test/{tag}/to"),
        "boot01",
        &tag,
        &[],
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(provider.power(&tag, virtrigaud::PowerOp::On))
        .unwrap();
    let back = t.path().join("back");
    let dry_via = format!("s3://virtrigaud-test/{tag}/back");
    let back_url = format!("local://{}", back.display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "--dry-run",
            "--from",
            &vs,
            "--to",
            &back_url,
            "--via",
            &dry_via,
            &tag,
        ];
        args.extend_from_slice(extra);
        output_with_secrets(&s3, &args)
    };
    let (code, out) = run(&[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("the source VM is running: pass --snapshot"),
        "{out}"
    );
    let (code, out) = run(&["--snapshot"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("readable").count(), 2, "{out}");
    assert!(out.contains("read from a snapshot"), "{out}");
    assert_eq!(
        s3.keys("virtrigaud-test", &format!("{tag}/back")),
        Vec::<String>::new()
    );
    assert_eq!(
        s3.keys("virtrigaud-test", &format!("{tag}/dry")),
        Vec::<String>::new()
    );
    assert!(!back.join(&tag).exists());
    // vSphere → local for real (powered off first), staged in S3: equal to the first source.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(provider.power(&tag, virtrigaud::PowerOp::Off))
        .unwrap();
    migrate(
        &s3,
        &vs,
        &format!("local://{}", back.display()),
        &dry_via,
        &tag,
        "boot01",
        &[],
    );
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("boot01/vm.json")).unwrap()).unwrap();
    let disks = vm["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{vm}");
    for (d, orig) in disks.iter().zip(["root.raw", "data.raw"]) {
        let p = back.join("boot01").join(d["location"].as_str().unwrap());
        qemu_img_compare(
            t.path().join("src/boot01").join(orig).to_str().unwrap(),
            p.to_str().unwrap(),
        );
    }
}

/// A local VM `big01` with one raw disk of 40 MiB of noise (and a small second disk), for runs
/// slow enough (under `--limit`) to be caught in the middle of a disk.
fn big_local_vm(root: &Path) {
    let dir = root.join("big01");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("root.raw"),
        virtrigaud::testdata::noise(11, 40 << 20),
    )
    .unwrap();
    std::fs::write(
        dir.join("data.raw"),
        virtrigaud::testdata::noise(12, 4 << 20),
    )
    .unwrap();
    let vm = serde_json::json!({
        "id": "big01", "name": "big01", "cpus": 1, "memory_mib": 64, "firmware": "bios",
        "state": "stopped",
        "disks": [
            {"id": "vda", "capacity": 0, "bus": "virtio", "location": "root.raw"},
            {"id": "vdb", "capacity": 0, "bus": "virtio", "location": "data.raw"}
        ],
        "nics": []
    });
    std::fs::write(dir.join("vm.json"), serde_json::to_vec_pretty(&vm).unwrap()).unwrap();
}

/// local → local staged in S3 under `--limit 8MiB/s`: while the first disk is being uploaded
/// (an export progress event between 0 and all of its data), a second `migrate` of the same
/// migration is refused with exit 5 naming the first one's host and pid; then the first is
/// killed with SIGKILL in the middle of that upload, and the same command resumes and finishes
/// with every disk equal to its source.
#[test]
fn killed_mid_upload_to_s3_resumes_and_a_concurrent_run_is_refused() {
    use std::io::BufRead;
    let Some(s3) = S3::from_env() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clikill{}", std::process::id());
    let t = tempfile::tempdir().unwrap();
    big_local_vm(&t.path().join("src"));
    let from = format!("local://{}", t.path().join("src").display());
    let to = format!("local://{}", t.path().join("dst").display());
    let via = format!("s3://virtrigaud-test/{tag}");
    let args = [
        "--json", "migrate", "--from", &from, "--to", &to, "--via", &via, "big01", "--jobs", "1",
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_virtrigaud"));
    cmd.args(["--limit", "8MiB/s"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    peer_secrets(&mut cmd, &s3);
    let mut child = cmd.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut mid = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let p = &v["progress"];
        if v["event"] == "progress"
            && p["phase"] == "export"
            && p["data_bytes"].as_u64().unwrap_or(0) > 0
            && p["data_bytes"].as_u64() < p["data_total"].as_u64()
        {
            mid = Some(v);
            break;
        }
    }
    let mid = mid.expect("no export progress in the middle of a disk");
    // A second run of the same migration, now: refused, naming the first.
    let o = s3.run(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(
        err.contains(&format!("process {} on host {}", child.id(), host.trim())),
        "{err}"
    );
    child.kill().unwrap(); // SIGKILL, in the middle of the upload
    assert!(!child.wait().unwrap().success());
    eprintln!("killed during {mid}");
    let out = s3.ok(&args);
    let f = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "finished")
        .unwrap_or_else(|| panic!("{out}"));
    let disks = f["report"]["state"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for (d, src) in disks.iter().zip(["root.raw", "data.raw"]) {
        assert_eq!(d["verified"], true, "{d}");
        assert!(
            std::fs::read(t.path().join("src/big01").join(src)).unwrap()
                == std::fs::read(
                    t.path()
                        .join("dst/big01")
                        .join(d["target_location"].as_str().unwrap())
                )
                .unwrap(),
            "{src} differs after the resume"
        );
    }
}

/// A Proxmox source VM on fakepve whose disk is an image file the `pvesm` stand-in serves over
/// SSH; removed (VM and file) on drop.
#[cfg(feature = "proxmox")]
struct PveSource {
    pve: virtrigaud::proxmox::ProxmoxProvider,
    rt: tokio::runtime::Runtime,
    vmid: u32,
    /// The disk's image file.
    image: std::path::PathBuf,
    /// `proxmox://…` with the SSH stand-in for exports.
    url: String,
}

#[cfg(feature = "proxmox")]
impl PveSource {
    /// Creates VM `name` with a 32 MiB disk holding the boot sector and 8 KiB at 20 MiB.
    fn create(name: &str) -> Option<PveSource> {
        use std::os::unix::fs::FileExt;
        let pve_url = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh")?;
        let images = peer_env("VIRTRIGAUD_PVE_SSH_IMAGES", "sshd.sh")?;
        let var = |k: &str| std::env::var(k).unwrap();
        let pve = PveProxy::provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let node = var("VIRTRIGAUD_PVE_NODE");
        let (vmid, volid) = rt.block_on(pve_create_vm(&pve, &node, name));
        let image = Path::new(&images)
            .join("local-lvm")
            .join(volid.split_once(':').unwrap().1);
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(&boot_sector(), 0).unwrap();
        f.write_all_at(&[0x5a; 8192], 20 << 20).unwrap();
        drop(f);
        let host = pve_url.trim_start_matches("https://");
        let url = format!(
            "proxmox://{}@{host}/{node}?fingerprint={}&ssh_host={}&ssh_port={}&ssh_user={}\
             &ssh_key={}&ssh_fingerprint={}",
            var("VIRTRIGAUD_PVE_TOKEN_ID"),
            var("VIRTRIGAUD_PVE_FINGERPRINT"),
            var("VIRTRIGAUD_PVE_SSH_HOST"),
            var("VIRTRIGAUD_PVE_SSH_PORT"),
            var("VIRTRIGAUD_PVE_SSH_USER"),
            var("VIRTRIGAUD_PVE_SSH_KEY"),
            var("VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT"),
        );
        Some(PveSource {
            pve,
            rt,
            vmid,
            image,
            url,
        })
    }
}

#[cfg(feature = "proxmox")]
impl Drop for PveSource {
    fn drop(&mut self) {
        use virtrigaud::Provider;
        let _ = self.rt.block_on(self.pve.delete_vm(&self.vmid.to_string()));
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Proxmox → local through the binary, staged in S3: the VM's config from fakepve, its disk
/// over real SSH from the `pvesm` stand-in; the local disk equals the image it came from.
#[cfg(feature = "proxmox")]
#[test]
fn proxmox_to_local_through_s3() {
    let Some(s3) = S3::from_env() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clip2loc{}", std::process::id());
    let Some(src) = PveSource::create(&tag) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let f = migrate(
        &s3,
        &src.url,
        &format!("local://{}", t.path().display()),
        &format!("s3://virtrigaud-test/{tag}"),
        &tag,
        "pve01",
        &[],
    );
    let disks = f["report"]["state"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{f}");
    let p = t
        .path()
        .join("pve01")
        .join(disks[0]["target_location"].as_str().unwrap());
    qemu_img_compare(src.image.to_str().unwrap(), p.to_str().unwrap());
}

/// `--dry-run` local → Proxmox (fakepve's API), staged in S3: a storage the node lacks and a
/// bridge it lacks are problems (exit 4) naming them; `local-lvm` and `vmbr0.42` (a VLAN on
/// `vmbr0`) pass. Nothing staged.
#[cfg(feature = "proxmox")]
#[test]
fn dry_run_to_proxmox_checks_storages_and_bridges() {
    let Some(s3) = S3::from_env() else { return };
    let Some(pve_url) = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh") else {
        return;
    };
    s3.create_bucket("virtrigaud-test");
    let var = |k: &str| std::env::var(k).unwrap();
    let tag = format!("clidrypve{}", std::process::id());
    let pve = format!(
        "proxmox://{}@{}/{}?fingerprint={}",
        var("VIRTRIGAUD_PVE_TOKEN_ID"),
        pve_url.trim_start_matches("https://"),
        var("VIRTRIGAUD_PVE_NODE"),
        var("VIRTRIGAUD_PVE_FINGERPRINT"),
    );
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let local = format!("local://{}", t.path().join("src").display());
    let via = format!("s3://virtrigaud-test/{tag}");
    let dry = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "--dry-run",
            "--from",
            &local,
            "--to",
            &pve,
            "--via",
            &via,
            "boot01",
            "--name",
            &tag,
        ];
        args.extend_from_slice(extra);
        output_with_secrets(&s3, &args)
    };
    let missing = format!("{tag}-store");
    let (code, out) = dry(&["--placement", &missing]);
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains(&format!(
            "no placement (pool, storage, datastore) \"{missing}\""
        )),
        "{out}"
    );
    let (code, out) = dry(&["--placement", "local-lvm", "--network-map", "default=vmbr9"]);
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("no network \"vmbr9\""), "{out}");
    let (code, out) = dry(&[
        "--placement",
        "local-lvm",
        "--network-map",
        "default=vmbr0.42",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("placements and networks: checked"), "{out}");
    assert_eq!(
        s3.keys("virtrigaud-test", &format!("{tag}/")),
        Vec::<String>::new()
    );
}

/// libvirt over SSH through the binary, staged in S3: `libvirt+qemu+ssh://` URLs reach the
/// libvirt peer's system daemon through the real OpenSSH `sshd` peer (`scripts/peers/sshd.sh`:
/// key authentication, its own host key). local → libvirt over ssh, the disks equal their
/// sources; libvirt over ssh → local gives them back. Over `libvirt+qemu+libssh://`, a
/// known_hosts file that names another host key is refused before anything is written. (The
/// OpenSSH transport reads the user's own known_hosts, which a test must not touch, so the
/// migrations pass `no_verify=1`; and over libssh a whole migration hangs in
/// virConnectGetCapabilities inside our process, which virsh does not: not yet explained.)
#[test]
fn libvirt_over_ssh_through_s3() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(port) = peer_env("VIRTRIGAUD_PVE_SSH_PORT", "sshd.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    let env = |v: &str| std::env::var(v).unwrap();
    let (user, key) = (
        env("VIRTRIGAUD_PVE_SSH_USER"),
        env("VIRTRIGAUD_PVE_SSH_KEY"),
    );
    assert_eq!(
        uri, "qemu:///system",
        "the ssh URLs below reach the system daemon"
    );
    let over_libssh = |known_hosts: &str| {
        format!(
            "libvirt+qemu+libssh://{user}@127.0.0.1:{port}/system?keyfile={key}\
             &known_hosts={known_hosts}&sshauth=privkey"
        )
    };
    let over_ssh =
        format!("libvirt+qemu+ssh://{user}@127.0.0.1:{port}/system?keyfile={key}&no_verify=1");
    s3.create_bucket("virtrigaud-test");
    let tag = format!("clissh{}", std::process::id());
    let via = format!("s3://virtrigaud-test/{tag}");
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"));
    let name = format!("{tag}-a");
    let guard = Guard::pool(&uri, &tag, "vrg-cli-ssh-pool", vec![name.clone()]);
    let from = format!("local://{}", t.path().join("src").display());

    // A known_hosts file naming another host key: refused, nothing staged or created.
    let wrong = t.path().join("wrong_known_hosts");
    let other = std::fs::read_to_string(format!("{key}.pub")).unwrap();
    std::fs::write(
        &wrong,
        format!(
            "[127.0.0.1]:{port} {}\n",
            other
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
    .unwrap();
    let o = s3.run(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &over_libssh(wrong.to_str().unwrap()),
        "--via",
        &via,
        "boot01",
        "--name",
        &name,
        "--placement",
        &tag,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a wrong host key is refused");
    assert!(
        err.to_lowercase().contains("host"),
        "the error names the host key check: {err}"
    );
    assert!(s3.keys("virtrigaud-test", &tag).is_empty());
    assert!(
        std::fs::read_dir(guard.dir().path())
            .unwrap()
            .next()
            .is_none(),
        "no volume created"
    );

    // local → libvirt over ssh.
    s3.ok(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &over_ssh,
        "--via",
        &via,
        "boot01",
        "--name",
        &name,
        "--placement",
        &tag,
    ]);
    let src = t.path().join("src/boot01");
    let paths = disk_paths(&uri, &name, &tag);
    assert_eq!(paths.len(), 2, "{paths:?}");
    for (p, orig) in paths.iter().zip(["root.raw", "data.raw"]) {
        qemu_img_compare(src.join(orig).to_str().unwrap(), p);
    }
    let inspected = s3.ok(&["--json", "inspect", &over_ssh, &name]);
    assert!(inspected.contains(&name), "{inspected}");

    // libvirt over ssh → local.
    let back = t.path().join("back");
    back_to_local(&s3, &over_ssh, &via, &name, &back, &src);
}

/// `export PROVIDER VM STORE` with `--disk`, `--format` and `--snapshot`, then `verify STORE KEY`
/// and `import STORE KEY PROVIDER`, through the binary, staged in S3 (SeaweedFS) from the
/// libvirt peer: the stored object is raw as asked, verifies, the snapshot taken for the export
/// is gone afterwards, and the disk imported into a local VM equals the domain's qcow2 disk.
/// A disk id the VM does not have is refused (exit 4) before anything is stored.
#[test]
fn export_verify_and_import_a_vm_disk_through_s3() {
    let Some(uri) = peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh") else {
        return;
    };
    let Some(s3) = S3::from_env() else { return };
    s3.create_bucket("virtrigaud-test");
    let tag = format!("cliexp{}", std::process::id());
    let via = format!("s3://virtrigaud-test/{tag}");
    let guard = Guard::pool(&uri, &tag, "vrg-cli-exp-pool", vec![tag.clone()]);
    let disk = libvirt_boot_domain(&uri, &tag, guard.dir().path(), &tag);
    let lv = format!("libvirt+{uri}");

    let out = s3.ok(&[
        "--json",
        "export",
        &lv,
        &tag,
        &via,
        "--disk",
        "vda",
        "--format",
        "raw",
        "--snapshot",
    ]);
    let result = result_line(&out);
    let disks = result["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{result}");
    let key = disks[0]["key"].as_str().unwrap().to_string();
    assert_eq!(
        virsh(&uri, &["snapshot-list", &tag, "--name"]).trim(),
        "",
        "the export's snapshot is removed"
    );
    let verified: serde_json::Value =
        serde_json::from_str(s3.ok(&["--json", "verify", &via, &key]).trim()).unwrap();
    let m = &verified["manifest"];
    assert_eq!(m["format"]["type"], "raw", "{verified}");
    assert_eq!(m["content_digest"]["value"], disks[0]["content_digest"]);

    let t = tempfile::tempdir().unwrap();
    let target = format!("local://{}", t.path().display());
    let out = s3.ok(&[
        "--json", "import", &via, &key, &target, "--vm", "back", "--name", "d0",
    ]);
    let result = result_line(&out);
    let location = result["location"].as_str().unwrap();
    qemu_img_compare(
        &disk,
        t.path().join("back").join(location).to_str().unwrap(),
    );

    // A disk the VM does not have: refused, nothing stored.
    let before = s3.keys("virtrigaud-test", &tag);
    let o = s3.run(&["export", &lv, &tag, &via, "--disk", "vdz"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("vdz"));
    assert_eq!(s3.keys("virtrigaud-test", &tag), before);
}

//! The `virtrigaud` binary, driven as a user drives it: local image directories and a file
//! store (no peer needed), and libvirt pairs against the libvirt peer (`VIRTRIGAUD_LIBVIRT_URI`,
//! started by `scripts/peers/libvirt.sh`; a missing peer fails under `VIRTRIGAUD_IT=1`).
//! No real Proxmox VE is available here: Proxmox runs on fakepve and a `pvesm` stand-in.

mod common;

#[cfg(any(feature = "proxmox", feature = "libvirt"))]
use common::peer_env;
#[cfg(feature = "libvirt")]
use common::virsh;
#[cfg(feature = "vsphere")]
use common::vsphere_url;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtrigaud"));
    c.env_remove("VIRTRIGAUD_VSPHERE_PASSWORD")
        .env_remove("VIRTRIGAUD_PROXMOX_PASSWORD")
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
            assert_eq!(v["v"], 1, "schema version on every line: {l}");
            v
        })
        .collect()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A local VM `web01` with two sparse raw disks; `data_mib` of data in each.
fn local_vm(root: &Path, data_mib: usize) {
    std::fs::create_dir_all(root.join("web01")).unwrap();
    for (i, name) in ["root.raw", "data.raw"].iter().enumerate() {
        let mut f = std::fs::File::create(root.join("web01").join(name)).unwrap();
        f.set_len(((data_mib as u64) << 20) * 4).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&pattern(data_mib << 20, i as u64 + 1)).unwrap();
    }
    let vm = serde_json::json!({
        "id": "web01", "name": "web01", "cpus": 2, "memory_mib": 1024, "firmware": "bios",
        "state": "stopped",
        "disks": [
            {"id": "vda", "capacity": 0, "bus": "virtio", "location": "root.raw"},
            {"id": "vdb", "capacity": 0, "bus": "virtio", "location": "data.raw"}
        ],
        "nics": [{"mac": "52:54:00:00:00:01", "model": "virtio", "network": "default"}]
    });
    std::fs::write(
        root.join("web01/vm.json"),
        serde_json::to_vec_pretty(&vm).unwrap(),
    )
    .unwrap();
}

#[test]
fn every_subcommand_has_help_with_an_example_and_there_is_a_version() {
    for sub in [
        "inspect",
        "list",
        "export",
        "import",
        "verify",
        "migrate",
        "status",
        "completions",
        "plan",
        "plan run",
    ] {
        let args: Vec<&str> = sub.split(' ').chain(["--help"]).collect();
        let h = ok(&args);
        assert!(h.contains("Example"), "{sub} --help has no example:\n{h}");
    }
    // The top-level help names every provider URL form and the exit codes.
    let h = ok(&["--help"]);
    for form in [
        "local:///dir",
        "libvirt+qemu:///system",
        "libvirt+qemu+tcp://",
        "libvirt+qemu+ssh://",
        "vsphere://",
        "proxmox://",
    ] {
        assert!(h.contains(form), "--help lacks {form}:\n{h}");
    }
    assert!(ok(&["--version"]).contains(env!("CARGO_PKG_VERSION")));
    assert!(ok(&["--help"]).contains("Exit codes"));
    assert!(ok(&["completions", "bash"]).contains("virtrigaud"));
}

#[test]
fn local_to_local_migration_with_json_events_resume_and_status() {
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 4);
    let from = format!("local://{}", t.path().join("src").display());
    let to = format!("local://{}", t.path().join("dst").display());
    let via = format!("file://{}", t.path().join("store").display());
    let out = ok(&[
        "--json",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--via",
        &via,
        "web01",
        "--name",
        "web01-copy",
    ]);
    let ev = json_lines(&out);
    let finished = ev
        .iter()
        .find(|e| e["event"] == "finished")
        .expect("a finished event");
    let disks = finished["report"]["state"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert!(disks.iter().all(|d| d["verified"] == true));
    assert!(ev.iter().any(|e| e["event"] == "progress"));
    assert!(
        ev.iter()
            .any(|e| e["event"] == "phase_started" && e["phase"] == "create_vm")
    );
    // Same bytes on the target.
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("dst/web01-copy/vm.json")).unwrap())
            .unwrap();
    for (src, d) in ["root.raw", "data.raw"]
        .iter()
        .zip(vm["disks"].as_array().unwrap())
    {
        assert_eq!(
            std::fs::read(t.path().join("src/web01").join(src)).unwrap(),
            std::fs::read(
                t.path()
                    .join("dst/web01-copy")
                    .join(d["location"].as_str().unwrap())
            )
            .unwrap()
        );
    }
    // Again: already done, nothing moves.
    let again = json_lines(&ok(&[
        "--json",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--via",
        &via,
        "web01",
        "--name",
        "web01-copy",
    ]));
    let f = again.iter().find(|e| e["event"] == "finished").unwrap();
    assert_eq!(f["report"]["exported_now"], 0);
    assert_eq!(f["report"]["imported_now"], 0);
    // Status finds it.
    let st = json_lines(&ok(&["--json", "status", &via]));
    let m = &st[0]["migrations"][0];
    assert_eq!(m["finished"], true);
    assert_eq!(m["disks_done"], 2);
    assert_eq!(m["target"], "local:web01-copy");
    // Inspect and list.
    let i = json_lines(&ok(&["--json", "inspect", &to, "web01-copy"]));
    assert_eq!(i[0]["vm"]["cpus"], 2);
    assert!(ok(&["list", &to]).contains("web01-copy"));
}

#[test]
fn exit_codes_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 1);
    let from = format!("local://{}", t.path().join("src").display());
    let to = format!("local://{}", t.path().join("dst").display());
    let via = format!("file://{}", t.path().join("store").display());
    // A password in a URL: refused, the message says where it goes, the password is not echoed.
    let o = run(&["inspect", "vsphere://admin:s3cret@vc/DC0", "vm1"]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("VIRTRIGAUD_VSPHERE_PASSWORD") && !err.contains("s3cret"),
        "{err}"
    );
    // Credentials in a store URL or a libvirt URL: refused before anything is opened, each
    // message naming the variables that take them instead, none echoing the secret.
    for (args, var) in [
        (
            vec![
                "migrate",
                "--from",
                &from,
                "--to",
                &to,
                "--via",
                "s3://AKID:s3cret@bkt/p",
                "web01",
            ],
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            vec!["status", "https://dav:s3cret@127.0.0.1:9/dav/"],
            "VIRTRIGAUD_WEBDAV_PASSWORD",
        ),
        (
            vec!["verify", "s3://bkt/p?secret=s3cret", "k"],
            "AWS_ACCESS_KEY_ID",
        ),
        (
            vec![
                "export",
                &from,
                "web01",
                "webdav://127.0.0.1:9/x?token=s3cret",
            ],
            "VIRTRIGAUD_WEBDAV_TOKEN",
        ),
        (
            vec![
                "inspect",
                "libvirt+qemu+ssh://root:s3cret@kvm1/system",
                "vm1",
            ],
            "SSH_AUTH_SOCK",
        ),
        (
            vec!["list", "vsphere://admin@vc/DC0?password=s3cret"],
            "VIRTRIGAUD_VSPHERE_PASSWORD",
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains(var) && !err.contains("s3cret"),
            "{args:?}: {err}"
        );
        assert!(
            var == "VIRTRIGAUD_VSPHERE_PASSWORD" || !err.contains("VSPHERE"),
            "{err}"
        );
    }
    assert!(!t.path().join("store").exists(), "nothing written");
    // Not found.
    let o = run(&["inspect", &from, "nope"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Usage.
    assert_eq!(run(&["migrate"]).status.code(), Some(2));
    // Another process holds the migration: exit 5, naming it.
    std::fs::create_dir_all(t.path().join("store/migrations/web01")).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lease = serde_json::json!({"host": host.trim(), "pid": std::process::id(),
        "acquired": 1, "expires": u64::MAX / 4});
    std::fs::write(
        t.path().join("store/migrations/web01/migration.lease"),
        lease.to_string(),
    )
    .unwrap();
    let o = run(&[
        "migrate", "--from", &from, "--to", &to, "--via", &via, "web01",
    ]);
    assert_eq!(o.status.code(), Some(5));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    std::fs::remove_file(t.path().join("store/migrations/web01/migration.lease")).unwrap();
    // Dry run: finds nothing wrong between two local providers, writes nothing.
    let out = ok(&[
        "--json",
        "migrate",
        "--dry-run",
        "--from",
        &from,
        "--to",
        &to,
        "--via",
        &via,
        "web01",
    ]);
    assert_eq!(json_lines(&out)[0]["findings"].as_array().unwrap().len(), 0);
    assert!(!t.path().join("dst").join("web01").exists());
    assert!(
        std::fs::read_dir(t.path().join("store/migrations/web01"))
            .unwrap()
            .next()
            .is_none(),
        "nothing written"
    );
}

#[test]
fn a_migration_killed_with_sigkill_resumes_to_equal_digests() {
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 96);
    let from = format!("local://{}", t.path().join("src").display());
    let to = format!("local://{}", t.path().join("dst").display());
    let via = format!("file://{}", t.path().join("store").display());
    let args = [
        "--json", "migrate", "--from", &from, "--to", &to, "--via", &via, "web01", "--jobs", "1",
    ];
    let mut child = bin().args(args).stdout(Stdio::piped()).spawn().unwrap();
    // Kill it once the first disk has been exported.
    let stdout = child.stdout.take().unwrap();
    let mut killed = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        if line.contains("\"phase_finished\"") && line.contains("\"export\"") {
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed && !status.success(), "the child was killed midway");
    // The killed process left its lease: this host sees that its holder is gone.
    let out = ok(&args);
    let ev = json_lines(&out);
    let f = ev.iter().find(|e| e["event"] == "finished").unwrap();
    assert!(f["report"]["exported_now"].as_u64().unwrap() <= 1, "{f}");
    for (src, d) in ["root.raw", "data.raw"]
        .iter()
        .zip(f["report"]["state"]["disks"].as_array().unwrap())
    {
        assert_eq!(
            std::fs::read(t.path().join("src/web01").join(src)).unwrap(),
            std::fs::read(
                t.path()
                    .join("dst/web01")
                    .join(d["target_location"].as_str().unwrap())
            )
            .unwrap()
        );
    }
}

/// Runs `args` and sends SIGINT (Ctrl-C) once the first disk's export has finished; returns the
/// exit status and everything printed on stdout.
fn interrupt_after_first_export(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = bin().args(args).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut out = String::new();
    let mut sent = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        if !sent && line.contains("\"phase_finished\"") && line.contains("\"export\"") {
            let st = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            sent = true;
        }
        out.push_str(&line);
        out.push('\n');
    }
    assert!(sent, "no export finished: {out}");
    (child.wait().unwrap(), out)
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Ctrl-C: exit 130 with a `cancelled` event, no partial target file left, the staged data
/// kept, and the same command resumes to equal bytes. With `--cleanup`, a Ctrl-C leaves nothing
/// at all (target disks, staged objects, checkpoint), and the same command starts afresh.
#[test]
fn ctrl_c_cancels_cleanly_keeping_or_cleaning_the_staged_data() {
    for cleanup in [false, true] {
        let t = tempfile::tempdir().unwrap();
        local_vm(&t.path().join("src"), 192);
        let from = format!("local://{}", t.path().join("src").display());
        let to = format!("local://{}", t.path().join("dst").display());
        let via = format!("file://{}", t.path().join("store").display());
        let mut args = vec![
            "--json", "migrate", "--from", &from, "--to", &to, "--via", &via, "web01", "--jobs",
            "1",
        ];
        if cleanup {
            args.push("--cleanup");
        }
        let (status, out) = interrupt_after_first_export(&args);
        assert_eq!(status.code(), Some(130), "{out}");
        assert!(
            json_lines(&out).iter().any(|e| e["kind"] == "cancelled"),
            "{out}"
        );
        let dst = files_under(&t.path().join("dst"));
        let store = files_under(&t.path().join("store"));
        if cleanup {
            assert!(dst.is_empty(), "left on the target: {dst:?}");
            assert!(store.is_empty(), "left in the store: {store:?}");
        } else {
            // A disk imported before the cancel may stay (the resume adopts it); nothing
            // partial (a temporary name) does.
            assert!(
                dst.iter()
                    .all(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.')),
                "partial target files: {dst:?}"
            );
            assert!(
                store
                    .iter()
                    .any(|p| p.to_string_lossy().ends_with(".manifest.json")),
                "the staged export is gone: {store:?}"
            );
        }
        let out = ok(&args);
        let ev = json_lines(&out);
        let f = ev.iter().find(|e| e["event"] == "finished").unwrap();
        let exported = f["report"]["exported_now"].as_u64().unwrap();
        if cleanup {
            assert_eq!(exported, 2, "started afresh: {f}");
            let left = files_under(&t.path().join("store"));
            assert!(
                left.iter()
                    .all(|p| !p.to_string_lossy().ends_with(".manifest.json")),
                "staged objects after --cleanup: {left:?}"
            );
        } else {
            assert_eq!(exported, 1, "resumed after the first export: {f}");
        }
        for (src, d) in ["root.raw", "data.raw"]
            .iter()
            .zip(f["report"]["state"]["disks"].as_array().unwrap())
        {
            assert_eq!(
                std::fs::read(t.path().join("src/web01").join(src)).unwrap(),
                std::fs::read(
                    t.path()
                        .join("dst/web01")
                        .join(d["target_location"].as_str().unwrap())
                )
                .unwrap()
            );
        }
    }
}

#[cfg(feature = "libvirt")]
fn libvirt_uri() -> Option<String> {
    peer_env("VIRTRIGAUD_LIBVIRT_URI", "libvirt.sh")
}

/// local → libvirt and back (libvirt → local), through the binary; libvirt side over
/// `qemu+tcp` when the peer offers it.
#[cfg(feature = "libvirt")]
#[test]
fn local_to_libvirt_and_back() {
    let Some(uri) = libvirt_uri() else { return };
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 3);
    let pool_dir = tempfile::Builder::new()
        .prefix("vrg-cli-pool")
        .tempdir()
        .unwrap();
    let tag = format!("cli{}", std::process::id());
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
    let from = format!("local://{}", t.path().join("src").display());
    let via = format!("file://{}", t.path().join("store").display());
    let lv = format!(
        "libvirt+{}",
        std::env::var("VIRTRIGAUD_LIBVIRT_TCP_URI").unwrap_or(uri.clone())
    );
    let dom = format!("{tag}-vm");
    // Dry run first: the local NIC's network has no map entry for libvirt.
    let o = run(&[
        "--json",
        "migrate",
        "--dry-run",
        "--from",
        &from,
        "--to",
        &lv,
        "--via",
        &via,
        "web01",
        "--name",
        &dom,
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("network-map"));
    let r = run(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &lv,
        "--via",
        &via,
        "web01",
        "--name",
        &dom,
        "--placement",
        &tag,
        "--network-map",
        "default=default",
    ]);
    let cleanup = |uri: &str| {
        let _ = Command::new("virsh")
            .args(["-c", uri, "undefine", &dom])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", uri, "pool-destroy", &tag])
            .output();
    };
    if !r.status.success() {
        cleanup(&uri);
        panic!("migrate to libvirt: {}", String::from_utf8_lossy(&r.stderr));
    }
    let xml = virsh(&uri, &["dumpxml", &dom]);
    assert!(
        xml.contains("virtrigaud-migration:"),
        "marker in <description>"
    );
    // And back to a local directory.
    let back = format!("local://{}", t.path().join("back").display());
    let r = run(&[
        "--json",
        "migrate",
        "--from",
        &lv,
        "--to",
        &back,
        "--via",
        &via,
        "--prefix",
        "migrations/back",
        &dom,
        "--name",
        "web01",
    ]);
    let ok_back = r.status.success();
    cleanup(&uri);
    assert!(ok_back, "{}", String::from_utf8_lossy(&r.stderr));
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("back/web01/vm.json")).unwrap())
            .unwrap();
    for (src, d) in ["root.raw", "data.raw"]
        .iter()
        .zip(vm["disks"].as_array().unwrap())
    {
        let a = t.path().join("src/web01").join(src);
        let b = t
            .path()
            .join("back/web01")
            .join(d["location"].as_str().unwrap());
        let o = Command::new("qemu-img")
            .args(["compare", a.to_str().unwrap(), b.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
}

/// A plan of three VMs, the way a Kubernetes Indexed Job runs it: one process per index, all
/// at once, over one store; then the same index twice at once (one runs, the other is refused
/// naming the holder, or finds it done); then the whole plan again finds everything done.
#[test]
fn a_plan_runs_by_index_in_parallel_processes_and_resumes_as_a_whole() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    local_vm(&src, 2);
    for vm in ["web02", "web03"] {
        std::fs::create_dir_all(src.join(vm)).unwrap();
        for f in ["root.raw", "data.raw"] {
            std::fs::copy(src.join("web01").join(f), src.join(vm).join(f)).unwrap();
        }
        let j = std::fs::read_to_string(src.join("web01/vm.json"))
            .unwrap()
            .replace("web01", vm);
        std::fs::write(src.join(vm).join("vm.json"), j).unwrap();
    }
    let plan = t.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "from = \"local://{}\"\nto = \"local://{}\"\nvia = \"file://{}\"\njobs = 2\n\
             [[vm]]\nname = \"web01\"\n[[vm]]\nname = \"web02\"\n[[vm]]\nname = \"web03\"\n\
             target_name = \"web03-new\"\n",
            src.display(),
            t.path().join("dst").display(),
            t.path().join("store").display()
        ),
    )
    .unwrap();
    let p = plan.to_str().unwrap();
    let children: Vec<_> = (0..3)
        .map(|i| {
            bin()
                .args(["--json", "plan", "run", p])
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for vm in ["web01", "web02", "web03-new"] {
        assert!(
            t.path().join("dst").join(vm).join("vm.json").is_file(),
            "{vm} migrated"
        );
    }
    // The same index twice at once, on a VM not migrated yet (its own store), slowed so the two
    // overlap: without waiting, exactly one runs and the other exits 5 naming it; with
    // --wait-for-lease, the other waits, then finds the VM done.
    for (i, wait) in ["0", "60"].iter().enumerate() {
        let plan2 = t.path().join(format!("plan-twins{i}.toml"));
        std::fs::write(
            &plan2,
            std::fs::read_to_string(&plan)
                .unwrap()
                .replace("/store\"", &format!("/store-twins{i}\""))
                .replace("/dst\"", &format!("/dst-twins{i}\"")),
        )
        .unwrap();
        let twins: Vec<_> = (0..2)
            .map(|_| {
                bin()
                    .args(["--json", "--limit", "2MiB/s", "plan", "run"])
                    .arg(&plan2)
                    .args(["--index", "1", "--wait-for-lease", wait])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pids: Vec<u32> = twins.iter().map(|c| c.id()).collect();
        let outs: Vec<_> = twins
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let ok_runs: Vec<usize> = (0..2).filter(|&k| outs[k].status.success()).collect();
        if *wait == "0" {
            assert_eq!(ok_runs.len(), 1, "exactly one runs: {outs:?}");
            let loser = 1 - ok_runs[0];
            let err = String::from_utf8_lossy(&outs[loser].stderr);
            assert_eq!(outs[loser].status.code(), Some(5), "{err}");
            assert!(
                err.contains(&format!("process {} on host", pids[ok_runs[0]])),
                "{err}"
            );
        } else {
            assert_eq!(ok_runs.len(), 2, "{outs:?}");
            let waited: Vec<_> = outs
                .iter()
                .map(|o| json_lines(&String::from_utf8_lossy(&o.stdout)))
                .filter(|ev| ev.iter().any(|e| e["event"] == "lease_wait"))
                .collect();
            assert_eq!(waited.len(), 1, "one of the two waited: {outs:?}");
            let f = waited[0].iter().find(|e| e["event"] == "finished").unwrap();
            assert_eq!(f["report"]["exported_now"], 0, "it found the VM done: {f}");
        }
    }
    // The whole plan again: every VM already done.
    let out = ok(&["--json", "plan", "run", p]);
    let ev = json_lines(&out);
    let finished: Vec<_> = ev.iter().filter(|e| e["event"] == "finished").collect();
    assert_eq!(finished.len(), 3);
    assert!(
        finished
            .iter()
            .all(|f| f["report"]["exported_now"] == 0 && f["vm"].is_string())
    );
    assert_eq!(
        run(&["plan", "run", p, "--index", "7"]).status.code(),
        Some(3)
    );
}

/// vSphere through the binary, against the govmomi simulator: list, inspect, a wrong password
/// (exit 6), and a local VM migrated onto it and inspected there.
#[cfg(feature = "vsphere")]
#[test]
fn vsphere_through_the_binary() {
    let Some(vs) = vsphere_url() else { return };
    let password = std::env::var("VIRTRIGAUD_VSPHERE_PASSWORD").unwrap();
    let with_pw = |args: &[&str]| {
        bin()
            .args(args)
            .env("VIRTRIGAUD_VSPHERE_PASSWORD", &password)
            .output()
            .unwrap()
    };
    let o = with_pw(&["--json", "list", &vs]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vms = json_lines(&String::from_utf8_lossy(&o.stdout));
    let first = vms[0]["vms"][0]["name"].as_str().unwrap().to_string();
    let o = with_pw(&["--json", "inspect", &vs, &first]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(json_lines(&String::from_utf8_lossy(&o.stdout))[0]["vm"]["cpus"].as_u64() >= Some(1));
    let o = bin()
        .args(["list", &vs])
        .env("VIRTRIGAUD_VSPHERE_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // local → vSphere.
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 2);
    let from = format!("local://{}", t.path().join("src").display());
    let via = format!("file://{}", t.path().join("store").display());
    let name = format!("cli-vs-{}", std::process::id());
    let o = with_pw(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &vs,
        "--via",
        &via,
        "web01",
        "--name",
        &name,
        "--network-map",
        "default=VM Network",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = with_pw(&["--json", "inspect", &vs, &name]);
    let vm = &json_lines(&String::from_utf8_lossy(&o.stdout))[0]["vm"];
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2);
    assert!(
        vm["annotation"]
            .as_str()
            .unwrap()
            .contains("virtrigaud-migration:")
    );
}

/// Proxmox through the binary, against fakepve: inspect by vmid with an API token, a wrong
/// token (exit 6).
#[cfg(feature = "proxmox")]
#[test]
fn proxmox_through_the_binary() {
    let Some(url) = peer_env("VIRTRIGAUD_PVE_URL", "fakepve.sh") else {
        return;
    };
    let token = std::env::var("VIRTRIGAUD_PVE_TOKEN_ID").unwrap();
    let secret = std::env::var("VIRTRIGAUD_PVE_TOKEN_SECRET").unwrap();
    let fp = std::env::var("VIRTRIGAUD_PVE_FINGERPRINT").unwrap();
    let node = std::env::var("VIRTRIGAUD_PVE_NODE").unwrap();
    let host = url.trim_start_matches("https://");
    let pve = format!("proxmox://{token}@{host}/{node}?fingerprint={fp}");
    let o = bin()
        .args(["--json", "inspect", &pve, "100"])
        .env("VIRTRIGAUD_PROXMOX_PASSWORD", &secret)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vm = &json_lines(&String::from_utf8_lossy(&o.stdout))[0]["vm"];
    assert_eq!(vm["name"], "vrg-describe");
    let o = bin()
        .args(["list", &pve])
        .env("VIRTRIGAUD_PROXMOX_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `export IMAGE STORE KEY` of a VMDK given by its descriptor opens its extents: the split
/// twoGbMaxExtentSparse VMware Workstation writes by default, and monolithicFlat, each with the
/// content digest of the raw disk qemu-img made it from.
#[test]
fn export_of_a_vmdk_descriptor_reads_its_extents() {
    if !virtrigaud_testkit::have_tool("qemu-img", "qemu-utils") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4200 << 20).unwrap();
    f.write_all_at(&pattern(1 << 20, 7), 3 << 20).unwrap();
    f.write_all_at(&pattern(3 << 20, 8), 2047 << 20).unwrap();
    f.write_all_at(&pattern(1 << 20, 9), 4100 << 20).unwrap();
    drop(f);
    let store = format!("file://{}", t.path().join("store").display());
    let digest_of = |image: &Path, key: &str| -> String {
        let out = ok(&["--json", "export", image.to_str().unwrap(), &store, key]);
        json_lines(&out)[0]["manifest"]["content_digest"]["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let want = digest_of(&raw, "raw");
    for sub in ["twoGbMaxExtentSparse", "monolithicFlat"] {
        let dir = t.path().join(sub);
        std::fs::create_dir(&dir).unwrap();
        let vmdk = dir.join("disk.vmdk");
        let o = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&raw)
            .arg(&vmdk)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(digest_of(&vmdk, sub), want, "{sub}");
    }
}

/// `--dry-run` against the vSphere simulator with a wrong password: the auth exit code (6),
/// the error names the login, and the store stays untouched (no checkpoint, no lease).
#[cfg(feature = "vsphere")]
#[test]
fn dry_run_finds_a_wrong_password_and_writes_nothing() {
    let Some(vs) = vsphere_url() else { return };
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 1);
    let store = t.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let from = format!("local://{}", t.path().join("src").display());
    let via = format!("file://{}", store.display());
    let o = bin()
        .args([
            "--json",
            "migrate",
            "--dry-run",
            "--from",
            &from,
            "--to",
            &vs,
            "--via",
            &via,
            "web01",
            "--network-map",
            "default=VM Network",
        ])
        .env("VIRTRIGAUD_VSPHERE_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let err = json_lines(&out)
        .into_iter()
        .find(|l| l["event"] == "error")
        .unwrap_or_else(|| panic!("no error line: {out}"));
    assert_eq!(err["kind"], "auth", "{err}");
    let left: Vec<_> = std::fs::read_dir(&store).unwrap().collect();
    assert!(left.is_empty(), "dry run wrote {left:?}");
}

/// `--limit`: a bad rate is a usage error (exit 3) naming the forms it takes; 64 MiB of data
/// exported under 32 MiB/s takes at least about two seconds (a lower bound only: a slow machine
/// cannot make it fail), where the same export without a cap takes a fraction of that.
#[test]
fn the_limit_flag_caps_the_transfer() {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("d.raw");
    std::fs::write(&image, pattern(64 << 20, 3)).unwrap();
    let store = format!("file://{}", t.path().join("store").display());
    let image = image.to_str().unwrap();
    let o = run(&["--limit", "0", "export", image, &store, "a.raw"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("50MiB/s"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&["--limit", "fast", "export", image, &store, "a.raw"]);
    assert_eq!(o.status.code(), Some(3));
    let t0 = std::time::Instant::now();
    ok(&["--limit", "32MiB/s", "export", image, &store, "b.raw"]);
    let capped = t0.elapsed();
    assert!(
        capped >= std::time::Duration::from_millis(1800),
        "64 MiB under 32 MiB/s took {capped:?}"
    );
}

/// `--encrypt-to` / `--identity` through a whole local → local migration: the staged objects
/// are age files (the standard `age` tool reads them), the migrated disks equal the source;
/// `verify` without the identity is an auth error (6) and with it succeeds; encrypting without
/// an identity to import with is refused before anything moves (3).
#[test]
fn an_encrypted_staging_through_the_binary() {
    if !virtrigaud_testkit::have_tool("age-keygen", "scripts/test.sh installs age") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let id = t.path().join("id.txt");
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(&id)
        .output()
        .unwrap();
    assert!(o.status.success());
    let recipient = std::fs::read_to_string(&id)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .unwrap();
    local_vm(&t.path().join("src"), 2);
    let from = format!("local://{}", t.path().join("src").display());
    let to = format!("local://{}", t.path().join("dst").display());
    let store = t.path().join("store");
    let via = format!("file://{}", store.display());
    let id_s = id.to_str().unwrap();
    let o = run(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--via",
        &via,
        "web01",
        "--encrypt-to",
        &recipient,
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(files_under(&store).is_empty());
    let out = ok(&[
        "--json",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--via",
        &via,
        "web01",
        "--encrypt-to",
        &recipient,
        "--identity",
        id_s,
    ]);
    let ev = json_lines(&out);
    let f = ev.iter().find(|e| e["event"] == "finished").unwrap();
    for (src, d) in ["root.raw", "data.raw"]
        .iter()
        .zip(f["report"]["state"]["disks"].as_array().unwrap())
    {
        assert_eq!(
            std::fs::read(t.path().join("src/web01").join(src)).unwrap(),
            std::fs::read(
                t.path()
                    .join("dst/web01")
                    .join(d["target_location"].as_str().unwrap())
            )
            .unwrap()
        );
    }
    let staged: Vec<_> = files_under(&store)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(staged.len(), 2, "{staged:?}");
    for p in &staged {
        assert!(
            std::fs::read(p)
                .unwrap()
                .starts_with(b"age-encryption.org/v1\n")
        );
        let o = Command::new("age")
            .args(["-d", "-i", id_s, "-o", "/dev/null"])
            .arg(p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let key = staged[0]
        .strip_prefix(&store)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let o = run(&["verify", &via, &key]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&["--identity", id_s, "verify", &via, &key]);
}

/// A reader that goes away (`virtrigaud … | head -1`) is no panic and no failure: the export
/// finishes, is stored, and the exit status is success.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.raw");
    std::fs::write(&img, pattern(1 << 20, 11)).unwrap();
    let store = format!("file://{}", t.path().join("store").display());
    let mut child = bin()
        .args(["-q", "export", img.to_str().unwrap(), &store, "k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    assert!(t.path().join("store/k.manifest.json").exists());
}

/// No password in the environment or a file, stdin a terminal (a pseudo-terminal made by
/// util-linux `script`): the command asks for it with echo off, and what is typed logs in to
/// the vSphere simulator (a wrong one is an auth error, exit 6); the typed text never appears
/// on the terminal. Without a terminal there is no prompt: the error names the variable.
#[cfg(feature = "vsphere")]
#[test]
fn the_password_is_asked_on_a_terminal_without_echo() {
    use std::io::Read;
    let Some(vs) = vsphere_url() else { return };
    if !virtrigaud_testkit::have_tool("script", "util-linux") {
        return;
    }
    let password = std::env::var("VIRTRIGAUD_VSPHERE_PASSWORD").unwrap();
    let o = run(&["list", &vs]);
    assert_eq!(o.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&o.stderr).contains("VIRTRIGAUD_VSPHERE_PASSWORD"));
    for (typed, code) in [(password.as_str(), 0), ("typed-wrong-pw", 6)] {
        let cmd = format!("'{}' list '{vs}'", env!("CARGO_BIN_EXE_virtrigaud"));
        let mut child = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env_remove("VIRTRIGAUD_VSPHERE_PASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        // Type only once the prompt is there (echo is off by then).
        let t0 = std::time::Instant::now();
        while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("password for") {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "no prompt: {}",
                String::from_utf8_lossy(&seen.lock().unwrap())
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{typed}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let status = child.wait().unwrap();
        drop(stdin);
        reader.join().unwrap();
        let screen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        assert_eq!(status.code(), Some(code), "{screen}");
        assert!(!screen.contains(typed), "the password was echoed: {screen}");
        assert!(screen.contains("vsphere password for vrg@"), "{screen}");
        if code == 0 {
            assert!(screen.contains("DC0_H0_VM0"), "{screen}");
        }
    }
}

/// A Kubernetes retry, as `plan run --index N` meets it: the lease of a pod that died on
/// another node (a record naming another host, expiring in 4 s) refuses the run at once with
/// `--wait-for-lease 0` (exit 5, naming that host), and with --index's default wait the run
/// waits for the expiry, takes the lease over and finishes. Then a run of another index killed
/// with SIGKILL midway is rerun and resumes (only what was missing is exported).
#[test]
fn plan_index_waits_for_a_dead_pods_lease_and_resumes_after_sigkill() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    local_vm(&src, 8);
    std::fs::create_dir_all(src.join("web02")).unwrap();
    for f in ["root.raw", "data.raw"] {
        std::fs::copy(src.join("web01").join(f), src.join("web02").join(f)).unwrap();
    }
    let j = std::fs::read_to_string(src.join("web01/vm.json"))
        .unwrap()
        .replace("web01", "web02");
    std::fs::write(src.join("web02/vm.json"), j).unwrap();
    let plan = t.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "from = \"local://{}\"\nto = \"local://{}\"\nvia = \"file://{}\"\n\
             [[vm]]\nname = \"web01\"\n[[vm]]\nname = \"web02\"\n",
            src.display(),
            t.path().join("dst").display(),
            t.path().join("store").display()
        ),
    )
    .unwrap();
    let p = plan.to_str().unwrap();
    let lease_dir = t.path().join("store/migrations/web01");
    std::fs::create_dir_all(&lease_dir).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lease = serde_json::json!({"host": "node-7-dead", "pid": 4242, "acquired": now - 100,
        "expires": now + 4});
    std::fs::write(lease_dir.join("migration.lease"), lease.to_string()).unwrap();
    let o = run(&["plan", "run", p, "--index", "0", "--wait-for-lease", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("process 4242 on host node-7-dead"), "{err}");
    let t0 = std::time::Instant::now();
    let out = ok(&["--json", "plan", "run", p, "--index", "0"]);
    let ev = json_lines(&out);
    assert!(ev.iter().any(|e| e["event"] == "lease_wait"), "{out}");
    assert!(ev.iter().any(|e| e["event"] == "finished"), "{out}");
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    // Index 1 killed with SIGKILL after its first disk's export, then retried.
    let mut child = bin()
        .args([
            "--json", "--limit", "8MiB/s", "plan", "run", p, "--index", "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut killed = false;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        if line.contains("\"phase_finished\"") && line.contains("\"export\"") {
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    assert!(killed && !child.wait().unwrap().success());
    let out = ok(&["--json", "plan", "run", p, "--index", "1"]);
    let ev = json_lines(&out);
    let f = ev.iter().find(|e| e["event"] == "finished").unwrap();
    // The disk exported before the kill is not exported again (the other one may have
    // finished in the same instant).
    assert!(
        f["report"]["exported_now"].as_u64().unwrap() <= 1,
        "resumed: {f}"
    );
    for (s, d) in ["root.raw", "data.raw"]
        .iter()
        .zip(f["report"]["state"]["disks"].as_array().unwrap())
    {
        assert_eq!(
            std::fs::read(src.join("web02").join(s)).unwrap(),
            std::fs::read(
                t.path()
                    .join("dst/web02")
                    .join(d["target_location"].as_str().unwrap())
            )
            .unwrap()
        );
    }
}

/// `--bus-map FROM=TO` moves the disks of one source bus to another, a bare `--bus-map BUS`
/// (or its alias `--bus BUS`) puts every disk on it; the migrated VM records the new buses; an
/// unknown bus is invalid input (3).
#[test]
fn bus_map_moves_disks_between_buses() {
    let t = tempfile::tempdir().unwrap();
    local_vm(&t.path().join("src"), 1);
    let from = format!("local://{}", t.path().join("src").display());
    let via = format!("file://{}", t.path().join("store").display());
    for (i, (flag, value, want)) in [
        ("--bus-map", "virtio=sata", "sata"),
        ("--bus", "scsi", "scsi"),
        ("--bus-map", "ide=nvme", "virtio"),
    ]
    .iter()
    .enumerate()
    {
        let to = t.path().join(format!("dst{i}"));
        ok(&[
            "migrate",
            "--from",
            &from,
            "--to",
            &format!("local://{}", to.display()),
            "--via",
            &via,
            "--prefix",
            &format!("migrations/bus{i}"),
            "web01",
            flag,
            value,
        ]);
        let vm: serde_json::Value =
            serde_json::from_slice(&std::fs::read(to.join("web01/vm.json")).unwrap()).unwrap();
        for d in vm["disks"].as_array().unwrap() {
            assert_eq!(d["bus"], *want, "{flag} {value}: {vm}");
        }
    }
    let o = run(&[
        "migrate",
        "--from",
        &from,
        "--to",
        &from,
        "--via",
        &via,
        "web01",
        "--bus-map",
        "virtio=floppy",
    ]);
    assert_eq!(o.status.code(), Some(3));
}

/// On a terminal (a pseudo-terminal made by util-linux `script`), each disk's bar shows the
/// bytes done of all (`… MiB/… MiB`) and its message once.
#[test]
fn progress_bars_show_bytes_on_a_terminal() {
    if !virtrigaud_testkit::have_tool("script", "util-linux") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.raw");
    std::fs::write(&img, pattern(24 << 20, 5)).unwrap();
    let store = format!("file://{}", t.path().join("store").display());
    let cmd = format!(
        "stty cols 160; '{}' --limit 8MiB/s export '{}' '{store}' k",
        env!("CARGO_BIN_EXE_virtrigaud"),
        img.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{screen}");
    assert!(
        screen.contains("/24.00 MiB"),
        "no bytes of the total: {screen}"
    );
    let line = screen
        .split(['\r', '\n'])
        .find(|l| l.contains("/24.00 MiB") && l.contains("MiB/s"))
        .unwrap_or_else(|| panic!("no bar with a rate: {screen}"));
    assert_eq!(line.matches("export").count(), 1, "{line}");
}

//! `virtrigaud` — migrate VMs between libvirt, vSphere and Proxmox VE through S3, HTTP/WebDAV,
//! NFS or a directory, from one command line.
//!
//! A package of its own (`cargo install virtrigaud-cli`) rather than a feature of the library,
//! so that the library's users never compile clap, indicatif or toml.

mod output;
mod planfile;
mod providers;

use clap::{CommandFactory, Parser, Subcommand};
use output::{EXIT_CODES, Renderer, exit_code, json_line};
use providers::Secrets;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::{
    CancellationToken, DiskBus, DiskFormat, Error, ErrorKind, ExportOptions, ImportOptions,
    Migration, MigrationPlan, OnFailure, PipelineOptions, PrepareSource, Result,
};

const AFTER_HELP: &str = "Providers: local:///dir, libvirt+qemu:///system, \
libvirt+qemu+tcp://host/system, libvirt+qemu+ssh://user@host/system, \
vsphere://user@vcenter/Datacenter?thumbprint=SHA256, \
proxmox://user@realm!token@host:8006/node?fingerprint=SHA256. Stores: file:///dir, \
s3://bucket/prefix (AWS_* variables), http(s)://host/path (WebDAV), nfs://host/export/path. \
Secrets only from VIRTRIGAUD_VSPHERE_PASSWORD / VIRTRIGAUD_PROXMOX_PASSWORD, --password-file \
or a prompt (no echo) when stdin is a terminal; store credentials from AWS_ACCESS_KEY_ID / \
AWS_SECRET_ACCESS_KEY (s3) and VIRTRIGAUD_WEBDAV_USER / _PASSWORD / _TOKEN (http); a secret in \
a URL is refused. libvirt on this host (qemu:///…) reads and writes a volume through its file \
when this process may open it; VIRTRIGAUD_LIBVIRT_STREAMS=1 sends all disk data through \
libvirt's streams instead.";

/// Migrate virtual machines between libvirt/KVM, VMware vSphere and Proxmox VE.
#[derive(Debug, Parser)]
#[command(name = "virtrigaud", version, about, after_help = format!("{AFTER_HELP}\n\n{EXIT_CODES}"))]
struct Cli {
    /// Print events and results as JSON lines (schema v1) instead of bars and text.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Read the provider password or token secret from this file.
    #[arg(long, global = true, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Cap the bandwidth of the whole process, shared by every transfer in it (all disks and
    /// all VMs of a plan): bytes per second with an optional unit, e.g. 50MiB/s, 20M, 1.5GB/s.
    #[arg(long, global = true, value_name = "RATE", env = "VIRTRIGAUD_LIMIT")]
    limit: Option<String>,
    /// Encrypt staged disks for this age recipient (`age1…`, repeatable): export and
    /// migrate. The standard `age` tool decrypts what is stored. Needs the `encryption`
    /// feature.
    #[arg(long, global = true, value_name = "RECIPIENT")]
    encrypt_to: Vec<String>,
    /// The age identity file (`age-keygen` output) that decrypts encrypted staged disks:
    /// import, verify and migrate.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "VIRTRIGAUD_AGE_IDENTITY_FILE"
    )]
    identity: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the `migrate` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show a VM's hardware (CPUs, memory, firmware, disks, NICs).
    ///
    /// Example: virtrigaud inspect libvirt+qemu:///system web01 --json
    #[command(after_help = AFTER_HELP)]
    Inspect {
        /// Provider URL.
        provider: String,
        /// VM name or id.
        vm: String,
    },
    /// List the VMs of a provider.
    ///
    /// Example: virtrigaud list local:///srv/images
    #[command(after_help = AFTER_HELP)]
    List {
        /// Provider URL.
        provider: String,
    },
    /// Export a VM's disks (PROVIDER VM STORE) or an image file (IMAGE STORE KEY) to a store.
    ///
    /// Examples: virtrigaud export libvirt+qemu:///system web01 s3://bucket/vms --snapshot;
    /// virtrigaud export disk.qcow2 file:///srv/stage web01/disk0
    #[command(after_help = AFTER_HELP)]
    Export {
        /// Provider URL, or an image file.
        source: String,
        /// VM (with a provider) or store URL (with an image file).
        second: String,
        /// Store URL (with a provider) or key (with an image file).
        third: String,
        /// Only these disks (ids, repeatable).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Stored format: qcow2, raw, vmdk (streamOptimized), vmdk-sparse.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// qcow2 with compressed clusters.
        #[arg(long)]
        compress: bool,
        /// Read from a snapshot taken for the export (removed afterwards).
        #[arg(long)]
        snapshot: bool,
    },
    /// Import a stored disk into a provider, verified against its manifest.
    ///
    /// Example: virtrigaud import file:///srv/stage web01/disk0 local:///srv/vms --vm web01 --name disk0
    #[command(after_help = AFTER_HELP)]
    Import {
        /// Store URL.
        store: String,
        /// Key of the stored disk.
        key: String,
        /// Provider URL.
        provider: String,
        /// VM the disk belongs to (for naming and placement).
        #[arg(long)]
        vm: String,
        /// Disk name on the target.
        #[arg(long)]
        name: String,
        /// Target format (provider default otherwise).
        #[arg(long)]
        format: Option<String>,
        /// Pool, storage or datastore on the target.
        #[arg(long)]
        placement: Option<String>,
    },
    /// Re-read a stored disk and check it against its manifest.
    ///
    /// Example: virtrigaud verify s3://bucket/vms web01/disk0
    Verify {
        /// Store URL.
        store: String,
        /// Key.
        key: String,
    },
    /// Migrate one VM: export, stage, import, verify, create (resumable: run it again).
    ///
    /// Example: virtrigaud migrate --from libvirt+qemu:///system --to local:///srv/vms
    ///   --via s3://bucket/stage web01 --snapshot --network-map default=br0
    #[command(after_help = AFTER_HELP)]
    Migrate(MigrateArgs),
    /// Show the migrations found in a store (phase, disks done, bytes, lease holder).
    ///
    /// Example: virtrigaud status s3://bucket/stage migrations/
    Status {
        /// Store URL.
        store: String,
        /// Prefix to search under.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Plans of many VMs: each VM its own resumable migration, a bounded number at once.
    ///
    /// Example: virtrigaud plan run plan.toml --jobs 4 (plan.toml: from, to, via, maps, and a
    /// [[vm]] name = "web01" per VM; see the README); one VM of it, as a Kubernetes Indexed Job
    /// pod does: virtrigaud plan run plan.toml --index 2
    #[command(subcommand, after_help = AFTER_HELP)]
    Plan(PlanCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: virtrigaud completions bash > /etc/bash_completion.d/virtrigaud
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum PlanCmd {
    /// Run a plan: every VM its own resumable migration, a bounded number at once.
    ///
    /// Example: virtrigaud plan run plan.toml --jobs 4; in a Kubernetes Indexed Job:
    /// virtrigaud plan run /plan/plan.toml (JOB_COMPLETION_INDEX selects the VM)
    Run {
        /// The plan file (TOML; see the README).
        plan: PathBuf,
        /// VMs at once (default: the plan's `jobs`, else 2).
        #[arg(long)]
        jobs: Option<usize>,
        /// VMs at once per source provider (default: the plan's `per_source`, else jobs).
        #[arg(long)]
        per_source: Option<usize>,
        /// Run only the plan's VM number N (from 0).
        #[arg(long, env = "JOB_COMPLETION_INDEX")]
        index: Option<usize>,
        /// When another process holds a VM's lease, wait up to SECS for it to finish or expire
        /// (a dead holder's lease on another host expires 60 s after its last renewal). Default
        /// with --index: 90 (a retried Kubernetes pod outwaits its dead predecessor instead of
        /// burning a retry); otherwise 0 (exit 5 at once).
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "90")]
        wait_for_lease: Option<u64>,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct MigrateArgs {
    /// Source provider URL.
    #[arg(long)]
    from: String,
    /// Target provider URL.
    #[arg(long)]
    to: String,
    /// Staging store URL.
    #[arg(long)]
    via: String,
    /// Source VM.
    vm: String,
    /// Name on the target (default: the source name).
    #[arg(long)]
    name: Option<String>,
    /// Store prefix of this migration (default: migrations/<VM>).
    #[arg(long)]
    prefix: Option<String>,
    /// Source network → target network (repeatable).
    #[arg(long = "network-map", value_name = "A=B")]
    network_map: Vec<String>,
    /// Source datastore/pool/storage → target placement (repeatable).
    #[arg(long = "storage-map", value_name = "A=B")]
    storage_map: Vec<String>,
    /// Source NIC model → target NIC model (repeatable), e.g. vmxnet3=virtio.
    #[arg(long = "nic-model-map", value_name = "A=B")]
    nic_model_map: Vec<String>,
    /// Disk buses on the target (repeatable): FROM=TO moves the disks on source bus FROM
    /// (virtio, scsi, sata, ide, nvme) to bus TO, e.g. ide=virtio; a bare BUS puts every disk
    /// on it. `--bus BUS` is the same.
    #[arg(long = "bus-map", visible_alias = "bus", value_name = "[FROM=]TO")]
    bus_map: Vec<String>,
    /// Default target placement (pool, storage, datastore).
    #[arg(long)]
    placement: Option<String>,
    /// Only these disks (repeatable).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Read a running source from a snapshot.
    #[arg(long, conflicts_with_all = ["shutdown", "as_is"])]
    snapshot: bool,
    /// Shut a running source down first (seconds to wait; forced off after).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "300")]
    shutdown: Option<u64>,
    /// Read a running source as it is (may be inconsistent).
    #[arg(long)]
    as_is: bool,
    /// Staged format.
    #[arg(long, default_value = "qcow2")]
    format: String,
    /// Target disk format.
    #[arg(long)]
    target_format: Option<String>,
    /// Start the new VM at the end.
    #[arg(long)]
    start: bool,
    /// On failure, remove what the migration created and restore the source.
    #[arg(long)]
    rollback: bool,
    /// Delete the staged objects after success. With Ctrl-C, leave nothing behind instead of
    /// keeping what a rerun needs: target disks removed, staged objects and checkpoint deleted.
    #[arg(long)]
    cleanup: bool,
    /// Replace a target VM of the same name that this migration did not create.
    #[arg(long)]
    replace: bool,
    /// Disks moved at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Check everything and print the plan; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// When another process holds this migration's lease, wait up to SECS (90 without a
    /// value) for it to finish or expire instead of exiting 5 at once.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "90")]
    wait_for_lease: Option<u64>,
    /// Never let a target that can fetch URLs itself (Proxmox `download-url`) pull the staged
    /// objects from presigned GETs; upload them instead (for a target that cannot reach the
    /// store's endpoint).
    #[arg(long)]
    no_pull: bool,
}

fn main() -> ExitCode {
    virtrigaud::io::limit_allocator_retention();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                json_line(serde_json::json!({
                    "event": "error",
                    "kind": e.kind(),
                    "message": e.to_string(),
                }));
            }
            eprintln!("error: {e}");
            ExitCode::from(exit_code(e.kind()))
        }
    }
}

fn ctrl_c(cancel: &CancellationToken) {
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ncancelling… (run the same command again to resume)");
            c.cancel();
        }
    });
}

fn pairs(v: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    v.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::invalid(format!("--{what} takes A=B, not {s:?}")))
        })
        .collect()
}

fn bus(s: &str) -> Result<DiskBus> {
    Ok(match s {
        "virtio" => DiskBus::Virtio,
        "scsi" => DiskBus::Scsi,
        "sata" => DiskBus::Sata,
        "ide" => DiskBus::Ide,
        "nvme" => DiskBus::Nvme,
        _ => {
            return Err(Error::invalid(format!(
                "unknown bus {s:?} (virtio, scsi, sata, ide, nvme)"
            )));
        }
    })
}

/// `--encrypt-to` and `--identity`, read once at start.
static CRYPT: std::sync::OnceLock<(
    Option<virtrigaud::crypt::Encryption>,
    Option<virtrigaud::crypt::Decryption>,
)> = std::sync::OnceLock::new();

fn encryption() -> Option<virtrigaud::crypt::Encryption> {
    CRYPT.get().and_then(|c| c.0.clone())
}

fn decryption() -> Option<virtrigaud::crypt::Decryption> {
    CRYPT.get().and_then(|c| c.1.clone())
}

/// The process-wide bandwidth cap of `--limit`, set once at start.
static LIMIT: std::sync::OnceLock<virtrigaud::Bandwidth> = std::sync::OnceLock::new();

fn pipeline(json: bool, cancel: &CancellationToken) -> PipelineOptions {
    PipelineOptions {
        cancel: cancel.clone(),
        progress_interval: std::time::Duration::from_millis(if json { 1000 } else { 200 }),
        bandwidth: LIMIT.get().cloned().into_iter().collect(),
        ..Default::default()
    }
}

fn print_result(json: bool, v: serde_json::Value, text: String) {
    if json {
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), "result".into());
        }
        json_line(v);
    } else {
        output::out_line(text);
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(rate) = &cli.limit {
        let _ = LIMIT.set(virtrigaud::Bandwidth::parse(rate)?);
    }
    let enc = if cli.encrypt_to.is_empty() {
        None
    } else {
        Some(virtrigaud::crypt::Encryption::to_recipients(
            &cli.encrypt_to,
        )?)
    };
    let dec = cli
        .identity
        .as_ref()
        .map(virtrigaud::crypt::Decryption::from_identity_file)
        .transpose()?;
    // With the identity too, an interrupted encrypted export to S3 resumes with its key.
    let enc = match (enc, &dec) {
        (Some(e), Some(d)) => Some(e.resumable_with(d.clone())),
        (e, _) => e,
    };
    let _ = CRYPT.set((enc, dec));
    let secrets = Secrets::new(cli.password_file.clone());
    let json = cli.json;
    let cancel = CancellationToken::new();
    ctrl_c(&cancel);
    let renderer = Renderer::new(json, cli.quiet);
    match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "virtrigaud",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Inspect { provider, vm } => {
            let p = providers::open(&provider, &secrets)?;
            let info = p.describe_vm(&vm).await?;
            let v = serde_json::to_value(&info).unwrap_or_default();
            let mut t = format!(
                "VM {} (id {})\n  state {:?}, {} vCPU, {} MiB, firmware {:?}, machine {}, guest {}\n",
                info.name,
                info.id,
                info.state,
                info.cpus,
                info.memory_mib,
                info.firmware,
                info.machine.as_deref().unwrap_or("-"),
                info.guest_os.as_deref().unwrap_or("-")
            );
            for d in &info.disks {
                t += &format!(
                    "  disk {:<8} {:>14} bytes  {:<22} {:<7} {}\n",
                    d.id,
                    d.capacity,
                    d.format.map(|f| f.to_string()).unwrap_or("-".into()),
                    d.bus
                        .map(|b| format!("{b:?}").to_lowercase())
                        .unwrap_or("-".into()),
                    d.location
                );
            }
            for n in &info.nics {
                t += &format!(
                    "  nic  {:<17} {:<8} {}\n",
                    n.mac.as_deref().unwrap_or("-"),
                    n.model.as_deref().unwrap_or("-"),
                    n.network.as_deref().unwrap_or("-")
                );
            }
            print_result(
                json,
                serde_json::json!({ "vm": v }),
                t.trim_end().to_string(),
            );
            Ok(())
        }
        Cmd::List { provider } => {
            let p = providers::open(&provider, &secrets)?;
            let vms = p.list_vms().await?;
            let t = vms
                .iter()
                .map(|v| format!("{:<24} {:<38} {:?}", v.name, v.id, v.state))
                .collect::<Vec<_>>()
                .join("\n");
            print_result(json, serde_json::json!({ "vms": vms }), t);
            Ok(())
        }
        Cmd::Verify { store, key } => {
            let s = providers::open_store(&store)?;
            let opts = ImportOptions {
                pipeline: pipeline(json, &cancel),
                decrypt: decryption(),
                ..Default::default()
            };
            let m = virtrigaud::verify_object(&*s, &key, &opts).await?;
            print_result(
                json,
                serde_json::json!({ "key": key, "manifest": m }),
                format!(
                    "OK {key}: sha256 {} content {}",
                    m.object_digest.value, m.content_digest.value
                ),
            );
            Ok(())
        }
        Cmd::Import {
            store,
            key,
            provider,
            vm,
            name,
            format,
            placement,
        } => {
            let s = providers::open_store(&store)?;
            let p = providers::open(&provider, &secrets)?;
            let mut opts = ImportOptions {
                format: format.as_deref().map(DiskFormat::parse).transpose()?,
                placement,
                pipeline: pipeline(json, &cancel),
                decrypt: decryption(),
                ..Default::default()
            };
            let r2 = renderer.clone();
            let label = key.clone();
            opts.pipeline.progress = Some(Arc::new(move |pr| r2.progress(&label, pr)));
            let r = virtrigaud::import_disk(&*s, &key, &*p, &vm, &name, &opts).await;
            renderer.finish();
            let r = r?;
            print_result(
                json,
                serde_json::json!({ "key": key, "location": r.location, "format": r.format,
                    "content_digest": r.manifest.content_digest.value }),
                format!(
                    "imported {key} as {} ({}), verified: content {}",
                    r.location, r.format, r.manifest.content_digest.value
                ),
            );
            Ok(())
        }
        Cmd::Export {
            source,
            second,
            third,
            disks,
            format,
            compress,
            snapshot,
        } => {
            let mut opts = ExportOptions {
                format: DiskFormat::parse(&format)?,
                pipeline: pipeline(json, &cancel),
                ..Default::default()
            };
            opts.encode.compress = compress;
            opts.encode.encrypt = encryption();
            if !source.contains("://") {
                // An image file.
                let s = providers::open_store(&second)?;
                let f = LocalFile::open(&source).await?;
                // A VMDK given by its descriptor opens its extents next to it.
                opts.decode.extent_resolver = Some(Arc::new(
                    virtrigaud::format::vmdk::LocalExtentResolver::new(image_dir(&source)),
                ));
                let r2 = renderer.clone();
                let label = third.clone();
                opts.pipeline.progress = Some(Arc::new(move |pr| r2.progress(&label, pr)));
                let r = virtrigaud::export_image(
                    ImageSource::RandomAccess(Arc::new(f)),
                    None,
                    &*s,
                    &third,
                    None,
                    None,
                    &opts,
                )
                .await;
                renderer.finish();
                let m = r?.manifest;
                print_result(
                    json,
                    serde_json::json!({ "key": third, "manifest": m }),
                    format!(
                        "stored {third} ({}, {} bytes, virtual {})\nsha256  {}\ncontent {}",
                        m.format,
                        m.stored_size,
                        m.virtual_size,
                        m.object_digest.value,
                        m.content_digest.value
                    ),
                );
                return Ok(());
            }
            let p = providers::open(&source, &secrets)?;
            let s = providers::open_store(&third)?;
            let vm = second;
            let info = p.describe_vm(&vm).await?;
            if let Some(missing) = disks
                .iter()
                .find(|id| !info.disks.iter().any(|d| &d.id == *id))
            {
                let have: Vec<&str> = info.disks.iter().map(|d| d.id.as_str()).collect();
                return Err(virtrigaud::Error::not_found(format!(
                    "VM {vm} has no disk {missing:?} (its disks: {})",
                    have.join(", ")
                )));
            }
            if snapshot {
                opts.snapshot = Some(
                    p.create_snapshot(
                        &vm,
                        &format!("virtrigaud-export-{}", virtrigaud::io::unique_suffix()),
                    )
                    .await?,
                );
            }
            let mut out = Vec::new();
            let mut result = Ok(());
            for d in info
                .disks
                .iter()
                .filter(|d| disks.is_empty() || disks.contains(&d.id))
            {
                let key = format!("{vm}/{}.img", virtrigaud::migration::disk_slug(&d.id));
                let r2 = renderer.clone();
                let label = d.id.clone();
                let mut o = opts.clone();
                o.pipeline.progress = Some(Arc::new(move |pr| r2.progress(&label, pr)));
                match virtrigaud::export_disk(&*p, &vm, &d.id, &*s, &key, &o).await {
                    Ok(r) => out.push(serde_json::json!({ "disk": d.id, "key": key,
                        "content_digest": r.manifest.content_digest.value,
                        "object_sha256": r.manifest.object_digest.value })),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if let Some(snap) = &opts.snapshot {
                // Removed whether or not the export worked.
                if let Err(e) = p.delete_snapshot(&vm, snap).await {
                    renderer.println(&format!(
                        "warning: cannot delete snapshot {}: {e}",
                        snap.name
                    ));
                }
            }
            renderer.finish();
            result?;
            let t = out
                .iter()
                .map(|o| {
                    format!(
                        "{} → {} content {}",
                        o["disk"], o["key"], o["content_digest"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print_result(json, serde_json::json!({ "disks": out }), t);
            Ok(())
        }
        Cmd::Status { store, prefix } => {
            let s = providers::open_store(&store)?;
            let objs = s.list(&prefix).await?;
            let mut rows = Vec::new();
            for o in objs.iter().filter(|o| o.key.ends_with("/migration.json")) {
                let Ok(b) = virtrigaud::StorageExt::get_bytes(&*s, &o.key, 16 << 20).await else {
                    continue;
                };
                let Ok(st) = serde_json::from_slice::<virtrigaud::MigrationState>(&b) else {
                    continue;
                };
                let base = o.key.trim_end_matches("migration.json");
                let lease = virtrigaud::StorageExt::get_bytes(
                    &*s,
                    &format!("{base}migration.lease"),
                    1 << 16,
                )
                .await
                .ok()
                .and_then(|b| {
                    serde_json::from_slice::<virtrigaud::migration::lease::LeaseRecord>(&b).ok()
                });
                let done = st
                    .disks
                    .iter()
                    .filter(|d| d.verified || d.import == virtrigaud::migration::StepStatus::Done)
                    .count();
                let bytes: u64 = st
                    .source
                    .as_ref()
                    .map(|s| s.disks.iter().map(|d| d.capacity).sum())
                    .unwrap_or(0);
                rows.push(serde_json::json!({
                    "prefix": base.trim_end_matches('/'),
                    "migration": st.migration_id,
                    "source": format!("{}:{}", st.source_provider, st.source_vm),
                    "target": format!("{}:{}", st.target_provider, st.target_name),
                    "phase": st.phase,
                    "finished": st.finished,
                    "rolled_back": st.rolled_back,
                    "disks": st.disks.len(),
                    "disks_done": done,
                    "virtual_bytes": bytes,
                    "lease": lease,
                }));
            }
            let t = rows
                .iter()
                .map(|r| {
                    format!(
                        "{:<30} {} → {}  phase {}  disks {}/{}  {}{}",
                        r["prefix"].as_str().unwrap_or(""),
                        r["source"].as_str().unwrap_or(""),
                        r["target"].as_str().unwrap_or(""),
                        r["phase"].as_str().unwrap_or(""),
                        r["disks_done"],
                        r["disks"],
                        if r["finished"] == true {
                            "finished"
                        } else {
                            "unfinished"
                        },
                        r["lease"]
                            .as_object()
                            .map(|l| format!("  (running: pid {} on {})", l["pid"], l["host"]))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print_result(json, serde_json::json!({ "migrations": rows }), t);
            Ok(())
        }
        Cmd::Migrate(a) => migrate(a, &secrets, json, &cancel, renderer, None).await,
        Cmd::Plan(PlanCmd::Run {
            plan,
            jobs,
            per_source,
            index,
            wait_for_lease,
        }) => {
            let wait = wait_for_lease.or(index.map(|_| 90));
            run_plan(
                &plan, jobs, per_source, index, wait, &secrets, json, &cancel, renderer,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_plan(
    path: &std::path::Path,
    jobs: Option<usize>,
    per_source: Option<usize>,
    index: Option<usize>,
    wait_for_lease: Option<u64>,
    secrets: &Secrets,
    json: bool,
    cancel: &CancellationToken,
    renderer: Arc<Renderer>,
) -> Result<()> {
    use futures::StreamExt;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(e, format!("cannot read {}", path.display())))?;
    let plan = planfile::PlanFile::parse(&text)?;
    let mut all = plan.jobs()?;
    if let Some(i) = index {
        if i >= all.len() {
            return Err(Error::invalid(format!(
                "index {i} is past the plan's {} VMs",
                all.len()
            )));
        }
        all = vec![all.swap_remove(i)];
    }
    let jobs = jobs.or(plan.jobs).unwrap_or(2).max(1);
    let per_source = per_source.or(plan.per_source).unwrap_or(jobs).max(1);
    let mut limits: BTreeMap<String, Arc<tokio::sync::Semaphore>> = BTreeMap::new();
    for j in &all {
        limits
            .entry(j.from.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(per_source)));
    }
    let map_args = |m: &BTreeMap<String, String>| -> Vec<String> {
        m.iter().map(|(a, b)| format!("{a}={b}")).collect()
    };
    let prepare = plan.prepare.clone().unwrap_or_default();
    renderer.start_plan(all.len());
    let results: Vec<(String, Result<()>)> = futures::stream::iter(all)
        .map(|j| {
            let limit = limits.get(&j.from).cloned();
            let args = MigrateArgs {
                from: j.from.clone(),
                to: j.to.clone(),
                via: j.via.clone(),
                vm: j.vm.name.clone(),
                name: j.vm.target_name.clone(),
                prefix: None,
                network_map: map_args(&plan.network_map),
                storage_map: map_args(&plan.storage_map),
                nic_model_map: map_args(&plan.nic_model_map),
                bus_map: vec![],
                placement: j.vm.placement.clone().or(plan.placement.clone()),
                disks: vec![],
                snapshot: prepare == "snapshot",
                shutdown: (prepare == "shutdown").then_some(plan.shutdown_timeout.unwrap_or(300)),
                as_is: prepare == "as_is",
                format: "qcow2".into(),
                target_format: None,
                start: plan.start,
                rollback: false,
                cleanup: false,
                replace: false,
                jobs: 2,
                dry_run: false,
                wait_for_lease,
                no_pull: false,
            };
            let renderer = renderer.clone();
            async move {
                let _permit = match &limit {
                    Some(l) => l.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let name = j.vm.name.clone();
                let r = migrate(
                    args,
                    secrets,
                    json,
                    cancel,
                    renderer.clone(),
                    Some(name.clone()),
                )
                .await;
                renderer.vm_finished(r.is_ok());
                (name, r)
            }
        })
        .buffer_unordered(jobs)
        .collect()
        .await;
    renderer.finish();
    let failed: Vec<&(String, Result<()>)> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let summary = results
        .iter()
        .map(|(vm, r)| match r {
            Ok(()) => serde_json::json!({"vm": vm, "ok": true}),
            Err(e) => serde_json::json!({"vm": vm, "ok": false, "kind": e.kind(), "message": e.to_string()}),
        })
        .collect::<Vec<_>>();
    print_result(
        json,
        serde_json::json!({ "plan": path.display().to_string(), "vms": summary }),
        format!(
            "plan {}: {} VM(s) migrated, {} failed{}",
            path.display(),
            results.len() - failed.len(),
            failed.len(),
            failed
                .iter()
                .map(|(vm, r)| format!(
                    "\n  {vm}: {}",
                    r.as_ref().err().map(|e| e.to_string()).unwrap_or_default()
                ))
                .collect::<String>()
        ),
    );
    match failed.first() {
        Some((vm, Err(e))) => Err(Error::new(
            e.kind(),
            format!(
                "{} of {} VM(s) failed; first: {vm}: {e}",
                failed.len(),
                results.len()
            ),
        )),
        _ => Ok(()),
    }
}

async fn migrate(
    a: MigrateArgs,
    secrets: &Secrets,
    json: bool,
    cancel: &CancellationToken,
    renderer: Arc<Renderer>,
    label: Option<String>,
) -> Result<()> {
    let plan_mode = label.is_some();
    // A refused store URL is said before any password prompt.
    providers::refuse_secret_in_store_url(&a.via)?;
    let source = providers::open(&a.from, secrets)?;
    let target = providers::open(&a.to, secrets)?;
    let store = providers::open_store(&a.via)?;
    let mut plan = MigrationPlan::new(
        a.vm.clone(),
        a.prefix
            .clone()
            .unwrap_or_else(|| format!("migrations/{}", a.vm)),
    )
    .with_stored_format(DiskFormat::parse(&a.format)?)
    .with_disk_parallelism(a.jobs)
    .with_target_pull(!a.no_pull)
    .with_start_after(a.start)
    .with_replace_existing(a.replace)
    .with_on_failure(if a.rollback {
        OnFailure::Rollback
    } else {
        OnFailure::Keep
    })
    .with_cleanup(virtrigaud::CleanupPolicy::default().delete_staged(a.cleanup));
    plan.target_name = a.name.clone();
    plan.placement = a.placement.clone();
    plan.network_map = pairs(&a.network_map, "network-map")?;
    plan.storage_map = pairs(&a.storage_map, "storage-map")?;
    plan.nic_model_map = pairs(&a.nic_model_map, "nic-model-map")?;
    for m in &a.bus_map {
        match m.split_once('=') {
            Some((from, to)) => {
                bus(from)?;
                plan.bus_map.insert(from.to_string(), bus(to)?);
            }
            None => plan.bus_override = Some(bus(m)?),
        }
    }
    plan.target_format = a
        .target_format
        .as_deref()
        .map(DiskFormat::parse)
        .transpose()?;
    plan.include_disks = a.disks.clone();
    plan.prepare = if a.snapshot {
        PrepareSource::Snapshot
    } else if let Some(secs) = a.shutdown {
        PrepareSource::Shutdown {
            timeout_secs: secs,
            force: true,
        }
    } else if a.as_is {
        PrepareSource::AsIs
    } else {
        PrepareSource::RequireStopped
    };
    if a.dry_run {
        return dry_run(&plan, &*source, &*target, &*store, json).await;
    }
    // A lease held by another process: wait for it (up to --wait-for-lease) when asked, e.g.
    // a retried Kubernetes pod that meets the lease of its dead predecessor on another node,
    // which stays until it expires.
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(a.wait_for_lease.unwrap_or(0));
    let result = loop {
        // Wait while a live holder (another host's unexpired lease, or a running process of
        // this host) has it, without starting a run that would only report a conflict.
        if std::time::Instant::now() < deadline
            && let Some(h) = live_lease_holder(&*store, &plan).await
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            lease_wait(
                json,
                &renderer,
                label.as_deref(),
                format!(
                    "waiting up to {} s more: this migration is being run by process {} on \
                     host {} (lease until {} s since the epoch)",
                    left.as_secs(),
                    h.pid,
                    h.host,
                    h.expires
                ),
            );
            tokio::select! {
                _ = tokio::time::sleep(left.min(std::time::Duration::from_secs(2))) => {}
                _ = cancel.cancelled() => break Err(Error::new(ErrorKind::Cancelled, "cancelled while waiting for the lease")),
            }
            continue;
        }
        let r = renderer.clone();
        let l = label.clone();
        let mut m = Migration::new(source.clone(), target.clone(), store.clone(), plan.clone())
            .with_pipeline(pipeline(json, cancel));
        if let Some(e) = encryption() {
            m = m.with_encryption(e);
        }
        if let Some(d) = decryption() {
            m = m.with_decryption(d);
        }
        let lease_key = m.lease_key();
        let m = m.on_event(move |e| r.event(l.as_deref(), e));
        match m.run().await {
            Err(e)
                if e.kind() == ErrorKind::Conflict
                    && std::time::Instant::now() < deadline
                    && virtrigaud::StorageExt::get_bytes(&*store, &lease_key, 1 << 16)
                        .await
                        .is_ok() =>
            {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                lease_wait(
                    json,
                    &renderer,
                    label.as_deref(),
                    format!("waiting up to {} s more for the lease: {e}", left.as_secs()),
                );
                tokio::select! {
                    _ = tokio::time::sleep(left.min(std::time::Duration::from_secs(3))) => {}
                    _ = cancel.cancelled() => break Err(Error::new(ErrorKind::Cancelled, "cancelled while waiting for the lease")),
                }
            }
            r => break r,
        }
    };
    if !plan_mode {
        renderer.finish();
    }
    let report = result?;
    if !json {
        output::out_line(format_args!(
            "migrated {} → {} ({} disk(s), {} exported and {} imported by this run)",
            a.vm,
            report.state.target_name,
            report.state.disks.len(),
            report.exported_now,
            report.imported_now
        ));
        for d in &report.state.disks {
            output::out_line(format_args!(
                "  {} → {}  content {}{}",
                d.id,
                d.target_location.as_deref().unwrap_or("-"),
                d.content_digest.as_deref().unwrap_or("-"),
                if d.verified { "  verified" } else { "" }
            ));
        }
    }
    Ok(())
}

/// Says that a run waits for a lease: a `lease_wait` JSON event, or a line above the bars.
fn lease_wait(json: bool, renderer: &Renderer, vm: Option<&str>, msg: String) {
    if json {
        let mut v = serde_json::json!({ "event": "lease_wait", "message": msg });
        if let (Some(vm), Some(o)) = (vm, v.as_object_mut()) {
            o.insert("vm".into(), vm.into());
        }
        json_line(v);
    } else {
        renderer.println(&msg);
    }
}

/// The holder of the migration's lease when it is live: unexpired and, on this host, a
/// process that still exists (a dead local holder is taken over at once by the run).
async fn live_lease_holder(
    store: &dyn virtrigaud::StorageBackend,
    plan: &MigrationPlan,
) -> Option<virtrigaud::migration::lease::LeaseRecord> {
    let key = format!("{}/migration.lease", plan.prefix.trim_end_matches('/'));
    let b = virtrigaud::StorageExt::get_bytes(store, &key, 1 << 16)
        .await
        .ok()?;
    let h: virtrigaud::migration::lease::LeaseRecord = serde_json::from_slice(&b).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let local = h.host == virtrigaud::migration::lease::host_name();
    let alive = !local
        || h.pid == std::process::id()
        || std::path::Path::new(&format!("/proc/{}", h.pid)).exists();
    (h.expires >= now && alive).then_some(h)
}

/// One problem a dry run found, with the kind of error the real run would meet.
struct Finding {
    kind: ErrorKind,
    message: String,
}

/// Reads the first block of a source disk (nothing else), to prove it can be read.
async fn read_first_block(
    source: &dyn virtrigaud::Provider,
    vm: &str,
    disk: &str,
) -> Result<usize> {
    use futures::StreamExt;
    let opened = source.open_disk(vm, disk, None).await?;
    match opened.source {
        virtrigaud::ImageSource::RandomAccess(r) => {
            let len = r.size().min(4096) as usize;
            Ok(r.read_at(0, len).await?.len())
        }
        virtrigaud::ImageSource::Sequential { mut stream, .. } => match stream.next().await {
            Some(Ok(virtrigaud::Extent::Data { bytes, .. })) => Ok(bytes.len()),
            Some(Ok(_)) | None => Ok(0),
            Some(Err(e)) => Err(e),
        },
    }
}

/// Checks everything a migration needs without writing: credentials of both providers and
/// the store, the source VM and its running state against the chosen preparation, every disk
/// opened and its first block read, the target name, the maps complete, and the target's
/// placements and networks present (where the target can tell). Prints the plan (disks, NICs,
/// maps) and every problem; fails with the kind of the first problem.
async fn dry_run(
    plan: &MigrationPlan,
    source: &dyn virtrigaud::Provider,
    target: &dyn virtrigaud::Provider,
    store: &dyn virtrigaud::StorageBackend,
    json: bool,
) -> Result<()> {
    use virtrigaud::PowerState;
    source.validate().await?;
    target.validate().await?;
    store.list(&plan.prefix).await?;
    let info = source.describe_vm(&plan.source_vm).await?;
    let mut findings: Vec<Finding> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut problem = |kind: ErrorKind, message: String| findings.push(Finding { kind, message });

    // The running state against --snapshot / --shutdown / --as-is.
    let running = matches!(info.state, PowerState::Running | PowerState::Paused);
    let caps = source.capabilities();
    let prepare = match &plan.prepare {
        PrepareSource::RequireStopped if running => {
            problem(
                ErrorKind::InvalidInput,
                format!(
                    "the source VM is {}: pass --snapshot (read a snapshot taken for the \
                     migration), --shutdown [SECS] (shut it down first) or --as-is (read it \
                     running, possibly inconsistent)",
                    format!("{:?}", info.state).to_lowercase()
                ),
            );
            "must be stopped".to_string()
        }
        PrepareSource::RequireStopped => "stopped, read as it is".to_string(),
        PrepareSource::Snapshot if !caps.snapshots => {
            problem(
                ErrorKind::Unsupported,
                format!(
                    "--snapshot: the {} source cannot take snapshots",
                    source.kind()
                ),
            );
            "snapshot (unsupported)".to_string()
        }
        PrepareSource::Snapshot => "read from a snapshot taken for the migration".to_string(),
        PrepareSource::Shutdown { timeout_secs, .. } if running && !caps.power => {
            problem(
                ErrorKind::Unsupported,
                format!(
                    "--shutdown: the {} source cannot power VMs off",
                    source.kind()
                ),
            );
            format!("shut down (up to {timeout_secs} s; unsupported)")
        }
        PrepareSource::Shutdown { timeout_secs, .. } if running => {
            format!("shut down first (forced off after {timeout_secs} s)")
        }
        PrepareSource::Shutdown { .. } => "stopped already".to_string(),
        PrepareSource::AsIs if running => {
            notes.push("the source is read while it runs (--as-is): may be inconsistent".into());
            "read running, as it is".to_string()
        }
        other => format!("{other:?}").to_lowercase(),
    };

    // Every disk opened and its first block read.
    let disks: Vec<_> = info.disks.iter().filter(|d| plan.includes(&d.id)).collect();
    for id in &plan.include_disks {
        if !info.disks.iter().any(|d| &d.id == id) {
            problem(
                ErrorKind::NotFound,
                format!("--disk {id}: the source VM has no such disk"),
            );
        }
    }
    let mut disk_rows = Vec::new();
    let mut placements: Vec<Option<String>> = Vec::new();
    for d in &disks {
        let placement = plan.placement_for(d);
        placements.push(placement.clone());
        let read = read_first_block(source, &plan.source_vm, &d.id).await;
        if let Err(e) = &read {
            problem(
                e.kind(),
                format!("disk {}: cannot open and read it: {e}", d.id),
            );
        }
        disk_rows.push(serde_json::json!({
            "id": d.id,
            "capacity": d.capacity,
            "format": d.format.map(|f| f.to_string()),
            "location": d.location,
            "placement": placement,
            "first_block_read": read.is_ok(),
        }));
    }
    for p in plan.storage_map.values() {
        placements.push(Some(p.clone()));
    }

    // NICs: every network mapped (between providers of different kinds), and where it lands.
    let mut nic_rows = Vec::new();
    let mut networks = Vec::new();
    for n in &info.nics {
        let Some(net) = &n.network else { continue };
        let mapped = plan.network_map.get(net);
        if mapped.is_none() && source.kind() != target.kind() {
            problem(
                ErrorKind::InvalidInput,
                format!(
                    "NIC {} is on network {net:?}, which has no --network-map entry (the {} \
                     target would get a network of that name)",
                    n.mac.as_deref().unwrap_or("-"),
                    target.kind()
                ),
            );
        }
        let to = mapped.unwrap_or(net).clone();
        networks.push(to.clone());
        nic_rows.push(serde_json::json!({
            "mac": n.mac, "model": n.model, "network": net, "target_network": to,
        }));
    }
    for (a, b) in &plan.network_map {
        if !info.nics.iter().any(|n| n.network.as_deref() == Some(a)) {
            notes.push(format!(
                "--network-map {a}={b} matches no NIC of the source"
            ));
        }
        networks.push(b.clone());
    }
    networks.sort();
    networks.dedup();

    // The target: its placements and networks, and no VM of the same name.
    let placement_check = match target.check_placement(&placements, &networks).await {
        Ok(c) => {
            for p in &c.missing_placements {
                problem(
                    ErrorKind::NotFound,
                    format!(
                        "the {} target has no placement (pool, storage, datastore) {p:?}",
                        target.kind()
                    ),
                );
            }
            for n in &c.missing_networks {
                problem(
                    ErrorKind::NotFound,
                    format!("the {} target has no network {n:?}", target.kind()),
                );
            }
            "checked".to_string()
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            notes.push(format!(
                "the {} target cannot check its placements and networks: not checked",
                target.kind()
            ));
            "cannot check".to_string()
        }
        Err(e) => return Err(e),
    };
    match target.describe_vm(plan.target_vm_name()).await {
        Ok(_) if !plan.replace_existing => problem(
            ErrorKind::AlreadyExists,
            format!(
                "a VM named {:?} already exists on the target (--replace replaces it)",
                plan.target_vm_name()
            ),
        ),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }

    let mut text = format!(
        "dry run: {} VM {:?} ({:?}; {prepare}) → {} VM {:?} via {}\n",
        source.kind(),
        plan.source_vm,
        info.state,
        target.kind(),
        plan.target_vm_name(),
        store.location(),
    );
    text += &format!(
        "  {} disk(s), {} bytes virtual, staged as {}\n",
        disks.len(),
        disks.iter().map(|d| d.capacity).sum::<u64>(),
        plan.stored_format
    );
    for r in &disk_rows {
        text += &format!(
            "  disk {:<8} {:>14} bytes  {:<8} {}  → placement {}  {}\n",
            r["id"].as_str().unwrap_or("-"),
            r["capacity"],
            r["format"].as_str().unwrap_or("-"),
            r["location"].as_str().unwrap_or("-"),
            r["placement"].as_str().unwrap_or("(default)"),
            if r["first_block_read"] == true {
                "readable"
            } else {
                "NOT READABLE"
            }
        );
    }
    for r in &nic_rows {
        text += &format!(
            "  nic  {:<17} {} → {}\n",
            r["mac"].as_str().unwrap_or("-"),
            r["network"].as_str().unwrap_or("-"),
            r["target_network"].as_str().unwrap_or("-"),
        );
    }
    for (what, m) in [
        ("network map", &plan.network_map),
        ("storage map", &plan.storage_map),
        ("nic model map", &plan.nic_model_map),
    ] {
        if !m.is_empty() {
            text += &format!(
                "  {what}: {}\n",
                m.iter()
                    .map(|(a, b)| format!("{a}={b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if !plan.bus_map.is_empty() {
        text += &format!(
            "  bus map: {}\n",
            plan.bus_map
                .iter()
                .map(|(a, b)| format!("{a}={}", format!("{b:?}").to_lowercase()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(b) = plan.bus_override {
        text += &format!("  every disk on bus {}\n", format!("{b:?}").to_lowercase());
    }
    text += &format!("  target placements and networks: {placement_check}\n");
    for n in &notes {
        text += &format!("  note: {n}\n");
    }
    text += &if findings.is_empty() {
        "no problem found".to_string()
    } else {
        findings
            .iter()
            .map(|f| format!("problem: {}", f.message))
            .collect::<Vec<_>>()
            .join("\n")
    };
    print_result(
        json,
        serde_json::json!({
            "dry_run": true,
            "plan": plan,
            "source_state": info.state,
            "prepare": prepare,
            "disks": disk_rows,
            "nics": nic_rows,
            "placement_check": placement_check,
            "notes": notes,
            "findings": findings.iter().map(|f| f.message.clone()).collect::<Vec<_>>(),
            "finding_kinds": findings.iter().map(|f| f.kind).collect::<Vec<_>>(),
        }),
        text,
    );
    match findings.first() {
        None => Ok(()),
        Some(f) => Err(Error::new(
            f.kind,
            format!("{} problem(s) found; first: {}", findings.len(), f.message),
        )),
    }
}

/// The directory an image file's relative extent names resolve in.
fn image_dir(path: &str) -> std::path::PathBuf {
    match std::path::Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

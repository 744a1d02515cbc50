//! Migrates a libvirt domain through a storage URL: every disk is exported (sparse stream,
//! holes never transferred) as qcow2 with its manifest, imported into a storage pool of the
//! target host (verified against the manifest before it is visible), and a domain is defined
//! there with the source's hardware. Rerunning after a failure resumes from the checkpoint
//! stored next to the disks.
//!
//! ```text
//! cargo run --release --example libvirt_migrate --features libvirt,s3 -- \
//!     qemu:///system web01 s3://bucket/migrations qemu+tcp://target/system [pool] [--snapshot]
//! ```
//!
//! `--snapshot` reads a running domain from a disk-only snapshot (point-in-time copy, deleted
//! afterwards); without it the domain should be shut off. Source and target may be the same
//! host: the new domain is named `<vm>-migrated`.

use std::process::ExitCode;
use virtrigaud::libvirt::LibvirtProvider;
use virtrigaud::{Migration, MigrationPlan, PipelineOptions, PrepareSource};

#[tokio::main]
async fn main() -> ExitCode {
    virtrigaud::io::limit_allocator_retention();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = args
        .iter()
        .find(|a| a.starts_with("--") && *a != "--snapshot")
    {
        eprintln!("unknown option {bad}");
        return ExitCode::from(2);
    }
    let snapshot = args.iter().any(|a| a == "--snapshot");
    let pos: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let [source_uri, vm, store_url, target_uri, rest @ ..] = pos.as_slice() else {
        eprintln!("usage: libvirt_migrate SOURCE_URI VM STORE_URL TARGET_URI [POOL] [--snapshot]");
        return ExitCode::from(2);
    };
    match run(
        source_uri,
        vm,
        store_url,
        target_uri,
        rest.first().copied(),
        snapshot,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migration failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    source_uri: &str,
    vm: &str,
    store_url: &str,
    target_uri: &str,
    pool: Option<&str>,
    snapshot: bool,
) -> virtrigaud::Result<()> {
    let source = std::sync::Arc::new(LibvirtProvider::new(source_uri));
    let target = std::sync::Arc::new(LibvirtProvider::new(target_uri));
    let store = virtrigaud::storage::open(store_url)?;
    let mut plan = MigrationPlan::new(vm, format!("migrations/{vm}"));
    plan.target_name = Some(format!("{vm}-migrated"));
    plan.placement = pool.map(str::to_string);
    // A running domain is refused unless the plan says how to read it.
    plan.prepare = if snapshot {
        PrepareSource::Snapshot
    } else {
        PrepareSource::RequireStopped
    };
    let pipeline = PipelineOptions {
        progress: Some(std::sync::Arc::new(|p: &virtrigaud::Progress| {
            eprintln!(
                "{:?} {}: {:5.1} %  {:.0} MiB/s{}",
                p.phase,
                p.label,
                100.0 * p.fraction(),
                p.rate / 1048576.0,
                p.eta
                    .map(|d| format!("  ETA {} s", d.as_secs()))
                    .unwrap_or_default()
            );
        })),
        ..Default::default()
    };
    let report = Migration::new(source, target, store, plan)
        .with_pipeline(pipeline)
        .run()
        .await?;
    let created = report.state.target_vm.as_ref().map(|v| v.name.as_str());
    println!(
        "done: {} disk(s) exported now, {} imported now; target domain {}",
        report.exported_now,
        report.imported_now,
        created.unwrap_or("(not created)")
    );
    Ok(())
}

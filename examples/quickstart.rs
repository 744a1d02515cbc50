//! Quickstart: no server needed.
//!
//! Creates a sample VM with a sparse 1 GiB **qcow2** disk in a temp directory, exports the disk
//! to a `file://` store as a **streamOptimized VMDK** with its manifest (what vSphere imports),
//! imports it into a second directory as **qcow2** again, verifies the content digest end to end
//! (and re-reads the imported disk to digest it independently), and prints a short report.
//! Exits non-zero on any mismatch.
//!
//! ```text
//! cargo run --release --example quickstart [-- --keep]
//! ```

use futures::StreamExt;
use std::process::ExitCode;
use std::time::Instant;
use virtrigaud::format::{self, EncodeOptions, VmdkSubformat};
use virtrigaud::io::LocalFileSink;
use virtrigaud::{
    AllocationMap, ByteSink, DiskBus, DiskContent, DiskFormat, DiskInfo, ExportOptions, Extent,
    Firmware, ImportOptions, LocalProvider, NicInfo, PowerState, Provider, VmDiskSpec, VmInfo,
    VmSpec, digest_disk, export_disk, import_disk,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> ExitCode {
    virtrigaud::io::limit_allocator_retention();
    let keep = std::env::args().any(|a| a == "--keep");
    match run(keep).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud::testdata::noise(seed, len)
}

async fn run(keep: bool) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new()
        .prefix("virtrigaud-quickstart-")
        .tempdir()?;
    let root = dir.path();
    println!("working in {}", root.display());

    // 1. A sample VM: 1 GiB virtual qcow2 disk, 48 MiB of data in 12 pieces at scattered offsets,
    //    written by our own one-pass qcow2 encoder.
    let source = LocalProvider::new(root.join("source"));
    let pieces: Vec<Extent> = (0..12u64)
        .map(|i| Extent::Data {
            offset: i * 85 * MIB + i * 12_345,
            bytes: pattern(4 * MIB as usize, i).into(),
        })
        .collect();
    let map = AllocationMap::from_ranges(pieces.iter().map(|e| e.offset()..e.end()).collect());
    let mut content = DiskContent::from_extents(GIB, pieces);
    content.allocation = Some(map);
    let mut chunks = format::encode(content, DiskFormat::Qcow2, &EncodeOptions::default())?;
    let mut sink: Box<dyn ByteSink> =
        Box::new(LocalFileSink::create(root.join("source/demo/disk0.qcow2"), false).await?);
    while let Some(c) = chunks.next().await {
        match c? {
            format::Chunk::Data(b) => sink.write(b).await?,
            format::Chunk::Zeros(n) => sink.write_zeros(n).await?,
        }
    }
    sink.commit().await?;
    source
        .write_vm(
            &VmInfo {
                annotation: None,
                id: "demo".into(),
                name: "demo".into(),
                cpus: 2,
                memory_mib: 2048,
                firmware: Firmware::Bios,
                machine: Some("q35".into()),
                guest_os: Some("linux".into()),
                state: PowerState::Stopped,
                disks: vec![DiskInfo {
                    id: "disk0".into(),
                    capacity: GIB,
                    allocation: None,
                    format: None,
                    bus: Some(DiskBus::Virtio),
                    location: "disk0.qcow2".into(),
                }],
                nics: vec![NicInfo {
                    mac: Some("52:54:00:00:00:01".into()),
                    model: Some("virtio".into()),
                    network: Some("default".into()),
                }],
            },
            false,
        )
        .await?;

    // 2. Export to a file:// store as a streamOptimized VMDK, with its manifest.
    let store_url = format!("file://{}", root.join("store").display());
    let store = virtrigaud::storage::open(&store_url)?;
    let key = "demo/disk0.vmdk";
    let export_opts = ExportOptions {
        format: DiskFormat::Vmdk(VmdkSubformat::StreamOptimized),
        ..Default::default()
    };
    let t = Instant::now();
    let exported = export_disk(&source, "demo", "disk0", &*store, key, &export_opts).await?;
    let export_time = t.elapsed();

    // 3. Import into a second directory as qcow2 (verified against the manifest before it is
    //    visible).
    let target = LocalProvider::new(root.join("target"));
    let import_opts = ImportOptions {
        format: Some(DiskFormat::Qcow2),
        ..Default::default()
    };
    let t = Instant::now();
    let imported = import_disk(&*store, key, &target, "demo", "disk0", &import_opts).await?;
    let import_time = t.elapsed();

    // 4. Create the target VM from the hardware description recorded in the manifest, then
    //    re-read the imported disk and digest it again, independently of the import.
    let hw = exported
        .manifest
        .vm
        .clone()
        .ok_or("manifest has no VM description")?;
    target
        .create_vm(&VmSpec {
            annotation: None,
            name: "demo".into(),
            cpus: hw.cpus,
            memory_mib: hw.memory_mib,
            firmware: hw.firmware,
            machine: hw.machine.clone(),
            guest_os: hw.guest_os.clone(),
            disks: vec![VmDiskSpec {
                location: imported.location.clone(),
                bus: DiskBus::Virtio,
                format: imported.format,
            }],
            nics: hw.nics.clone(),
            overwrite: false,
        })
        .await?;
    let again = digest_disk(&target, "demo", "disk0", &ImportOptions::default()).await?;
    let m = &exported.manifest;
    let ok = again == m.content_digest.value
        && imported.transfer.content_digest.as_deref() == Some(m.content_digest.value.as_str());

    let t = &exported.transfer;
    println!();
    println!("virtual size      {:>10} MiB", m.virtual_size / MIB);
    println!(
        "allocated         {:>10} MiB (data bytes read: {} MiB)",
        m.allocated_bytes / MIB,
        t.data_bytes_read / MIB
    );
    println!(
        "stored object     {:>10} MiB  {store_url}/{key} ({})",
        m.stored_size / MIB,
        m.format
    );
    println!("object sha256     {}", m.object_digest.value);
    println!(
        "content digest    {} ({})",
        m.content_digest.value, m.content_digest.algorithm
    );
    println!("re-read digest    {again}");
    println!(
        "export            {:>10.2} s, {:.0} MiB/s of data",
        export_time.as_secs_f64(),
        t.data_bytes_read as f64 / MIB as f64 / export_time.as_secs_f64()
    );
    println!(
        "import            {:>10.2} s, as {} ({})",
        import_time.as_secs_f64(),
        imported.format,
        imported.location
    );
    println!(
        "source            qcow2 -> stored {} -> target {}",
        m.format, imported.format
    );
    if keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    if ok {
        println!("\nOK: the imported disk is identical to the source (content digests match)");
        Ok(())
    } else {
        Err("content digest mismatch".into())
    }
}

//! `virtrigaud` — a small command-line tool over the library.
//!
//! ```text
//! virtrigaud info   IMAGE
//! virtrigaud export IMAGE STORAGE_URL KEY [--format qcow2|raw|vmdk|vmdk-sparse] [--compress]
//! virtrigaud import STORAGE_URL KEY TARGET_DIR VM DISK [--format qcow2|raw|vmdk|vmdk-sparse]
//! virtrigaud verify STORAGE_URL KEY
//! ```
//!
//! Storage URLs: `file:///dir`, `s3://bucket/prefix` (feature `s3`; credentials and endpoint
//! from `AWS_*`), `http(s)://…` (feature `http`), `nfs://host/export/path` (feature `nfs`).
//! Ctrl-C cancels cleanly: the partial object or disk is removed. `--compress` stores qcow2
//! with compressed clusters (the image is read twice: a sizing pass, then the upload).
//!
//! ```text
//! cargo run --release --example virtrigaud --features s3 -- export disk.qcow2 s3://bucket/vms web01/disk0.qcow2
//! ```

use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;
use std::sync::Arc;
use virtrigaud::io::{ImageSource, LocalFile};
use virtrigaud::{
    CancellationToken, DiskFormat, ExportOptions, ImportOptions, LocalProvider, Progress,
    ProgressFn, export_image, import_disk, verify_object,
};

const USAGE: &str = "usage:
  virtrigaud info   IMAGE
  virtrigaud export IMAGE STORAGE_URL KEY [--format qcow2|raw|vmdk|vmdk-sparse] [--compress]
  virtrigaud import STORAGE_URL KEY TARGET_DIR VM DISK [--format qcow2|raw|vmdk|vmdk-sparse]
  virtrigaud verify STORAGE_URL KEY";

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> ExitCode {
    virtrigaud::io::limit_allocator_retention();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `--format X` and `--compress` off the positional arguments.
fn parse(mut args: Vec<String>) -> AnyResult<(Vec<String>, Option<DiskFormat>, bool)> {
    let mut format = None;
    if let Some(i) = args.iter().position(|a| a == "--format") {
        let v = args.get(i + 1).ok_or("--format needs a value")?.clone();
        format = Some(DiskFormat::parse(&v)?);
        args.drain(i..=i + 1);
    }
    let compress = args.iter().any(|a| a == "--compress");
    args.retain(|a| a != "--compress");
    Ok((args, format, compress))
}

fn progress_bar(cancel: &CancellationToken) -> (ProgressBar, ProgressFn) {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:>8} [{bar:40}] {percent:>3}% {prefix} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let f: ProgressFn = Arc::new(move |p: &Progress| {
        b.set_message(format!("{:?}", p.phase).to_lowercase());
        b.set_position((p.fraction() * 1000.0) as u64);
        b.set_prefix(format!("{:.0} MiB/s", p.rate / (1 << 20) as f64));
    });
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ncancelling…");
            c.cancel();
        }
    });
    (bar, f)
}

async fn run(args: Vec<String>) -> AnyResult<()> {
    let (args, format, compress) = parse(args)?;
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["info", image] => {
            let f = LocalFile::open(image).await?;
            let (fmt, size) = virtrigaud::format::probe(&f).await?;
            println!(
                "format: {fmt}\nvirtual size: {size}\nfile size: {}",
                f.path().metadata()?.len()
            );
            Ok(())
        }
        ["export", image, url, key] => {
            let store = virtrigaud::storage::open(url)?;
            let f = LocalFile::open(image).await?;
            let mut opts = ExportOptions::default();
            // A VMDK given by its descriptor opens its extents next to it.
            let dir = std::path::Path::new(image)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            opts.decode.extent_resolver = Some(Arc::new(
                virtrigaud::format::vmdk::LocalExtentResolver::new(dir),
            ));
            if let Some(fmt) = format {
                opts.format = fmt;
            }
            if compress && opts.format != DiskFormat::Qcow2 {
                return Err(
                    "--compress applies to qcow2 (streamOptimized VMDK is always \
                            compressed)"
                        .into(),
                );
            }
            opts.encode.compress = compress;
            let (bar, f_progress) = progress_bar(&opts.pipeline.cancel);
            opts.pipeline.progress = Some(f_progress);
            let r = export_image(
                ImageSource::RandomAccess(Arc::new(f)),
                None,
                &*store,
                key,
                None,
                None,
                &opts,
            )
            .await;
            bar.finish_and_clear();
            let r = r?;
            let m = &r.manifest;
            println!(
                "stored {url}/{key} ({}, {} bytes, virtual {} bytes, {} bytes of data)",
                m.format, m.stored_size, m.virtual_size, m.allocated_bytes
            );
            println!("sha256  {}", m.object_digest.value);
            println!(
                "content {} ({})",
                m.content_digest.value, m.content_digest.algorithm
            );
            println!(
                "{:.2} s, {:.0} MiB/s of data",
                r.transfer.elapsed.as_secs_f64(),
                r.transfer.data_bytes_read as f64
                    / (1 << 20) as f64
                    / r.transfer.elapsed.as_secs_f64()
            );
            Ok(())
        }
        ["import", url, key, dir, vm, disk] => {
            let store = virtrigaud::storage::open(url)?;
            let target = LocalProvider::new(dir);
            let mut opts = ImportOptions {
                format,
                ..Default::default()
            };
            let (bar, f_progress) = progress_bar(&opts.pipeline.cancel);
            opts.pipeline.progress = Some(f_progress);
            let r = import_disk(&*store, key, &target, vm, disk, &opts).await;
            bar.finish_and_clear();
            let r = r?;
            println!(
                "imported {} into {dir}/{vm}/{} ({}), verified: content {}",
                key, r.location, r.format, r.manifest.content_digest.value
            );
            Ok(())
        }
        ["verify", url, key] => {
            let store = virtrigaud::storage::open(url)?;
            let m = verify_object(&*store, key, &ImportOptions::default()).await?;
            println!(
                "OK {key}: sha256 {} content {}",
                m.object_digest.value, m.content_digest.value
            );
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

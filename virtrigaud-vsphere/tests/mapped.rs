//! The allocation map of a flat disk (`QueryChangedDiskAreas`, which the simulator lacks) end to
//! end: a [`MappedReader`] over a counting in-memory source through
//! `virtrigaud_core::transfer::export_image`. No peer: the map comes from vSphere's CBT, which no
//! available peer has; the source is in memory so that every read can be counted.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use virtrigaud_core::io::ReadAt;
use virtrigaud_core::transfer::{ExportOptions, export_image};
use virtrigaud_core::{DiskFormat, ImageSource, Result};
use virtrigaud_storage::FsBackend;
use virtrigaud_vsphere::datastore::MappedReader;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// What format detection reads at offset 0 before the export (`virtrigaud_core::format`).
const HEAD: u64 = virtrigaud_core::format::DETECT_LEN as u64;

/// An in-memory disk that records every read and knows no allocation map of its own.
struct Counting {
    data: Vec<u8>,
    reads: Mutex<Vec<Range<u64>>>,
}

#[async_trait]
impl ReadAt for Counting {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let start = (offset as usize).min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.reads.lock().unwrap().push(start as u64..end as u64);
        Ok(Bytes::copy_from_slice(&self.data[start..end]))
    }
}

fn disk() -> (Vec<u8>, Vec<Range<u64>>) {
    let size = 64 * MIB;
    // Allocated: CBT areas (64 KiB aligned, as vSphere reports them), one with a zero run
    // inside, one overlapping another, given out of order.
    let areas = vec![
        40 * MIB..40 * MIB + 192 * KIB,
        MIB..3 * MIB,
        2 * MIB..4 * MIB,
        20 * MIB + 64 * KIB..21 * MIB,
    ];
    let mut data = vec![0u8; size as usize];
    for r in &areas {
        for i in r.start..r.end {
            data[i as usize] = (i.wrapping_mul(2654435761) >> 7) as u8 | 1;
        }
    }
    // A zero run inside an allocated area.
    data[(2 * MIB + 512 * KIB) as usize..(3 * MIB) as usize].fill(0);
    (data, areas)
}

async fn export(src: Arc<dyn ReadAt>, format: DiskFormat) -> virtrigaud_core::Manifest {
    let store = tempfile::tempdir().unwrap();
    let storage = FsBackend::new(store.path());
    let opts = ExportOptions {
        format,
        ..ExportOptions::default()
    };
    export_image(
        ImageSource::RandomAccess(src),
        Some(DiskFormat::Raw),
        &storage,
        "d.img",
        None,
        None,
        &opts,
    )
    .await
    .unwrap()
    .manifest
}

#[tokio::test]
async fn mapped_export_reads_only_allocated_ranges() {
    let (data, areas) = disk();
    let allocated = {
        let mut a = areas.clone();
        a.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in a {
            match out.last_mut() {
                Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    };
    for format in [DiskFormat::Qcow2, DiskFormat::Raw] {
        // The reference: the same bytes without a map, every byte read.
        let plain = Arc::new(Counting {
            data: data.clone(),
            reads: Mutex::new(Vec::new()),
        });
        let want = export(plain.clone(), format).await;
        let plain_read: u64 = plain
            .reads
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert_eq!(plain_read, data.len() as u64 + HEAD);

        let inner = Arc::new(Counting {
            data: data.clone(),
            reads: Mutex::new(Vec::new()),
        });
        let mapped = Arc::new(MappedReader::new(inner.clone(), areas.clone()));
        assert_eq!(mapped.ranges(), &allocated[..]);
        let got = export(mapped, format).await;
        assert_eq!(got.content_digest, want.content_digest, "{format:?}");
        assert_eq!(got.virtual_size, data.len() as u64);

        let mut reads = inner.reads.lock().unwrap().clone();
        // The one read outside the map: format detection's look at the head (the guest's
        // first sector; on vSphere an unallocated one reads as zeros).
        let head = reads.iter().position(|r| *r == (0..HEAD));
        assert!(head.is_some(), "{format:?}: no format detection read");
        reads.remove(head.unwrap_or(0));
        assert!(!reads.is_empty());
        for r in &reads {
            assert!(
                allocated
                    .iter()
                    .any(|a| a.start <= r.start && r.end <= a.end),
                "{format:?}: read {r:?} outside the allocated ranges {allocated:?}"
            );
        }
        let read: u64 = reads.iter().map(|r| r.end - r.start).sum();
        let total: u64 = allocated.iter().map(|a| a.end - a.start).sum();
        assert_eq!(read, total, "{format:?}: every allocated byte read once");
    }
}

//! qcow2 (v2 and v3): decoder to extents and one-pass sequential encoder.
//!
//! # Decoding
//!
//! [`decode_random`] parses the header, the L1 table and every L2 table first (metadata only)
//! to build the [`AllocationMap`](crate::extent::AllocationMap), then streams the data in guest
//! order: host-contiguous clusters are coalesced into reads of up to
//! [`DecodeOptions::read_size`] bytes, with [`DecodeOptions::read_ahead`] reads in flight.
//! Unallocated and zero clusters (v3 zero flag, extended-L2 zero subclusters) are never read
//! and come out as gaps. Compressed clusters are inflated (zlib = raw deflate, or zstd when the
//! compression type header field says so).
//!
//! [`decode_sequential`] reads the file once, in order. It parses the header, the L1 table and
//! the L2 tables as they stream by and emits data in guest order as it arrives. This works for
//! images whose metadata precedes the data it describes and whose data is stored in guest order:
//! our own encoder's output and typical `qemu-img convert` output. Anything else is buffered up
//! to 64 MiB; beyond that the decoder fails with `Unsupported` ("this qcow2 layout needs random
//! access"). It never emits out of order.
//!
//! Refused: backing files (`Unsupported`, supply the chain), encryption, external data files,
//! unknown incompatible features (`Unsupported`), images flagged corrupt (`Corrupt`). Images
//! flagged dirty are read (only their refcounts may be stale, and refcounts are not used).
//! Internal snapshots are ignored: the active L1 table is the disk.
//!
//! Every header field and table entry is treated as hostile: sizes and offsets are checked
//! against the file size and each other before anything is allocated or read, tables may not
//! overlap the header or each other, the L1 table is capped at 32 MiB, and (random access) a
//! host cluster used twice by the active tables is refused, so a small file cannot expand into
//! an endless amount of output. Such problems are `Corrupt` errors, never panics.
//!
//! The sequential decoder holds at most 64 MiB of file bytes (more only if the source hands out
//! bigger pieces) and at most 256 MiB of L2 tables received ahead of the guest position (enough
//! for about 2 TiB of guest space with 64 KiB clusters); beyond either it fails with
//! `Unsupported`. Compressed clusters are inflated inline on the stream's task.
//!
//! # Encoding
//!
//! [`encode`] writes qcow2 v3 (refcount order 4, no extensions) strictly sequentially: header,
//! refcount table, refcount blocks, L1 table, L2 tables, then one data cluster per allocated
//! guest cluster in guest order. The layout comes from [`DiskContent::allocation`] rounded out to
//! clusters; when the content has no allocation map every cluster is treated as allocated (the
//! image is then as large as the disk, but zero runs are still emitted as
//! [`Chunk::Zeros`](crate::format::Chunk::Zeros), so sparse sinks keep it sparse). An allocated
//! cluster whose data never arrives is written as zeros. A data extent outside the map is a
//! contract violation (`InvalidInput`). The output is deterministic.
//!
//! The header's size is always a whole number of 512-byte sectors: QEMU reads it in sectors,
//! rounding down, so a disk whose size is not such a multiple is rounded *up* with zeros, as
//! `qemu-img convert` does (see [`stored_virtual_size`](crate::format::stored_virtual_size)).
//!
//! Compressed output ([`EncodeOptions::compress`]) takes two passes: the tables written first
//! hold the offsets and sizes of the compressed clusters, known only after compressing. A
//! sizing pass over [`DiskContent::replay`] records every cluster's compressed length, then the
//! image is written from [`DiskContent::extents`], compressing again; all-zero clusters stay
//! unallocated. Without a replay (a sequential source) it is `Unsupported`. Details in the
//! `writer` module.

mod header;
mod reader;
mod tables;
mod writer;

use crate::Result;
use crate::extent::{DiskContent, ExtentStream};
use crate::format::{ChunkStream, DecodeOptions, EncodeOptions};
use crate::io::ReadAt;
use std::sync::Arc;

/// Reads the header and returns the virtual size (metadata only).
pub async fn probe(src: &dyn ReadAt) -> Result<u64> {
    Ok(reader::read_header(src).await?.size)
}

/// Decodes a qcow2 image read by ranges.
pub async fn decode_random(src: Arc<dyn ReadAt>, opts: &DecodeOptions) -> Result<DiskContent> {
    reader::decode_random(src, opts).await
}

/// Decodes a qcow2 image arriving as one sequential stream of file extents.
pub async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    reader::decode_sequential(size, stream, opts).await
}

/// Encodes content as a qcow2 v3 image, strictly sequentially.
///
/// A size that is not a whole number of 512-byte sectors is rounded up with zeros, because
/// QEMU reads the header's size in whole sectors and would cut the disk short (see
/// [`stored_virtual_size`](crate::format::stored_virtual_size)).
pub fn encode(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let (content, _) = crate::format::pad_for(content, crate::format::DiskFormat::Qcow2)?;
    writer::encode(content, opts)
}

#[cfg(test)]
mod tests;

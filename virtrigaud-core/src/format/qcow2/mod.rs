//! qcow2 (v2 and v3): decoder to extents and one-pass sequential encoder.
//!
//! Not implemented yet: every function returns `Unsupported`.

use crate::extent::{DiskContent, ExtentStream};
use crate::format::{ChunkStream, DecodeOptions, EncodeOptions};
use crate::io::ReadAt;
use crate::{Error, Result};
use std::sync::Arc;

/// Reads the header and returns the virtual size (metadata only).
pub async fn probe(src: &dyn ReadAt) -> Result<u64> {
    let _ = src;
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

/// Decodes a qcow2 image read by ranges.
pub async fn decode_random(src: Arc<dyn ReadAt>, opts: &DecodeOptions) -> Result<DiskContent> {
    let _ = (src, opts);
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

/// Decodes a qcow2 image arriving as one sequential stream of file extents.
pub async fn decode_sequential(
    size: Option<u64>,
    stream: ExtentStream,
    opts: &DecodeOptions,
) -> Result<DiskContent> {
    let _ = (size, stream, opts);
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

/// Encodes content as a qcow2 v3 image, strictly sequentially.
pub fn encode(content: DiskContent, opts: &EncodeOptions) -> Result<ChunkStream> {
    let _ = (content, opts);
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

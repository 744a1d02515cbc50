//! GET streams: ranged READs with read-ahead.
//!
//! A range is cut into READs of the mounted read size; up to
//! [`NfsConfig::concurrency`](super::NfsConfig::concurrency) of them run ahead of the consumer
//! as tasks of their own (each on its own connection) and are yielded in order, so memory stays
//! near `read size × concurrency`. A short READ is continued; a file that ends before the
//! range does (truncated while read) is an error. Dropping the stream cancels the reads ahead.

use super::core::{FileHandle, NfsCore};
use bytes::Bytes;
use futures::StreamExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use virtrigaud_core::io::ByteStream;
use virtrigaud_core::{Error, ErrorKind, Result};

/// A spawned task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Streams `start..end` of the file `fh`.
pub(crate) fn stream(
    core: Arc<NfsCore>,
    fh: FileHandle,
    start: u64,
    end: u64,
    read_size: u32,
    key: String,
) -> ByteStream {
    let concurrency = core.config().concurrency;
    let step = u64::from(read_size.max(1));
    let count = (end.saturating_sub(start)).div_ceil(step);
    let key2 = key.clone();
    futures::stream::iter(0..count)
        .map(move |i| {
            let offset = start + i * step;
            let len = step.min(end - offset) as usize;
            let (core, fh, key) = (core.clone(), fh.clone(), key.clone());
            AbortOnDrop(tokio::spawn(async move {
                read_exact(&core, &fh, offset, len, &key).await
            }))
        })
        .buffered(concurrency)
        .map(move |r| match r {
            Ok(r) => r,
            Err(e) => Err(
                Error::new(ErrorKind::Storage, format!("NFS read task failed: {e}"))
                    .with_target(key2.clone()),
            ),
        })
        // Stop after the first error.
        .scan(false, |failed, item| {
            let out = if *failed {
                None
            } else {
                *failed = item.is_err();
                Some(item)
            };
            futures::future::ready(out)
        })
        .boxed()
}

/// Reads exactly `len` bytes at `offset`, continuing short READs.
async fn read_exact(
    core: &NfsCore,
    fh: &FileHandle,
    offset: u64,
    len: usize,
    key: &str,
) -> Result<Bytes> {
    let mut out: Vec<u8> = Vec::new();
    while out.len() < len {
        let at = offset + out.len() as u64;
        let want = (len - out.len()) as u32;
        let (data, eof) = core.read(fh, at, want, key).await?;
        if data.is_empty() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                if eof {
                    "object ended before the requested range (changed while being read?)"
                } else {
                    "NFS server returned an empty READ before the end of the file"
                },
            )
            .with_target(key.to_string())
            .with_offset(at));
        }
        if out.is_empty() && data.len() == len {
            return Ok(Bytes::from(data));
        }
        out.extend_from_slice(&data);
    }
    Ok(Bytes::from(out))
}

//! A small safe wrapper over libvirt's sparse stream calls, which the `virt` crate exposes only
//! as raw `virt::sys` functions: `virStreamRecvFlags` with `VIR_STREAM_RECV_STOP_AT_HOLE`,
//! `virStreamRecvHole` and `virStreamSendHole`.
//!
//! A sparse stream (a volume download or upload started with the `SPARSE_STREAM` flag) carries
//! data and hole markers. Receiving with STOP_AT_HOLE returns data up to the next hole, then
//! reports the hole (`-3`), whose length `virStreamRecvHole` tells. Sending a hole skips that
//! many bytes in the target file without writing them.
//!
//! All calls block; use them from a blocking thread. The stream is a blocking stream (created
//! without `VIR_STREAM_NONBLOCK`), so `-2` (would block) never occurs.

use crate::error::from_virt;
use std::os::raw::{c_char, c_longlong};
use virt::connect::Connect;
use virt::stream::Stream;
use virtrigaud_core::{Error, ErrorKind, Result};

/// What one receive produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// `n` bytes of data were written to the front of the buffer.
    Data(usize),
    /// A hole of this many bytes.
    Hole(u64),
    /// The end of the stream.
    End,
}

/// A blocking libvirt stream used for sparse volume transfers.
pub struct SparseStream {
    inner: Stream,
}

impl std::fmt::Debug for SparseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SparseStream")
    }
}

fn last_error(op: &str) -> Error {
    from_virt(virt::error::Error::last_error(), op)
}

impl SparseStream {
    /// A new blocking stream on `conn`.
    pub fn new(conn: &Connect) -> Result<SparseStream> {
        let inner = Stream::new(conn, 0).map_err(|e| from_virt(e, "stream.new"))?;
        Ok(SparseStream { inner })
    }

    /// The underlying `virt` stream (to pass to download/upload).
    pub fn stream(&self) -> &Stream {
        &self.inner
    }

    /// Receives into `buf`, stopping at holes.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Recv> {
        // SAFETY: the stream pointer is valid while `self.inner` lives; `buf` is a valid,
        // writable buffer of `buf.len()` bytes that libvirt fills with at most that many bytes.
        let n = unsafe {
            virt::sys::virStreamRecvFlags(
                self.inner.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
                virt::sys::VIR_STREAM_RECV_STOP_AT_HOLE,
            )
        };
        match n {
            0 => Ok(Recv::End),
            n if n > 0 => Ok(Recv::Data(n as usize)),
            -3 => {
                let mut len: c_longlong = 0;
                // SAFETY: valid stream pointer; `len` is a valid out-parameter.
                let r = unsafe { virt::sys::virStreamRecvHole(self.inner.as_ptr(), &mut len, 0) };
                if r < 0 {
                    return Err(last_error("stream.recv_hole"));
                }
                u64::try_from(len).map(Recv::Hole).map_err(|_| {
                    Error::new(ErrorKind::Provider, "libvirt reported a negative hole")
                })
            }
            _ => Err(last_error("stream.recv")),
        }
    }

    /// Sends all of `data`.
    pub fn send_all(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = self
                .inner
                .send(data)
                .map_err(|e| from_virt(e, "stream.send"))?;
            if n <= 0 {
                return Err(Error::new(
                    ErrorKind::Provider,
                    "libvirt stream accepted no data",
                ));
            }
            data = &data[(n as usize).min(data.len())..];
        }
        Ok(())
    }

    /// Sends a hole of `len` bytes.
    pub fn send_hole(&self, mut len: u64) -> Result<()> {
        while len > 0 {
            let n = len.min(i64::MAX as u64);
            // SAFETY: valid stream pointer; plain integer arguments.
            let r =
                unsafe { virt::sys::virStreamSendHole(self.inner.as_ptr(), n as c_longlong, 0) };
            if r < 0 {
                return Err(last_error("stream.send_hole"));
            }
            len -= n;
        }
        Ok(())
    }

    /// Completes the transfer (waits for the far end to confirm).
    pub fn finish(self) -> Result<()> {
        self.inner
            .finish()
            .map_err(|e| from_virt(e, "stream.finish"))
    }

    /// Aborts the transfer.
    pub fn abort(self) -> Result<()> {
        self.inner.abort().map_err(|e| from_virt(e, "stream.abort"))
    }
}

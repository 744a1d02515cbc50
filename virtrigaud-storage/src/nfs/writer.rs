//! [`NfsWriter`]: the [`ByteSink`] of a put.
//!
//! Bytes go to a temporary file `.<name>.<unique>.vrg-tmp` beside the target, in WRITE requests
//! of the mounted write size, up to [`NfsConfig::concurrency`](super::NfsConfig::concurrency)
//! of them in flight (each on its own connection); the writer waits for the oldest ones when
//! that many are pending, so memory stays near `write size × (concurrency + 1)`. Long zero runs
//! are not sent: they become holes (the file is extended by SETATTR at the end when it ends
//! in zeros).
//!
//! `commit` waits for every WRITE, COMMITs the file when writes were `UNSTABLE` (and checks the
//! server's write verifier did not change, which would mean it restarted and lost data), then
//! renames the temp over the target. Without `overwrite`, the temp is hard-linked (LINK) to the
//! target name instead — which fails atomically if the name exists — and then removed; a server
//! without LINK gets a check-then-rename. `abort`, drop and a failed commit remove the temp
//! file, and the directories the put created if they are still empty.

use super::core::{FileHandle, NfsCore};
use bytes::{Buf, Bytes, BytesMut};
use nfs3_client::nfs3_types::nfs3::stable_how;
use std::sync::Arc;
use tokio::task::JoinSet;
use virtrigaud_core::io::ByteSink;
use virtrigaud_core::{Error, ErrorKind, Result};

/// Zero runs shorter than this are written as data (keeps requests large).
const MIN_HOLE: u64 = 64 << 10;

/// What one WRITE task achieved.
struct Written {
    /// Verifier of the last non-`FILE_SYNC` reply, if any.
    unstable_verf: Option<[u8; 8]>,
}

/// Where the temp file lives and what it becomes.
pub(crate) struct Target {
    pub(crate) key: String,
    pub(crate) dir: FileHandle,
    pub(crate) tmp_name: String,
    pub(crate) final_name: String,
    pub(crate) fh: FileHandle,
    pub(crate) overwrite: bool,
    /// Directories this put created, as (parent, name), outermost first: removed again (when
    /// empty) if the put does not commit.
    pub(crate) created_dirs: Vec<(FileHandle, String)>,
}

impl Target {
    /// Removes the temp file, then the directories this put created if they are empty.
    async fn discard(&self, core: &NfsCore) -> Result<()> {
        core.remove(&self.dir, &self.tmp_name, &self.key).await?;
        for (parent, name) in self.created_dirs.iter().rev() {
            if !core.rmdir(parent, name, &self.key).await.unwrap_or(false) {
                break;
            }
        }
        Ok(())
    }
}

/// A streaming put to an NFS export: invisible until `commit`, gone after `abort` or drop.
pub struct NfsWriter {
    core: Arc<NfsCore>,
    t: Arc<Target>,
    stable: stable_how,
    write_size: usize,
    concurrency: usize,
    buf: BytesMut,
    /// Logical end of what was written (data and zero runs). `buf` ends here.
    pos: u64,
    /// End of the last byte actually sent.
    sent_end: u64,
    inflight: JoinSet<Result<Written>>,
    unstable_verf: Option<[u8; 8]>,
    failed: bool,
    finished: bool,
}

impl std::fmt::Debug for NfsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsWriter")
            .field("key", &self.t.key)
            .field("tmp", &self.t.tmp_name)
            .field("pos", &self.pos)
            .finish()
    }
}

impl NfsWriter {
    pub(crate) fn new(
        core: Arc<NfsCore>,
        target: Target,
        write_size: u32,
        stable: stable_how,
    ) -> NfsWriter {
        let concurrency = core.config().concurrency;
        NfsWriter {
            core,
            t: Arc::new(target),
            stable,
            write_size: write_size as usize,
            concurrency,
            buf: BytesMut::new(),
            pos: 0,
            sent_end: 0,
            inflight: JoinSet::new(),
            unstable_verf: None,
            failed: false,
            finished: false,
        }
    }

    /// The key this writer will create.
    pub fn key(&self) -> &str {
        &self.t.key
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed {
            return Err(Error::new(
                ErrorKind::Storage,
                "an earlier write of this NFS put failed",
            )
            .with_target(self.t.key.clone()));
        }
        Ok(())
    }

    /// Sends `data` at `offset`, after waiting for room.
    async fn send(&mut self, offset: u64, data: Bytes) -> Result<()> {
        while self.inflight.len() >= self.concurrency {
            self.reap_one().await?;
        }
        let len = data.len() as u64;
        let (core, t, stable) = (self.core.clone(), self.t.clone(), self.stable);
        self.inflight
            .spawn(async move { write_all(&core, &t, offset, data, stable).await });
        self.sent_end = self.sent_end.max(offset + len);
        Ok(())
    }

    async fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        let offset = self.pos - data.len() as u64;
        self.send(offset, data).await
    }

    /// Waits for one WRITE task.
    async fn reap_one(&mut self) -> Result<()> {
        let Some(res) = self.inflight.join_next().await else {
            return Ok(());
        };
        let outcome = res.map_err(|e| {
            Error::new(ErrorKind::Storage, format!("NFS write task failed: {e}"))
                .with_target(self.t.key.clone())
        });
        let w = match outcome.and_then(|r| r) {
            Ok(w) => w,
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        if let Some(v) = w.unstable_verf {
            match self.unstable_verf {
                None => self.unstable_verf = Some(v),
                Some(prev) if prev != v => {
                    self.failed = true;
                    return Err(restarted(&self.t.key));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn finish_writes(&mut self) -> Result<()> {
        self.flush_buf().await?;
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        Ok(())
    }

    async fn do_commit(&mut self) -> Result<()> {
        self.check_usable()?;
        self.finish_writes().await?;
        let (core, t) = (self.core.clone(), self.t.clone());
        let key = t.key.as_str();
        if self.pos > self.sent_end {
            core.set_size(&t.fh, self.pos, key).await?;
        }
        if let Some(v) = self.unstable_verf {
            let committed = core.commit(&t.fh, key).await?;
            if committed != v {
                return Err(restarted(key));
            }
        }
        if t.overwrite {
            core.rename(&t.dir, &t.tmp_name, &t.dir, &t.final_name, key)
                .await
        } else {
            match core.link(&t.fh, &t.dir, &t.final_name, key).await {
                Ok(()) => {
                    core.remove(&t.dir, &t.tmp_name, key).await?;
                    Ok(())
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{key:?} already exists (overwrite not requested)"),
                )
                .with_operation("put")
                .with_target(key.to_string())),
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    // No hard links on this server: check, then rename (not atomic).
                    if core.lookup(&t.dir, &t.final_name, key).await?.is_some() {
                        return Err(Error::new(
                            ErrorKind::AlreadyExists,
                            format!("{key:?} already exists (overwrite not requested)"),
                        )
                        .with_target(key.to_string()));
                    }
                    core.rename(&t.dir, &t.tmp_name, &t.dir, &t.final_name, key)
                        .await
                }
                Err(e) => Err(e),
            }
        }
    }

    async fn remove_temp(&mut self) -> Result<()> {
        self.inflight.shutdown().await;
        self.t.discard(&self.core).await
    }
}

fn restarted(key: &str) -> Error {
    Error::new(
        ErrorKind::Storage,
        "the NFS server restarted during the put (write verifier changed): unstable data may be \
         lost, the put must be repeated",
    )
    .with_retryable(true)
    .with_target(key.to_string())
}

/// WRITEs all of `data` at `offset`, continuing after short writes.
async fn write_all(
    core: &NfsCore,
    t: &Target,
    mut offset: u64,
    mut data: Bytes,
    stable: stable_how,
) -> Result<Written> {
    let mut unstable_verf = None;
    while !data.is_empty() {
        let r = core.write(&t.fh, offset, &data, stable, &t.key).await?;
        if r.count == 0 {
            return Err(
                Error::new(ErrorKind::Storage, "NFS server accepted 0 bytes of a WRITE")
                    .with_target(t.key.clone())
                    .with_offset(offset),
            );
        }
        if r.committed != stable_how::FILE_SYNC {
            match unstable_verf {
                Some(v) if v != r.verf => return Err(restarted(&t.key)),
                _ => unstable_verf = Some(r.verf),
            }
        }
        offset += u64::from(r.count);
        data.advance(r.count as usize);
    }
    Ok(Written { unstable_verf })
}

#[async_trait::async_trait]
impl ByteSink for NfsWriter {
    async fn write(&mut self, mut data: Bytes) -> Result<()> {
        self.check_usable()?;
        let ws = self.write_size;
        while !data.is_empty() {
            if self.buf.is_empty() && data.len() >= ws {
                let chunk = data.split_to(ws);
                self.pos += ws as u64;
                let offset = self.pos - ws as u64;
                self.send(offset, chunk).await?;
                continue;
            }
            let n = (ws - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data.advance(n);
            self.pos += n as u64;
            if self.buf.len() == ws {
                self.flush_buf().await?;
            }
        }
        Ok(())
    }

    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        self.check_usable()?;
        if len < MIN_HOLE {
            let mut left = len;
            while left > 0 {
                let n = left.min(virtrigaud_core::io::ZEROS.len() as u64) as usize;
                self.write(Bytes::from_static(&virtrigaud_core::io::ZEROS[..n]))
                    .await?;
                left -= n as u64;
            }
            return Ok(());
        }
        self.flush_buf().await?;
        self.pos = self
            .pos
            .checked_add(len)
            .ok_or_else(|| Error::invalid("object size overflow"))?;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let res = self.do_commit().await;
        self.finished = true;
        if let Err(e) = res {
            let _ = self.remove_temp().await;
            return Err(e.with_operation("put.commit"));
        }
        tracing::debug!(key = %self.t.key, size = self.pos, "nfs put committed");
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        self.remove_temp().await
    }
}

impl Drop for NfsWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped without commit or abort: stop the writes, remove the temp in the background.
        self.inflight.abort_all();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (core, t) = (self.core.clone(), self.t.clone());
            handle.spawn(async move {
                if let Err(e) = t.discard(&core).await {
                    tracing::warn!(key = %t.key, tmp = %t.tmp_name, error = %e,
                        "could not remove the temp file of a dropped NFS put");
                }
            });
        } else {
            tracing::warn!(key = %self.t.key, tmp = %self.t.tmp_name,
                "NFS put dropped outside a tokio runtime: its temp file stays");
        }
    }
}

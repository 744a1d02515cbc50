//! Storage volumes: streamed sparse download (export) and upload (import).
//!
//! A download is a byte copy of the volume file (a qcow2 volume yields its qcow2 bytes). It
//! runs on a blocking thread that receives with STOP_AT_HOLE and feeds a bounded channel with
//! [`Extent::Data`] and, for holes, [`Extent::Zero`]; the consumer sees an
//! [`ImageSource::Sequential`]. Because everything goes through the libvirt stream, it works the
//! same over `qemu+tcp://` and `qemu+ssh://`.
//!
//! An upload writes the volume file from offset 0 with a sparse stream: zero runs become holes
//! (`virStreamSendHole`). The volume is removed again on abort or when the sink is dropped
//! without commit.

use crate::connection::blocking;
use crate::error::VirtResultExt;
use crate::stream::{Recv, SparseStream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use virt::connect::Connect;
use virt::storage_vol::StorageVol;
use virtrigaud_core::io::ReadBuf;
use virtrigaud_core::{ByteSink, Error, ErrorKind, Extent, ImageSource, Result};

/// Bytes received per libvirt call.
pub const RECV_SIZE: usize = 1 << 20;
/// Extents buffered between the libvirt thread and the consumer.
pub const CHANNEL_DEPTH: usize = 8;

/// Physical size of a volume file (for qcow2, the file size, not the virtual size).
pub fn physical_size(vol: &StorageVol) -> Result<u64> {
    let info = vol
        .info_flags(virt::sys::VIR_STORAGE_VOL_GET_PHYSICAL)
        .op("volume.info")?;
    Ok(info.allocation)
}

/// Streams a volume's bytes as a sparse sequential source.
pub fn download(conn: Arc<Connect>, vol: StorageVol, size: u64) -> ImageSource {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Extent>>(CHANNEL_DEPTH);
    let err_tx = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("vrg-libvirt-download".into())
        .spawn(move || {
            let r = download_loop(&conn, &vol, &tx);
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(e));
            }
        });
    if let Err(e) = spawned {
        let _ = err_tx.try_send(Err(Error::io(e, "cannot start the download thread")));
    }
    drop(err_tx);
    ImageSource::Sequential {
        size: Some(size),
        stream: futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
    }
}

fn download_loop(
    conn: &Connect,
    vol: &StorageVol,
    tx: &tokio::sync::mpsc::Sender<Result<Extent>>,
) -> Result<()> {
    let st = SparseStream::new(conn)?;
    vol.download(
        st.stream(),
        0,
        0,
        virt::sys::VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM,
    )
    .op("volume.download")?;
    let mut pos = 0u64;
    // A recycled, already mapped buffer: a fresh 1 MiB each time cost page faults and the
    // kernel's zeroing of every page, about as much CPU as the copy itself. A short receive is
    // copied out, so that a few bytes never pin a whole buffer downstream.
    let mut buf = ReadBuf::new(RECV_SIZE);
    loop {
        let item = match st.recv(buf.as_mut()) {
            Ok(r) => r,
            Err(e) => {
                let _ = st.abort();
                return Err(e.with_offset(pos));
            }
        };
        let extent = match item {
            Recv::End => break,
            Recv::Data(n) if n >= RECV_SIZE / 2 => Extent::Data {
                offset: pos,
                bytes: std::mem::replace(&mut buf, ReadBuf::new(RECV_SIZE)).freeze(n),
            },
            Recv::Data(n) => Extent::Data {
                offset: pos,
                bytes: Bytes::copy_from_slice(&buf.as_mut()[..n]),
            },
            Recv::Hole(0) => continue,
            Recv::Hole(len) => Extent::Zero { offset: pos, len },
        };
        pos += extent.len();
        if tx.blocking_send(Ok(extent)).is_err() {
            // The consumer went away: stop the transfer.
            let _ = st.abort();
            return Ok(());
        }
    }
    st.finish()
}

/// Data gathered into one libvirt send: smaller writes (a qcow2 encoder's clusters) are copied
/// into one buffer of this size; larger ones go as they are.
pub const SEND_SIZE: usize = 1 << 20;
/// Writes queued between the pipeline and the libvirt upload thread.
pub const SEND_DEPTH: usize = 16;

/// What the pipeline hands the upload thread.
enum Piece {
    Data(Bytes),
    Hole(u64),
}

/// A volume being uploaded. Created by [`UploadSink::start`].
///
/// One thread of its own sends to libvirt, fed through a bounded queue, so the pipeline encodes
/// the next bytes while libvirt sends the last ones (a blocking call per write made each wait
/// for the other), and small writes are gathered into sends of [`SEND_SIZE`].
pub struct UploadSink {
    state: Option<UploadState>,
    location: String,
    /// The file this upload replaces at commit (overwrite): the old volume stays until then.
    replace: Option<std::path::PathBuf>,
}

struct UploadState {
    tx: Option<tokio::sync::mpsc::Sender<Piece>>,
    worker: Option<std::thread::JoinHandle<Result<()>>>,
    stream: Arc<SparseStream>,
    vol: Arc<StorageVol>,
    pool: virt::storage_pool::StoragePool,
}

impl std::fmt::Debug for UploadSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadSink")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

fn upload_loop(st: &SparseStream, rx: &mut tokio::sync::mpsc::Receiver<Piece>) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(SEND_SIZE);
    let mut pos = 0u64;
    let flush = |buf: &mut Vec<u8>, pos: u64| -> Result<()> {
        if !buf.is_empty() {
            st.send_all(buf)
                .map_err(|e| e.with_offset(pos - buf.len() as u64))?;
            buf.clear();
        }
        Ok(())
    };
    while let Some(piece) = rx.blocking_recv() {
        match piece {
            Piece::Data(d) => {
                if buf.len() + d.len() > SEND_SIZE {
                    flush(&mut buf, pos)?;
                }
                pos += d.len() as u64;
                if d.len() >= SEND_SIZE {
                    st.send_all(&d)
                        .map_err(|e| e.with_offset(pos - d.len() as u64))?;
                } else {
                    buf.extend_from_slice(&d);
                }
            }
            Piece::Hole(n) => {
                flush(&mut buf, pos)?;
                st.send_hole(n).map_err(|e| e.with_offset(pos))?;
                pos += n;
            }
        }
    }
    flush(&mut buf, pos)
}

impl UploadSink {
    /// Starts a sparse upload into `vol` (of `pool`) from offset 0. Blocking.
    pub fn start(
        conn: &Connect,
        pool: virt::storage_pool::StoragePool,
        vol: StorageVol,
        location: String,
        replace: Option<std::path::PathBuf>,
    ) -> Result<UploadSink> {
        let st = SparseStream::new(conn)?;
        vol.upload(
            st.stream(),
            0,
            0,
            virt::sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM,
        )
        .op("volume.upload")?;
        let stream = Arc::new(st);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(SEND_DEPTH);
        let worker_stream = stream.clone();
        let worker = std::thread::Builder::new()
            .name("vrg-libvirt-upload".into())
            .spawn(move || upload_loop(&worker_stream, &mut rx));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                if let Ok(st) = Arc::try_unwrap(stream) {
                    let _ = st.abort();
                }
                let _ = vol.delete(0);
                return Err(Error::io(e, "cannot start the upload thread"));
            }
        };
        Ok(UploadSink {
            state: Some(UploadState {
                tx: Some(tx),
                worker: Some(worker),
                stream,
                vol: Arc::new(vol),
                pool,
            }),
            location,
            replace,
        })
    }

    async fn send(&mut self, piece: Piece) -> Result<()> {
        let state = self
            .state
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Io, "upload already finished"))?;
        let tx = state
            .tx
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "upload already finished"))?;
        if tx.send(piece).await.is_ok() {
            return Ok(());
        }
        // The upload thread stopped: it failed; its error says why.
        state.tx = None;
        let worker = state.worker.take();
        let r = blocking(move || join(worker)).await;
        Err(r.err().unwrap_or_else(|| {
            Error::new(ErrorKind::Provider, "the libvirt upload thread stopped")
        }))
    }
}

/// Waits for the upload thread and returns its result.
fn join(worker: Option<std::thread::JoinHandle<Result<()>>>) -> Result<()> {
    match worker {
        Some(w) => w.join().unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Provider,
                "the libvirt upload thread panicked",
            ))
        }),
        None => Ok(()),
    }
}

fn discard(state: UploadState) -> Result<()> {
    let UploadState {
        tx,
        worker,
        stream,
        vol,
        ..
    } = state;
    drop(tx);
    let _ = join(worker);
    if let Ok(st) = Arc::try_unwrap(stream) {
        let _ = st.abort();
    }
    vol.delete(0).op("volume.delete")
}

#[async_trait]
impl ByteSink for UploadSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.send(Piece::Data(data)).await
    }

    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.send(Piece::Hole(len)).await
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let state = self
            .state
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "upload already finished"))?;
        let location = self.location.clone();
        let replace = self.replace.take();
        blocking(move || {
            let UploadState {
                tx,
                worker,
                stream,
                vol,
                pool,
            } = state;
            drop(tx);
            if let Err(e) = join(worker) {
                if let Ok(st) = Arc::try_unwrap(stream) {
                    let _ = st.abort();
                }
                let _ = vol.delete(0);
                return Err(e.with_target(location));
            }
            let st = Arc::try_unwrap(stream)
                .map_err(|_| Error::new(ErrorKind::Io, "upload stream still in use"))?;
            if let Err(e) = st.finish() {
                let _ = vol.delete(0);
                return Err(e.with_target(location));
            }
            publish(&vol, &pool, replace, location)
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        match self.state.take() {
            Some(state) => blocking(move || discard(state)).await,
            None => Ok(()),
        }
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            // Dropped without commit: abort the stream and remove the volume off-thread.
            let _ = std::thread::Builder::new()
                .name("vrg-libvirt-upload-cleanup".into())
                .spawn(move || {
                    let _ = discard(state);
                });
        }
    }
}

/// The last step of a commit, once the volume's bytes are complete: an overwrite's new volume
/// takes the old one's file name in one rename (readers see the old disk or the new one, never
/// a partial one; on failure the new volume is deleted), then the pool is refreshed, so that
/// libvirt re-probes the file (a qcow2 written into a fresh volume becomes a qcow2 volume with
/// its virtual size). Blocking.
fn publish(
    vol: &StorageVol,
    pool: &virt::storage_pool::StoragePool,
    replace: Option<std::path::PathBuf>,
    location: String,
) -> Result<()> {
    if let Some(old) = replace {
        let tmp = vol.path().op("volume.path")?;
        if let Err(e) = std::fs::rename(&tmp, &old) {
            let _ = vol.delete(0);
            return Err(
                Error::io(e, format!("cannot replace {}", old.display())).with_target(location)
            );
        }
    }
    refresh_when_idle(pool)
}

/// Longest wait for the pool's other uploads before a refresh gives up.
const REFRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// Refreshes `pool` once no other upload into it runs: libvirt refuses to refresh a pool with
/// jobs in flight ("has asynchronous jobs running"), which is what several disks of one VM
/// imported in parallel into one pool are. Blocking.
fn refresh_when_idle(pool: &virt::storage_pool::StoragePool) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match pool.refresh(0) {
            Ok(_) => return Ok(()),
            Err(e)
                if e.message().contains("asynchronous jobs") && start.elapsed() < REFRESH_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(crate::error::from_virt(e, "pool.refresh")),
        }
    }
}

/// The volume's file, when this process can use it directly: a regular file at the volume's
/// path whose size is `expected` (what libvirt reports for it, so that a same-named file of
/// another host or mount namespace is not taken for it), and that this process may open for
/// reading, or for writing with `write` (a user in the libvirt group reaches libvirtd's
/// socket but often not the pool's root-owned files: streams then). Blocking.
pub fn local_file(vol: &StorageVol, expected: u64, write: bool) -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(vol.path().ok()?);
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open(&path)
        .ok()?;
    let meta = file.metadata().ok()?;
    (meta.is_file() && meta.len() == expected).then_some(path)
}

/// A volume written directly in its file on this host (see `LibvirtProvider::with_local_files`):
/// the bytes go from the pipeline to the disk with direct I/O, without libvirtd's stream (a
/// socket, a pipe and a copy into the page cache on its side). Abort, or a drop without commit,
/// deletes the volume; commit syncs the file, renames it over the volume it replaces
/// (overwrite) and refreshes the pool, as [`UploadSink`] does.
pub struct FileSink {
    inner: Option<Box<virtrigaud_core::io::LocalFileSink>>,
    vol: Option<StorageVol>,
    pool: Option<virt::storage_pool::StoragePool>,
    location: String,
    replace: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl FileSink {
    /// Writes `vol` (of `pool`) through its file `path`, truncated first. On error the volume
    /// is deleted.
    pub async fn start(
        pool: virt::storage_pool::StoragePool,
        vol: StorageVol,
        path: std::path::PathBuf,
        location: String,
        replace: Option<std::path::PathBuf>,
    ) -> Result<FileSink> {
        match virtrigaud_core::io::LocalFileSink::in_place(&path).await {
            Ok(inner) => Ok(FileSink {
                inner: Some(Box::new(inner)),
                vol: Some(vol),
                pool: Some(pool),
                location,
                replace,
            }),
            Err(e) => {
                let _ = blocking(move || vol.delete(0).op("volume.delete")).await;
                Err(e.with_target(location))
            }
        }
    }

    fn inner(&mut self) -> Result<&mut virtrigaud_core::io::LocalFileSink> {
        self.inner
            .as_deref_mut()
            .ok_or_else(|| Error::new(ErrorKind::Io, "upload already finished"))
    }

    /// Deletes the volume (abort, or a failed commit).
    async fn delete_volume(&mut self) -> Result<()> {
        match self.vol.take() {
            Some(vol) => blocking(move || vol.delete(0).op("volume.delete")).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ByteSink for FileSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.inner()?.write(data).await
    }

    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        self.inner()?.write_zeros(len).await
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let inner = self
            .inner
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "upload already finished"))?;
        let location = self.location.clone();
        if let Err(e) = inner.commit().await {
            let _ = self.delete_volume().await;
            return Err(e.with_target(location));
        }
        let vol = self.vol.take();
        let pool = self.pool.take();
        let replace = self.replace.take();
        blocking(move || match (vol, pool) {
            (Some(vol), Some(pool)) => publish(&vol, &pool, replace, location),
            _ => Err(Error::new(ErrorKind::Io, "upload already finished")),
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        if let Some(inner) = self.inner.take() {
            let _ = inner.abort().await;
        }
        self.delete_volume().await
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Some(vol) = self.vol.take() {
            // Dropped without commit: remove the volume off-thread.
            self.inner.take();
            let _ = std::thread::Builder::new()
                .name("vrg-libvirt-file-cleanup".into())
                .spawn(move || {
                    let _ = vol.delete(0);
                });
        }
    }
}

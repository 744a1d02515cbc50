//! Byte-level I/O: random-access sources ([`ReadAt`]), native image sources ([`ImageSource`]) and
//! sequential sinks ([`ByteSink`]), plus their local-file implementations.
//!
//! A sink is written strictly in order and becomes visible only on [`ByteSink::commit`];
//! [`ByteSink::abort`] (or dropping it) leaves nothing behind.

use crate::extent::{Extent, ExtentStream};
use crate::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A stream of bytes (e.g. an object GET).
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// A source that allows reads at any offset (local file, ranged GET, datastore HTTP).
#[async_trait]
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads up to `len` bytes at `offset`. Returns fewer only at the end of the source.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes>;
    /// Ranges that hold data, when the source can tell cheaply (`SEEK_DATA`/`SEEK_HOLE`);
    /// `None` when unknown.
    async fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        Ok(None)
    }
    /// Reads exactly `len` bytes at `offset`, or fails with `Corrupt` (truncated source).
    async fn read_exact_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let b = self.read_at(offset, len).await?;
        if b.len() != len {
            return Err(Error::corrupt(format!(
                "truncated: wanted {len} bytes at {offset}, source has {}",
                self.size()
            ))
            .with_offset(offset));
        }
        Ok(b)
    }
}

/// The native bytes of a disk image, as a provider or storage hands them out.
pub enum ImageSource {
    /// Ranged reads are possible.
    RandomAccess(Arc<dyn ReadAt>),
    /// One pass, in order (an export stream, a sparse volume stream). Items are extents of the
    /// *image file*: `Zero` marks a hole in the file.
    Sequential {
        /// Total size of the image file, when known.
        size: Option<u64>,
        /// The bytes.
        stream: ExtentStream,
    },
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::RandomAccess(r) => write!(f, "RandomAccess(size={})", r.size()),
            ImageSource::Sequential { size, .. } => write!(f, "Sequential(size={size:?})"),
        }
    }
}

impl ImageSource {
    /// A sequential source from a plain byte stream (no holes known).
    pub fn from_byte_stream(size: Option<u64>, stream: ByteStream) -> Self {
        let mut pos = 0u64;
        let stream = stream
            .map(move |b| {
                let bytes = b?;
                let e = Extent::Data { offset: pos, bytes };
                pos += e.len();
                Ok(e)
            })
            .boxed();
        ImageSource::Sequential { size, stream }
    }
}

/// A sequential writer: a stored object, a target disk, a file.
#[async_trait]
pub trait ByteSink: Send {
    /// Appends bytes.
    async fn write(&mut self, data: Bytes) -> Result<()>;
    /// Appends `len` zero bytes. Sparse sinks (files, sparse streams) skip them cheaply.
    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            self.write(Bytes::from_static(&ZEROS[..n])).await?;
            left -= n as u64;
        }
        Ok(())
    }
    /// Makes the written bytes visible under their final name. Nothing is visible before.
    async fn commit(self: Box<Self>) -> Result<()>;
    /// Discards everything written; leaves nothing behind.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// 1 MiB of zeros, for writing zero runs to sinks that cannot skip them.
pub static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

/// A local file opened for random-access reads, with `SEEK_DATA`/`SEEK_HOLE` hole detection.
#[derive(Debug)]
pub struct LocalFile {
    file: Arc<std::fs::File>,
    size: u64,
    path: PathBuf,
    /// The same file opened with `O_DIRECT` ([`LocalFile::open_direct`]).
    direct: Option<Arc<std::fs::File>>,
}

impl LocalFile {
    /// Opens `path` read-only.
    pub async fn open(path: impl AsRef<Path>) -> Result<LocalFile> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let (file, size) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let f = std::fs::File::open(&p)?;
            let m = f.metadata()?;
            if m.is_dir() {
                return Err(std::io::Error::other("is a directory"));
            }
            Ok((f, m.len()))
        })
        .await
        .map_err(join_err)?
        .map_err(|e| Error::io(e, "cannot open file").with_target(path.display().to_string()))?;
        Ok(LocalFile {
            file: Arc::new(file),
            size,
            path,
            direct: None,
        })
    }

    /// Opens `path` read-only, reading with direct I/O (`O_DIRECT`, Linux) where a read allows
    /// it: page-aligned offsets into the pooled, page-aligned buffers, which is what the
    /// decoders' data reads are; metadata and odd pieces use the ordinary descriptor.
    ///
    /// For a file that is probably not in the page cache and will not be read again soon (a
    /// disk just written with direct I/O, read back once to prove it): the bytes go from the
    /// disk to the buffer without a copy through the page cache, and reading a disk does not
    /// fill the host's memory with it. Where the file system refuses `O_DIRECT` this is
    /// [`LocalFile::open`].
    pub async fn open_direct(path: impl AsRef<Path>) -> Result<LocalFile> {
        let mut f = Self::open(path).await?;
        let p = f.path.clone();
        let plain = f.file.clone();
        f.direct = tokio::task::spawn_blocking(move || open_direct_read(&p, &plain))
            .await
            .map_err(join_err)?
            .map(Arc::new);
        Ok(f)
    }

    /// Whether reads may go around the page cache ([`LocalFile::open_direct`] on a file system
    /// that allows it).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Io, format!("worker task failed: {e}"))
}

/// Reads up to `len` bytes at `offset` of `file` into a pooled buffer (fewer only at the end of
/// the file). With `direct` (the same file opened by [`open_direct_read`]) a read at a
/// page-aligned offset goes around the page cache: whole pages into a page-aligned buffer;
/// other reads, and any the file system refuses, use `file`. A range whose pages are all in
/// the page cache already ([`page_cache_residency`]: an object that was just written through
/// it, a file just created) is read from there, a copy from memory instead of a disk read.
/// Blocking.
pub fn read_file_at(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    offset: u64,
    len: usize,
) -> std::io::Result<Bytes> {
    if let Some(d) = direct.filter(|_| offset.is_multiple_of(BUFFER_ALIGN as u64))
        && page_cache_residency(file, offset, len as u64).is_none_or(|(c, n)| c < n)
    {
        #[cfg(test)]
        DIRECT_READS.with(|n| n.set(n.get() + 1));
        // The last page may end past the file: the read is then short.
        let whole = len.next_multiple_of(BUFFER_ALIGN);
        let mut buf = ReadBuf::new(whole);
        if buf.is_aligned() {
            match read_full_at(d, buf.as_mut(), offset) {
                Ok(done) => return Ok(buf.freeze(done.min(len))),
                // Not for this read after all (the file system's own alignment rules).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let mut buf = ReadBuf::new(len);
    let done = read_full_at(file, buf.as_mut(), offset)?;
    Ok(buf.freeze(done))
}

#[cfg(test)]
thread_local! {
    /// Reads [`read_file_at`] sent around the page cache on this thread.
    static DIRECT_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many of the pages that hold the `len` bytes at `offset` of `file` are in the page
/// cache, and how many pages that is: `(cached, pages)`. From `cachestat(2)` (Linux 6.5 and
/// later), which looks at the cache only: it starts no read and changes nothing. `None` where
/// the kernel cannot tell (older kernels, file systems without a page cache, other systems).
pub fn page_cache_residency(file: &std::fs::File, offset: u64, len: u64) -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        /// `cachestat`'s number, the same on these architectures (the unified table).
        const SYS_CACHESTAT: libc::c_long = 451;
        const UNIFIED_TABLE: bool = cfg!(any(
            target_arch = "x86_64",
            target_arch = "x86",
            target_arch = "aarch64",
            target_arch = "arm",
            target_arch = "riscv64",
            target_arch = "powerpc64",
            target_arch = "s390x",
            target_arch = "loongarch64"
        ));
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct CacheStat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        if !UNIFIED_TABLE {
            return None;
        }
        if len == 0 {
            return Some((0, 0));
        }
        // SAFETY: sysconf only reads a system constant.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| *p > 0)?;
        let pages = offset.checked_add(len)?.div_ceil(page) - offset / page;
        let range = Range { off: offset, len };
        let mut st = CacheStat::default();
        // SAFETY: cachestat reads `range` and fills `st`, both valid for the call and laid
        // out as the kernel's `struct cachestat_range` and `struct cachestat`; the descriptor
        // is ours and open.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut CacheStat,
                0u32,
            )
        };
        (rc == 0).then_some((st.nr_cache.min(pages), pages))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        None
    }
}

/// Reads into all of `buf` from `offset`, short only at the end of the file.
fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Opens `path`, already open as `plain`, once more for reading with `O_DIRECT` (Linux), for
/// [`read_file_at`]. `None` where the file system refuses it, on tmpfs (the page cache itself,
/// where it only adds work), or when the name no longer leads to `plain`'s file.
pub fn open_direct_read(path: &Path, plain: &std::fs::File) -> Option<std::fs::File> {
    open_o_direct(path, false).filter(|d| same_file(plain, d) && fs_type(d) != Some(TMPFS_MAGIC))
}

/// Opens `path` with `O_DIRECT` (Linux) for reading, or for writing with `write`; `None`
/// where the file system refuses it.
fn open_o_direct(path: &Path, write: bool) -> Option<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (path, write);
        None
    }
}

#[async_trait]
impl ReadAt for LocalFile {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let len = len.min(self.size.saturating_sub(offset) as usize);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let file = self.file.clone();
        let direct = self.direct.clone();
        tokio::task::spawn_blocking(move || read_file_at(&file, direct.as_deref(), offset, len))
            .await
            .map_err(join_err)?
            .map_err(|e| {
                Error::io(e, "read failed")
                    .with_target(self.path.display().to_string())
                    .with_offset(offset)
            })
    }

    async fn data_ranges(&self) -> Result<Option<Vec<Range<u64>>>> {
        let file = self.file.clone();
        let size = self.size;
        tokio::task::spawn_blocking(move || seek_data_ranges(&file, size))
            .await
            .map_err(join_err)
    }
}

/// Data ranges of a file by `SEEK_DATA`/`SEEK_HOLE`; `None` if the file system cannot tell.
fn seek_data_ranges(file: &std::fs::File, size: u64) -> Option<Vec<Range<u64>>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: i64 = 0;
    let size = i64::try_from(size).ok()?;
    while pos < size {
        // SAFETY: lseek on a valid, owned descriptor; it only moves a file offset that no other
        // code of ours relies on (all reads are positional).
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return None;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let end = hole.min(size);
        if end > data {
            ranges.push(data as u64..end as u64);
        }
        pos = hole;
    }
    Some(ranges)
}

/// Permission bits of the files virtrigaud creates: read and write for the owner only. Disk
/// images hold whole file systems (keys, password hashes, databases), so nothing is
/// world-readable unless asked for.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// How a [`LocalFileSink`] creates its file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileCreateOptions {
    /// Replace an existing file (default: refuse with `AlreadyExists`).
    pub overwrite: bool,
    /// Permission bits of the new file (default [`DEFAULT_FILE_MODE`], 0600), given to the
    /// temporary file at creation, so the data is never readable by others, not even while
    /// it is written. The process umask is not applied: the file gets exactly these bits.
    pub mode: u32,
    /// Before creating its temporary file, remove the temporary files that interrupted puts
    /// left in the same directory and that were not modified for this long (default
    /// [`DEFAULT_TEMP_MAX_AGE`](crate::temp::DEFAULT_TEMP_MAX_AGE), 24 h; `None`: never). See
    /// [`temp`](crate::temp) for what is removed.
    pub sweep_temp_after: Option<std::time::Duration>,
    /// Write large aligned pieces around the page cache (`O_DIRECT`, where the file system
    /// takes it; default `true`): right for a disk that is written once and read back only to
    /// prove it, which then comes from the disk itself. `false` writes through the page
    /// cache (the disk writeback of each large write still starts at once, and commit still
    /// fsyncs): right for a file read again soon, such as a staged object that the import of
    /// the same migration reads, which [`read_file_at`] then takes from memory.
    pub direct_writes: bool,
}

impl Default for FileCreateOptions {
    fn default() -> Self {
        FileCreateOptions {
            overwrite: false,
            mode: DEFAULT_FILE_MODE,
            sweep_temp_after: Some(crate::temp::DEFAULT_TEMP_MAX_AGE),
            direct_writes: true,
        }
    }
}

impl FileCreateOptions {
    /// Sets [`overwrite`](Self::overwrite).
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
    /// Sets [`mode`](Self::mode) (permission bits, e.g. `0o640`).
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    /// Sets [`sweep_temp_after`](Self::sweep_temp_after).
    pub fn sweep_temp_after(mut self, max_age: Option<std::time::Duration>) -> Self {
        self.sweep_temp_after = max_age;
        self
    }
    /// Sets [`direct_writes`](Self::direct_writes).
    pub fn direct_writes(mut self, direct: bool) -> Self {
        self.direct_writes = direct;
        self
    }
}

/// A sink that writes a local file under a temporary name, then fsyncs and renames it on
/// commit. Zero runs become holes. The temp file is removed on abort or drop; those a killed
/// process left are removed by the sweep of the next sink created in the same directory
/// ([`FileCreateOptions::sweep_temp_after`]). The file is created with mode 0600 unless asked
/// otherwise ([`FileCreateOptions::mode`]).
#[derive(Debug)]
pub struct LocalFileSink {
    file: Option<Arc<std::fs::File>>,
    tmp: PathBuf,
    dest: PathBuf,
    pos: u64,
    overwrite: bool,
    committed: bool,
    /// The writer worker's queue. Writes run one after the other on a blocking worker of their
    /// own (concurrent writes to one file only contend for its inode lock), so `write` returns
    /// as soon as the data is queued and the caller goes on hashing or reading.
    queue: Option<tokio::sync::mpsc::Sender<(u64, Bytes)>>,
    worker: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// The same file opened with `O_DIRECT`, when the file system allows it.
    direct: Option<std::fs::File>,
    /// A write failed: every later write and the commit fail too (only abort is left).
    failed: bool,
    /// Writing an existing file in place ([`LocalFileSink::in_place`]): no temp file, no
    /// rename, and nothing removed on abort.
    in_place: bool,
}

/// Writes a [`LocalFileSink`] queues behind the one in progress.
const FILE_WRITES_QUEUED: usize = 4;
/// Writes at least this large start the disk writeback of their range at once.
const WRITEBACK_MIN: u64 = 1 << 20;

#[cfg(test)]
static DIRECT_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes at least this large go straight to the disk when they are aligned.
const DIRECT_MIN: usize = 64 << 10;

/// Opens `path` for writing with `O_DIRECT` (Linux), `None` where the file system refuses.
///
/// Large aligned writes (the pooled read buffers are page-aligned, so a raw or decoded disk's
/// data arrives aligned) then skip the page cache: no copy into it, no writeback work later,
/// and a disk migration does not evict everything else cached on the host. Unaligned pieces
/// (image metadata, odd tails) use the ordinary descriptor; the two never touch the same page,
/// and the fsync on commit covers both.
fn open_direct(path: &Path) -> Option<std::fs::File> {
    open_o_direct(path, true)
}

/// The file system type (`statfs.f_type`) of `file`, on Linux.
fn fs_type(file: &std::fs::File) -> Option<i64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: statfs is plain old data; fstatfs fills it for a descriptor we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a valid pointer to a statfs.
        let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        (rc == 0).then_some(st.f_type as i64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683E;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether growing `file` with `set_len` stays sparse and cheap: ext4, xfs or btrfs.
fn sparse_extension_is_cheap(file: &std::fs::File) -> bool {
    fs_type(file).is_some_and(|t| [EXT4_MAGIC, XFS_MAGIC, BTRFS_MAGIC].contains(&t))
}

/// Whether two descriptors refer to the same file (the direct descriptor is opened by name,
/// and the name could have been replaced in between).
fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Whether a write can use the direct descriptor: offset, length and memory page-aligned.
fn direct_ok(pos: u64, data: &[u8]) -> bool {
    let a = BUFFER_ALIGN;
    data.len() >= DIRECT_MIN
        && pos.is_multiple_of(a as u64)
        && data.len().is_multiple_of(a)
        && (data.as_ptr() as usize).is_multiple_of(a)
}

/// Asks the kernel to start writing `len` bytes at `pos` to the disk now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while the pipeline hashes the
/// next chunks, dirty pages do not pile up, and the fsync on commit only waits for the tail.
/// Best effort: an error here changes nothing, the fsync on commit is what guarantees
/// durability.
fn start_writeback(file: &std::fs::File, pos: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(pos), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on a file descriptor we own; no memory is passed.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, pos, len);
}

impl LocalFileSink {
    /// Creates the temp file next to `dest`, mode 0600. Fails with `AlreadyExists` if `dest`
    /// exists and `overwrite` is false (checked again at commit, atomically).
    pub async fn create(dest: impl AsRef<Path>, overwrite: bool) -> Result<LocalFileSink> {
        Self::create_with(dest, &FileCreateOptions::default().overwrite(overwrite)).await
    }

    /// Creates the temp file next to `dest`, as `opts` say (see [`LocalFileSink::create`]).
    pub async fn create_with(
        dest: impl AsRef<Path>,
        opts: &FileCreateOptions,
    ) -> Result<LocalFileSink> {
        let overwrite = opts.overwrite;
        let mode = opts.mode & 0o7777;
        let sweep = opts.sweep_temp_after;
        let direct_writes = opts.direct_writes;
        let dest = dest.as_ref().to_path_buf();
        let target = dest.display().to_string();
        let d = dest.clone();
        let (file, tmp) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            if !overwrite && d.symlink_metadata().is_ok() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            let dir = d
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            if let Some(max_age) = sweep {
                crate::temp::sweep_dir(dir, max_age);
            }
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = dir.join(crate::temp::temp_name(&name));
            let f = {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o600)
                    .open(&tmp)?;
                // Created with at most owner read/write (never more open than asked, whatever
                // the umask); then exactly the bits asked for, umask or not.
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                f
            };
            // Not on tmpfs: it is the page cache itself, direct writes only add work there
            // (measured: slower and erratic).
            let direct = if direct_writes {
                open_direct(&tmp).filter(|d| same_file(&f, d) && fs_type(&f) != Some(TMPFS_MAGIC))
            } else {
                None
            };
            Ok(((f, direct), tmp))
        })
        .await
        .map_err(join_err)?
        .map_err(|e| {
            let kind = e.kind();
            let msg = if kind == std::io::ErrorKind::AlreadyExists {
                "target already exists (overwrite not requested)"
            } else {
                "cannot create target"
            };
            Error::io(e, msg).with_target(target)
        })?;
        let (file, direct) = file;
        Ok(LocalFileSink {
            file: Some(Arc::new(file)),
            direct,
            tmp,
            dest,
            pos: 0,
            overwrite,
            committed: false,
            queue: None,
            worker: None,
            failed: false,
            in_place: false,
        })
    }

    /// Writes the existing file `path` in place, from offset 0: it is truncated to nothing
    /// first, and commit sets its final size and syncs it. Nothing is renamed and abort (or
    /// drop) leaves the file as it is, partly written: this is for a file that somebody else
    /// created and removes on failure (a libvirt volume, whose owner, mode and labels it
    /// keeps). Large aligned writes go around the page cache, as with
    /// [`LocalFileSink::create`].
    pub async fn in_place(path: impl AsRef<Path>) -> Result<LocalFileSink> {
        let dest = path.as_ref().to_path_buf();
        let target = dest.display().to_string();
        let d = dest.clone();
        let (file, direct) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let f = std::fs::OpenOptions::new().write(true).open(&d)?;
            if !f.metadata()?.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            f.set_len(0)?;
            let direct =
                open_direct(&d).filter(|x| same_file(&f, x) && fs_type(&f) != Some(TMPFS_MAGIC));
            Ok((f, direct))
        })
        .await
        .map_err(join_err)?
        .map_err(|e| Error::io(e, "cannot open the file for writing").with_target(target))?;
        Ok(LocalFileSink {
            file: Some(Arc::new(file)),
            direct,
            tmp: dest.clone(),
            dest,
            pos: 0,
            overwrite: true,
            committed: false,
            queue: None,
            worker: None,
            failed: false,
            in_place: true,
        })
    }

    fn file(&self) -> Result<&Arc<std::fs::File>> {
        self.file
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "sink already closed"))
    }

    /// Tells the sink how large the file will probably be. The temp file is extended to that
    /// size at once, so the writes that follow land inside the file instead of growing it one
    /// by one (growing a file with direct writes costs the file system a journal update each
    /// time). Commit sets the exact size whatever the hint was. Call it before the first write.
    /// Only applied on file systems known to keep the extension sparse (ext4, xfs, btrfs; on
    /// tmpfs it made the writes slower, measured), and only a hint: a failure is logged, not
    /// returned.
    pub async fn set_size_hint(&mut self, size: u64) {
        if self.queue.is_some() || self.pos > 0 {
            return;
        }
        let Ok(file) = self.file().cloned() else {
            return;
        };
        let res = tokio::task::spawn_blocking(move || {
            if sparse_extension_is_cheap(&file) {
                file.set_len(size)
            } else {
                Ok(())
            }
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::debug!(error = %e, "size hint not applied");
        }
    }

    /// Stops the writer worker after the queued writes and reports its error, if any.
    async fn finish_writes(&mut self) -> Result<()> {
        self.queue.take();
        if let Some(h) = self.worker.take() {
            let res = h.await.map_err(join_err).and_then(|r| {
                r.map_err(|e| {
                    Error::io(e, "write failed").with_target(self.dest.display().to_string())
                })
            });
            if res.is_err() {
                self.failed = true;
            }
            res?;
        }
        self.check_failed()
    }

    /// The error of a sink whose earlier write failed.
    fn check_failed(&self) -> Result<()> {
        if self.failed {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier write failed; the file is incomplete and can only be aborted",
            )
            .with_target(self.dest.display().to_string()));
        }
        Ok(())
    }
}

pub use crate::temp::unique_suffix;

#[async_trait]
impl ByteSink for LocalFileSink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.check_failed()?;
        if self.queue.is_none() {
            let file = self.file()?.clone();
            let mut direct = self.direct.take();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(FILE_WRITES_QUEUED);
            self.worker = Some(tokio::task::spawn_blocking(move || {
                while let Some((pos, data)) = rx.blocking_recv() {
                    if let Some(d) = direct.as_ref().filter(|_| direct_ok(pos, &data)) {
                        match d.write_all_at(&data, pos) {
                            Ok(()) => {
                                #[cfg(test)]
                                DIRECT_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            }
                            // Not for this file after all: buffered writes from now on.
                            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                            Err(e) => return Err(e),
                        }
                    }
                    file.write_all_at(&data, pos)?;
                    let n = data.len() as u64;
                    if n >= WRITEBACK_MIN {
                        start_writeback(&file, pos, n);
                    }
                }
                Ok(())
            }));
            self.queue = Some(tx);
        }
        let n = data.len() as u64;
        let sent = match &self.queue {
            Some(q) => q.send((self.pos, data)).await.is_ok(),
            None => false,
        };
        if !sent {
            // The worker stopped: it failed; report why.
            self.failed = true;
            self.finish_writes().await?;
            return Err(Error::new(ErrorKind::Io, "file writer stopped")
                .with_target(self.dest.display().to_string()));
        }
        self.pos += n;
        Ok(())
    }

    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        self.check_failed()?;
        self.pos = self
            .pos
            .checked_add(len)
            .ok_or_else(|| Error::invalid("file size overflow"))?;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        self.finish_writes().await?;
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "sink closed"))?;
        let (tmp, dest, size, overwrite) = (
            self.tmp.clone(),
            self.dest.clone(),
            self.pos,
            self.overwrite,
        );
        let in_place = self.in_place;
        let target = dest.display().to_string();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.set_len(size)?;
            file.sync_all()?;
            drop(file);
            if in_place {
                return Ok(());
            }
            if overwrite {
                std::fs::rename(&tmp, &dest)?;
            } else {
                // hard_link fails if dest exists: an atomic no-overwrite rename.
                std::fs::hard_link(&tmp, &dest)?;
                std::fs::remove_file(&tmp)?;
            }
            if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty())
                && let Ok(d) = std::fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(())
        })
        .await
        .map_err(join_err)?
        .map_err(|e| Error::io(e, "commit failed").with_target(target))?;
        self.committed = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        let _ = self.finish_writes().await;
        self.file.take();
        let tmp = self.tmp.clone();
        self.committed = true; // nothing left for Drop to do
        if self.in_place {
            return Ok(());
        }
        match tokio::fs::remove_file(&tmp).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(e, "cannot remove temp file")),
        }
    }
}

impl Drop for LocalFileSink {
    fn drop(&mut self) {
        if !self.committed && !self.in_place {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A sink that keeps everything in memory (tests, small manifests).
#[derive(Debug, Default)]
pub struct MemorySink {
    buf: Vec<u8>,
    out: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl MemorySink {
    /// A new sink and the slot that receives the bytes on commit.
    pub fn new() -> (MemorySink, Arc<std::sync::Mutex<Option<Vec<u8>>>>) {
        let s = MemorySink::default();
        let out = s.out.clone();
        (s, out)
    }
}

#[async_trait]
impl ByteSink for MemorySink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&data);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        let mut slot = self
            .out
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "poisoned"))?;
        *slot = Some(self.buf);
        Ok(())
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Makes glibc return freed multi-MiB transfer buffers to the system at once.
///
/// glibc raises its mmap threshold dynamically after large buffers are freed, so the next ones
/// come from heap arenas that keep their pages: a transfer's peak RSS then creeps to several
/// times its working set (measured: 191 MiB instead of 64 MiB for an S3 export). Call this once
/// at program start in applications that move disks; it fixes the threshold at 1 MiB. It is a
/// process-wide allocator setting, so the library never does it on its own. No-op elsewhere.
pub fn limit_allocator_retention() {
    // Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default: the heap
    // then shrank and grew again around every few messages of the libvirt client (its buffers
    // are a few hundred KiB), and page faults took a quarter of a whole migration's CPU time.
    // Free memory up to this much stays mapped at the top of each heap.
    const TRIM_THRESHOLD: i32 = 4 << 20;
    // Each heap keeps up to that much; a transfer's threads (runtime workers, blocking
    // threads, libvirt's) would otherwise get up to 8 heaps per core.
    const ARENA_MAX: i32 = 4;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tuning parameter; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Largest buffer [`ReadBuf`] recycles (the default read size of the decoders).
pub const POOL_BUFFER: usize = 4 << 20;
/// The buffer sizes recycled: 1, 2 and 4 MiB.
const POOL_CLASSES: [usize; 3] = [1 << 20, 2 << 20, POOL_BUFFER];
/// Free buffers kept per size class (bounds what the pool holds while idle: 8 × 7 MiB).
const POOL_KEEP: usize = 8;
/// Reads shorter than this use a plain allocation.
const POOL_MIN: usize = 512 << 10;

static POOL: [std::sync::Mutex<Vec<AlignedBuf>>; 3] = [
    std::sync::Mutex::new(Vec::new()),
    std::sync::Mutex::new(Vec::new()),
    std::sync::Mutex::new(Vec::new()),
];

/// A read buffer that returns to a small process-wide pool when the last [`Bytes`] made from
/// it is dropped.
///
/// Transfers read the same few MiB-sized buffers over and over; a fresh allocation each time
/// costs page faults and the kernel's zeroing of every page, about as much CPU as the copy
/// itself. Recycled buffers are already mapped. The pool keeps at most 8 free buffers of 1 MiB
/// and 2 MiB and 4 MiB ([`POOL_BUFFER`]) each; a read gets the smallest class that holds it
/// (so at most twice its size); reads larger than 4 MiB or smaller than 512 KiB use plain
/// allocations. A recycled buffer holds old bytes: only the part filled by the caller is ever
/// exposed, through [`ReadBuf::freeze`].
///
/// ```
/// use virtrigaud_core::io::ReadBuf;
/// let mut buf = ReadBuf::new(4 << 20);
/// buf.as_mut()[..5].copy_from_slice(b"hello");
/// let bytes = buf.freeze(5);
/// assert_eq!(&bytes[..], b"hello");
/// ```
pub struct ReadBuf {
    store: Store,
    len: usize,
}

enum Store {
    /// A pooled, page-aligned buffer (its capacity is one of the pool classes).
    Pooled(AlignedBuf),
    Plain(Vec<u8>),
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuf")
            .field("len", &self.len)
            .field("pooled", &matches!(self.store, Store::Pooled(_)))
            .finish()
    }
}

impl ReadBuf {
    /// A buffer of `len` bytes to be filled (its initial content is unspecified). Buffers of
    /// 512 KiB to 4 MiB are page-aligned, so a file sink can write them with direct I/O.
    pub fn new(len: usize) -> ReadBuf {
        // A class at most twice the request: a 257 KiB read does not pin 1 MiB.
        let class = POOL_CLASSES.iter().position(|&c| len <= c && len > c / 2);
        if let (true, Some(class)) = (len >= POOL_MIN, class) {
            let recycled = POOL[class].lock().ok().and_then(|mut p| p.pop());
            if let Some(buf) = recycled.or_else(|| AlignedBuf::new(POOL_CLASSES[class])) {
                return ReadBuf {
                    store: Store::Pooled(buf),
                    len,
                };
            }
        }
        ReadBuf {
            store: Store::Plain(vec![0u8; len]),
            len,
        }
    }

    /// Whether the buffer starts on a page ([`BUFFER_ALIGN`]), as direct I/O needs.
    pub fn is_aligned(&self) -> bool {
        match &self.store {
            Store::Pooled(_) => true,
            Store::Plain(v) => (v.as_ptr() as usize).is_multiple_of(BUFFER_ALIGN),
        }
    }

    /// The first `filled` bytes (at most the length asked for) as [`Bytes`]; the buffer goes
    /// back to the pool when the last clone or slice of them is dropped.
    pub fn freeze(mut self, filled: usize) -> Bytes {
        self.len = filled.min(self.len);
        match &mut self.store {
            Store::Pooled(_) => Bytes::from_owner(self),
            Store::Plain(v) => {
                let mut v = std::mem::take(v);
                v.truncate(self.len);
                Bytes::from(v)
            }
        }
    }
}

impl AsMut<[u8]> for ReadBuf {
    /// The `len` bytes to fill.
    fn as_mut(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Pooled(b) => &mut b.as_mut_slice()[..self.len],
            Store::Plain(v) => &mut v[..self.len],
        }
    }
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.store {
            Store::Pooled(b) => &b.as_slice()[..self.len],
            Store::Plain(v) => &v[..self.len],
        }
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        let placeholder = Store::Plain(Vec::new());
        if let Store::Pooled(buf) = std::mem::replace(&mut self.store, placeholder)
            && let Some(class) = POOL_CLASSES.iter().position(|&c| buf.cap == c)
            && let Ok(mut p) = POOL[class].lock()
            && p.len() < POOL_KEEP
        {
            p.push(buf);
        }
    }
}

/// Alignment of pooled buffers: the page size, which direct I/O needs.
pub const BUFFER_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`BUFFER_ALIGN`] (a `Vec<u8>` cannot promise an
/// alignment, and direct I/O needs one).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>; shared access is read-only.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(cap, BUFFER_ALIGN).ok()
    }

    /// `None` if `cap` is 0 or too large for a layout.
    fn new(cap: usize) -> Option<AlignedBuf> {
        let layout = Self::layout(cap).filter(|_| cap > 0)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        match std::ptr::NonNull::new(raw) {
            Some(ptr) => Some(AlignedBuf { ptr, cap }),
            None => std::alloc::handle_alloc_error(layout),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `cap` initialised bytes (zeroed at allocation) owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.cap) {
            // SAFETY: allocated in `new` with this very layout, and freed only here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp dir (on tmpfs, direct I/O is off and the buffered path is what these test).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Writes `path` to the disk and drops its pages from the page cache (best effort:
    /// `POSIX_FADV_DONTNEED` after an fsync).
    fn evict(path: &Path) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: an advice on a descriptor we own; no memory is passed.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    #[test]
    fn page_cache_residency_counts_the_pages_a_range_touches() {
        let dir = disk_dir();
        let path = dir.path().join("f");
        let page = 4096u64;
        std::fs::write(&path, crate::testdata::noise(3, 16 * page as usize)).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let Some((cached, pages)) = page_cache_residency(&f, 0, 16 * page) else {
            eprintln!("SKIP page-cache residency: the kernel has no cachestat");
            return;
        };
        // Just written through the page cache: all there.
        assert_eq!((cached, pages), (16, 16));
        // A range that starts and ends inside pages touches both.
        assert_eq!(page_cache_residency(&f, 100, page), Some((2, 2)));
        assert_eq!(page_cache_residency(&f, 3 * page, 1), Some((1, 1)));
        assert_eq!(page_cache_residency(&f, 0, 0), Some((0, 0)));
        evict(&path);
        let (cached, pages) = page_cache_residency(&f, 0, 16 * page).unwrap();
        assert_eq!(pages, 16);
        assert!(
            cached < pages,
            "{cached} of {pages} pages still cached after eviction"
        );
    }

    /// A range the page cache holds is copied from it; one it does not hold is read around it,
    /// and both give the file's bytes.
    #[test]
    fn reads_take_cached_ranges_from_the_page_cache_and_the_rest_around_it() {
        let dir = disk_dir();
        let path = dir.path().join("f");
        let data = crate::testdata::noise(11, 4 << 20);
        std::fs::write(&path, &data).unwrap();
        let plain = std::fs::File::open(&path).unwrap();
        let direct = open_direct_read(&path, &plain);
        let cachestat = page_cache_residency(&plain, 0, 1);
        let (Some(direct), Some(_)) = (direct, cachestat) else {
            eprintln!("SKIP cached reads: no O_DIRECT here (tmpfs?) or no cachestat");
            return;
        };
        let directs = || DIRECT_READS.with(|n| n.get());
        let before = directs();
        let got = read_file_at(&plain, Some(&direct), 1 << 20, 1 << 20).unwrap();
        assert!(got[..] == data[1 << 20..2 << 20], "cached read differs");
        assert_eq!(
            directs(),
            before,
            "a cached range was read around the cache"
        );
        evict(&path);
        let got = read_file_at(&plain, Some(&direct), 2 << 20, 1 << 20).unwrap();
        assert!(got[..] == data[2 << 20..3 << 20], "direct read differs");
        assert_eq!(
            directs(),
            before + 1,
            "an evicted range was read through the cache"
        );
    }

    #[tokio::test]
    async fn direct_reads_return_the_same_bytes_as_buffered_ones() {
        let dir = disk_dir();
        let path = dir.path().join("f");
        // Not a whole number of pages, so the last page is short.
        let len = (3 << 20) + 1234;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        // Out of the page cache, or the reads below would be taken from it.
        evict(&path);
        let plain = LocalFile::open(&path).await.unwrap();
        let direct = LocalFile::open_direct(&path).await.unwrap();
        eprintln!("direct reads in effect: {}", direct.is_direct());
        let reads = [
            (0u64, 1usize << 20),      // aligned, pooled: the direct path
            (4096, 2 << 20),           // aligned
            (3 << 20, 1 << 20),        // aligned, runs past the end
            (100, 1 << 20),            // unaligned offset: buffered
            (0, 512),                  // small: not page-aligned memory
            (len as u64 - 10, 4096),   // the tail
            (len as u64 + 4096, 4096), // past the end
        ];
        // The direct ones first: a buffered read would bring its range into the cache.
        let mut got = Vec::new();
        for (off, n) in reads {
            got.push(direct.read_at(off, n).await.unwrap());
        }
        for ((off, n), b) in reads.into_iter().zip(got) {
            let a = plain.read_at(off, n).await.unwrap();
            let end = (off as usize + n).min(len).max(off as usize).min(len);
            let want = &data[(off as usize).min(len)..end];
            assert_eq!(&a[..], want, "buffered {off}+{n}");
            assert_eq!(&b[..], want, "direct {off}+{n}");
        }
    }

    #[tokio::test]
    async fn in_place_sink_writes_the_same_file_and_leaves_it_on_abort() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = disk_dir();
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![9u8; 3 << 20]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        let mut sink = LocalFileSink::in_place(&path).await.unwrap();
        let mut block = ReadBuf::new(1 << 20);
        block.as_mut().fill(5);
        sink.write(block.freeze(1 << 20)).await.unwrap();
        sink.write_zeros(1 << 20).await.unwrap();
        sink.write(Bytes::from_static(b"tail")).await.unwrap();
        Box::new(sink).commit().await.unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), (2 << 20) + 4);
        assert!(got[..1 << 20].iter().all(|&b| b == 5));
        // The old nines are gone: the file was truncated first.
        assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert_eq!(&got[2 << 20..], b"tail");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.ino(), ino, "written in place, not replaced");
        assert_eq!(meta.mode() & 0o777, 0o640, "its mode kept");

        // Abort and drop leave the (partial) file to its owner.
        let mut sink = LocalFileSink::in_place(&path).await.unwrap();
        sink.write(Bytes::from_static(b"partial")).await.unwrap();
        Box::new(sink).abort().await.unwrap();
        assert!(path.exists());
        let sink = LocalFileSink::in_place(&path).await.unwrap();
        drop(sink);
        assert!(path.exists());
        // Not a regular file: refused.
        let e = LocalFileSink::in_place(dir.path()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    }

    #[tokio::test]
    async fn local_file_reports_holes_and_reads() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.raw");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
        drop(f);
        let lf = LocalFile::open(&p).await.unwrap();
        assert_eq!(lf.size(), 64 << 20);
        if let Some(r) = lf.data_ranges().await.unwrap() {
            let total: u64 = r.iter().map(|r| r.end - r.start).sum();
            assert!((1 << 20..8 << 20).contains(&total), "{r:?}");
            assert!(r.iter().any(|r| r.start <= 8 << 20 && r.end >= 9 << 20));
        }
        let b = lf.read_at((8 << 20) - 2, 4).await.unwrap();
        assert_eq!(&b[..], &[0, 0, 7, 7]);
        let b = lf.read_at((64 << 20) - 2, 10).await.unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            lf.read_exact_at((64 << 20) - 2, 10)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
    }

    #[tokio::test]
    async fn file_sink_creates_owner_only_files_unless_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        for (name, opts, want) in [
            ("default", FileCreateOptions::default(), 0o600),
            ("group", FileCreateOptions::default().mode(0o640), 0o640),
            ("world", FileCreateOptions::default().mode(0o644), 0o644),
        ] {
            let dest = dir.path().join(name);
            let mut s = Box::new(LocalFileSink::create_with(&dest, &opts).await.unwrap());
            // Already while it is written, under its temporary name.
            let tmp = s.tmp.clone();
            assert_eq!(mode(&tmp), want, "{name} (temp)");
            s.write(Bytes::from_static(b"abc")).await.unwrap();
            s.commit().await.unwrap();
            assert_eq!(mode(&dest), want, "{name}");
        }
        let dest = dir.path().join("plain");
        let s = Box::new(LocalFileSink::create(&dest, false).await.unwrap());
        s.commit().await.unwrap();
        assert_eq!(mode(&dest), 0o600);
    }

    #[tokio::test]
    async fn file_sink_is_invisible_until_commit_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/out.raw");
        let mut s = Box::new(LocalFileSink::create(&dest, false).await.unwrap());
        s.write(Bytes::from_static(b"abc")).await.unwrap();
        s.write_zeros(5).await.unwrap();
        s.write(Bytes::from_static(b"z")).await.unwrap();
        assert!(!dest.exists());
        s.commit().await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc\0\0\0\0\0z");
        let e = LocalFileSink::create(&dest, false).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        // abort and drop leave no temp files
        let s = Box::new(
            LocalFileSink::create(dir.path().join("b"), false)
                .await
                .unwrap(),
        );
        s.abort().await.unwrap();
        {
            let _s = LocalFileSink::create(dir.path().join("c"), false)
                .await
                .unwrap();
        }
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["sub".to_string()]);
    }

    #[test]
    fn read_buffers_are_recycled_and_expose_only_what_was_filled() {
        let mut a = ReadBuf::new(1 << 20);
        a.as_mut().fill(0xAB);
        let bytes = a.freeze(1 << 20);
        assert_eq!(
            bytes.as_ptr() as usize % BUFFER_ALIGN,
            0,
            "pooled buffers are aligned"
        );
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[0xAB; 10]);
        drop(slice);
        // The buffer went back to the pool: a new one may reuse it, holding old bytes that
        // must not be exposed beyond what the caller filled.
        let mut b = ReadBuf::new(512 << 10);
        assert_eq!(b.as_mut().len(), 512 << 10);
        b.as_mut()[..3].copy_from_slice(b"abc");
        let frozen = b.freeze(3);
        assert_eq!(&frozen[..], b"abc");
        // freeze never exposes more than asked for
        assert_eq!(ReadBuf::new(1000).freeze(5000).len(), 1000);
        // small and oversized requests are plain allocations
        assert_eq!(ReadBuf::new(10).freeze(10).len(), 10);
        assert_eq!(ReadBuf::new(POOL_BUFFER + 1).freeze(7).len(), 7);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        let many: Vec<_> = (0..3 * POOL_KEEP)
            .map(|_| ReadBuf::new(POOL_BUFFER).freeze(1))
            .collect();
        drop(many);
        let small: Vec<_> = (0..3 * POOL_KEEP)
            .map(|_| ReadBuf::new(POOL_MIN).freeze(1))
            .collect();
        drop(small);
        for p in &POOL {
            assert!(p.lock().unwrap().len() <= POOL_KEEP);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_sink_mixes_direct_and_buffered_writes_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        let mut sink = LocalFileSink::create(&dest, false).await.unwrap();
        let mut expect = Vec::new();
        let pattern = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        // unaligned head (metadata-like), then an aligned pooled buffer at an unaligned
        // offset (buffered), then padding to a page, aligned pooled buffers (direct where the
        // file system allows), a zero run, an odd tail
        let head = pattern(1000, 1);
        sink.write(Bytes::from(head.clone())).await.unwrap();
        expect.extend_from_slice(&head);
        let mut b = ReadBuf::new(1 << 20);
        b.as_mut().copy_from_slice(&pattern(1 << 20, 2));
        let b = b.freeze(1 << 20);
        sink.write(b.clone()).await.unwrap();
        expect.extend_from_slice(&b);
        let pad = 4096 - expect.len() % 4096;
        sink.write(Bytes::from(vec![7u8; pad])).await.unwrap();
        expect.extend(std::iter::repeat_n(7u8, pad));
        for seed in 3..6 {
            let mut b = ReadBuf::new(4 << 20);
            b.as_mut().copy_from_slice(&pattern(4 << 20, seed));
            let b = b.freeze(4 << 20);
            // a page-aligned slice of an aligned buffer
            let s = b.slice(64 << 10..(3 << 20));
            sink.write(s.clone()).await.unwrap();
            expect.extend_from_slice(&s);
        }
        sink.write_zeros(3 << 20).await.unwrap();
        expect.extend(std::iter::repeat_n(0u8, 3 << 20));
        let tail = pattern(777, 9);
        sink.write(Bytes::from(tail.clone())).await.unwrap();
        expect.extend_from_slice(&tail);
        Box::new(sink).commit().await.unwrap();
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "file content differs");
        // On Linux file systems that take O_DIRECT (ext4 and xfs do), the aligned pieces went
        // straight to the disk.
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        let fs_takes_direct = open_direct(&probe).is_some_and(|d| {
            use std::os::unix::fs::FileExt;
            let mut b = ReadBuf::new(1 << 20);
            b.as_mut().fill(1);
            d.write_all_at(&b.freeze(1 << 20), 0).is_ok()
        });
        let tmpfs = fs_type(&std::fs::File::open(&probe).unwrap()) == Some(TMPFS_MAGIC);
        if fs_takes_direct && !tmpfs {
            assert!(DIRECT_WRITES.load(std::sync::atomic::Ordering::Relaxed) >= 3);
        } else {
            eprintln!("SKIP direct-write count: the temp file system is tmpfs or refuses O_DIRECT");
        }
    }

    #[tokio::test]
    async fn size_hint_never_changes_the_committed_size() {
        let dir = tempfile::tempdir().unwrap();
        // larger hint than the data: the file ends where the data ends
        let dest = dir.path().join("a.img");
        let mut sink = LocalFileSink::create(&dest, false).await.unwrap();
        sink.set_size_hint(10 << 20).await;
        sink.write(Bytes::from(vec![5u8; 8192])).await.unwrap();
        Box::new(sink).commit().await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), vec![5u8; 8192]);
        // a hint after the first write is ignored; trailing zeros still extend the file
        let dest = dir.path().join("b.img");
        let mut sink = LocalFileSink::create(&dest, false).await.unwrap();
        sink.write(Bytes::from(vec![6u8; 100])).await.unwrap();
        sink.set_size_hint(1 << 30).await;
        sink.write_zeros(900).await.unwrap();
        Box::new(sink).commit().await.unwrap();
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), 1000);
        assert!(got[..100].iter().all(|&b| b == 6) && got[100..].iter().all(|&b| b == 0));
        // aborted: nothing left, whatever the hint
        let dest = dir.path().join("c.img");
        let mut sink = LocalFileSink::create(&dest, false).await.unwrap();
        sink.set_size_hint(1 << 20).await;
        Box::new(sink).abort().await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_failed_write_poisons_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("bad.img");
        let mut sink = LocalFileSink::create(&dest, false).await.unwrap();
        sink.write(Bytes::from(vec![1u8; 4096])).await.unwrap();
        // a position no file system takes: the worker's write fails
        sink.write_zeros((1u64 << 63) - 8192).await.unwrap();
        let mut first_error = None;
        for _ in 0..8 {
            if let Err(e) = sink.write(Bytes::from(vec![2u8; 16384])).await {
                first_error = Some(e);
                break;
            }
        }
        assert!(first_error.is_some(), "the failed write was never reported");
        // every later call fails too, and commit publishes nothing
        assert!(sink.write(Bytes::from(vec![3u8; 10])).await.is_err());
        assert!(sink.write_zeros(10).await.is_err());
        assert!(Box::new(sink).commit().await.is_err());
        assert!(!dest.exists());
    }
}

/// A spawned task that is aborted when its handle is dropped: a detached worker (a verifier
/// reading a whole object, say) stops when the future that needed it is dropped.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

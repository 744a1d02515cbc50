//! Digests computed in the same pass as the transfer.
//!
//! * **Object digest** — SHA-256 of the exact stored bytes ([`ObjectHasher`]), what `sha256sum`
//!   prints on the stored object and what Proxmox accepts as `checksum`. The same hasher records
//!   per-chunk CRC32C checksums (fixed chunk size, lower-case hex of the big-endian value) so an
//!   import fails at the first damaged chunk; CRC32C runs at memory speed with SSE 4.2, so the
//!   only sequential SHA-256 of a transfer is the whole-object one. (CRC32C detects accidental
//!   damage; the object SHA-256, checked before anything becomes visible, covers the rest.)
//! * **Content digest** — a digest of the guest-visible disk, independent of the image format
//!   ([`ContentDigester`]), so a disk exported as streamOptimized VMDK and imported as qcow2 is
//!   proven identical. Algorithm `vrg-blocksha256-v1`:
//!
//!   1. Split the virtual disk into blocks of `B` = 65,536 bytes; the last block may be shorter.
//!   2. `h_i = SHA-256(block_i)`. An all-zero full block has the constant hash
//!      `SHA-256(65,536 zero bytes)`, so zero blocks cost no hashing.
//!   3. `digest = SHA-256(h_0 ‖ h_1 ‖ … ‖ h_{n-1} ‖ LE64(virtual_size))`, printed as lower-case hex.
//!
//!   Block hashes are computed in parallel across cores, and on each core several blocks at
//!   once, one per SIMD lane (multi-buffer SHA-256); only the 32-byte block hashes go through
//!   the final sequential hash. Anyone can recompute it, e.g. in Python:
//!
//!   ```text
//!   import hashlib, struct
//!   def content_digest(path, size, B=65536):
//!       root = hashlib.sha256()
//!       with open(path, 'rb') as f:
//!           for off in range(0, size, B):
//!               root.update(hashlib.sha256(f.read(min(B, size - off))).digest())
//!       root.update(struct.pack('<Q', size))
//!       return root.hexdigest()
//!   ```

use crate::extent::{Extent, is_zero};
use crate::{Error, ErrorKind, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use sha2::{Digest, Sha256};

/// Name of the content digest algorithm, as stored in manifests.
pub const CONTENT_ALGORITHM: &str = "vrg-blocksha256-v1";
/// Block size of the content digest.
pub const CONTENT_BLOCK: usize = 65536;
/// Name of the object digest algorithm.
pub const OBJECT_ALGORITHM: &str = "sha256";
/// Name of the per-chunk checksum algorithm.
pub const CHUNK_ALGORITHM: &str = "crc32c";

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

fn zero_block_hash() -> [u8; 32] {
    static ZH: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *ZH.get_or_init(|| Sha256::digest([0u8; CONTENT_BLOCK]).into())
}

/// Hashes independent messages, with the multi-buffer kernel when it may be trusted.
///
/// `tape-sha256` runs one message per SIMD lane (16 with AVX-512, 8 with AVX2, 4 interleaved
/// SHA-NI streams), which hashes the content digest's independent blocks 1.6–1.8× faster than
/// one SHA-256 at a time (measured against `sha2` with SHA-NI on a Xeon with AVX-512). Before
/// its first use in a process, its answers for a set of blocks are compared with `sha2`'s; on
/// any difference, or where it has only its portable kernel, `sha2` hashes each message.
fn hash_many(msgs: &[&[u8]], out: &mut [[u8; 32]]) {
    if multi_buffer_trusted() {
        tape_sha256::hash_many(msgs, out);
    } else {
        for (m, o) in msgs.iter().zip(out.iter_mut()) {
            *o = Sha256::digest(m).into();
        }
    }
}

fn multi_buffer_trusted() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let backend = tape_sha256::backend();
        if backend.starts_with("portable") {
            return false;
        }
        // More blocks than the widest kernel has lanes, so a remainder runs too; every lane
        // gets different bytes.
        let n = 2 * tape_sha256::lane_width().max(16) + 3;
        let data = crate::testdata::noise(1, n * CONTENT_BLOCK);
        let msgs: Vec<&[u8]> = data.chunks(CONTENT_BLOCK).collect();
        let mut got = vec![[0u8; 32]; n];
        tape_sha256::hash_many(&msgs, &mut got);
        let ok = msgs
            .iter()
            .zip(&got)
            .all(|(m, g)| <[u8; 32]>::from(Sha256::digest(m)) == *g);
        if !ok {
            tracing::warn!(
                backend,
                "multi-buffer SHA-256 disagrees with sha2; not used"
            );
        }
        ok
    })
}

/// The block hashes `h_i` of consecutive blocks: zero blocks take the constant, full data
/// blocks go through the multi-buffer kernel together, a short last block through `sha2`.
fn hash_blocks(pieces: &[Bytes]) -> Vec<[u8; 32]> {
    let blocks: Vec<&[u8]> = pieces
        .iter()
        .flat_map(|p| p.chunks(CONTENT_BLOCK))
        .collect();
    let mut out = vec![[0u8; 32]; blocks.len()];
    let mut at = Vec::with_capacity(blocks.len());
    let mut data = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        if b.len() != CONTENT_BLOCK {
            out[i] = Sha256::digest(b).into();
        } else if is_zero(b) {
            out[i] = zero_block_hash();
        } else {
            at.push(i);
            data.push(*b);
        }
    }
    let mut hashes = vec![[0u8; 32]; data.len()];
    hash_many(&data, &mut hashes);
    for (i, h) in at.into_iter().zip(hashes) {
        out[i] = h;
    }
    out
}

enum Item {
    Hashes(Vec<[u8; 32]>),
    Zeros(u64),
}

/// How much a content-digest worker lowers its own priority (its nice value goes up by this).
pub const WORKER_NICE: i32 = 10;

type Task = (Vec<Bytes>, tokio::sync::oneshot::Sender<Vec<[u8; 32]>>);

/// The threads of one digester: they hash its batches below the priority of the rest of the
/// process.
///
/// A transfer's speed is bounded by its object digest, one sequential SHA-256; the content
/// digest's batches are parallel work that can fill whatever CPU time is left. With more busy
/// threads than cores (on 2 cores: the object SHA-256, the reader and writer, the content
/// digest), the kernel's fair share slows the sequential hash as much as the rest, and the
/// whole transfer with it: in `benches/pipeline.rs` both digests into a null sink ran at 0.81
/// of one SHA-256 core. Workers that raise their own nice value by [`WORKER_NICE`] run in the
/// time the others leave, and the same line ran at 0.92 (see `benches/README.md`). The nice
/// value is per thread on Linux and raising it needs no privilege; where it cannot be set the
/// workers run at normal priority. Only the order changes: with nothing else to run, the
/// workers get whole cores. The threads start with the first batch and end when the
/// digester is dropped; they are not tokio's blocking pool, whose threads are reused for
/// other work and could not get their priority back.
struct Workers {
    count: usize,
    /// Names the threads `vrg-digest-<set>`, a number of this process's own for each digester.
    set: u64,
    tx: Option<std::sync::mpsc::Sender<Task>>,
}

impl Workers {
    fn new(count: usize) -> Self {
        static SETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Workers {
            count: count.max(1),
            set: SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tx: None,
        }
    }

    fn sender(&mut self) -> Result<&std::sync::mpsc::Sender<Task>> {
        if self.tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Task>();
            let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
            for _ in 0..self.count {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("vrg-digest-{}", self.set))
                    .spawn(move || {
                        lower_own_priority(WORKER_NICE);
                        loop {
                            let task = match rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            let Ok((batch, reply)) = task else { return };
                            // The digester may be gone (an error elsewhere): nothing to tell.
                            let _ = reply.send(hash_blocks(&batch));
                        }
                    })
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Io,
                            format!("cannot start a content digest worker: {e}"),
                        )
                    })?;
            }
            self.tx = Some(tx);
        }
        self.tx
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "content digest workers are gone"))
    }

    /// Hands `batch` to a worker; the future resolves to its block hashes.
    fn submit(&mut self, batch: Vec<Bytes>) -> Result<BoxFuture<'static, Result<Item>>> {
        let (reply, hashes) = tokio::sync::oneshot::channel();
        self.sender()?
            .send((batch, reply))
            .map_err(|_| Error::new(ErrorKind::Io, "content digest workers are gone"))?;
        Ok(Box::pin(async move {
            hashes
                .await
                .map(Item::Hashes)
                .map_err(|_| Error::new(ErrorKind::Io, "a content digest worker failed"))
        }))
    }
}

/// Raises the calling thread's nice value by `by` (lowers its priority). Linux only: elsewhere
/// the nice value belongs to the whole process, and nothing is changed.
fn lower_own_priority(by: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's own id; no memory is shared.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() == 0 {
                let _ = libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19));
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = by;
}

/// Bytes of full blocks gathered before they are handed to a worker.
const BATCH_BYTES: usize = 4 << 20;

/// Computes the content digest from extents, in order. See the module doc for the algorithm.
pub struct ContentDigester {
    virtual_size: u64,
    pos: u64,
    partial: Vec<u8>,
    root: Sha256,
    batch: Vec<Bytes>,
    batch_bytes: usize,
    inflight: FuturesOrdered<BoxFuture<'static, Result<Item>>>,
    max_inflight: usize,
    workers: Workers,
    hashed_bytes: u64,
}

impl std::fmt::Debug for ContentDigester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentDigester")
            .field("virtual_size", &self.virtual_size)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl ContentDigester {
    /// A digester for a disk of `virtual_size` bytes. Work runs on `parallelism` threads of its
    /// own, below the priority of the rest of the process (see [`WORKER_NICE`]).
    pub fn new(virtual_size: u64, parallelism: usize) -> Self {
        ContentDigester {
            virtual_size,
            pos: 0,
            partial: Vec::new(),
            root: Sha256::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            inflight: FuturesOrdered::new(),
            max_inflight: parallelism.max(1),
            workers: Workers::new(parallelism),
            hashed_bytes: 0,
        }
    }

    /// Bytes that went through SHA-256 so far (zero blocks are not counted: they cost nothing).
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed_bytes
    }

    /// Feeds the next extent. Extents must come in order without overlap; gaps are zeros.
    pub async fn update(&mut self, extent: &Extent) -> Result<()> {
        let off = extent.offset();
        if off < self.pos || extent.end() > self.virtual_size {
            return Err(Error::corrupt(format!(
                "extent {}..{} out of order or beyond {}",
                off,
                extent.end(),
                self.virtual_size
            )));
        }
        if off > self.pos {
            self.zeros(off - self.pos).await?;
        }
        match extent {
            Extent::Zero { len, .. } => self.zeros(*len).await,
            Extent::Data { bytes, .. } => self.data(bytes.clone()).await,
        }
    }

    async fn data(&mut self, mut bytes: Bytes) -> Result<()> {
        let b = CONTENT_BLOCK;
        self.pos += bytes.len() as u64;
        if !self.partial.is_empty() {
            let need = b - self.partial.len();
            let take = need.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = bytes.slice(take..);
            if self.partial.len() == b {
                let block = std::mem::take(&mut self.partial);
                self.hashed_bytes += b as u64;
                self.batch.push(Bytes::from(block));
                self.batch_bytes += b;
            }
        }
        let full = bytes.len() / b * b;
        if full > 0 {
            self.hashed_bytes += full as u64;
            self.batch_bytes += full;
            self.batch.push(bytes.slice(..full));
        }
        if bytes.len() > full {
            self.partial.extend_from_slice(&bytes[full..]);
        }
        if self.batch_bytes >= BATCH_BYTES {
            self.dispatch().await?;
        }
        Ok(())
    }

    async fn zeros(&mut self, mut len: u64) -> Result<()> {
        let b = CONTENT_BLOCK as u64;
        self.pos += len;
        if !self.partial.is_empty() {
            let need = b - self.partial.len() as u64;
            let take = need.min(len);
            self.partial.resize(self.partial.len() + take as usize, 0);
            len -= take;
            if self.partial.len() as u64 == b {
                let block = std::mem::take(&mut self.partial);
                self.hashed_bytes += b;
                self.batch.push(Bytes::from(block));
                self.batch_bytes += b as usize;
            }
        }
        let blocks = len / b;
        if blocks > 0 {
            self.dispatch().await?;
            self.push(Box::pin(async move { Ok(Item::Zeros(blocks)) }))
                .await?;
        }
        let rest = (len % b) as usize;
        if rest > 0 {
            self.partial.resize(rest, 0);
        }
        Ok(())
    }

    async fn dispatch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        // Sent now, not when the queue is next polled: the batch hashes while the caller goes
        // on reading.
        let fut = self.workers.submit(batch)?;
        self.push(fut).await
    }

    async fn push(&mut self, fut: BoxFuture<'static, Result<Item>>) -> Result<()> {
        self.inflight.push_back(fut);
        while self.inflight.len() > self.max_inflight {
            self.drain_one().await?;
        }
        Ok(())
    }

    async fn drain_one(&mut self) -> Result<()> {
        if let Some(item) = self.inflight.next().await {
            match item? {
                Item::Hashes(h) => {
                    for x in h {
                        self.root.update(x);
                    }
                }
                Item::Zeros(n) => {
                    let zh = zero_block_hash();
                    for _ in 0..n {
                        self.root.update(zh);
                    }
                }
            }
        }
        Ok(())
    }

    /// Completes the digest (zero-filling up to the virtual size) and returns it as hex.
    pub async fn finish(mut self) -> Result<String> {
        if self.pos < self.virtual_size {
            self.zeros(self.virtual_size - self.pos).await?;
        }
        if !self.partial.is_empty() {
            // The short last block of a disk whose size is not a multiple of the block size.
            let block = std::mem::take(&mut self.partial);
            self.hashed_bytes += block.len() as u64;
            self.batch.push(Bytes::from(block));
        }
        self.dispatch().await?;
        while !self.inflight.is_empty() {
            self.drain_one().await?;
        }
        if self.pos != self.virtual_size {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "content longer than virtual size",
            ));
        }
        self.root.update(self.virtual_size.to_le_bytes());
        Ok(hex(&self.root.finalize()))
    }
}

/// Per-chunk CRC32C checksums of a byte stream: one for every `chunk_size` bytes, the last one
/// for the remainder (big-endian hex, as in the manifest).
#[derive(Debug, Clone)]
pub struct ChunkChecksums {
    chunk: u32,
    chunk_size: u64,
    in_chunk: u64,
    chunks: Vec<String>,
    /// The checksum of a whole chunk of zeros, once computed.
    zero_chunk: Option<String>,
}

impl ChunkChecksums {
    /// Checksums recording one CRC32C for every `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Self {
        ChunkChecksums {
            chunk: 0,
            chunk_size: chunk_size.max(1),
            in_chunk: 0,
            chunks: Vec::new(),
            zero_chunk: None,
        }
    }

    /// Feeds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = ((self.chunk_size - self.in_chunk) as usize).min(data.len());
            self.chunk = crc32c::crc32c_append(self.chunk, &data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                self.chunks
                    .push(hex(&std::mem::take(&mut self.chunk).to_be_bytes()));
                self.in_chunk = 0;
            }
        }
    }

    /// Feeds `len` zero bytes. Whole chunks of zeros cost one lookup each, so a hole of a TiB
    /// takes no time.
    pub fn update_zeros(&mut self, mut len: u64) {
        while len > 0 {
            if self.in_chunk == 0 && len >= self.chunk_size {
                let z = match &self.zero_chunk {
                    Some(z) => z.clone(),
                    None => {
                        let mut c = 0u32;
                        zero_pieces(self.chunk_size, |p| c = crc32c::crc32c_append(c, p));
                        let z = hex(&c.to_be_bytes());
                        self.zero_chunk = Some(z.clone());
                        z
                    }
                };
                let n = len / self.chunk_size;
                self.chunks.extend(std::iter::repeat_n(z, n as usize));
                len -= n * self.chunk_size;
                continue;
            }
            let take = len
                .min(self.chunk_size - self.in_chunk)
                .min(crate::io::ZEROS.len() as u64);
            self.update(&crate::io::ZEROS[..take as usize]);
            len -= take;
        }
    }

    /// Checksums of the chunks completed so far.
    pub fn completed(&self) -> &[String] {
        &self.chunks
    }

    /// All checksums, including the last partial chunk.
    pub fn finish(mut self) -> Vec<String> {
        if self.in_chunk > 0 {
            self.chunks.push(hex(&self.chunk.to_be_bytes()));
        }
        self.chunks
    }
}

/// The SHA-256 of a stored object and its per-chunk CRC32C checksums.
#[derive(Debug, Clone)]
pub struct ObjectHasher {
    sha: ObjectSha256,
    chunks: ChunkChecksums,
}

impl ObjectHasher {
    /// A hasher recording a digest for every `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> Self {
        ObjectHasher {
            sha: ObjectSha256::new(),
            chunks: ChunkChecksums::new(chunk_size),
        }
    }

    /// Hashes `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.chunks.update(data);
    }

    /// Hashes `len` zero bytes.
    pub fn update_zeros(&mut self, len: u64) {
        self.sha.update_zeros(len);
        self.chunks.update_zeros(len);
    }

    /// Bytes hashed so far.
    pub fn total(&self) -> u64 {
        self.sha.total()
    }

    /// Digests of the chunks completed so far.
    pub fn completed_chunks(&self) -> &[String] {
        self.chunks.completed()
    }

    /// Finishes: (object SHA-256 hex, chunk CRC32Cs including the last partial chunk).
    pub fn finish(self) -> (String, Vec<String>) {
        (self.sha.finish(), self.chunks.finish())
    }
}

/// The SHA-256 of a byte stream, the sequential half of an [`ObjectHasher`] (the pipeline runs
/// it alone on a core and the chunk checksums beside the writes).
#[derive(Clone, Default)]
pub struct ObjectSha256 {
    whole: Sha256,
    total: u64,
}

impl std::fmt::Debug for ObjectSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSha256")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl ObjectSha256 {
    /// A new SHA-256 state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.whole.update(data);
        self.total += data.len() as u64;
    }

    /// Hashes `len` zero bytes.
    pub fn update_zeros(&mut self, len: u64) {
        zero_pieces(len, |z| self.update(z));
    }

    /// Bytes hashed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The SHA-256 as hex.
    pub fn finish(self) -> String {
        hex(&self.whole.finalize())
    }
}

/// Calls `f` with slices of zeros adding up to `len` bytes.
fn zero_pieces(mut len: u64, mut f: impl FnMut(&[u8])) {
    while len > 0 {
        let n = len.min(crate::io::ZEROS.len() as u64) as usize;
        f(&crate::io::ZEROS[..n]);
        len -= n as u64;
    }
}

/// SHA-256 hex of a byte slice.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest straight from the documented definition, over a flat buffer.
    fn reference(disk: &[u8]) -> String {
        let mut root = Sha256::new();
        for block in disk.chunks(CONTENT_BLOCK) {
            root.update(Sha256::digest(block));
        }
        root.update((disk.len() as u64).to_le_bytes());
        hex(&root.finalize())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Many different blocks, zero blocks among them and a short last one: the multi-buffer
    /// kernel's lanes (16 with AVX-512) and its remainder all run, and each block hash lands
    /// at its own index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_blocks_hash_as_the_definition_says() {
        let blocks = 2 * 16 + 7;
        let size = blocks * CONTENT_BLOCK + 777;
        let mut disk = crate::testdata::noise(2, size);
        for z in [0usize, 5, 17, 18, 33] {
            disk[z * CONTENT_BLOCK..(z + 1) * CONTENT_BLOCK].fill(0);
        }
        let pieces: Vec<Bytes> = disk
            .chunks(3 * CONTENT_BLOCK + 4096)
            .map(Bytes::copy_from_slice)
            .collect();
        let want: Vec<[u8; 32]> = disk
            .chunks(CONTENT_BLOCK)
            .map(|b| Sha256::digest(b).into())
            .collect();
        let whole = Bytes::copy_from_slice(&disk[..blocks * CONTENT_BLOCK]);
        assert_eq!(hash_blocks(std::slice::from_ref(&whole)), want[..blocks]);
        for parallelism in [1, 2] {
            let mut d = ContentDigester::new(size as u64, parallelism);
            let mut off = 0u64;
            for p in &pieces {
                d.update(&Extent::Data {
                    offset: off,
                    bytes: p.clone(),
                })
                .await
                .unwrap();
                off += p.len() as u64;
            }
            assert_eq!(d.finish().await.unwrap(), reference(&disk));
        }
    }

    /// The nice values of this process's threads named `name` (Linux `/proc`; the kernel keeps
    /// 15 bytes of a name).
    #[cfg(target_os = "linux")]
    fn nices_of_threads(name: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != &name[..name.len().min(15)] {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Field 19 is the nice value; fields after the command name (in parentheses).
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                out.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
            }
        }
        out
    }

    /// The digester's workers are threads of its own, below the process's priority, and they
    /// end with it.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn digest_workers_run_below_the_process_priority_and_end_with_the_digester() {
        let base = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let size = 2 * BATCH_BYTES;
        let mut d = ContentDigester::new(size as u64, 2);
        d.update(&Extent::Data {
            offset: 0,
            bytes: Bytes::from(vec![7u8; BATCH_BYTES]),
        })
        .await
        .unwrap();
        // Each thread names itself and sets its priority as it starts: wait for both.
        let name = format!("vrg-digest-{}", d.workers.set);
        let want = vec![(base + WORKER_NICE).min(19); 2];
        let mut nices = nices_of_threads(&name);
        for _ in 0..400 {
            if nices == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            nices = nices_of_threads(&name);
        }
        assert_eq!(
            nices, want,
            "the workers' nice values (the process's is {base})"
        );
        d.update(&Extent::Data {
            offset: BATCH_BYTES as u64,
            bytes: Bytes::from(vec![7u8; BATCH_BYTES]),
        })
        .await
        .unwrap();
        assert_eq!(
            d.finish().await.unwrap(),
            reference(&vec![7u8; size]),
            "the workers' hashes"
        );
        // The threads see the channel close and return; give them time to be scheduled.
        let mut left = nices_of_threads(&name).len();
        for _ in 0..400 {
            if left == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            left = nices_of_threads(&name).len();
        }
        assert_eq!(
            left, 0,
            "digest workers still running after their digesters"
        );
    }

    /// Where the CPU has a SIMD kernel, it passed the check against `sha2` and is the one used.
    #[test]
    fn the_multi_buffer_kernel_is_trusted_where_there_is_one() {
        let backend = tape_sha256::backend();
        assert_eq!(
            multi_buffer_trusted(),
            !backend.starts_with("portable"),
            "{backend}"
        );
    }

    #[tokio::test]
    async fn content_digest_matches_definition_whatever_the_extent_shape() {
        let size = 3 * CONTENT_BLOCK + 1000;
        let mut disk = vec![0u8; size];
        disk[100..5000].copy_from_slice(&pattern(4900, 1));
        disk[2 * CONTENT_BLOCK - 10..2 * CONTENT_BLOCK + 10].copy_from_slice(&pattern(20, 2));
        disk[size - 3..].copy_from_slice(&[9, 9, 9]);
        let expected = reference(&disk);

        // one extent per byte range of random-ish sizes, data and zero mixed
        for step in [1usize, 7, 4096, CONTENT_BLOCK, size] {
            let mut d = ContentDigester::new(size as u64, 2);
            let mut off = 0;
            while off < size {
                let end = (off + step).min(size);
                let piece = &disk[off..end];
                let e = if piece.iter().all(|&b| b == 0) && step > 1 {
                    Extent::Zero {
                        offset: off as u64,
                        len: (end - off) as u64,
                    }
                } else {
                    Extent::Data {
                        offset: off as u64,
                        bytes: Bytes::copy_from_slice(piece),
                    }
                };
                d.update(&e).await.unwrap();
                off = end;
            }
            assert_eq!(d.finish().await.unwrap(), expected, "step {step}");
        }
        // gaps count as zeros
        let mut d = ContentDigester::new(size as u64, 2);
        d.update(&Extent::Data {
            offset: 100,
            bytes: Bytes::copy_from_slice(&disk[100..5000]),
        })
        .await
        .unwrap();
        let o = 2 * CONTENT_BLOCK - 10;
        d.update(&Extent::Data {
            offset: o as u64,
            bytes: Bytes::copy_from_slice(&disk[o..o + 20]),
        })
        .await
        .unwrap();
        d.update(&Extent::Data {
            offset: size as u64 - 3,
            bytes: Bytes::from_static(&[9, 9, 9]),
        })
        .await
        .unwrap();
        assert_eq!(d.finish().await.unwrap(), expected);
    }

    #[tokio::test]
    async fn content_digest_differs_on_one_byte_and_on_size() {
        let a = vec![0u8; 2 * CONTENT_BLOCK];
        let mut b = a.clone();
        b[77777] = 1;
        assert_ne!(reference(&a), reference(&b));
        let mut d = ContentDigester::new(a.len() as u64, 1);
        d.update(&Extent::Data {
            offset: 0,
            bytes: Bytes::from(b.clone()),
        })
        .await
        .unwrap();
        assert_eq!(d.finish().await.unwrap(), reference(&b));
        let d = ContentDigester::new(a.len() as u64 + 1, 1);
        assert_ne!(d.finish().await.unwrap(), reference(&a));
    }

    #[tokio::test]
    async fn zero_runs_cost_no_hashing() {
        let size = 64u64 << 30;
        let mut d = ContentDigester::new(size, 2);
        d.update(&Extent::Data {
            offset: 1 << 30,
            bytes: Bytes::from(vec![1u8; 1 << 20]),
        })
        .await
        .unwrap();
        assert_eq!(d.hashed_bytes(), 1 << 20);
        d.finish().await.unwrap();
    }

    #[test]
    fn object_hasher_chunks() {
        let data = pattern(10_000, 3);
        let mut h = ObjectHasher::new(4096);
        for b in data.chunks(1) {
            h.update(b);
        }
        let (whole, chunks) = h.finish();
        assert_eq!(whole, sha256_hex(&data));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0], hex(&crc32c::crc32c(&data[..4096]).to_be_bytes()));
        assert_eq!(chunks[2], hex(&crc32c::crc32c(&data[8192..]).to_be_bytes()));
        // the standard CRC32C check value
        let mut c = ObjectHasher::new(100);
        c.update(b"123456789");
        assert_eq!(c.finish().1, vec!["e3069283".to_string()]);
        let mut z = ObjectHasher::new(1 << 20);
        z.update_zeros(3 << 20);
        assert_eq!(z.finish().0, sha256_hex(&vec![0u8; 3 << 20]));
        // zero runs (the fast path for whole chunks) give the same checksums as zero bytes
        let mut a = ChunkChecksums::new(3000);
        let mut b = ChunkChecksums::new(3000);
        a.update(&[7u8; 100]);
        b.update(&[7u8; 100]);
        a.update_zeros(20_000);
        b.update(&vec![0u8; 20_000]);
        a.update(&[9u8; 50]);
        b.update(&[9u8; 50]);
        a.update_zeros(9_000);
        b.update(&vec![0u8; 9_000]);
        assert_eq!(a.finish(), b.finish());
    }
}

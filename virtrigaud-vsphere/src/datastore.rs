//! The datastore data path: `https://host/folder/<path>?dcPath=<dc>&dsName=<ds>`.
//!
//! * [`DatastoreFile`]: a file read by ranged GETs, as a [`ReadAt`]. A read is split into up
//!   to [`VsphereConfig::folder_concurrency`](crate::VsphereConfig::folder_concurrency) ranges
//!   fetched at once, and every request holds a permit of a semaphore shared by the whole
//!   provider, so one host never sees more than that many `/folder` streams (ESXi answers 503
//!   above ~4). 503 and transport failures are retried with backoff; a 401 logs in again once.
//! * [`open_disk_file`]: a VMDK by its `[ds] path.vmdk`: a monolithicSparse file is handed out
//!   as it is; a descriptor (`monolithicFlat`/`vmfs`) is parsed and its `FLAT`/`VMFS`/`ZERO`
//!   extents joined into one raw source ([`ExtentsReader`]); a descriptor with one hosted
//!   `SPARSE` extent is that sparse file; several (`twoGbMaxExtentSparse`) are `Unsupported`
//!   with their fix (clone to one thin disk). Delta extents (`VMFSSPARSE`, `SESPARSE`, or a
//!   parent: a snapshot chain) are `Unsupported` with the fix (consolidate) named.
//! * [`FlatWriter`]: a new disk as `<name>-flat.vmdk` streamed in one PUT with its exact
//!   `Content-Length` (the virtual size: ESXi does not take chunked uploads on `/folder`), then
//!   the descriptor `<name>.vmdk` written last. The descriptor is what makes the disk exist:
//!   [`find`](crate::VsphereProvider) looks for it only, so a flat file left by a killed process
//!   is never taken for a disk, and abort or drop deletes whatever was written.

use crate::client::Client;
use crate::error::{from_status, from_transport};
use async_trait::async_trait;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode, header};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use virtrigaud_core::format::vmdk::descriptor::{
    Descriptor, ExtentKind, MAX_DESCRIPTOR, check_extent_name,
};
use virtrigaud_core::format::{DiskFormat, VmdkSubformat};
use virtrigaud_core::io::{ByteSink, ReadAt};
use virtrigaud_core::{Error, ErrorKind, Result};

/// A datastore path `[ds] dir/file.vmdk`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsPath {
    /// Datastore name.
    pub datastore: String,
    /// Path inside the datastore (no leading `/`).
    pub path: String,
}

impl DsPath {
    /// Parses `[ds] path`, refusing paths that could leave the datastore.
    pub fn parse(s: &str) -> Result<DsPath> {
        let bad = || Error::invalid(format!("not a datastore path '[datastore] path': '{s}'"));
        let rest = s.trim().strip_prefix('[').ok_or_else(bad)?;
        let (ds, path) = rest.split_once(']').ok_or_else(bad)?;
        let path = path.trim().trim_start_matches('/');
        if ds.is_empty() || path.is_empty() {
            return Err(bad());
        }
        check_path(path)?;
        Ok(DsPath {
            datastore: ds.to_string(),
            path: path.to_string(),
        })
    }
    /// The `[ds] path` form.
    pub fn display(&self) -> String {
        format!("[{}] {}", self.datastore, self.path)
    }
    /// The directory part (`dir` of `dir/file`), empty at the top.
    pub fn dir(&self) -> &str {
        self.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
    }
    /// A sibling file in the same directory.
    pub fn sibling(&self, name: &str) -> DsPath {
        let path = match self.dir() {
            "" => name.to_string(),
            d => format!("{d}/{name}"),
        };
        DsPath {
            datastore: self.datastore.clone(),
            path,
        }
    }
}

/// Refuses `..`, empty segments, backslashes and control characters.
pub fn check_path(path: &str) -> Result<()> {
    if path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || path.contains('\\')
        || path.chars().any(char::is_control)
    {
        return Err(Error::invalid(format!(
            "datastore path '{}' is not a plain relative path",
            path.escape_debug()
        )));
    }
    Ok(())
}

/// Access to `/folder` of one host and datacenter.
#[derive(Debug, Clone)]
pub struct Folder {
    client: Arc<Client>,
    datacenter: String,
    datacenter_ref: crate::client::MoRef,
    permits: Arc<Semaphore>,
}

const RETRIES: u32 = 5;

impl Folder {
    /// `/folder` of `datacenter`, at most as many requests at once as `permits` allows.
    pub fn new(
        client: Arc<Client>,
        datacenter: String,
        datacenter_ref: crate::client::MoRef,
        permits: Arc<Semaphore>,
    ) -> Folder {
        Folder {
            client,
            datacenter,
            datacenter_ref,
            permits,
        }
    }

    /// The URL of a file.
    pub fn url(&self, p: &DsPath) -> Result<url::Url> {
        let mut u = self.client.sdk_url().clone();
        {
            let mut segs = u
                .path_segments_mut()
                .map_err(|_| Error::invalid("the vSphere URL cannot carry a path"))?;
            segs.clear().push("folder");
            for s in p.path.split('/') {
                segs.push(s);
            }
        }
        u.query_pairs_mut()
            .clear()
            .append_pair("dcPath", &self.datacenter)
            .append_pair("dsName", &p.datastore);
        Ok(u)
    }

    /// Sends a request built by `make`, retrying 503/transport failures with backoff and
    /// logging in again once on 401. Returns the response of any other status.
    async fn send(
        &self,
        op: &str,
        p: &DsPath,
        make: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
        method: Method,
    ) -> Result<reqwest::Response> {
        let url = self.url(p)?;
        let target = p.display();
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let generation = self.client.generation();
            let req = self
                .client
                .data_request(method.clone(), url.as_str())
                .await?;
            let r = make(req).send().await;
            let retry_after = match r {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !relogged => {
                    relogged = true;
                    self.client.relogin(generation).await?;
                    continue;
                }
                Ok(resp)
                    if resp.status() == StatusCode::SERVICE_UNAVAILABLE && attempt < RETRIES =>
                {
                    debug!(op, "datastore busy (503), retrying");
                    Duration::from_millis(200 << attempt)
                }
                Ok(resp) => return Ok(resp),
                Err(e) if attempt < RETRIES && (e.is_connect() || e.is_timeout()) => {
                    debug!(op, error = %e, "datastore request failed, retrying");
                    Duration::from_millis(200 << attempt)
                }
                Err(e) => return Err(from_transport(op, &target, e)),
            };
            tokio::time::sleep(retry_after).await;
        }
    }

    /// HEAD: the size of a file, `None` when it does not exist.
    pub async fn size(&self, p: &DsPath) -> Result<Option<u64>> {
        let _permit = self.permit().await?;
        let resp = self.send("datastore.head", p, |r| r, Method::HEAD).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let ct = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct.starts_with("text/html") {
                    // A directory answers with an HTML listing.
                    return Ok(None);
                }
                // Not `content_length()`: for a HEAD it is the (empty) body's size.
                let len = resp
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Provider,
                            format!("{}: HEAD answered without a Content-Length", p.display()),
                        )
                    })?;
                Ok(Some(len))
            }
            s => Err(from_status("datastore.head", &p.display(), s)),
        }
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Provider, "datastore access closed"))
    }

    /// GET of `len` bytes at `offset` (fewer at the end of the file).
    pub async fn get_range(&self, p: &DsPath, offset: u64, len: usize) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset + len as u64 - 1;
        let _permit = self.permit().await?;
        let resp = self
            .send(
                "datastore.get",
                p,
                |r| r.header(header::RANGE, format!("bytes={offset}-{end}")),
                Method::GET,
            )
            .await?;
        let status = resp.status();
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(Bytes::new());
        }
        if !status.is_success() {
            return Err(from_status("datastore.get", &p.display(), status).with_offset(offset));
        }
        let whole = status == StatusCode::OK;
        let mut buf = Vec::with_capacity(len);
        let mut skip = if whole { offset } else { 0 };
        let mut s = resp.bytes_stream();
        while let Some(c) = s.next().await {
            let c = c.map_err(|e| from_transport("datastore.get", &p.display(), e))?;
            let mut c = &c[..];
            if skip > 0 {
                let n = (skip as usize).min(c.len());
                c = &c[n..];
                skip -= n as u64;
            }
            let room = len - buf.len();
            buf.extend_from_slice(&c[..c.len().min(room)]);
            if buf.len() == len {
                break;
            }
        }
        Ok(Bytes::from(buf))
    }

    /// PUT of a small file in one request.
    pub async fn put_small(&self, p: &DsPath, data: Bytes) -> Result<()> {
        let _permit = self.permit().await?;
        let resp = self
            .send(
                "datastore.put",
                p,
                |r| {
                    r.header(header::CONTENT_TYPE, "application/octet-stream")
                        .body(data.clone())
                },
                Method::PUT,
            )
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(from_status("datastore.put", &p.display(), resp.status()))
        }
    }

    /// Deletes a file (`FileManager.DeleteDatastoreFile_Task`: ESXi's `/folder` takes DELETE,
    /// the simulator's does not, and the SOAP call works on both); a missing file is not an
    /// error.
    pub async fn delete(&self, p: &DsPath) -> Result<()> {
        if self.size(p).await?.is_none() {
            return Ok(());
        }
        let fm = self.client.content().await?.file_manager.clone();
        let inner = format!(
            "{}<name>{}</name>{}",
            fm.this(),
            crate::xml::esc(&p.display()),
            self.datacenter_ref.xml("datacenter")
        );
        match self
            .client
            .run_task("DeleteDatastoreFile_Task", &inner)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.with_target(p.display())),
        }
    }

    /// Starts a streamed PUT of exactly `len` bytes; the body comes from the returned sender.
    pub async fn put_stream(
        &self,
        p: &DsPath,
        len: u64,
    ) -> Result<(mpsc::Sender<std::io::Result<Bytes>>, JoinHandle<Result<()>>)> {
        let url = self.url(p)?;
        let req = self.client.data_request(Method::PUT, url.as_str()).await?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
        let target = p.display();
        let permits = self.permits.clone();
        let task = tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| Error::new(ErrorKind::Provider, "datastore access closed"))?;
            let resp = req
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .body(reqwest::Body::wrap_stream(rx))
                .send()
                .await
                .map_err(|e| from_transport("datastore.put", &target, e))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(from_status("datastore.put", &target, resp.status()))
            }
        });
        Ok((tx, task))
    }
}

/// A datastore file read by ranged GETs.
#[derive(Debug, Clone)]
pub struct DatastoreFile {
    folder: Folder,
    path: DsPath,
    size: u64,
    split: usize,
}

impl DatastoreFile {
    /// Opens `path` (HEAD for its size); `NotFound` when it does not exist.
    pub async fn open(folder: Folder, path: DsPath, split: usize) -> Result<DatastoreFile> {
        let size = folder.size(&path).await?.ok_or_else(|| {
            Error::not_found(format!("datastore file {} not found", path.display()))
        })?;
        Ok(DatastoreFile {
            folder,
            path,
            size,
            split: split.max(1),
        })
    }
    /// The path.
    pub fn path(&self) -> &DsPath {
        &self.path
    }
}

/// Pieces smaller than this are not split further.
const MIN_PIECE: usize = 256 << 10;

#[async_trait]
impl ReadAt for DatastoreFile {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let len = len.min(self.size.saturating_sub(offset) as usize);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let parts = self.split.min(len.div_ceil(MIN_PIECE)).max(1);
        if parts == 1 {
            return self.folder.get_range(&self.path, offset, len).await;
        }
        let piece = len.div_ceil(parts);
        let reads = (0..parts).map(|i| {
            let o = i * piece;
            let n = piece.min(len - o);
            self.folder.get_range(&self.path, offset + o as u64, n)
        });
        let got = futures::future::try_join_all(reads).await?;
        let mut buf = Vec::with_capacity(len);
        for g in got {
            buf.extend_from_slice(&g);
        }
        Ok(Bytes::from(buf))
    }
}

/// One piece of an [`ExtentsReader`].
#[derive(Clone)]
enum Piece {
    File {
        file: Arc<DatastoreFile>,
        offset: u64,
    },
    Zero,
}

/// Flat and zero extents of a descriptor joined into one raw source.
#[derive(Clone)]
pub struct ExtentsReader {
    pieces: Vec<(u64, u64, Piece)>,
    size: u64,
}

impl std::fmt::Debug for ExtentsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentsReader")
            .field("extents", &self.pieces.len())
            .field("size", &self.size)
            .finish()
    }
}

#[async_trait]
impl ReadAt for ExtentsReader {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        for (start, plen, piece) in &self.pieces {
            let pend = start + plen;
            if pend <= pos || *start >= end {
                continue;
            }
            let a = pos.max(*start);
            let b = end.min(pend);
            let n = (b - a) as usize;
            match piece {
                Piece::Zero => out.resize(out.len() + n, 0),
                Piece::File { file, offset: fo } => {
                    let got = file.read_exact_at(fo + (a - start), n).await?;
                    out.extend_from_slice(&got);
                }
            }
            pos = b;
        }
        Ok(Bytes::from(out))
    }

    async fn data_ranges(&self) -> Result<Option<Vec<std::ops::Range<u64>>>> {
        if self
            .pieces
            .iter()
            .all(|(_, _, p)| matches!(p, Piece::File { .. }))
        {
            return Ok(None);
        }
        Ok(Some(
            self.pieces
                .iter()
                .filter(|(_, _, p)| matches!(p, Piece::File { .. }))
                .map(|(s, l, _)| *s..s + l)
                .collect(),
        ))
    }
}

/// A flat disk whose allocated ranges are known from `QueryChangedDiskAreas` (change id `*`):
/// [`data_ranges`](ReadAt::data_ranges) answers them, intersected with what the source itself
/// knows (zero extents), so the pipeline neither reads nor sends the unallocated space of a
/// thin disk. Reads pass through unchanged.
pub struct MappedReader {
    inner: Arc<dyn ReadAt>,
    ranges: Vec<std::ops::Range<u64>>,
}

impl MappedReader {
    /// `inner` with the allocated `ranges` (any order, may overlap; clipped to the size).
    pub fn new(inner: Arc<dyn ReadAt>, ranges: Vec<std::ops::Range<u64>>) -> MappedReader {
        let ranges = normalise_ranges(ranges, inner.size());
        MappedReader { inner, ranges }
    }

    /// The allocated ranges, sorted and merged.
    pub fn ranges(&self) -> &[std::ops::Range<u64>] {
        &self.ranges
    }
}

impl std::fmt::Debug for MappedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedReader")
            .field("ranges", &self.ranges.len())
            .field("size", &self.inner.size())
            .finish()
    }
}

#[async_trait]
impl ReadAt for MappedReader {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read_at(offset, len).await
    }

    async fn data_ranges(&self) -> Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(Some(match self.inner.data_ranges().await? {
            Some(inner) => intersect_ranges(&self.ranges, &inner),
            None => self.ranges.clone(),
        }))
    }
}

/// Sorts `ranges`, drops empty ones, clips them to `size` and merges overlapping or adjacent
/// ones.
pub fn normalise_ranges(
    mut ranges: Vec<std::ops::Range<u64>>,
    size: u64,
) -> Vec<std::ops::Range<u64>> {
    for r in &mut ranges {
        r.end = r.end.min(size);
    }
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The intersection of two sorted, merged range lists.
pub fn intersect_ranges(
    a: &[std::ops::Range<u64>],
    b: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].start.max(b[j].start);
        let e = a[i].end.min(b[j].end);
        if s < e {
            out.push(s..e);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// A VMDK opened for reading.
pub struct OpenedVmdk {
    /// Native bytes.
    pub source: Arc<dyn ReadAt>,
    /// Their format: `Raw` for flat extents, `Vmdk(MonolithicSparse)` for a sparse file.
    pub format: DiskFormat,
    /// Virtual size.
    pub capacity: u64,
}

impl std::fmt::Debug for OpenedVmdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedVmdk")
            .field("format", &self.format)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Opens the VMDK at `path` (descriptor or sparse file).
pub async fn open_disk_file(folder: &Folder, path: &DsPath, split: usize) -> Result<OpenedVmdk> {
    let head_file = DatastoreFile::open(folder.clone(), path.clone(), 1).await?;
    let head = head_file.read_at(0, MAX_DESCRIPTOR).await?;
    if head.starts_with(b"KDMV") {
        let f = DatastoreFile::open(folder.clone(), path.clone(), split).await?;
        let capacity = virtrigaud_core::format::vmdk::probe(&f).await?;
        return Ok(OpenedVmdk {
            source: Arc::new(f),
            format: DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse),
            capacity,
        });
    }
    if !head.starts_with(b"# Disk DescriptorFile") {
        return Err(Error::corrupt(format!(
            "{} is neither a VMDK descriptor nor a sparse VMDK ({} bytes)",
            path.display(),
            head_file.size()
        )));
    }
    let d = Descriptor::parse(&head)?;
    // VMFSSPARSE and SESPARSE extents only hold snapshot deltas (and linked clones).
    if d.get("parentFileNameHint").is_some()
        || d.extents
            .iter()
            .any(|e| e.kind == ExtentKind::Sparse && !e.kind_name.eq_ignore_ascii_case("SPARSE"))
        || d.entries
            .iter()
            .any(|(k, v)| k == "parentCID" && v != "ffffffff")
    {
        return Err(delta_chain(&path.display()));
    }
    // A hosted sparse disk (no parent) behind a separate descriptor: one extent is read as
    // the monolithicSparse file it is; a disk split into several is refused with its fix.
    if d.extents.iter().any(|e| e.kind == ExtentKind::Sparse) {
        return open_hosted_sparse(folder, path, &d, split).await;
    }
    let mut pieces = Vec::new();
    let mut pos = 0u64;
    for e in &d.extents {
        let len = e
            .sectors
            .checked_mul(512)
            .ok_or_else(|| Error::corrupt(format!("{}: extent size overflows", path.display())))?;
        let piece = match e.kind {
            ExtentKind::Zero => Piece::Zero,
            ExtentKind::Flat => {
                let name = e.file.as_deref().unwrap_or("");
                check_extent_name(name)?;
                let f = DatastoreFile::open(folder.clone(), path.sibling(name), split).await?;
                let need = e.offset * 512 + len;
                if f.size() < need {
                    return Err(Error::corrupt(format!(
                        "extent {} has {} bytes, its descriptor needs {need}",
                        f.path().display(),
                        f.size()
                    )));
                }
                Piece::File {
                    file: Arc::new(f),
                    offset: e.offset * 512,
                }
            }
            _ => {
                return Err(Error::unsupported(format!(
                    "{}: extent type {} is not supported (flat, VMFS and zero extents are)",
                    path.display(),
                    e.kind_name
                )));
            }
        };
        pieces.push((pos, len, piece));
        pos += len;
    }
    Ok(OpenedVmdk {
        source: Arc::new(ExtentsReader { pieces, size: pos }),
        format: DiskFormat::Raw,
        capacity: pos,
    })
}

/// A descriptor whose extents are hosted `SPARSE` ones (`createType` `monolithicSparse` with
/// a separate descriptor, or `twoGbMaxExtentSparse`), no parent.
async fn open_hosted_sparse(
    folder: &Folder,
    path: &DsPath,
    d: &Descriptor,
    split: usize,
) -> Result<OpenedVmdk> {
    let create_type = d
        .get("createType")
        .unwrap_or("?")
        .trim_matches('"')
        .to_string();
    let [e] = d.extents.as_slice() else {
        return Err(Error::unsupported(format!(
            "{} is a hosted sparse disk in {} extents (createType {create_type}); split sparse \
             disks are not read from the datastore: clone it to one thin disk first \
             (vmkfstools -i <src> -d thin <dst>, or Clone/Migrate in the vSphere client), or use \
             ExportMode::Nfc",
            path.display(),
            d.extents.len()
        )));
    };
    let name = e.file.as_deref().unwrap_or("");
    check_extent_name(name)?;
    let f = DatastoreFile::open(folder.clone(), path.sibling(name), split).await?;
    let capacity = virtrigaud_core::format::vmdk::probe(&f).await?;
    let want = e
        .sectors
        .checked_mul(512)
        .ok_or_else(|| Error::corrupt(format!("{}: extent size overflows", path.display())))?;
    if capacity != want {
        return Err(Error::corrupt(format!(
            "{}: the descriptor gives its sparse extent {want} bytes, the extent's header \
             {capacity}",
            path.display()
        )));
    }
    Ok(OpenedVmdk {
        source: Arc::new(f),
        format: DiskFormat::Vmdk(VmdkSubformat::MonolithicSparse),
        capacity,
    })
}

/// The error for a disk that is a delta of older snapshots.
pub fn delta_chain(what: &str) -> Error {
    Error::unsupported(format!(
        "{what} is a delta disk of a snapshot chain; reading chains is not supported: \
         consolidate or delete the VM's snapshots first (Snapshots > Delete All / Consolidate)"
    ))
}

/// The descriptor of a flat disk of `capacity` bytes in `flat_name`.
pub fn flat_descriptor(capacity: u64, flat_name: &str, adapter: &str) -> String {
    let sectors = capacity / 512;
    let cyl = (sectors / (255 * 63)).max(1);
    let cid = (sectors as u32) ^ ((sectors >> 32) as u32) ^ 0x7672_6721;
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW {sectors} VMFS \"{flat_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"{adapter}\"\n\
         ddb.geometry.cylinders = \"{cyl}\"\nddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\nddb.thinProvisioned = \"1\"\nddb.virtualHWVersion = \"13\"\n"
    )
}

/// A disk being written as descriptor + flat extent (see the module docs).
pub struct FlatWriter {
    folder: Folder,
    descriptor: DsPath,
    flat: DsPath,
    capacity: u64,
    written: u64,
    tx: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    task: Option<JoinHandle<Result<()>>>,
    done: bool,
}

impl std::fmt::Debug for FlatWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatWriter")
            .field("descriptor", &self.descriptor.display())
            .field("written", &self.written)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl FlatWriter {
    /// Starts the PUT of the flat extent next to `descriptor`.
    pub async fn start(folder: Folder, descriptor: DsPath, capacity: u64) -> Result<FlatWriter> {
        if capacity == 0 || !capacity.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "a vSphere disk is a whole number of 512-byte sectors; {capacity} bytes is not"
            )));
        }
        let stem = descriptor
            .path
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".vmdk"))
            .ok_or_else(|| Error::invalid("a disk descriptor name must end in .vmdk"))?
            .to_string();
        let flat = descriptor.sibling(&format!("{stem}-flat.vmdk"));
        let (tx, task) = folder.put_stream(&flat, capacity).await?;
        Ok(FlatWriter {
            folder,
            descriptor,
            flat,
            capacity,
            written: 0,
            tx: Some(tx),
            task: Some(task),
            done: false,
        })
    }

    async fn push(&mut self, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        if self.written + n > self.capacity {
            return Err(Error::invalid(format!(
                "more data than the disk's {} bytes",
                self.capacity
            )));
        }
        let Some(tx) = self.tx.as_mut() else {
            return Err(Error::new(
                ErrorKind::Provider,
                "disk writer already finished",
            ));
        };
        if tx.send(Ok(data)).await.is_err() {
            // The request ended early: its error says why.
            return Err(self.join().await.err().unwrap_or_else(|| {
                Error::new(ErrorKind::Network, "the datastore upload ended early")
            }));
        }
        self.written += n;
        Ok(())
    }

    async fn join(&mut self) -> Result<()> {
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| Error::new(ErrorKind::Provider, format!("upload task failed: {e}")))?,
            None => Ok(()),
        }
    }

    async fn cleanup(&self) {
        for p in [&self.descriptor, &self.flat] {
            if let Err(e) = self.folder.delete(p).await {
                warn!(path = %p.display(), error = %e, "could not delete a partial disk file");
            }
        }
    }
}

#[async_trait]
impl ByteSink for FlatWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.push(data).await
    }

    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        // A PUT cannot skip: zeros go on the wire, but cost no reads upstream.
        let zeros = Bytes::from_static(&virtrigaud_core::io::ZEROS);
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            self.push(zeros.slice(..n)).await?;
            left -= n as u64;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let r = async {
            if self.written != self.capacity {
                return Err(Error::invalid(format!(
                    "disk incomplete: {} of {} bytes written",
                    self.written, self.capacity
                )));
            }
            self.tx = None;
            self.join().await?;
            let name = self
                .flat
                .path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            let text = flat_descriptor(self.capacity, &name, "lsilogic");
            self.folder
                .put_small(&self.descriptor, Bytes::from(text))
                .await
        }
        .await;
        if r.is_err() {
            self.tx = None;
            if let Some(t) = self.task.take() {
                t.abort();
            }
            self.cleanup().await;
        }
        self.done = true;
        r
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.tx = None;
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.cleanup().await;
        self.done = true;
        Ok(())
    }
}

impl Drop for FlatWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        // Dropped without commit or abort: delete in the background when a runtime exists.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let folder = self.folder.clone();
            let paths = [self.descriptor.clone(), self.flat.clone()];
            rt.spawn(async move {
                for p in paths {
                    let _ = folder.delete(&p).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(rs: &[std::ops::Range<u64>], size: u64) -> Vec<bool> {
        let mut m = vec![false; size as usize];
        for r in rs {
            for i in r.start..r.end.min(size) {
                m[i as usize] = true;
            }
        }
        m
    }

    #[test]
    fn range_lists_normalise_and_intersect_like_bitmaps() {
        // A small deterministic generator: every case checked against a bitmap oracle.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let size = 1 + next(64);
            let mut lists = [Vec::new(), Vec::new()];
            for l in &mut lists {
                for _ in 0..next(6) {
                    let a = next(80);
                    l.push(a..a + next(20));
                }
            }
            let [a, b] = lists;
            let na = normalise_ranges(a.clone(), size);
            let nb = normalise_ranges(b.clone(), size);
            assert_eq!(bitmap(&na, size), bitmap(&a, size), "{a:?}");
            for w in na.windows(2) {
                assert!(w[0].end < w[1].start, "not merged: {na:?}");
            }
            assert!(na.iter().all(|r| r.start < r.end && r.end <= size));
            let both = intersect_ranges(&na, &nb);
            let want: Vec<bool> = bitmap(&na, size)
                .iter()
                .zip(bitmap(&nb, size))
                .map(|(p, q)| *p && q)
                .collect();
            assert_eq!(bitmap(&both, size), want, "{na:?} & {nb:?}");
        }
    }

    #[test]
    fn datastore_paths_parse_and_refuse_escapes() {
        let p = DsPath::parse("[LocalDS_0] vm1/disk.vmdk").unwrap();
        assert_eq!(p.datastore, "LocalDS_0");
        assert_eq!(p.path, "vm1/disk.vmdk");
        assert_eq!(p.sibling("disk-flat.vmdk").path, "vm1/disk-flat.vmdk");
        assert_eq!(p.display(), "[LocalDS_0] vm1/disk.vmdk");
        assert!(DsPath::parse("[ds] ../x.vmdk").is_err());
        assert!(DsPath::parse("[ds] a//b").is_err());
        assert!(DsPath::parse("ds/x").is_err());
        assert!(DsPath::parse("[] x").is_err());
    }

    #[test]
    fn our_descriptor_parses_back() {
        let t = flat_descriptor(10 << 20, "d-flat.vmdk", "lsilogic");
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.virtual_size(), 10 << 20);
        assert_eq!(d.extents[0].kind, ExtentKind::Flat);
        assert_eq!(d.extents[0].file.as_deref(), Some("d-flat.vmdk"));
    }
}

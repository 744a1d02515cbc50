//! A storage backend of your own: implement [`StorageBackend`] (seven required methods), prove it
//! with the shared conformance suite every built-in backend runs, and every transfer works on
//! it. No server needed: this one keeps objects in memory.
//!
//! ```text
//! cargo run --release --example custom_backend
//! ```
//!
//! It runs the conformance suite on the backend (a failed check panics: non-zero exit), then
//! exports a sample disk into it as qcow2 with its manifest, verifies the stored object
//! against the manifest, and imports it back as raw with equal content digests.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use virtrigaud::storage::conformance;
use virtrigaud::{
    ByteSink, ByteStream, DiskFormat, DiskInfo, Error, ErrorKind, ExportOptions, Firmware,
    ImportOptions, LocalProvider, ObjectMeta, PowerState, PutOptions, Result, StorageBackend,
    StorageCapabilities, VmInfo, export_disk, import_disk, validate_key, verify_object,
};

type Objects = Arc<Mutex<BTreeMap<String, Bytes>>>;

/// Objects in a map; a put becomes visible on commit, atomically.
#[derive(Debug, Default, Clone)]
struct MemoryStore {
    objects: Objects,
}

fn poisoned() -> Error {
    Error::new(ErrorKind::Storage, "store lock poisoned")
}

impl MemoryStore {
    fn object(&self, key: &str) -> Result<Bytes> {
        validate_key(key)?;
        self.objects
            .lock()
            .map_err(|_| poisoned())?
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no object {key}")))
    }
}

/// Buffers a put and publishes it on commit.
struct MemorySink {
    objects: Objects,
    key: String,
    overwrite: bool,
    buf: Vec<u8>,
}

#[async_trait]
impl ByteSink for MemorySink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&data);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        let mut map = self.objects.lock().map_err(|_| poisoned())?;
        if !self.overwrite && map.contains_key(&self.key) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists", self.key),
            ));
        }
        map.insert(self.key, Bytes::from(self.buf));
        Ok(())
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(()) // nothing was published
    }
}

#[async_trait]
impl StorageBackend for MemoryStore {
    fn location(&self) -> String {
        "memory://".into()
    }

    fn capabilities(&self) -> StorageCapabilities {
        StorageCapabilities {
            ranged_read: true,
            list: true,
            atomic_put: true,
            ..Default::default()
        }
    }

    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        validate_key(key)?;
        if !opts.overwrite
            && self
                .objects
                .lock()
                .map_err(|_| poisoned())?
                .contains_key(key)
        {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{key} exists"),
            ));
        }
        Ok(Box::new(MemorySink {
            objects: self.objects.clone(),
            key: key.to_string(),
            overwrite: opts.overwrite,
            buf: Vec::new(),
        }))
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        let data = self.object(key)?;
        let len = data.len() as u64;
        let r = range.unwrap_or(0..len);
        if r.start > r.end || r.start > len {
            return Err(Error::invalid(format!(
                "range {}..{} outside 0..{len}",
                r.start, r.end
            )));
        }
        // Served in 1 MiB pieces, as a network backend would stream it.
        let piece = data.slice(r.start as usize..r.end.min(len) as usize);
        let chunks: Vec<Result<Bytes>> = (0..piece.len())
            .step_by(1 << 20)
            .map(|o| Ok(piece.slice(o..(o + (1 << 20)).min(piece.len()))))
            .collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }

    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        let data = self.object(key)?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
            etag: None,
            last_modified: None,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.objects.lock().map_err(|_| poisoned())?.remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let map = self.objects.lock().map_err(|_| poisoned())?;
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                etag: None,
                last_modified: None,
            })
            .collect())
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    virtrigaud::io::limit_allocator_retention();
    let store = MemoryStore::default();

    // 1. The conformance suite every built-in backend runs against its real peer.
    //    Its raw listing hook is what the store really holds (here: the map; a put in progress
    //    lives in its sink until commit), so "an aborted or dropped put leaves nothing" is
    //    checked on the store itself rather than through `list`.
    let objects = store.objects.clone();
    let raw: conformance::RawNames = Arc::new(move |prefix: String| {
        let held: Vec<String> = objects
            .lock()
            .map(|m| {
                m.keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { held })
    });
    conformance::run_all(Arc::new(store.clone()), "conformance", raw).await;
    println!("conformance suite: passed");

    // 2. A sample VM with one sparse raw disk (64 MiB virtual, 3 MiB of data).
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("source/demo/disk0.raw");
    std::fs::create_dir_all(disk.parent().ok_or("no parent")?)?;
    let f = std::fs::File::create(&disk)?;
    f.set_len(64 << 20)?;
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0x5a; 1 << 20], 5 << 20)?;
        f.write_all_at(&vec![0xa5; 2 << 20], 40 << 20)?;
    }
    let source = LocalProvider::new(dir.path().join("source"));
    source
        .write_vm(
            &VmInfo {
                annotation: None,
                id: "demo".into(),
                name: "demo".into(),
                cpus: 1,
                memory_mib: 512,
                firmware: Firmware::Bios,
                machine: None,
                guest_os: None,
                state: PowerState::Stopped,
                disks: vec![DiskInfo {
                    id: "disk0".into(),
                    capacity: 64 << 20,
                    allocation: None,
                    format: Some(DiskFormat::Raw),
                    bus: None,
                    location: "disk0.raw".into(),
                }],
                nics: vec![],
            },
            false,
        )
        .await?;

    // 3. Export into the custom backend, verify, import back.
    let key = "demo/disk0.qcow2";
    let exported = export_disk(
        &source,
        "demo",
        "disk0",
        &store,
        key,
        &ExportOptions::default(),
    )
    .await?;
    let m = verify_object(&store, key, &ImportOptions::default()).await?;
    let target = LocalProvider::new(dir.path().join("target"));
    let imported = import_disk(
        &store,
        key,
        &target,
        "demo",
        "disk0",
        &ImportOptions {
            format: Some(DiskFormat::Raw),
            ..Default::default()
        },
    )
    .await?;
    println!(
        "exported {} bytes as {} (sha256 {}), imported as {} ({}); content digest {}",
        exported.manifest.stored_size,
        exported.manifest.format,
        m.object_digest.value,
        imported.format,
        imported.location,
        m.content_digest.value
    );
    if imported.transfer.content_digest.as_deref() != Some(m.content_digest.value.as_str()) {
        return Err("content digests differ".into());
    }
    println!("OK");
    Ok(())
}

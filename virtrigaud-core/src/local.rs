//! The local image-directory provider: offline disk images plus one small JSON description per
//! VM. Useful by itself (a shelf of images) and the embedded default of the quickstart.
//!
//! Layout under the root directory:
//!
//! ```text
//! <root>/<vm>/vm.json        the VM's VmInfo (disks[].location is a file name in <root>/<vm>/)
//! <root>/<vm>/<disk files>   raw, qcow2 or VMDK images, detected by magic
//! ```
//!
//! Offline images have no power state and no snapshots: those operations return `Unsupported`.
//! New disks are written under a temporary name and renamed on commit; nothing is overwritten
//! unless asked; temporary files a killed process left are removed by a later write to the
//! same directory once they are a day old (see [`temp`](crate::temp)). Files are created with mode 0600 (owner only: a disk image holds a whole file
//! system); [`LocalProvider::with_file_mode`] changes that.

use crate::format::{self, DiskFormat};
use crate::io::{FileCreateOptions, ImageSource, LocalFile, LocalFileSink, ReadAt};
use crate::provider::*;
use crate::{Error, ErrorKind, Result};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of a VM's description inside its directory.
pub const VM_FILE: &str = "vm.json";

/// A directory of offline VMs.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    root: PathBuf,
    default_format: DiskFormat,
    file: FileCreateOptions,
}

/// Checks a VM or disk name used as a single path component.
fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.len() > 200
    {
        return Err(Error::invalid(format!("invalid {kind} name {name:?}")));
    }
    Ok(())
}

impl LocalProvider {
    /// A provider over `root` (created if missing on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalProvider {
            root: root.into(),
            default_format: DiskFormat::Raw,
            file: FileCreateOptions::default(),
        }
    }

    /// Sets the permission bits of the disk images and VM descriptions this provider creates
    /// (default [`DEFAULT_FILE_MODE`](crate::io::DEFAULT_FILE_MODE), 0600).
    pub fn with_file_mode(mut self, mode: u32) -> Self {
        self.file = self.file.mode(mode);
        self
    }

    /// Sets the age after which temporary files that interrupted writes left in a VM's
    /// directory are removed, by the next write to that directory (default 24 h; `None`:
    /// never; see [`temp`](crate::temp)).
    pub fn with_temp_max_age(mut self, max_age: Option<std::time::Duration>) -> Self {
        self.file = self.file.sweep_temp_after(max_age);
        self
    }

    /// Sets the format of disks created without a preference.
    pub fn with_default_format(mut self, format: DiskFormat) -> Self {
        self.default_format = format;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vm_dir(&self, vm: &str) -> Result<PathBuf> {
        check_name("VM", vm)?;
        Ok(self.root.join(vm))
    }

    /// Path of a disk file of a VM.
    pub fn disk_path(&self, vm: &str, location: &str) -> Result<PathBuf> {
        check_name("disk file", location)?;
        Ok(self.vm_dir(vm)?.join(location))
    }

    async fn read_vm(&self, vm: &str) -> Result<VmInfo> {
        let path = self.vm_dir(vm)?.join(VM_FILE);
        let data = tokio::fs::read(&path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!("no VM named {vm:?} in {}", self.root.display()))
            } else {
                Error::io(e, "cannot read VM description")
            }
        })?;
        let info: VmInfo = serde_json::from_slice(&data)
            .map_err(|e| Error::corrupt(format!("invalid {}: {e}", path.display())))?;
        for d in &info.disks {
            check_name("disk file", &d.location)
                .map_err(|e| e.with_vm(vm.to_string()).with_disk(d.id.clone()))?;
        }
        Ok(info)
    }

    /// Writes a VM description (used by [`Provider::create_vm`] and to register existing images).
    pub async fn write_vm(&self, info: &VmInfo, overwrite: bool) -> Result<()> {
        let dir = self.vm_dir(&info.name)?;
        tokio::fs::create_dir_all(&dir).await?;
        let json = serde_json::to_vec_pretty(info)
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        let mut sink = Box::new(
            LocalFileSink::create_with(dir.join(VM_FILE), &self.file.clone().overwrite(overwrite))
                .await?,
        );
        use crate::io::ByteSink;
        sink.write(bytes::Bytes::from(json)).await?;
        sink.commit().await
    }

    fn find_disk<'a>(info: &'a VmInfo, disk: &str) -> Result<&'a DiskInfo> {
        info.disks
            .iter()
            .find(|d| d.id == disk || d.location == disk)
            .ok_or_else(|| Error::not_found(format!("VM {:?} has no disk {disk:?}", info.name)))
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            export: true,
            import: true,
            create_vm: true,
            random_access_read: true,
            ..Capabilities::default()
        }
    }

    async fn validate(&self) -> Result<()> {
        // A missing root is created: an empty image directory is a valid (empty) provider.
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| Error::io(e, format!("cannot create {}", self.root.display())))?;
        match tokio::fs::metadata(&self.root).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::invalid(format!(
                "{} is not a directory",
                self.root.display()
            ))),
            Err(e) => Err(Error::io(e, format!("cannot use {}", self.root.display()))),
        }
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>> {
        let mut out = Vec::new();
        let mut rd = match tokio::fs::read_dir(&self.root).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = rd.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if check_name("VM", &name).is_err() || !entry.path().join(VM_FILE).is_file() {
                continue;
            }
            let info = self.read_vm(&name).await?;
            out.push(VmSummary {
                id: name.clone(),
                name,
                state: info.state,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn describe_vm(&self, vm: &str) -> Result<VmInfo> {
        let mut info = self.read_vm(vm).await?;
        for d in &mut info.disks {
            let path = self.disk_path(vm, &d.location)?;
            let f = LocalFile::open(&path)
                .await
                .map_err(|e| e.with_vm(vm).with_disk(d.id.clone()))?;
            let (fmt, size) = format::probe(&f)
                .await
                .map_err(|e| e.with_disk(d.id.clone()))?;
            d.format = Some(fmt);
            d.capacity = size;
            d.allocation = f
                .data_ranges()
                .await?
                .map(|r| r.iter().map(|r| r.end - r.start).sum());
        }
        info.id = vm.to_string();
        Ok(info)
    }

    async fn power(&self, vm: &str, _op: PowerOp) -> Result<()> {
        Err(
            Error::unsupported("offline images in a local directory have no power state")
                .with_vm(vm),
        )
    }

    async fn create_snapshot(&self, vm: &str, _name: &str) -> Result<SnapshotRef> {
        Err(Error::unsupported("the local provider has no snapshots").with_vm(vm))
    }

    async fn delete_snapshot(&self, vm: &str, _snapshot: &SnapshotRef) -> Result<()> {
        Err(Error::unsupported("the local provider has no snapshots").with_vm(vm))
    }

    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk> {
        if snapshot.is_some() {
            return Err(Error::unsupported("the local provider has no snapshots").with_vm(vm));
        }
        let info = self.describe_vm(vm).await?;
        let d = Self::find_disk(&info, disk)?.clone();
        let f = LocalFile::open(self.disk_path(vm, &d.location)?).await?;
        Ok(OpenedDisk {
            info: d,
            source: ImageSource::RandomAccess(Arc::new(f)),
        })
    }

    /// Every disk of a local VM lives in its directory (placements are not used) and a NIC's
    /// network is only recorded: nothing can be missing.
    async fn check_placement(
        &self,
        _placements: &[Option<String>],
        _networks: &[String],
    ) -> Result<crate::PlacementCheck> {
        Ok(crate::PlacementCheck::default())
    }

    async fn create_disk(&self, spec: &DiskCreateSpec) -> Result<CreatedDisk> {
        let format = spec.format.unwrap_or(self.default_format);
        check_name("disk", &spec.name)?;
        let location = format!("{}.{}", spec.name, format.extension());
        let path = self.disk_path(&spec.vm, &location)?;
        let mut sink =
            LocalFileSink::create_with(&path, &self.file.clone().overwrite(spec.overwrite))
                .await
                .map_err(|e| e.with_vm(spec.vm.clone()).with_disk(spec.name.clone()))?;
        if format == DiskFormat::Raw {
            // A raw image is exactly the capacity long.
            sink.set_size_hint(spec.capacity).await;
        }
        Ok(CreatedDisk {
            format,
            location,
            sink: Box::new(sink),
        })
    }

    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let path = self.disk_path(&spec.name, &d.location)?;
            if !path.is_file() {
                return Err(Error::not_found(format!(
                    "disk {} of VM {} does not exist at {}",
                    d.location,
                    spec.name,
                    path.display()
                )));
            }
            disks.push(DiskInfo {
                id: format!("disk{i}"),
                capacity: 0,
                allocation: None,
                format: Some(d.format),
                bus: Some(d.bus),
                location: d.location.clone(),
            });
        }
        let info = VmInfo {
            annotation: spec.annotation.clone(),
            id: spec.name.clone(),
            name: spec.name.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            firmware: spec.firmware,
            machine: spec.machine.clone(),
            guest_os: spec.guest_os.clone(),
            state: PowerState::Stopped,
            disks,
            nics: spec.nics.clone(),
        };
        self.write_vm(&info, spec.overwrite).await.map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::AlreadyExists,
                    format!("VM {} already exists", spec.name),
                )
            } else {
                e
            }
        })?;
        self.describe_vm(&spec.name).await
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        self.read_vm(vm).await?;
        tokio::fs::remove_dir_all(self.vm_dir(vm)?).await?;
        Ok(())
    }

    async fn find_disk(&self, spec: &DiskCreateSpec) -> Result<Option<String>> {
        check_name("disk", &spec.name)?;
        let formats = [
            spec.format.unwrap_or(self.default_format),
            DiskFormat::Raw,
            DiskFormat::Qcow2,
            DiskFormat::Vmdk(format::VmdkSubformat::MonolithicSparse),
        ];
        for f in formats {
            let location = format!("{}.{}", spec.name, f.extension());
            // Only committed disks: temporary files live under other names.
            if tokio::fs::metadata(self.disk_path(&spec.vm, &location)?)
                .await
                .is_ok_and(|m| m.is_file())
            {
                return Ok(Some(location));
            }
        }
        Ok(None)
    }

    async fn open_created_disk(&self, vm: &str, location: &str) -> Result<OpenedDisk> {
        let path = self.disk_path(vm, location)?;
        let f = LocalFile::open(&path).await?;
        let (fmt, size) = format::probe(&f).await?;
        Ok(OpenedDisk {
            info: DiskInfo {
                id: location.to_string(),
                capacity: size,
                allocation: None,
                format: Some(fmt),
                bus: None,
                location: location.to_string(),
            },
            source: ImageSource::RandomAccess(Arc::new(f)),
        })
    }

    async fn delete_disk(&self, vm: &str, location: &str) -> Result<()> {
        match tokio::fs::remove_file(self.disk_path(vm, location)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                e,
                format!("cannot delete disk {location} of {vm}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    async fn write_disk(p: &LocalProvider, name: &str) -> PathBuf {
        let created = p
            .create_disk(&DiskCreateSpec {
                vm: "vm1".into(),
                name: name.into(),
                capacity: 4096,
                format: Some(DiskFormat::Raw),
                placement: None,
                overwrite: false,
            })
            .await
            .unwrap();
        let mut sink = created.sink;
        sink.write(bytes::Bytes::from_static(b"data"))
            .await
            .unwrap();
        sink.commit().await.unwrap();
        p.disk_path("vm1", &created.location).unwrap()
    }

    fn vm() -> VmInfo {
        serde_json::from_str(r#"{"id":"vm1","name":"vm1","cpus":1,"memory_mib":64,"disks":[]}"#)
            .unwrap()
    }

    #[tokio::test]
    async fn created_files_are_owner_only_unless_configured() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalProvider::new(dir.path().join("a"));
        let disk = write_disk(&p, "d0").await;
        assert_eq!(mode(&disk), 0o600);
        p.write_vm(&vm(), false).await.unwrap();
        assert_eq!(mode(&dir.path().join("a/vm1").join(VM_FILE)), 0o600);

        let p = LocalProvider::new(dir.path().join("b")).with_file_mode(0o640);
        let disk = write_disk(&p, "d0").await;
        assert_eq!(mode(&disk), 0o640);
        p.write_vm(&vm(), false).await.unwrap();
        assert_eq!(mode(&dir.path().join("b/vm1").join(VM_FILE)), 0o640);
    }
}

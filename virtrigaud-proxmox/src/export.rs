//! Which read path a disk takes, by the type of the PVE storage it lives on, and the qcow2
//! internal-snapshot view for file storages.
//!
//! What upstream `pvesm export` really does (pve-storage 9.1, `volume_export` of each plugin):
//!
//! | storage type            | `raw+size`, no snapshot | `raw+size` of a snapshot              |
//! |-------------------------|-------------------------|---------------------------------------|
//! | dir, nfs, cifs, btrfs   | yes (`Plugin.pm`)       | refused ("format not available")      |
//! | lvm (thick)             | yes                     | refused ("cannot export a snapshot")  |
//! | lvmthin                 | yes (inherits lvm)      | refused (same)                        |
//! | rbd                     | yes                     | **ignores `--snapshot`**: live image  |
//! | zfspool                 | refused (`zfs` only)    | refused (`zfs send` stream only)      |
//! | iscsi, iscsidirect, zfs over iSCSI, cephfs, pbs, esxi | refused | refused           |
//!
//! So [`read_path`] picks, per storage type:
//! * **file storages** (dir, nfs, cifs, btrfs) without a snapshot: `pvesm path` and ranged SFTP
//!   reads of the image file (a qcow2 keeps its allocation map);
//! * **file storages with a snapshot**: PVE snapshots a qcow2 on a file storage *inside* the
//!   file (an internal qcow2 snapshot of the same name), so the file is read over SFTP through
//!   [`SnapshotView`], which presents the snapshot's L1 table as the active one. A raw file
//!   cannot hold a snapshot, and a storage with `snapshot-as-volume-chain` (PVE 9, external
//!   snapshot files) is not handled: both `Unsupported`;
//! * **lvm, lvmthin, rbd** without a snapshot: the `pvesm export … raw+size` stream;
//! * **zfspool** without a snapshot: the zvol device (`pvesm path` gives `/dev/zvol/…`), its
//!   size from `blockdev --getsize64`, read with ranged SFTP reads;
//! * every other combination is `Unsupported` naming the storage type and the alternative
//!   (stop the VM and migrate without a snapshot). In particular an lvmthin, ZFS or RBD
//!   snapshot: upstream exports none of them as raw (RBD would silently give the live image),
//!   and reading them as devices would mean changing the node (activating a thin snapshot LV,
//!   setting `snapdev=visible` on a zvol), which this provider does not do behind the
//!   administrator's back.

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use virtrigaud_core::io::ReadAt;
use virtrigaud_core::{Error, Result};

/// How one disk is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// `pvesm path` + ranged SFTP reads of the image file (with a snapshot: the qcow2 internal
    /// snapshot of that name, through [`SnapshotView`]).
    File,
    /// `pvesm export VOLID raw+size -` (no snapshot).
    ExportStream,
    /// `pvesm path` gives a block device; `blockdev --getsize64` its size; ranged SFTP reads.
    Device,
}

/// The read path for a volume on a storage of type `stype` (its configuration `scfg`), from
/// a snapshot or not; `Unsupported` naming the storage type for what cannot be read.
pub fn read_path(
    stype: &str,
    scfg: &serde_json::Map<String, serde_json::Value>,
    volid: &str,
    snapshot: bool,
) -> Result<ReadPath> {
    let storage = volid.split_once(':').map_or(volid, |(s, _)| s);
    let refuse = |why: &str| {
        Err(Error::unsupported(format!(
            "volume {volid} on storage {storage:?} (type {stype}): {why}"
        ))
        .with_disk(volid.to_string()))
    };
    let stop_first = "stop the VM and migrate it without a snapshot (prepare: shutdown)";
    match (stype, snapshot) {
        ("dir" | "nfs" | "cifs" | "btrfs", false) => Ok(ReadPath::File),
        ("dir" | "nfs" | "cifs", true) => {
            let chain = scfg
                .get("snapshot-as-volume-chain")
                .is_some_and(|v| v.as_u64() == Some(1) || v.as_str() == Some("1"));
            if chain {
                refuse(&format!(
                    "snapshots kept as external volume chains are not read; {stop_first}"
                ))
            } else if !volid.ends_with(".qcow2") {
                refuse(&format!(
                    "only a qcow2 file holds a snapshot on a file storage; {stop_first}"
                ))
            } else {
                Ok(ReadPath::File)
            }
        }
        ("lvm" | "lvmthin" | "rbd", false) => Ok(ReadPath::ExportStream),
        ("zfspool", false) => Ok(ReadPath::Device),
        ("lvm" | "lvmthin" | "btrfs", true) => refuse(&format!(
            "`pvesm export` cannot export a snapshot of this storage type; {stop_first}"
        )),
        ("rbd", true) => refuse(&format!(
            "`pvesm export` ignores the snapshot on RBD and would give the live image; {stop_first}"
        )),
        ("zfspool", true) => refuse(&format!(
            "`pvesm export` gives only `zfs send` streams, and a zvol snapshot is a device only \
             with snapdev=visible, which this provider does not set; {stop_first}"
        )),
        _ => refuse(
            "this provider reads disks only from dir, nfs, cifs, btrfs, lvm, lvmthin, rbd and \
             zfspool storages",
        ),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Bytes of the qcow2 header that [`SnapshotView`] rewrites (up to `snapshots_offset`).
const PATCHED: usize = 72;
/// Most snapshots a table may list for us to read it.
const MAX_SNAPSHOTS: u32 = 65536;
/// The snapshot table is read at most this large.
const MAX_TABLE: u64 = 64 << 20;

/// A qcow2 file seen as it was at one of its internal snapshots: the header's active L1 table
/// (and virtual size) are replaced by the snapshot's, and the snapshot table is hidden. The
/// clusters a snapshot references are copy-on-write in qcow2, so the view stays consistent
/// while a running guest writes to the file.
pub struct SnapshotView {
    inner: Arc<dyn ReadAt>,
    header: [u8; PATCHED],
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView").finish_non_exhaustive()
    }
}

impl SnapshotView {
    /// Finds the internal snapshot `name` in the qcow2 `inner`; `NotFound` when it has none by
    /// that name, `Corrupt` when the header or snapshot table is damaged.
    pub async fn open(inner: Arc<dyn ReadAt>, name: &str) -> Result<SnapshotView> {
        let head = inner.read_exact_at(0, PATCHED).await?;
        if head.get(..4) != Some(b"QFI\xfb".as_slice()) {
            return Err(Error::corrupt("not a qcow2 file (a snapshot needs one)"));
        }
        let bad = || Error::corrupt("qcow2 header is damaged");
        let nb = be32(&head, 60).ok_or_else(bad)?;
        let table = be64(&head, 64).ok_or_else(bad)?;
        if nb > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!("qcow2 lists {nb} snapshots")));
        }
        // Each entry is at least 40 bytes plus its names; read the table in one go, bounded.
        let len = (inner.size().saturating_sub(table)).min(MAX_TABLE) as usize;
        let t = if nb == 0 {
            Bytes::new()
        } else {
            inner.read_at(table, len).await?
        };
        let mut at = 0usize;
        for _ in 0..nb {
            let l1_offset = be64(&t, at).ok_or_else(bad)?;
            let l1_size = be32(&t, at + 8).ok_or_else(bad)?;
            let id_len = be16(&t, at + 12).ok_or_else(bad)? as usize;
            let name_len = be16(&t, at + 14).ok_or_else(bad)? as usize;
            let extra = be32(&t, at + 36).ok_or_else(bad)? as usize;
            let extra_at = at + 40;
            // Extra data bytes 8..16: the virtual size at the snapshot (absent in old files).
            let disk_size = if extra >= 16 {
                Some(be64(&t, extra_at + 8).ok_or_else(bad)?)
            } else {
                None
            };
            let name_at = extra_at + extra + id_len;
            let this = t.get(name_at..name_at + name_len).ok_or_else(bad)?;
            if this == name.as_bytes() {
                let mut header = [0u8; PATCHED];
                header.copy_from_slice(&head);
                if let Some(s) = disk_size {
                    header[24..32].copy_from_slice(&s.to_be_bytes());
                }
                header[36..40].copy_from_slice(&l1_size.to_be_bytes());
                header[40..48].copy_from_slice(&l1_offset.to_be_bytes());
                header[60..64].copy_from_slice(&0u32.to_be_bytes());
                header[64..72].copy_from_slice(&0u64.to_be_bytes());
                return Ok(SnapshotView { inner, header });
            }
            at = (name_at + name_len).next_multiple_of(8);
        }
        Err(Error::not_found(format!(
            "the qcow2 file has no internal snapshot {name:?}"
        )))
    }
}

#[async_trait]
impl ReadAt for SnapshotView {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let b = self.inner.read_at(offset, len).await?;
        if offset >= PATCHED as u64 || b.is_empty() {
            return Ok(b);
        }
        let mut v = b.to_vec();
        let start = offset as usize;
        let end = (start + v.len()).min(PATCHED);
        v[..end - start].copy_from_slice(&self.header[start..end]);
        Ok(Bytes::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use virtrigaud_core::ErrorKind;

    #[test]
    fn read_paths_follow_upstream_pvesm() {
        let none = Map::new();
        let p = |t: &str, v: &str, s: bool| read_path(t, &none, v, s);
        assert_eq!(
            p("dir", "local:100/vm-100-disk-0.raw", false).unwrap(),
            ReadPath::File
        );
        assert_eq!(
            p("nfs", "n:100/vm-100-disk-0.qcow2", true).unwrap(),
            ReadPath::File
        );
        assert_eq!(
            p("lvmthin", "local-lvm:vm-100-disk-0", false).unwrap(),
            ReadPath::ExportStream
        );
        assert_eq!(
            p("rbd", "c:vm-1-disk-0", false).unwrap(),
            ReadPath::ExportStream
        );
        assert_eq!(
            p("zfspool", "z:vm-1-disk-0", false).unwrap(),
            ReadPath::Device
        );
        for (t, v, s) in [
            ("dir", "local:100/vm-100-disk-0.raw", true),
            ("lvm", "vg:vm-1-disk-0", true),
            ("lvmthin", "local-lvm:vm-1-disk-0", true),
            ("rbd", "c:vm-1-disk-0", true),
            ("zfspool", "z:vm-1-disk-0", true),
            ("iscsi", "i:0.0.1.scsi-x", false),
            ("pbs", "b:backup/x", false),
        ] {
            let e = p(t, v, s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{t} {s}");
            assert!(e.to_string().contains(&format!("type {t}")), "{e}");
        }
        let mut chain = Map::new();
        chain.insert("snapshot-as-volume-chain".into(), 1.into());
        let e = read_path("dir", &chain, "local:1/vm-1-disk-0.qcow2", true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}

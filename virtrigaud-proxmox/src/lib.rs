//! virtrigaud provider for Proxmox VE: the PVE REST API for everything it can do, and SSH to
//! the node for the one thing it cannot (streaming a disk out).
//!
//! Layout, as in the storage backends: [`config`] (endpoint, credentials, TLS, SSH),
//! [`client`] (our own client, one method per API call; why not a crate is in its docs),
//! [`props`] (the drive and NIC property-string parsers), [`upload`] (the streamed multipart
//! body), [`ssh`] (the export data paths), `error` (PVE answers → `ErrorKind`) and
//! [`ProxmoxProvider`] (the [`Provider`](virtrigaud_core::Provider) implementation).
//!
//! # Import: stage, then create with `import-from`
//!
//! PVE has no "create an empty disk and stream into it" API. Since PVE 8.4 a file storage
//! takes disk images as content type `import` (by streamed upload or by `download-url`), and
//! since 7.2 a VM is created with `scsiN=TARGET:0,import-from=STORAGE:import/FILE`, which copies
//! the image into a new volume on the target storage (any type: LVM, ZFS, Ceph, dir). So:
//!
//! * [`create_disk`](virtrigaud_core::Provider::create_disk) *stages* the disk: its sink is the
//!   body of a running upload to the import storage (`vrg-<vm>-<disk>.raw`). Raw, because the
//!   pipeline re-encodes into the sink's format and only raw has a length known before the
//!   first byte (the capacity), and PVE needs an exact `Content-Length`. Its cost is the virtual
//!   size on the wire (holes are sent as zeros);
//! * [`ProxmoxProvider::upload_object`] uploads a staged object **as it is stored** (sparse
//!   qcow2, raw or single-extent VMDK) with its manifest's size and SHA-256 (`checksum`), so PVE
//!   verifies what it stored, and [`ProxmoxProvider::pull_object`] lets PVE fetch it itself
//!   from a presigned URL (`download-url`, capability `pull_from_url`): no disk byte passes
//!   through this process. These two are the efficient paths, and the `Migration` runner takes
//!   them through [`Provider::import_staged`](virtrigaud_core::Provider::import_staged): a pull
//!   when the staging store can presign (S3) and `MigrationPlan::target_pull` is on (the
//!   default; the CLI's `--no-pull` turns it off for a node that cannot reach the store), an
//!   upload as stored otherwise; `create_disk` remains for formats PVE cannot import;
//! * the location of a staged disk is PVE's own drive syntax, `TARGET:0,import-from=VOLID`,
//!   naming both the staged import file and the storage the VM's disk is created on
//!   (`DiskCreateSpec::placement`, default [`ProxmoxConfig::target_storage`]);
//! * [`create_vm`](virtrigaud_core::Provider::create_vm) creates the VM with one `import-from`
//!   drive per disk, NICs on the mapped bridges (`vmbr0.42` means bridge `vmbr0`, VLAN tag 42),
//!   `bios=ovmf` plus an `efidisk0` for UEFI, `ostype` from [`provider::ostype_for`], and the
//!   annotation as its description; it never replaces a VM of the same name unless
//!   `overwrite` is set, and deletes the staged import files once the VM holds its copies.
//!
//! Runner contract: a staged file's name is derived from the VM and disk names the runner gives
//! (unique to a migration), so [`find_disk`](virtrigaud_core::Provider::find_disk) finds it again
//! after a crash; PVE writes an upload to a temporary file and moves it into the storage only
//! once the request completed (and its checksum matched), so a killed upload never shows up as
//! a staged disk. [`open_created_disk`](virtrigaud_core::Provider::open_created_disk) re-reads a
//! staged file over SSH/SFTP; the VM's description carries the runner's marker.
//!
//! # Export: SSH to the node
//!
//! No PVE API streams a disk out, and upstream `pvesm export … raw+size` does not cover every
//! storage type (ZFS exports only `zfs send` streams; no plugin exports a snapshot as raw, and
//! RBD silently ignores the snapshot). [`open_disk`](virtrigaud_core::Provider::open_disk)
//! therefore picks the read path from the storage's type in the API's storage config
//! ([`export::read_path`], with the upstream table):
//! dir/NFS/CIFS/btrfs → `pvesm path` + ranged SFTP reads of the image file (a qcow2 keeps its
//! allocation map; from a snapshot: the qcow2's internal snapshot of that name,
//! [`export::SnapshotView`]); lvm/lvmthin/rbd → the `pvesm export` stream; zfspool → the zvol
//! device over SFTP with its size from `blockdev --getsize64`. A snapshot on lvm, lvmthin,
//! zfspool or rbd, and every other storage type, is `Unsupported` naming the type, before any
//! command runs on the node. See [`ssh`] for the transport.
//!
//! # What was tested against what
//!
//! **No real Proxmox VE is obtainable for the tests.** The API paths run against `fakepve`
//! 0.5.0 (an independent fake of the PVE 9 API that checks every parameter against PVE's own API
//! schema); it cannot prove that PVE really imports a disk (`import-from` allocates an empty
//! volume there), that its upload takes `content=import` (it refuses it: the streamed multipart
//! body is proven against an independent Python multipart parser instead), or that
//! `download-url` fetches anything (it never does: the tests fetch the presigned URL
//! themselves). The SSH paths run against a real OpenSSH sshd with a `pvesm` stand-in script
//! that answers `path` and `export … raw+size` from real qemu-img images and refuses per
//! storage type what upstream pve-storage 9.1 refuses; the real `pvesm`, LVM, ZFS and Ceph are
//! not tested (their behaviour is read from pve-storage's source).

#![warn(missing_docs)]

pub mod client;
pub mod config;
mod error;
pub mod export;
pub mod props;
pub mod provider;
pub mod ssh;
mod tls;
pub mod upload;

pub use client::{PveClient, PveVersion};
pub use config::{Auth, ProxmoxConfig, SshConfig, TlsConfig};
pub use provider::ProxmoxProvider;

//! # virtrigaud
//!
//! Streaming, verified, resumable migration of virtual machine disks between hypervisors
//! through intermediate storage. This facade re-exports [`virtrigaud_core`] (the model,
//! formats, digests, pipeline and the local image-directory provider) and
//! [`virtrigaud_storage`], plus the provider crates behind features.
//!
//! ```no_run
//! use virtrigaud::{ExportOptions, ImportOptions, LocalProvider, export_disk, import_disk};
//!
//! # async fn demo() -> virtrigaud::Result<()> {
//! let source = LocalProvider::new("/srv/images");
//! let target = LocalProvider::new("/srv/restored");
//! let store = virtrigaud::storage::open("file:///srv/staging")?;
//! let exported = export_disk(&source, "web01", "disk0", &*store, "web01/disk0.raw",
//!                            &ExportOptions::default()).await?;
//! let imported = import_disk(&*store, "web01/disk0.raw", &target, "web01", "disk0",
//!                            &ImportOptions::default()).await?;
//! assert_eq!(exported.manifest.content_digest, imported.manifest.content_digest);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub use virtrigaud_core::*;

/// Storage backends and URLs.
pub mod storage {
    pub use virtrigaud_storage::*;
}

/// The libvirt provider (feature `libvirt`).
#[cfg(feature = "libvirt")]
pub mod libvirt {
    pub use virtrigaud_libvirt::*;
}

/// The vSphere provider (feature `vsphere`).
#[cfg(feature = "vsphere")]
pub mod vsphere {
    pub use virtrigaud_vsphere::*;
}

/// The Proxmox VE provider (feature `proxmox`).
#[cfg(feature = "proxmox")]
pub mod proxmox {
    pub use virtrigaud_proxmox::*;
}

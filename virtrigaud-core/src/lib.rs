//! # virtrigaud-core
//!
//! The core of virtrigaud: the disk model (a disk is a sparse stream of [`Extent`]s), image
//! formats, digests, manifests, the streaming transfer [`pipeline`], and the traits every
//! hypervisor ([`Provider`]) and intermediate storage ([`StorageBackend`]) implements.
//!
//! Most users depend on the `virtrigaud` facade crate, which re-exports this one.

#![warn(missing_docs)]

pub mod crypt;
pub mod digest;
pub mod error;
pub mod extent;
pub mod format;
pub mod io;
pub mod limit;
pub mod local;
pub mod manifest;
pub mod migration;
pub mod pipeline;
pub mod progress;
pub mod provider;
pub mod secret;
pub mod storage;
pub mod temp;
pub mod testdata;
pub mod transfer;

pub use error::{Error, ErrorContext, ErrorKind, Result, ResultExt};
pub use extent::{AllocationBuilder, AllocationMap, DiskContent, Extent, ExtentStream, Replay};
pub use format::DiskFormat;
pub use io::{ByteSink, ByteStream, ImageSource, ReadAt};
pub use limit::Bandwidth;
pub use local::LocalProvider;
pub use manifest::Manifest;
pub use migration::{
    CleanupPolicy, Migration, MigrationEvent, MigrationPlan, MigrationReport, MigrationState,
    OnFailure, PrepareSource,
};
pub use pipeline::{PipelineOptions, TransferReport};
pub use progress::{Phase, Progress, ProgressFn};
pub use provider::*;
pub use secret::Secret;
pub use storage::{
    ObjectMeta, PutOptions, StorageBackend, StorageCapabilities, StorageExt, validate_key,
};
pub use tokio_util::sync::CancellationToken;
pub use transfer::{
    ExportOptions, ExportReport, ImportOptions, ImportReport, digest_disk, digest_opened_disk,
    export_disk, export_image, import_disk, open_staged, read_manifest, verify_object,
};

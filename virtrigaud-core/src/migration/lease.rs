//! The lease: at most one process runs a migration at a time.
//!
//! `<prefix>/migration.lease` is created with the storage's atomic create
//! ([`PutOptions::overwrite`] `false`: `O_EXCL`-style hard link on files and NFS, `If-None-Match:
//! *` on S3, `Overwrite: F` on WebDAV) and names its holder (host and process id). A second
//! process finds it and stops with [`ErrorKind::Conflict`] naming the holder. The holder
//! renews the lease every `ttl / 3`; a lease older than its expiry, or held by a process of
//! this host that no longer exists (a killed run), is taken over. Where a server ignores the
//! conditional create (nginx ignores `If-None-Match`; some S3-compatible servers do too), two
//! processes starting within the same instant could both believe they hold it: the checkpoint
//! and the migration-unique names still keep them from damaging each other's work, but their
//! work may be done twice.

use crate::storage::{PutOptions, StorageBackend, StorageExt};
use crate::{Error, ErrorKind, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the lease object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When it was taken (Unix seconds).
    pub acquired: u64,
    /// When it expires unless renewed (Unix seconds).
    pub expires: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This machine's host name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown-host".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A held lease; renewed in the background until released or dropped.
#[derive(Debug)]
pub struct Lease {
    storage: Arc<dyn StorageBackend>,
    key: String,
    renew: Option<crate::io::AbortOnDrop<()>>,
}

impl Lease {
    /// Takes the lease at `key`, or fails with `Conflict` naming its holder.
    pub async fn acquire(
        storage: Arc<dyn StorageBackend>,
        key: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        let ttl_s = ttl.as_secs().max(3);
        let me = LeaseRecord {
            host: host_name(),
            pid: std::process::id(),
            acquired: now(),
            expires: now() + ttl_s,
        };
        let body = || -> Result<Bytes> {
            serde_json::to_vec(&me)
                .map(Bytes::from)
                .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
        };
        for attempt in 0..2 {
            match create(storage.as_ref(), key, body()?).await {
                Ok(()) => {
                    let renew = spawn_renewal(storage.clone(), key.to_string(), me.clone(), ttl_s);
                    return Ok(Lease {
                        storage,
                        key: key.to_string(),
                        renew: Some(renew),
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt == 0 => {
                    let held = match storage.get_bytes(key, 1 << 16).await {
                        Ok(b) => serde_json::from_slice::<LeaseRecord>(&b).ok(),
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    let stale = match &held {
                        None => true, // unreadable: a torn write of a dead holder
                        Some(h) => {
                            h.expires < now()
                                || (h.host == me.host && h.pid != me.pid && !process_alive(h.pid))
                        }
                    };
                    if !stale {
                        let h = held.unwrap_or(LeaseRecord {
                            host: "?".into(),
                            pid: 0,
                            acquired: 0,
                            expires: 0,
                        });
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            format!(
                                "this migration is being run by process {} on host {} (lease \
                                 {key}, taken at {} s, renewed until {} s since the epoch); \
                                 wait for it, or stop it",
                                h.pid, h.host, h.acquired, h.expires
                            ),
                        ));
                    }
                    tracing::warn!(key, holder = ?held, "taking over a stale lease");
                    storage.delete(key).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("another process took the lease {key} at the same moment"),
        ))
    }

    /// Releases the lease (deletes it).
    pub async fn release(mut self) -> Result<()> {
        self.renew.take();
        self.storage.delete(&self.key).await
    }
}

async fn create(storage: &dyn StorageBackend, key: &str, data: Bytes) -> Result<()> {
    let mut sink = storage
        .put(
            key,
            &PutOptions {
                size_hint: Some(data.len() as u64),
                overwrite: false,
                content_type: Some("application/json".into()),
                ..Default::default()
            },
        )
        .await?;
    if let Err(e) = sink.write(data).await {
        let _ = sink.abort().await;
        return Err(e);
    }
    sink.commit().await
}

fn spawn_renewal(
    storage: Arc<dyn StorageBackend>,
    key: String,
    mut me: LeaseRecord,
    ttl_s: u64,
) -> crate::io::AbortOnDrop<()> {
    crate::io::AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs((ttl_s / 3).max(1))).await;
            me.expires = now() + ttl_s;
            if let Ok(b) = serde_json::to_vec(&me)
                && let Err(e) = storage.put_bytes(&key, Bytes::from(b)).await
            {
                tracing::warn!(key, error = %e, "cannot renew the migration lease");
            }
        }
    }))
}

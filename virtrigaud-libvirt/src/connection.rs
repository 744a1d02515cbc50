//! A shared libvirt connection whose blocking calls run on tokio's blocking pool.

use crate::error::VirtResultExt;
use std::sync::{Arc, Once};
use virt::connect::Connect;
use virtrigaud_core::{Error, ErrorKind, Result};

/// Silences libvirt's default error printing (every error would go to stderr) once per process.
pub fn silence_libvirt_errors() {
    static ONCE: Once = Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

/// A lazily opened connection to one libvirt URI (`qemu:///system`, `qemu+tcp://…`,
/// `qemu+ssh://…`). libvirt connections are thread-safe; one is shared by all operations and
/// reopened when it dies.
#[derive(Debug)]
pub struct Connection {
    uri: String,
    conn: tokio::sync::Mutex<Option<Arc<Connect>>>,
}

impl Connection {
    /// A connection to `uri`, opened on first use.
    pub fn new(uri: impl Into<String>) -> Self {
        Connection {
            uri: uri.into(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The open connection (opening or reopening it when needed).
    pub async fn get(&self) -> Result<Arc<Connect>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            let c2 = c.clone();
            let alive = blocking(move || Ok(c2.is_alive().unwrap_or(false))).await?;
            if alive {
                return Ok(c.clone());
            }
        }
        silence_libvirt_errors();
        let uri = self.uri.clone();
        let c = blocking(move || {
            Connect::open(Some(&uri))
                .op("connect")
                .map_err(|e| e.with_target(uri.clone()))
        })
        .await?;
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let c = self.get().await?;
        blocking(move || f(&c)).await
    }
}

/// Runs a blocking closure on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Provider, format!("libvirt worker failed: {e}")))?
}

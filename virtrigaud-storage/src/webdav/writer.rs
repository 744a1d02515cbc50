//! [`WebdavWriter`]: a put streamed as one chunked `PUT` to a temporary name, moved over the
//! final name on commit.
//!
//! Bytes handed to [`write`](ByteSink::write) go through a bounded channel
//! ([`WebdavConfig::queue_depth`](super::WebdavConfig::queue_depth) chunks) into the body of a
//! PUT that runs in its own task, so memory stays bounded whatever the object size. Commit ends
//! the body, waits for the server's answer, HEADs the key (a collection is never replaced),
//! then MOVEs the temporary object over it (`Overwrite: F` when the put must not overwrite).
//! Abort (or drop) cancels
//! the request — the server never completes the temporary object — and DELETEs it anyway.

use super::core::{DavCore, Head};
use super::error::from_transport;
use async_trait::async_trait;
use bytes::Bytes;
use futures::SinkExt;
use futures::channel::mpsc;
use std::sync::Arc;
use tokio::task::JoinHandle;
use virtrigaud_core::io::ByteSink;
use virtrigaud_core::{Error, ErrorKind, Result};

type BodyItem = std::result::Result<Bytes, std::io::Error>;

/// A streaming put to a WebDAV server (see the module docs).
pub struct WebdavWriter {
    core: Arc<DavCore>,
    key: String,
    temp: String,
    overwrite: bool,
    tx: Option<mpsc::Sender<BodyItem>>,
    task: Option<JoinHandle<Result<()>>>,
    written: u64,
    finished: bool,
}

impl std::fmt::Debug for WebdavWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebdavWriter")
            .field("key", &self.key)
            .field("temp", &self.temp)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl WebdavWriter {
    /// Starts the PUT of `temp` (parents must exist) and returns the writer.
    pub(crate) fn start(core: Arc<DavCore>, key: String, temp: String, overwrite: bool) -> Self {
        let (tx, rx) = mpsc::channel::<BodyItem>(core.queue_depth);
        let url = core.url(&temp);
        let c = core.clone();
        let task = tokio::spawn(async move {
            let req = c
                .stream_request(reqwest::Method::PUT, &url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(rx));
            let resp = req
                .send()
                .await
                .map_err(|e| from_transport("put", &url, e))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(DavCore::error_of("put", &url, resp).await)
            }
        });
        WebdavWriter {
            core,
            key,
            temp,
            overwrite,
            tx: Some(tx),
            task: Some(task),
            written: 0,
            finished: false,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The result of the PUT task (after the body ended or the request stopped reading it).
    /// The handle stays in place until the task ended, so a caller that gives up waiting
    /// (timeout) can still [`cancel`](Self::cancel) the request.
    async fn join(&mut self) -> Result<()> {
        let Some(t) = self.task.as_mut() else {
            return Err(Error::new(
                ErrorKind::Network,
                "the PUT request already ended",
            ));
        };
        let r = t.await;
        self.task = None;
        match r {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Network,
                format!("the PUT task of {} failed: {e}", self.core.url(&self.temp)),
            )),
        }
    }

    async fn remove_temp(&self) {
        if let Err(e) = self.core.delete(&self.temp).await {
            tracing::warn!(key = %self.temp, error = %e, "cannot remove the temporary object of a put");
        }
    }

    /// A `Timeout` error: the server stalled the PUT.
    fn stalled(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "the server {what} for {:?} during the PUT of {}",
                self.core.idle_timeout,
                self.core.url(&self.temp)
            ),
        )
        .with_operation("http.put")
        .with_target(self.core.url(&self.key))
    }

    /// Cancels the PUT request mid-body (the server discards it).
    fn cancel(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(mut tx) = self.tx.take() {
            // Ends the body with an error, so the server never completes the temporary object.
            let _ = tx.try_send(Err(std::io::Error::other("put cancelled")));
        }
    }

    async fn finish_put(&mut self) -> Result<()> {
        drop(self.tx.take());
        let idle = self.core.idle_timeout;
        match tokio::time::timeout(idle, self.join()).await {
            Ok(r) => r?,
            Err(_) => {
                let e = self.stalled("did not answer");
                self.cancel();
                return Err(e);
            }
        }
        let target = self.core.url(&self.key);
        // Never MOVE over a collection (`Overwrite: T` would delete it on some servers), and
        // refuse an existing object when asked not to overwrite.
        match self.core.head_outcome(&self.key).await? {
            Head::Redirect => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("{target} is a collection, not an object"),
                )
                .with_operation("http.put")
                .with_target(target));
            }
            Head::Object(_) if !self.overwrite => return Err(exists(&target)),
            _ => {}
        }
        match self
            .core
            .move_object(&self.temp, &self.key, self.overwrite)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                // The source is gone: an earlier attempt whose answer was lost moved it.
                match self.core.head(&self.key).await? {
                    Some(m) if m.size == self.written => Ok(()),
                    _ => Err(Error::new(
                        ErrorKind::Storage,
                        format!("the temporary object of {target} vanished before MOVE"),
                    )
                    .with_operation("http.move")
                    .with_target(target)),
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(exists(&target)),
            Err(e) => Err(e),
        }
    }
}

fn exists(target: &str) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("{target} exists and overwriting was not asked"),
    )
    .with_operation("http.put")
    .with_target(target.to_string())
}

#[async_trait]
impl ByteSink for WebdavWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let n = data.len() as u64;
        let Some(tx) = self.tx.as_mut() else {
            return Err(Error::invalid("write after the put ended"));
        };
        let sent = match tokio::time::timeout(self.core.idle_timeout, tx.send(Ok(data))).await {
            Ok(r) => r,
            Err(_) => {
                let e = self.stalled("accepted no data");
                self.cancel();
                self.remove_temp().await;
                return Err(e.with_offset(self.written));
            }
        };
        if sent.is_err() {
            // The request stopped reading its body: its answer says why.
            self.tx = None;
            let idle = self.core.idle_timeout;
            let e = match tokio::time::timeout(idle, self.join()).await {
                Err(_) => {
                    let e = self.stalled("did not answer");
                    self.cancel();
                    e
                }
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::new(
                    ErrorKind::Network,
                    format!(
                        "the server ended the PUT of {} before the body",
                        self.core.url(&self.temp)
                    ),
                )
                .with_retryable(true),
            };
            self.remove_temp().await;
            return Err(e.with_offset(self.written));
        }
        self.written += n;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        let r = self.finish_put().await;
        if r.is_err() {
            self.remove_temp().await;
        }
        r
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        self.cancel();
        self.core.delete(&self.temp).await
    }
}

impl Drop for WebdavWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.cancel();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let core = self.core.clone();
            let temp = std::mem::take(&mut self.temp);
            rt.spawn(async move {
                let _ = core.delete(&temp).await;
            });
        }
    }
}

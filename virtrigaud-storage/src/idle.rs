//! Idle bounds on response bodies that count only the time *we* wait for the network.
//!
//! reqwest's read timeout also fires when the consumer merely pauses between two reads longer
//! than it (a slow import target), and a whole-request timeout ends a GET of a large disk that
//! is still flowing. The HTTP backends read bodies without either and wrap them here instead.

use futures::StreamExt;
use std::time::Duration;
use virtrigaud_core::{ByteStream, Error, ErrorKind};

/// Ends `s` with a retryable `Timeout` error when no data comes for `idle` while it is being
/// polled; pauses of the consumer between polls do not count.
pub(crate) fn idle_stream(
    s: ByteStream,
    idle: Duration,
    op: &'static str,
    target: String,
) -> ByteStream {
    futures::stream::unfold(Some(s), move |st| {
        let target = target.clone();
        async move {
            let mut s = st?;
            match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(item)) => Some((item, Some(s))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(Error::new(
                        ErrorKind::Timeout,
                        format!("no data from {target} for {idle:?}"),
                    )
                    .with_retryable(true)
                    .with_operation(op)
                    .with_target(target)),
                    None,
                )),
            }
        }
    })
    .boxed()
}

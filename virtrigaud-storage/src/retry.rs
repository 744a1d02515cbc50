//! The retry policy shared by the HTTP-based backends (S3, WebDAV/HTTP): exponential backoff
//! with jitter, for retryable errors only ([`Error::is_retryable`]), via `backon`.

use backon::{ExponentialBuilder, Retryable};
use std::time::Duration;
use virtrigaud_core::{Error, Result};

/// Retries of a request that failed in a retryable way (connection refused/reset, timeout,
/// 408, 429, 5xx): exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts after the first one (0 disables retries).
    pub max_retries: usize,
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    /// 6 retries, 200 ms to 10 s (the S3 backend's own default is longer: see
    /// `S3Config::new`).
    fn default() -> Self {
        RetryConfig {
            max_retries: 6,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryConfig {
    /// Runs `f` until it succeeds, fails with an error that is not retryable, or the retry
    /// budget is spent; logs each retry with `service` and `op`.
    pub(crate) async fn run<T, F, Fut>(&self, service: &str, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter();
        f.retry(backoff)
            .when(Error::is_retryable)
            .notify(|e: &Error, after: Duration| {
                tracing::warn!(
                    service,
                    op,
                    error = %e,
                    retry_in_ms = after.as_millis() as u64,
                    "request failed, retrying"
                );
            })
            .await
    }
}

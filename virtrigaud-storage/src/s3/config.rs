//! [`S3Config`]: where the bucket is, how to authenticate, how puts are cut into parts, how
//! requests are retried.

pub use crate::retry::RetryConfig;
use std::time::Duration;
use virtrigaud_core::{Error, Result, Secret};

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// S3's smallest part (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's largest part count.
pub const MAX_PARTS: u64 = 10_000;
/// S3's largest object (5 TiB).
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
/// Part size used when a put has no size hint and the config sets none: 8 MiB, which caps such
/// an object at 10,000 × 8 MiB = 78.125 GiB. Pass a size hint, or raise
/// [`S3Config::part_size`], for larger objects.
pub const DEFAULT_PART_SIZE: u64 = 8 * MIB;
/// Parts in flight per put by default (memory ≈ part size × (concurrency + 1)).
pub const DEFAULT_CONCURRENCY: usize = 4;

/// What happens to a multipart upload whose writer is dropped without `commit` or `abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DropPolicy {
    /// Abort the multipart upload and remove its checkpoint (in a background task): nothing is
    /// left behind. The default, and what the [`ByteSink`](virtrigaud_core::io::ByteSink)
    /// contract asks for.
    #[default]
    Abort,
    /// Keep the upload and its checkpoint so that a later put of the same key (in this or
    /// another process) resumes it. A killed process always behaves like this.
    KeepForResume,
}

/// Configuration of an [`S3Backend`](super::S3Backend).
///
/// `Debug` never prints the secret key or the session token (they are [`Secret`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`), may be empty.
    pub prefix: String,
    /// Endpoint URL (`https://s3.example:9000`); `None` means AWS
    /// (`https://s3.<region>.amazonaws.com`).
    pub endpoint: Option<String>,
    /// Signing region; `None` takes `AWS_REGION`/`AWS_DEFAULT_REGION` in
    /// [`S3Config::from_env`], else `us-east-1` (see [`S3Config::region`]).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-host style
    /// (`bucket.endpoint/key`). Defaults to `true` for a custom endpoint, `false` for AWS.
    pub path_style: bool,
    /// Access key id; `None` sends unsigned (anonymous) requests.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<Secret>,
    /// Session token of temporary credentials.
    pub session_token: Option<Secret>,
    /// Part size of multipart puts; `None` chooses automatically (see
    /// [`choose_part_size`]). Raised when needed so that the size hint fits in 10,000 parts.
    pub part_size: Option<u64>,
    /// Parts uploaded at the same time by one put.
    pub concurrency: usize,
    /// Verify TLS certificates (on by default; turning it off is explicit).
    pub tls_verify: bool,
    /// What a dropped, uncommitted writer does with its upload.
    pub drop_policy: DropPolicy,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Timeout of one whole request, a part upload included (default 15 min: raise it for
    /// large parts over slow links). Object reads are not bounded by it: a GET streams as long
    /// as bytes keep coming, however long its consumer takes.
    pub request_timeout: Duration,
    /// Longest wait for the next bytes of an answer (default 60 s); what ends a stalled GET.
    /// For object reads only the time spent waiting for the network counts, not the pauses of
    /// a slow consumer between two reads.
    pub idle_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
}

impl S3Config {
    /// A configuration for `bucket` with defaults and no credentials.
    pub fn new(bucket: impl Into<String>) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            part_size: None,
            concurrency: DEFAULT_CONCURRENCY,
            tls_verify: true,
            drop_policy: DropPolicy::Abort,
            retry: RetryConfig {
                max_retries: 8,
                min_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(20),
            },
            request_timeout: Duration::from_secs(900),
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// A configuration for `bucket`/`prefix` completed from the standard environment variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`).
    pub fn from_env(bucket: impl Into<String>, prefix: impl Into<String>) -> S3Config {
        S3Config::new(bucket)
            .with_prefix(prefix)
            .with_env(|k| std::env::var(k).ok())
    }

    /// Fills every field still unset from `lookup` (the environment variables listed in
    /// [`S3Config::from_env`]). Explicit values win.
    pub fn with_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> S3Config {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        if self.access_key_id.is_none() {
            self.access_key_id = get("AWS_ACCESS_KEY_ID");
        }
        if self.secret_access_key.is_none() {
            self.secret_access_key = get("AWS_SECRET_ACCESS_KEY").map(Secret::new);
        }
        if self.session_token.is_none() {
            self.session_token = get("AWS_SESSION_TOKEN").map(Secret::new);
        }
        if self.region.is_none() {
            self.region = get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION"));
        }
        if self.endpoint.is_none()
            && let Some(e) = get("AWS_ENDPOINT_URL_S3").or_else(|| get("AWS_ENDPOINT_URL"))
        {
            self = self.with_endpoint(e);
        }
        self
    }

    /// Sets the key prefix (surrounding `/` removed).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> S3Config {
        self.prefix = prefix.into().trim_matches('/').to_string();
        self
    }

    /// Sets a custom endpoint and switches to path-style addressing (what most S3-compatible
    /// servers want; set [`S3Config::path_style`] to `false` afterwards for virtual-host style).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> S3Config {
        self.endpoint = Some(endpoint.into().trim_end_matches('/').to_string());
        self.path_style = true;
        self
    }

    /// Sets the signing region.
    pub fn with_region(mut self, region: impl Into<String>) -> S3Config {
        self.region = Some(region.into());
        self
    }

    /// The signing region: the configured one, or `us-east-1`.
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or("us-east-1")
    }

    /// Sets static credentials.
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<Secret>,
    ) -> S3Config {
        self.access_key_id = Some(access_key_id.into());
        self.secret_access_key = Some(secret_access_key.into());
        self
    }

    /// Checks the configuration (bucket name, endpoint URL, part size, concurrency).
    pub fn validate(&self) -> Result<()> {
        let b = &self.bucket;
        if b.len() < 3
            || b.len() > 63
            || !b
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            return Err(Error::invalid(format!(
                "invalid S3 bucket name {b:?} (3-63 characters: a-z, 0-9, '-', '.')"
            )));
        }
        if let Some(e) = &self.endpoint {
            let u = url::Url::parse(e)
                .map_err(|err| Error::invalid(format!("invalid S3 endpoint {e:?}: {err}")))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(Error::invalid(format!(
                    "S3 endpoint {e:?} must be an http(s) URL with a host"
                )));
            }
            if !u.username().is_empty() || u.password().is_some() {
                return Err(Error::invalid(
                    "the S3 endpoint must not carry credentials; use access_key_id/secret_access_key",
                ));
            }
        }
        if !self.prefix.is_empty() {
            virtrigaud_core::storage::validate_key(&self.prefix)?;
        }
        if let Some(p) = self.part_size
            && !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&p)
        {
            return Err(Error::invalid(format!(
                "S3 part size {p} outside {MIN_PART_SIZE}..={MAX_PART_SIZE}"
            )));
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return Err(Error::invalid("S3 concurrency must be within 1..=256"));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(Error::invalid(
                "S3 access key id and secret access key must be given together",
            ));
        }
        Ok(())
    }
}

/// The part size of a put: at least 5 MiB, at least `ceil(size_hint / 10,000)` rounded up to a
/// whole MiB (so any object up to 5 TiB fits in 10,000 parts), the configured size when larger,
/// and [`DEFAULT_PART_SIZE`] (8 MiB) when neither a hint nor a configured size is given.
///
/// A hint above 5 TiB is refused (`InvalidInput`).
///
/// ```
/// # use virtrigaud_storage::s3::config::*;
/// assert_eq!(choose_part_size(None, None).unwrap(), 8 << 20);
/// assert_eq!(choose_part_size(Some(1 << 30), None).unwrap(), 5 << 20);
/// let p = choose_part_size(Some(5 << 40), None).unwrap();
/// assert!((5u64 << 40).div_ceil(p) <= 10_000);
/// ```
pub fn choose_part_size(size_hint: Option<u64>, configured: Option<u64>) -> Result<u64> {
    let needed = match size_hint {
        Some(size) if size > MAX_OBJECT_SIZE => {
            return Err(Error::invalid(format!(
                "object of {size} bytes exceeds S3's 5 TiB limit"
            )));
        }
        Some(size) => size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB,
        None => 0,
    };
    let base = match (configured, size_hint) {
        (Some(p), _) => p,
        (None, Some(_)) => MIN_PART_SIZE,
        (None, None) => DEFAULT_PART_SIZE,
    };
    Ok(base.max(needed).clamp(MIN_PART_SIZE, MAX_PART_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_fits_five_tib_in_ten_thousand_parts() {
        for size in [
            0,
            1,
            5 * MIB,
            48 << 30,
            50 << 30,
            1 << 40,
            (5 << 40) - 1,
            5 << 40,
        ] {
            let p = choose_part_size(Some(size), None).unwrap();
            assert!((MIN_PART_SIZE..=MAX_PART_SIZE).contains(&p), "{size}: {p}");
            assert_eq!(p % MIB, 0, "{size}: {p}");
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}: {p}");
        }
        assert_eq!(choose_part_size(Some(5 << 40), None).unwrap(), 525 * MIB);
        assert_eq!(choose_part_size(Some(1 << 40), None).unwrap(), 105 * MIB);
        // a configured size is a floor, raised when the hint needs it
        assert_eq!(
            choose_part_size(Some(1 << 30), Some(64 * MIB)).unwrap(),
            64 * MIB
        );
        assert_eq!(
            choose_part_size(Some(1 << 40), Some(64 * MIB)).unwrap(),
            105 * MIB
        );
        // no hint: 8 MiB, so the cap is 78.125 GiB unless the config raises it
        assert_eq!(
            choose_part_size(None, None).unwrap() * MAX_PARTS,
            80_000 * MIB
        );
        assert_eq!(
            choose_part_size((5u64 << 40).checked_add(1), None)
                .unwrap_err()
                .kind(),
            virtrigaud_core::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn env_fills_unset_fields_and_never_prints_secrets() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKIDEXAMPLE".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("wJalrXUtnFEMI".to_string()),
            "AWS_DEFAULT_REGION" => Some("eu-west-3".to_string()),
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:9000/".to_string()),
            "AWS_ENDPOINT_URL_S3" => Some(String::new()),
            _ => None,
        };
        let c = S3Config::new("bucket").with_prefix("/vms/").with_env(env);
        assert_eq!(c.prefix, "vms");
        assert_eq!(c.region(), "eu-west-3");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.path_style);
        assert_eq!(c.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("wJalrXUtnFEMI"));
        let explicit = S3Config::new("bucket")
            .with_credentials("mine", "s")
            .with_env(env);
        assert_eq!(explicit.access_key_id.as_deref(), Some("mine"));
        let explicit = S3Config::new("bucket")
            .with_region("ap-south-1")
            .with_env(env);
        assert_eq!(explicit.region(), "ap-south-1");
        assert_eq!(S3Config::new("bucket").region(), "us-east-1");
    }

    #[test]
    fn validation_refuses_bad_settings() {
        for c in [
            S3Config::new("B"),
            S3Config::new("bucket").with_endpoint("ftp://x"),
            S3Config::new("bucket").with_endpoint("http://u:p@host"),
            S3Config {
                part_size: Some(MIB),
                ..S3Config::new("bucket")
            },
            S3Config {
                concurrency: 0,
                ..S3Config::new("bucket")
            },
            S3Config {
                access_key_id: Some("a".into()),
                ..S3Config::new("bucket")
            },
            S3Config::new("bucket").with_prefix("a/../b"),
        ] {
            assert_eq!(
                c.validate().unwrap_err().kind(),
                virtrigaud_core::ErrorKind::InvalidInput,
                "{c:?}"
            );
        }
    }
}

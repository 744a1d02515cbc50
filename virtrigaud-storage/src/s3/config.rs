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
/// Size of the first parts of a put when the config sets none: 8 MiB (see [`part_size_of`]).
pub const DEFAULT_PART_SIZE: u64 = 8 * MIB;
/// Parts of one size in the schedule, before the size doubles (see [`part_size_of`]).
pub const PARTS_PER_TIER: u64 = 1000;
/// Tiers whose size doubles, each [`PARTS_PER_TIER`] parts (7: the first size to 64 times it).
pub const DOUBLING_TIERS: u64 = 7;
/// The smallest size of the parts after the doubling tiers (parts 7,001 to 10,000): 1.5 GiB,
/// enough for 10,000 parts to hold 5 TiB whatever the first size (at least 5 MiB).
pub const LAST_TIER_MIN_PART_SIZE: u64 = 1536 * MIB;
/// Parts in flight per put by default (memory ≈ part size × (concurrency + 1); fewer when the
/// parts grow, see [`S3Config::concurrency`]).
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
    /// Size of the first parts of a multipart put (default [`DEFAULT_PART_SIZE`], 8 MiB); the
    /// parts that follow grow by the schedule of [`part_size_of`], so any object up to 5 TiB
    /// fits in 10,000 parts whatever this size and whatever the put's size hint.
    pub part_size: Option<u64>,
    /// Parts uploaded at the same time by one put, at most: fewer once the parts grow, so that
    /// the parts in flight stay within a memory budget of 96 MiB (one at a time from 64 MiB
    /// parts on).
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
    /// Server-side encryption of what is written (and, for SSE-C, the key every request needs).
    pub sse: Option<ServerSideEncryption>,
    /// An unknown `VIRTRIGAUD_S3_SSE` seen by [`S3Config::with_env`], refused by `validate`.
    sse_env_error: Option<String>,
}

/// Server-side encryption of the objects a backend writes.
///
/// The headers go on every request that needs them: PutObject and CreateMultipartUpload for
/// all three; for SSE-C also every UploadPart, GetObject and HeadObject (our own requests and
/// opendal's). A presigned GET cannot carry an SSE-C key (the target would have to send it), so
/// with SSE-C [`presign_get`](virtrigaud_core::StorageBackend::presign_get) answers
/// `Unsupported` and a migration uploads the staged disk instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// SSE-S3 (`x-amz-server-side-encryption: AES256`): keys held by the server.
    S3,
    /// SSE-KMS (`aws:kms`) with this key id, or the account's default KMS key when `None`.
    Kms {
        /// KMS key id or ARN.
        key_id: Option<String>,
    },
    /// SSE-C: the customer's 256-bit key, base64-encoded (as `openssl rand -base64 32`
    /// prints it), sent with its MD5 on every request; the server keeps neither.
    CustomerKey(Secret),
}

impl ServerSideEncryption {
    /// The raw 32-byte key of SSE-C (checked), `None` for the others.
    pub(crate) fn customer_key(&self) -> Result<Option<Vec<u8>>> {
        let ServerSideEncryption::CustomerKey(k) = self else {
            return Ok(None);
        };
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k.expose().trim())
            .map_err(|_| Error::invalid("the SSE-C key is not valid base64"))?;
        if raw.len() != 32 {
            return Err(Error::invalid(format!(
                "the SSE-C key must be 32 bytes (256 bits), not {}",
                raw.len()
            )));
        }
        Ok(Some(raw))
    }
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
            sse: None,
            sse_env_error: None,
        }
    }

    /// Sets the server-side encryption of what is written.
    pub fn with_sse(mut self, sse: ServerSideEncryption) -> S3Config {
        self.sse = Some(sse);
        self
    }

    /// A configuration for `bucket`/`prefix` completed from the standard environment variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`); server-side
    /// encryption from `VIRTRIGAUD_S3_SSE_C_KEY` (an SSE-C key, base64), or
    /// `VIRTRIGAUD_S3_SSE` = `AES256` or `aws:kms` (with `VIRTRIGAUD_S3_SSE_KMS_KEY_ID`).
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
        if self.sse.is_none() {
            self.sse = if let Some(k) = get("VIRTRIGAUD_S3_SSE_C_KEY") {
                Some(ServerSideEncryption::CustomerKey(Secret::new(k)))
            } else {
                match get("VIRTRIGAUD_S3_SSE").as_deref() {
                    Some("AES256") => Some(ServerSideEncryption::S3),
                    Some("aws:kms") => Some(ServerSideEncryption::Kms {
                        key_id: get("VIRTRIGAUD_S3_SSE_KMS_KEY_ID"),
                    }),
                    // Anything else is refused by `validate`, never silently ignored.
                    Some(other) => {
                        self.sse_env_error = Some(other.to_string());
                        None
                    }
                    None => None,
                }
            };
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
        if let Some(mode) = &self.sse_env_error {
            return Err(Error::invalid(format!(
                "VIRTRIGAUD_S3_SSE={mode:?}: use AES256 or aws:kms (or set \
                 VIRTRIGAUD_S3_SSE_C_KEY for SSE-C)"
            )));
        }
        if let Some(sse) = &self.sse {
            sse.customer_key()?;
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

/// The size of part `number` (1-based) of a put whose first part is `first` bytes: the part-size
/// schedule of every multipart put.
///
/// It depends on the part number only, never on the object's (unknown) final size, so a put
/// that resumes an upload computes the same sizes, and an object gets small parts while it is
/// small whatever size hint its put was given. With the default first size of 8 MiB:
///
/// | parts | size | the object holds up to |
/// |---|---|---|
/// | 1 – 1,000 | 8 MiB | 7.8 GiB |
/// | 1,001 – 2,000 | 16 MiB | 23.4 GiB |
/// | 2,001 – 3,000 | 32 MiB | 54.7 GiB |
/// | 3,001 – 4,000 | 64 MiB | 117 GiB |
/// | 4,001 – 5,000 | 128 MiB | 242 GiB |
/// | 5,001 – 6,000 | 256 MiB | 492 GiB |
/// | 6,001 – 7,000 | 512 MiB | 992 GiB |
/// | 7,001 – 10,000 | 1.5 GiB | 5.36 TiB |
///
/// In general: `first × 2^tier` for the 7 tiers of 1,000 parts, then
/// `max(192 × first, 1.5 GiB)` ([`LAST_TIER_MIN_PART_SIZE`]), each size kept within S3's
/// 5 MiB – 5 GiB. 10,000 parts so hold at least 5 TiB for any first size S3 allows.
///
/// ```
/// # use virtrigaud_storage::s3::config::*;
/// assert_eq!(part_size_of(1, DEFAULT_PART_SIZE), 8 << 20);
/// assert_eq!(part_size_of(1000, DEFAULT_PART_SIZE), 8 << 20);
/// assert_eq!(part_size_of(1001, DEFAULT_PART_SIZE), 16 << 20);
/// assert!(schedule_capacity(10_000, MIN_PART_SIZE) >= MAX_OBJECT_SIZE);
/// ```
pub fn part_size_of(number: u32, first: u64) -> u64 {
    let tier = u64::from(number.max(1) - 1) / PARTS_PER_TIER;
    let size = if tier < DOUBLING_TIERS {
        first.saturating_mul(1 << tier)
    } else {
        first
            .saturating_mul(3 << (DOUBLING_TIERS - 1))
            .max(LAST_TIER_MIN_PART_SIZE)
    };
    size.clamp(MIN_PART_SIZE, MAX_PART_SIZE)
}

/// Bytes the first `parts` parts of the schedule hold ([`part_size_of`]).
pub fn schedule_capacity(parts: u32, first: u64) -> u64 {
    (1..=parts).map(|n| part_size_of(n, first)).sum()
}

/// The first part size of a put: the configured one, else [`DEFAULT_PART_SIZE`].
pub fn first_part_size(configured: Option<u64>) -> u64 {
    configured
        .unwrap_or(DEFAULT_PART_SIZE)
        .clamp(MIN_PART_SIZE, MAX_PART_SIZE)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sse_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = S3Config::new("bkt").with_env(env(&[("VIRTRIGAUD_S3_SSE", "AES256")]));
        assert_eq!(c.sse, Some(ServerSideEncryption::S3));
        let c = S3Config::new("bkt").with_env(env(&[
            ("VIRTRIGAUD_S3_SSE", "aws:kms"),
            ("VIRTRIGAUD_S3_SSE_KMS_KEY_ID", "k1"),
        ]));
        assert_eq!(
            c.sse,
            Some(ServerSideEncryption::Kms {
                key_id: Some("k1".into())
            })
        );
        let c = S3Config::new("bkt").with_env(env(&[
            ("VIRTRIGAUD_S3_SSE", "AES256"),
            (
                "VIRTRIGAUD_S3_SSE_C_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            ),
        ]));
        assert!(matches!(c.sse, Some(ServerSideEncryption::CustomerKey(_))));
        assert!(!format!("{c:?}").contains("MDEy"), "{c:?}");
        c.validate().unwrap();
        let c = S3Config::new("bkt").with_env(env(&[("VIRTRIGAUD_S3_SSE", "aes")]));
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("AES256"), "{e}");
        let c = S3Config::new("bkt").with_env(env(&[("VIRTRIGAUD_S3_SSE_C_KEY", "not base64!")]));
        assert!(c.validate().is_err());
    }

    use super::*;

    #[test]
    fn part_schedule_holds_five_tib_grows_and_is_deterministic() {
        for first in [
            MIN_PART_SIZE,
            DEFAULT_PART_SIZE,
            7 * MIB + 3,
            64 * MIB,
            MAX_PART_SIZE,
        ] {
            let sizes: Vec<u64> = (1..=MAX_PARTS as u32)
                .map(|n| part_size_of(n, first))
                .collect();
            // 10,000 parts hold 5 TiB, so any object S3 accepts fits.
            let total: u64 = sizes.iter().sum();
            assert!(total >= MAX_OBJECT_SIZE, "first {first}: {total}");
            assert_eq!(total, schedule_capacity(MAX_PARTS as u32, first));
            // S3's limits, growth only, and the configured size first.
            assert!(
                sizes
                    .iter()
                    .all(|s| (MIN_PART_SIZE..=MAX_PART_SIZE).contains(s))
            );
            assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "first {first}");
            assert_eq!(sizes[0], first.clamp(MIN_PART_SIZE, MAX_PART_SIZE));
            // Deterministic: the same number gives the same size (resume relies on it).
            let again: Vec<u64> = (1..=MAX_PARTS as u32)
                .map(|n| part_size_of(n, first))
                .collect();
            assert_eq!(sizes, again);
        }
        // Small objects get small parts: the default schedule's first thousand parts are
        // 8 MiB (7.8 GiB), and parts only reach 64 MiB beyond 54 GiB.
        assert_eq!(first_part_size(None), DEFAULT_PART_SIZE);
        assert!((1..=1000).all(|n| part_size_of(n, DEFAULT_PART_SIZE) == 8 * MIB));
        assert_eq!(schedule_capacity(1000, DEFAULT_PART_SIZE), 8000 * MIB);
        assert_eq!(part_size_of(3000, DEFAULT_PART_SIZE), 32 * MIB);
        assert!(schedule_capacity(3000, DEFAULT_PART_SIZE) > 54 << 30);
        assert_eq!(part_size_of(7000, DEFAULT_PART_SIZE), 512 * MIB);
        assert_eq!(part_size_of(7001, DEFAULT_PART_SIZE), 1536 * MIB);
        assert_eq!(part_size_of(10_000, DEFAULT_PART_SIZE), 1536 * MIB);
        // Numbers outside 1..=10,000 do not panic.
        assert_eq!(part_size_of(0, DEFAULT_PART_SIZE), 8 * MIB);
        assert_eq!(part_size_of(u32::MAX, DEFAULT_PART_SIZE), 1536 * MIB);
        assert_eq!(first_part_size(Some(MIB)), MIN_PART_SIZE);
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

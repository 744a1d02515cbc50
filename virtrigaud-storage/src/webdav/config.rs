//! Configuration of the WebDAV backend and the plain HTTP source: base URL, credentials
//! ([`Secret`]s), TLS verification (on by default), timeouts and retries.

pub use crate::retry::RetryConfig;
use std::time::Duration;
use virtrigaud_core::{Error, Result, Secret};

/// Configuration of a [`WebdavBackend`](super::WebdavBackend) or an
/// [`HttpSource`](super::HttpSource).
///
/// `Debug` never prints the password or the token (they are [`Secret`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebdavConfig {
    /// Base URL (`http://` or `https://`, no credentials in it); keys are resolved below it.
    pub url: String,
    /// User name for HTTP basic authentication.
    pub user: Option<String>,
    /// Password for HTTP basic authentication.
    pub password: Option<Secret>,
    /// Bearer token (`Authorization: Bearer …`), instead of basic authentication.
    pub bearer_token: Option<Secret>,
    /// Verify the server's TLS certificate (default `true`; turning it off is explicit).
    pub tls_verify: bool,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the network before a request fails: an answer, the next chunk of a GET
    /// body, the server accepting the next chunk of a PUT body, the answer to a finished PUT.
    /// Time the caller spends producing or consuming data does not count.
    pub idle_timeout: Duration,
    /// Retries of each request (a streamed PUT body cannot be replayed and is not retried).
    pub retry: RetryConfig,
    /// Create missing parent collections with `MKCOL` before a put (default `true`; servers
    /// like nginx with `create_full_put_path on` do not need it).
    pub create_parents: bool,
    /// Chunks of a put queued between the writer and the HTTP request (memory bound: this many
    /// chunks as the caller writes them).
    pub queue_depth: usize,
}

impl WebdavConfig {
    /// A configuration for `url` with defaults: no credentials, TLS verified, 10 s connect
    /// timeout, 120 s idle timeout, 6 retries.
    pub fn new(url: impl Into<String>) -> WebdavConfig {
        let mut url = url.into();
        if !url.ends_with('/') {
            url.push('/');
        }
        WebdavConfig {
            url,
            user: None,
            password: None,
            bearer_token: None,
            tls_verify: true,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            retry: RetryConfig::default(),
            create_parents: true,
            queue_depth: 8,
        }
    }

    /// Parses a storage URL: `http(s)://` or `webdav(s)://` (taken as `http(s)://`), with
    /// optional `user:password@` (percent-decoded and moved into the configuration).
    pub fn from_url(raw: &str) -> Result<WebdavConfig> {
        let redacted = crate::url::redact(raw);
        let mut u = url::Url::parse(raw)
            .map_err(|e| Error::invalid(format!("invalid HTTP storage URL {redacted:?}: {e}")))?;
        let scheme = match u.scheme() {
            "http" | "webdav" => "http",
            "https" | "webdavs" => "https",
            other => {
                return Err(Error::invalid(format!(
                    "not an HTTP storage URL: scheme {other}"
                )));
            }
        };
        let user = percent_decode(u.username());
        let password = u.password().map(percent_decode);
        let _ = u.set_username("");
        let _ = u.set_password(None);
        let rest = u.as_str().split_once("://").map(|(_, r)| r).unwrap_or("");
        let mut cfg = WebdavConfig::new(format!("{scheme}://{rest}"));
        if !user.is_empty() {
            cfg.user = Some(user);
            cfg.password = password.map(Secret::new);
        }
        Ok(cfg)
    }

    /// Takes the user, password and token from `VIRTRIGAUD_WEBDAV_USER`,
    /// `VIRTRIGAUD_WEBDAV_PASSWORD` and `VIRTRIGAUD_WEBDAV_TOKEN` when none is set yet.
    pub fn with_env(self) -> WebdavConfig {
        self.with_env_from(|k| std::env::var(k).ok())
    }

    /// [`with_env`](Self::with_env) with a custom lookup (for tests).
    pub fn with_env_from(mut self, env: impl Fn(&str) -> Option<String>) -> WebdavConfig {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        if self.user.is_none() && self.bearer_token.is_none() {
            if let Some(u) = get("VIRTRIGAUD_WEBDAV_USER") {
                self.user = Some(u);
                self.password = get("VIRTRIGAUD_WEBDAV_PASSWORD").map(Secret::new);
            } else if let Some(t) = get("VIRTRIGAUD_WEBDAV_TOKEN") {
                self.bearer_token = Some(Secret::new(t));
            }
        }
        self
    }

    /// Sets HTTP basic authentication.
    pub fn with_basic_auth(mut self, user: impl Into<String>, password: impl Into<Secret>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self.bearer_token = None;
        self
    }

    /// Sets a bearer token.
    pub fn with_bearer_token(mut self, token: impl Into<Secret>) -> Self {
        self.bearer_token = Some(token.into());
        self.user = None;
        self.password = None;
        self
    }

    /// Turns TLS certificate verification on or off (explicitly; it is on by default).
    pub fn with_tls_verify(mut self, verify: bool) -> Self {
        self.tls_verify = verify;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Checks the configuration (no request is sent).
    pub fn validate(&self) -> Result<()> {
        let u = url::Url::parse(&self.url).map_err(|e| {
            Error::invalid(format!(
                "invalid base URL {:?}: {e}",
                crate::url::redact(&self.url)
            ))
        })?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "base URL must be http:// or https://, not {}://",
                u.scheme()
            )));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid("base URL without a host"));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(Error::invalid(
                "credentials in the base URL: set `user` and `password` instead",
            ));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(Error::invalid("base URL must not have a query or fragment"));
        }
        if u.path().split('/').any(|s| s == "..") {
            return Err(Error::invalid("base URL contains '..'"));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid("a password needs a user"));
        }
        if self.user.is_some() && self.bearer_token.is_some() {
            return Err(Error::invalid(
                "choose basic authentication or a bearer token, not both",
            ));
        }
        if self.queue_depth == 0 {
            return Err(Error::invalid("queue_depth must be at least 1"));
        }
        Ok(())
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_verified_by_default() {
        let c = WebdavConfig::new("https://dav.example/x");
        assert!(c.tls_verify);
        assert_eq!(c.url, "https://dav.example/x/");
        assert!(WebdavConfig::from_url("webdavs://h/p").unwrap().tls_verify);
        assert!(!c.with_tls_verify(false).tls_verify);
    }

    #[test]
    fn url_credentials_move_into_secrets() {
        let c = WebdavConfig::from_url("webdav://bob:p%40ss@h:8080/dav").unwrap();
        assert_eq!(c.url, "http://h:8080/dav/");
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert!(!format!("{c:?}").contains("p@ss"));
        c.validate().unwrap();
        let c = WebdavConfig::from_url("https://h/").unwrap();
        assert!(c.user.is_none());
    }

    #[test]
    fn env_fills_missing_credentials() {
        let env = |k: &str| match k {
            "VIRTRIGAUD_WEBDAV_USER" => Some("u".to_string()),
            "VIRTRIGAUD_WEBDAV_PASSWORD" => Some("pw".to_string()),
            _ => None,
        };
        let c = WebdavConfig::new("http://h/").with_env_from(env);
        assert_eq!(c.user.as_deref(), Some("u"));
        let c = WebdavConfig::new("http://h/")
            .with_bearer_token("t")
            .with_env_from(env);
        assert!(c.user.is_none());
    }

    #[test]
    fn validation_refuses_bad_settings() {
        for c in [
            WebdavConfig::new("ftp://h/"),
            WebdavConfig::new("http://u:p@h/"),
            WebdavConfig::new("http://h/?x=1"),
            WebdavConfig {
                password: Some("p".into()),
                ..WebdavConfig::new("http://h/")
            },
            WebdavConfig::new("http://h/")
                .with_basic_auth("u", "p")
                .with_bearer_token_both(),
        ] {
            assert_eq!(
                c.validate().unwrap_err().kind(),
                virtrigaud_core::ErrorKind::InvalidInput,
                "{c:?}"
            );
        }
    }

    impl WebdavConfig {
        fn with_bearer_token_both(mut self) -> Self {
            self.bearer_token = Some("t".into());
            self
        }
    }
}

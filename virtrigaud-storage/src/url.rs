//! Storage URLs: `file:///path`, `s3://bucket/prefix`, `http(s)://host/path`, `nfs://host/export/path`.

use std::path::PathBuf;
use virtrigaud_core::{Error, Result};

/// A parsed storage location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// A local or mounted directory.
    File {
        /// Root directory.
        root: PathBuf,
    },
    /// An S3 bucket and key prefix.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix (no leading or trailing `/`), may be empty.
        prefix: String,
    },
    /// A WebDAV or plain HTTP(S) location.
    Http {
        /// The base URL (credentials removed).
        url: String,
    },
    /// An NFSv3 export.
    Nfs {
        /// Server host.
        host: String,
        /// Export path.
        export: String,
        /// Path inside the export (may be empty).
        path: String,
    },
}

impl StorageUrl {
    /// Parses a storage URL. A bare absolute path is taken as `file://`.
    ///
    /// ```
    /// use virtrigaud_storage::StorageUrl;
    /// assert_eq!(
    ///     StorageUrl::parse("s3://images/vms/prod").unwrap(),
    ///     StorageUrl::S3 { bucket: "images".into(), prefix: "vms/prod".into() }
    /// );
    /// assert!(StorageUrl::parse("ftp://x").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<StorageUrl> {
        // URL parsing would silently resolve `..`; a storage location must not contain it.
        if s.split(['/', '?', '#'])
            .any(|seg| seg == ".." || seg.eq_ignore_ascii_case("%2e%2e"))
        {
            return Err(Error::invalid(format!(
                "storage URL {:?} contains '..'",
                redact(s)
            )));
        }
        if s.starts_with('/') {
            return Ok(StorageUrl::File {
                root: PathBuf::from(s),
            });
        }
        let u = url::Url::parse(s)
            .map_err(|e| Error::invalid(format!("invalid storage URL {:?}: {e}", redact(s))))?;
        let no_dots = |p: &str| -> Result<()> {
            if p.split('/').any(|seg| seg == "..") {
                return Err(Error::invalid(format!(
                    "storage URL {:?} contains '..'",
                    redact(s)
                )));
            }
            Ok(())
        };
        match u.scheme() {
            "file" => {
                if u.host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(Error::invalid("file:// URLs must not name a remote host"));
                }
                let root = u
                    .to_file_path()
                    .map_err(|_| Error::invalid(format!("invalid file URL {s:?}")))?;
                no_dots(u.path())?;
                Ok(StorageUrl::File { root })
            }
            "s3" => {
                let bucket = u
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| Error::invalid("s3:// URL without a bucket"))?
                    .to_string();
                let prefix = u.path().trim_matches('/').to_string();
                no_dots(&prefix)?;
                Ok(StorageUrl::S3 { bucket, prefix })
            }
            "http" | "https" | "webdav" | "webdavs" => {
                if u.host_str().is_none() {
                    return Err(Error::invalid("HTTP storage URL without a host"));
                }
                no_dots(u.path())?;
                let mut clean = u.clone();
                let _ = clean.set_username("");
                let _ = clean.set_password(None);
                Ok(StorageUrl::Http {
                    url: clean.to_string(),
                })
            }
            "nfs" => {
                let host = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| Error::invalid("nfs:// URL without a host"))?
                    .to_string();
                let full = u.path().trim_end_matches('/');
                no_dots(full)?;
                // The first segment is the export unless the export is given as a `export=` query.
                let export_q = u
                    .query_pairs()
                    .find(|(k, _)| k == "export")
                    .map(|(_, v)| v.to_string());
                let (export, path) = match export_q {
                    Some(e) => {
                        let e = format!("/{}", e.trim_matches('/'));
                        let rest = full.strip_prefix(&e).ok_or_else(|| {
                            Error::invalid(format!("nfs path {full} is not inside export {e}"))
                        })?;
                        (e, rest.trim_matches('/').to_string())
                    }
                    None => {
                        let mut it = full.trim_start_matches('/').splitn(2, '/');
                        let e = it.next().unwrap_or("");
                        if e.is_empty() {
                            return Err(Error::invalid("nfs:// URL without an export path"));
                        }
                        (format!("/{e}"), it.next().unwrap_or("").to_string())
                    }
                };
                Ok(StorageUrl::Nfs { host, export, path })
            }
            other => Err(Error::invalid(format!(
                "unknown storage scheme '{other}://' (known: file, s3, http, https, nfs)"
            ))),
        }
    }

    /// The scheme name.
    pub fn scheme(&self) -> &'static str {
        match self {
            StorageUrl::File { .. } => "file",
            StorageUrl::S3 { .. } => "s3",
            StorageUrl::Http { .. } => "http",
            StorageUrl::Nfs { .. } => "nfs",
        }
    }
}

/// Replaces the credentials (`user:password@`) of a URL-ish string with `***@`, for messages.
///
/// The credentials end at the *last* `@` of the authority, so a password that holds an `@`
/// (unescaped, as people type them) never partly leaks. A password that holds a `/`, `?` or
/// `#` unescaped ends the authority early: when what is left before it is not `host[:port]`
/// (its port is not a number), everything up to the last `@` of the string is treated as
/// credentials. In doubt this hides too much (part of a path), never too little.
///
/// ```
/// use virtrigaud_storage::url::redact;
/// assert_eq!(redact("https://u:p@ss@dav.example/x"), "https://***@dav.example/x");
/// assert_eq!(redact("https://dav.example/a@b"), "https://dav.example/a@b");
/// assert_eq!(redact("/srv/images"), "/srv/images");
/// ```
pub fn redact(s: &str) -> String {
    let Some(i) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[i + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let cut = match authority.rfind('@') {
        Some(j) => Some(j),
        None => {
            let port_is_not_a_number = authority
                .rsplit_once(':')
                .is_some_and(|(_, port)| !port.bytes().all(|b| b.is_ascii_digit()));
            if port_is_not_a_number {
                rest.rfind('@')
            } else {
                None
            }
        }
    };
    match cut {
        Some(j) => format!("{}***@{}", &s[..i + 3], &rest[j + 1..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            StorageUrl::parse("file:///var/lib/vrg").unwrap(),
            StorageUrl::File {
                root: "/var/lib/vrg".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("/srv/x").unwrap(),
            StorageUrl::File {
                root: "/srv/x".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("s3://b").unwrap(),
            StorageUrl::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("https://u:pw@dav.example/x/").unwrap(),
            StorageUrl::Http {
                url: "https://dav.example/x/".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("nfs://10.0.0.1/export/vms/a").unwrap(),
            StorageUrl::Nfs {
                host: "10.0.0.1".into(),
                export: "/export".into(),
                path: "vms/a".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("nfs://h/srv/nfs/vms?export=/srv/nfs").unwrap(),
            StorageUrl::Nfs {
                host: "h".into(),
                export: "/srv/nfs".into(),
                path: "vms".into()
            }
        );
    }

    #[test]
    fn rejects_bad_urls_clearly() {
        for bad in [
            "ftp://x/y",
            "s3:///nobucket",
            "file:///a/../b",
            "nfs://h/",
            "not a url",
        ] {
            let e = StorageUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind(), virtrigaud_core::ErrorKind::InvalidInput, "{bad}");
        }
        let e = StorageUrl::parse("https://user:secret@h:99999/x").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = StorageUrl::parse("https://user:se@cr@et@h:99999/x").unwrap_err();
        assert!(
            !e.to_string().contains("cr@et") && !e.to_string().contains("et@"),
            "{e}"
        );
    }

    #[test]
    fn redact_hides_every_part_of_a_password() {
        for (url, want) in [
            ("https://user:secret@h/x", "https://***@h/x"),
            // A password holding '@' (one or several): cut at the last '@' of the authority.
            ("https://user:p@ss@h/x", "https://***@h/x"),
            (
                "https://user:a@b@c@h:8443/x?y=1",
                "https://***@h:8443/x?y=1",
            ),
            ("s3://key:s@cret@bucket", "***@bucket"),
            // '/', '?' or '#' in the password: everything up to the last '@' goes.
            ("https://user:pa/ss@w@h/x", "https://***@h/x"),
            ("https://user:pa?ss@h/x", "https://***@h/x"),
            ("https://user:pa#ss@h", "https://***@h"),
            // No credentials: unchanged, '@' in the path included.
            ("https://h/a@b", "https://h/a@b"),
            ("https://h:8443/a@b", "https://h:8443/a@b"),
            ("nfs://10.0.0.1/export/a@b", "nfs://10.0.0.1/export/a@b"),
            ("file:///srv/x", "file:///srv/x"),
            ("no url @ all", "no url @ all"),
        ] {
            let want = if want.starts_with("***") {
                format!("s3://{want}")
            } else {
                want.to_string()
            };
            let got = redact(url);
            assert_eq!(got, want, "{url}");
            for secret in [
                "secret", "p@ss", "ss@", "a@b@c", "s@cret", "pa/ss", "pa?ss", "pa#ss",
            ] {
                if url.contains(secret) && !want.contains(secret) {
                    assert!(!got.contains(secret), "{url} -> {got}");
                }
            }
        }
    }
}

//! AWS Signature Version 4 for the requests of our own multipart path.
//!
//! Hand-written over `hmac` + `sha2` (about a hundred lines) rather than with `reqsign`: the
//! `reqsign` 3.x that opendal 0.59 uses is built around async credential providers and its own
//! request context, which we do not need for static credentials, and its API changes between
//! releases; this signer only has to produce the header form of SigV4 for S3, with the payload
//! hash always sent in `x-amz-content-sha256`. Presigned GET URLs come from opendal.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::SystemTime;
use virtrigaud_core::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Static credentials and the scope they sign for.
#[derive(Clone)]
pub(crate) struct Signer {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub region: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Characters left as they are by S3's URI encoding.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// URI-encodes `s` the way SigV4 wants it (`/` kept when `keep_slash`).
pub(crate) fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if unreserved(b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The canonical (sorted, encoded) query string of `query`.
pub(crate) fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `(YYYYMMDD'T'HHMMSS'Z', YYYYMMDD)` of `t` in UTC.
pub(crate) fn amz_date(t: SystemTime) -> (String, String) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}{m:02}{d:02}");
    let full = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    (full, date)
}

/// Proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail here.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// What a request is sent to: method, `host[:port]`, encoded path and query parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignTarget<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub canonical_uri: &'a str,
    pub query: &'a [(String, String)],
}

impl Signer {
    /// Signs a request. `headers` holds every header to sign except `host`, `x-amz-date`,
    /// `x-amz-content-sha256` and `x-amz-security-token`, which are added to it; on return it
    /// holds every header to send, `authorization` included.
    pub(crate) fn sign(
        &self,
        target: SignTarget<'_>,
        headers: &mut Vec<(String, String)>,
        payload_sha256: &str,
        now: SystemTime,
    ) {
        let SignTarget {
            method,
            host,
            canonical_uri,
            query,
        } = target;
        let (amz, date) = amz_date(now);
        headers.push(("x-amz-date".into(), amz.clone()));
        headers.push(("x-amz-content-sha256".into(), payload_sha256.to_string()));
        if let Some(t) = &self.session_token {
            headers.push(("x-amz-security-token".into(), t.expose().to_string()));
        }
        let mut signed: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        signed.push(("host".into(), host.to_string()));
        signed.sort();
        let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed_headers = signed
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_request = format!(
            "{method}\n{canonical_uri}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_sha256}",
            canonical_query(query)
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz}\n{scope}\n{}",
            sha256_hex(canonical_request.as_bytes())
        );
        let k_date = hmac(
            format!("AWS4{}", self.secret_access_key.expose()).as_bytes(),
            date.as_bytes(),
        );
        let k_region = hmac(&k_date, self.region.as_bytes());
        let k_service = hmac(&k_region, b"s3");
        let k_signing = hmac(&k_service, b"aws4_request");
        let signature = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
        headers.push((
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                self.access_key_id
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_utc_civil_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_369_353_600); // 2013-05-24
        assert_eq!(amz_date(t).0, "20130524T000000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(amz_date(t).0, "20000229T010101Z");
        assert_eq!(amz_date(SystemTime::UNIX_EPOCH).1, "19700101");
    }

    #[test]
    fn encoding_follows_sigv4() {
        assert_eq!(uri_encode("a b/c~d+e", true), "a%20b/c~d%2Be");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        let q = vec![
            ("uploadId".to_string(), "x/y".to_string()),
            ("partNumber".to_string(), "2".to_string()),
            ("uploads".to_string(), String::new()),
        ];
        assert_eq!(canonical_query(&q), "partNumber=2&uploadId=x%2Fy&uploads=");
    }

    /// The GET Object example of the AWS SigV4 documentation ("examplebucket", `Range:
    /// bytes=0-9`), with its published signature.
    #[test]
    fn matches_the_published_aws_example() {
        let s = Signer {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: None,
            region: "us-east-1".into(),
        };
        let mut headers = vec![("range".to_string(), "bytes=0-9".to_string())];
        let empty = sha256_hex(b"");
        s.sign(
            SignTarget {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                canonical_uri: "/test.txt",
                query: &[],
            },
            &mut headers,
            &empty,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_369_353_600),
        );
        let auth = &headers.last().unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert!(!format!("{s:?}").contains("wJalr"));
    }
}

//! The streamed `multipart/form-data` body of `POST /nodes/{node}/storage/{storage}/upload`.
//!
//! PVE's proxy needs a `Content-Length` (it does not take chunked uploads), so the body is laid
//! out up front: the form fields, the file part's header, the file bytes as they stream, and the
//! closing boundary. Only the file's length must be known before the first byte, and it is (the
//! staged object's size is in its manifest; a raw disk's is its capacity). The fields come
//! first, in the order PVE's own web UI sends them (`content`, `checksum-algorithm`,
//! `checksum`), then the file part named `filename`, so PVE knows the checksum before the file
//! and verifies what it stored. Nothing is buffered beyond one chunk; nothing touches a disk.
//! A file stream that ends early or runs long fails the body, so PVE never stores a short file.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use virtrigaud_core::{Error, Result};

/// A multipart body's fixed parts around the streamed file.
#[derive(Debug, Clone)]
pub struct MultipartLayout {
    /// The boundary (in the `Content-Type` header).
    pub boundary: String,
    /// Fields and the file part's header.
    pub head: Bytes,
    /// The closing boundary.
    pub tail: Bytes,
    /// Length of the file bytes.
    pub file_len: u64,
}

impl MultipartLayout {
    /// Lays out `fields` (in this order) and a file part `file_field` named `filename`.
    pub fn new(fields: &[(&str, &str)], file_field: &str, filename: &str, file_len: u64) -> Self {
        // Random enough to never occur in a field; a disk image could hold any byte sequence,
        // but a multipart parser looks for the boundary only where the Content-Length-less
        // parts end, and PVE's parser reads the file part by its boundary too: 32 random hex
        // digits make an accidental match in a disk image vanishingly unlikely.
        let boundary = format!("----virtrigaud-{}", random_hex(16));
        let mut head = String::new();
        for (k, v) in fields {
            head.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            ));
        }
        head.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ));
        let tail = format!("\r\n--{boundary}--\r\n");
        MultipartLayout {
            boundary,
            head: Bytes::from(head),
            tail: Bytes::from(tail),
            file_len,
        }
    }

    /// The exact `Content-Length` of the body.
    pub fn content_length(&self) -> u64 {
        self.head.len() as u64 + self.file_len + self.tail.len() as u64
    }

    /// The `Content-Type` header.
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The whole body: head, `file` checked against `file_len`, tail.
    pub fn body(
        &self,
        file: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let file_done = FileEnd {
            inner: file,
            expected: self.file_len,
            tail: Some(self.tail.clone()),
            seen: 0,
            failed: false,
        };
        futures::stream::once(futures::future::ready(Ok(self.head.clone())))
            .chain(file_done)
            .boxed()
    }
}

/// Passes the file bytes through and, at their end, checks the count and appends the tail.
struct FileEnd {
    inner: BoxStream<'static, Result<Bytes>>,
    expected: u64,
    tail: Option<Bytes>,
    seen: u64,
    failed: bool,
}

impl futures::Stream for FileEnd {
    type Item = Result<Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.failed {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.seen += b.len() as u64;
                if self.seen > self.expected {
                    self.failed = true;
                    let expected = self.expected;
                    return Poll::Ready(Some(Err(Error::corrupt(format!(
                        "upload source yields more than its {expected} bytes"
                    )))));
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if self.seen != self.expected {
                    self.failed = true;
                    let (seen, expected) = (self.seen, self.expected);
                    return Poll::Ready(Some(Err(Error::corrupt(format!(
                        "upload source ended after {seen} of {expected} bytes"
                    )))));
                }
                Poll::Ready(self.tail.take().map(Ok))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `n` random bytes as hex, from the OS (no RNG crate needed for a boundary).
pub(crate) fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        // Fall back on the clock and the address of a stack value: still unique per call.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let a = &buf as *const _ as usize as u128;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((t ^ a.rotate_left(i as u32 * 7)) >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn collect(s: BoxStream<'static, Result<Bytes>>) -> Result<Vec<u8>> {
        let parts: Vec<Bytes> = s.try_collect().await?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn body_has_exact_length_and_order() {
        let l = MultipartLayout::new(
            &[("content", "import"), ("checksum", "ab")],
            "filename",
            "d.raw",
            5,
        );
        let file = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"he")),
            Ok(Bytes::from_static(b"llo")),
        ])
        .boxed();
        let body = collect(l.body(file)).await.unwrap();
        assert_eq!(body.len() as u64, l.content_length());
        let s = String::from_utf8(body).unwrap();
        let c = s.find("name=\"content\"").unwrap();
        let k = s.find("name=\"checksum\"").unwrap();
        let f = s.find("filename=\"d.raw\"").unwrap();
        assert!(c < k && k < f, "{s}");
        assert!(s.contains("\r\n\r\nhello\r\n--"), "{s}");
        assert!(s.ends_with(&format!("--{}--\r\n", l.boundary)));
    }

    #[tokio::test]
    async fn short_or_long_file_fails_the_body() {
        let l = MultipartLayout::new(&[], "filename", "d.raw", 5);
        let short = futures::stream::iter(vec![Ok(Bytes::from_static(b"hell"))]).boxed();
        let e = collect(l.body(short)).await.unwrap_err();
        assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Corrupt);
        let long = futures::stream::iter(vec![Ok(Bytes::from_static(b"hello!"))]).boxed();
        assert!(collect(l.body(long)).await.is_err());
    }
}

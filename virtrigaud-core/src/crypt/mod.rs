//! Client-side encryption of staged objects in the [age](https://age-encryption.org/v1) format
//! (feature `encryption`; crate `age`, X25519 recipients, 64 KiB ChaCha20-Poly1305 chunks).
//!
//! Why age: a standard, audited format with a reference implementation, so a stored object can
//! be decrypted with the `age` command-line tool (`age -d -i KEY OBJECT`) and nobody is locked
//! in; no scheme of our own.
//!
//! Where it sits: a pass-through stage after the encoder and before the sink
//! ([`EncodeOptions::encrypt`](crate::format::EncodeOptions::encrypt)), so the object SHA-256,
//! the chunk checksums and the stored size cover the bytes actually stored (the ciphertext),
//! and the content digest still proves the disk. The manifest records the scheme and the
//! recipients' public keys ([`EncryptionInfo`]), never a key.
//!
//! Import and verify decrypt transparently with [`ImportOptions::decrypt`](crate::ImportOptions)
//! ([`Decryption`]): the object digest and chunk checksums are checked on the ciphertext as it
//! streams, the age header is read and the file key unwrapped before the decoder runs (a
//! missing or wrong identity is `Auth` before anything is created), every 64 KiB chunk is
//! authenticated (a tampered one is `ChecksumMismatch`, and nothing is committed), and the
//! content digest proves the decrypted disk.
//!
//! The runner takes both ([`Migration::with_encryption`](crate::Migration::with_encryption),
//! [`with_decryption`](crate::Migration::with_decryption)), the command line
//! `--encrypt-to RECIPIENT` and `--identity FILE`.
//!
//! Random access: [`open_staged`](crate::open_staged) (or `DecryptingReader`, with the
//! `encryption` feature, over any [`ReadAt`](crate::io::ReadAt)) reads an encrypted object by
//! range, fetching and opening only the 64 KiB chunks a read covers, so a decoder that seeks
//! (qcow2, VMDK) works on it.
//!
//! Resume: the exporter writes the age format with its own framing ([`stream`](self), on the
//! `age` crate's primitives) so that it knows the object's header and keys. On a store that
//! resumes uploads (S3), the header (the file key wrapped for the recipients, exactly as in
//! the object, never in clear) is kept beside the upload as `<key>.encryption.json`; a rerun
//! holding an identity ([`Encryption::resumable_with`]; the runner and the command line pass
//! the one they import with) unwraps the key from it, seals the same ciphertext again and the
//! store skips the parts it holds. A rerun whose source changed is stopped with `Conflict`
//! before a part it would replace is sent, so one key never seals two plaintexts that both
//! reach the store. Without an identity the rerun starts over with new keys.
//!
//! Who holds what: the exporter needs only the recipients' public keys (and the identity, if
//! it is to resume); the store holds ciphertext, the wrapped file key and public nonces; the
//! manifest names the recipients. Encryption turns the holes of a raw object into data: stage
//! as qcow2 (the default).

use crate::format::ChunkStream;
use crate::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// What the manifest says of an encrypted object: the scheme and who can read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// `age` (age-encryption.org/v1).
    pub scheme: String,
    /// The recipients' public keys (`age1…`).
    pub recipients: Vec<String>,
}

#[cfg(feature = "encryption")]
pub(crate) mod stream;

/// Encryption of an export for one or more recipients.
#[derive(Clone)]
pub struct Encryption {
    recipients: Vec<String>,
    #[cfg(feature = "encryption")]
    parsed: Vec<age::x25519::Recipient>,
    /// The identity that may reopen the header of an interrupted export ([`Encryption::resumable_with`]).
    resume: Option<Decryption>,
    /// The keys this export seals with, when the export chose them (a resumed header).
    #[cfg(feature = "encryption")]
    pub(crate) session: Option<std::sync::Arc<stream::Session>>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field("recipients", &self.recipients)
            .finish()
    }
}

impl Encryption {
    /// Encryption for the age X25519 recipients `recipients` (`age1…` public keys, as
    /// `age-keygen` prints them). Without the `encryption` feature: `Unsupported`.
    pub fn to_recipients<S: AsRef<str>>(recipients: &[S]) -> Result<Encryption> {
        if recipients.is_empty() {
            return Err(Error::invalid("encryption needs at least one recipient"));
        }
        let names: Vec<String> = recipients
            .iter()
            .map(|r| r.as_ref().trim().to_string())
            .collect();
        #[cfg(feature = "encryption")]
        {
            let parsed = names
                .iter()
                .map(|r| {
                    r.parse::<age::x25519::Recipient>().map_err(|e| {
                        Error::invalid(format!("{r:?} is not an age X25519 recipient: {e}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Encryption {
                recipients: names,
                parsed,
                resume: None,
                session: None,
            })
        }
        #[cfg(not(feature = "encryption"))]
        {
            let _ = names;
            Err(Error::unsupported(
                "client-side encryption needs virtrigaud built with the `encryption` feature",
            ))
        }
    }

    /// Lets an interrupted export be resumed: with an identity that can read what this
    /// encryption writes (one of the recipients' secret keys), an export to a store that
    /// resumes uploads (S3) reuses the file key of the upload it resumes, so the parts already
    /// stored are not sent again.
    ///
    /// How the key survives a crash without being stored in clear: it is never written at
    /// all. The store keeps `<key>.encryption.json` beside the upload, which holds only the
    /// object's age header (the file key wrapped for the recipients, as in the object itself)
    /// and its public payload nonce; the rerun unwraps the key from that header with this
    /// identity. Without it, or when the header cannot be opened, the export starts over with
    /// a new key. A resumed upload must find exactly the parts it would send: if the source
    /// changed in between, one key would seal two different plaintexts, so the export stops
    /// with `Conflict` and the upload is discarded instead (the rerun then starts over).
    pub fn resumable_with(mut self, identity: Decryption) -> Encryption {
        self.resume = Some(identity);
        self
    }

    /// The identity given to [`Encryption::resumable_with`].
    pub fn resume_identity(&self) -> Option<&Decryption> {
        self.resume.as_ref()
    }

    /// What the manifest records.
    pub fn info(&self) -> EncryptionInfo {
        EncryptionInfo {
            scheme: "age".into(),
            recipients: self.recipients.clone(),
        }
    }
}

/// The identities an import or verification decrypts with (age X25519 secret keys). `Debug`
/// never prints a key.
#[derive(Clone)]
pub struct Decryption {
    #[cfg(feature = "encryption")]
    identities: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Decryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decryption(<identities redacted>)")
    }
}

impl Decryption {
    /// The identities in the text of an age identity file (`AGE-SECRET-KEY-1…` lines, as
    /// `age-keygen` writes them; `#` comments and blank lines skipped).
    pub fn from_identities_text(text: &str) -> Result<Decryption> {
        #[cfg(feature = "encryption")]
        {
            let identities = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| {
                    l.parse::<age::x25519::Identity>().map_err(|_| {
                        Error::new(
                            ErrorKind::Auth,
                            "an identity line is not an age X25519 secret key (AGE-SECRET-KEY-1…)",
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if identities.is_empty() {
                return Err(Error::new(ErrorKind::Auth, "no age identity found"));
            }
            Ok(Decryption { identities })
        }
        #[cfg(not(feature = "encryption"))]
        {
            let _ = text;
            Err(Error::unsupported(
                "client-side encryption needs virtrigaud built with the `encryption` feature",
            ))
        }
    }

    /// The identities of an age identity file.
    pub fn from_identity_file(path: impl AsRef<std::path::Path>) -> Result<Decryption> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|e| {
            Error::new(
                ErrorKind::Auth,
                format!("cannot read the identity file {}: {e}", p.display()),
            )
        })?;
        Decryption::from_identities_text(&text)
    }
}

/// Suffix of the object that an encrypted export keeps beside its upload while it is in
/// progress on a store that resumes uploads: `<key>.encryption.json`, holding the object's
/// age header (the file key wrapped for the recipients, never in clear) so that a rerun with
/// an identity can resume ([`Encryption::resumable_with`]). Removed when the export completes.
pub const RESUME_SUFFIX: &str = ".encryption.json";

/// The object beside an encrypted upload in progress.
#[cfg(feature = "encryption")]
#[derive(Debug, Serialize, Deserialize)]
struct ResumeState {
    version: u32,
    scheme: String,
    recipients: Vec<String>,
    /// The age header and payload nonce, base64.
    prefix: String,
}

/// The encryption an export of `key` seals with, and whether it resumes the keys of an
/// interrupted upload: on a store that resumes uploads, with a pending upload of `key`, its
/// [`RESUME_SUFFIX`] object and an identity that opens it; otherwise new keys, whose header is
/// stored beside the upload first (when the store resumes uploads).
#[cfg(feature = "encryption")]
pub(crate) async fn prepare_export(
    storage: &dyn crate::storage::StorageBackend,
    key: &str,
    enc: &Encryption,
) -> Result<(Encryption, bool)> {
    use crate::storage::StorageExt;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let state_key = format!("{key}{RESUME_SUFFIX}");
    if !storage.capabilities().resume {
        return Ok((enc.clone(), false));
    }
    if let Some(dec) = &enc.resume
        && storage.pending_upload(key).await?
    {
        let load = async {
            let raw = match storage.get_bytes(&state_key, 1 << 20).await {
                Ok(raw) => raw,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let st: ResumeState = serde_json::from_slice(&raw)
                .map_err(|e| Error::corrupt(format!("unreadable {state_key}: {e}")))?;
            if st.version != 1 || st.scheme != "age" || st.recipients != enc.recipients {
                return Ok(None);
            }
            let prefix = B64
                .decode(st.prefix.as_bytes())
                .map_err(|e| Error::corrupt(format!("unreadable {state_key}: {e}")))?;
            let session = stream::Session::open(&prefix, &dec.identities)?;
            if session.prefix().len() != prefix.len() {
                return Err(Error::corrupt(format!(
                    "{state_key} holds more than a header"
                )));
            }
            Ok(Some(session))
        };
        match load.await {
            Ok(Some(session)) => {
                tracing::info!(
                    key,
                    "resuming an encrypted upload with the key of its header"
                );
                let mut e = enc.clone();
                e.session = Some(std::sync::Arc::new(session));
                return Ok((e, true));
            }
            Ok(None) => tracing::info!(
                key,
                "the interrupted upload has no header for these recipients: new keys, its parts are sent again"
            ),
            Err(e) => tracing::warn!(
                key, error = %e,
                "the interrupted encrypted upload cannot be resumed: new keys, its parts are sent again"
            ),
        }
    }
    let session = stream::Session::new(&enc.parsed)?;
    let state = ResumeState {
        version: 1,
        scheme: "age".into(),
        recipients: enc.recipients.clone(),
        prefix: B64.encode(session.prefix()),
    };
    let json = serde_json::to_vec(&state)
        .map_err(|e| Error::new(ErrorKind::Io, format!("encoding {state_key}: {e}")))?;
    storage
        .put_bytes(&state_key, bytes::Bytes::from(json))
        .await?;
    let mut e = enc.clone();
    e.session = Some(std::sync::Arc::new(session));
    Ok((e, false))
}

/// Without the feature there is no [`Encryption`] to prepare.
#[cfg(not(feature = "encryption"))]
pub(crate) async fn prepare_export(
    _storage: &dyn crate::storage::StorageBackend,
    _key: &str,
    _enc: &Encryption,
) -> Result<(Encryption, bool)> {
    Err(Error::unsupported(
        "client-side encryption needs virtrigaud built with the `encryption` feature",
    ))
}

/// The error for an encrypted object met without identities.
pub fn missing_identity(info: &EncryptionInfo, key: &str) -> Error {
    Error::new(
        ErrorKind::Auth,
        format!(
            "{key} is encrypted ({} for {}): give an identity that can read it \
             (ImportOptions::decrypt, or --identity FILE)",
            info.scheme,
            info.recipients.join(", ")
        ),
    )
}

/// The plaintext of an encrypted sequential object: the age header is read and the file key
/// unwrapped here, so a wrong identity is an `Auth` error before anything is created; a chunk
/// that fails its authentication tag (tampered or corrupt) is `ChecksumMismatch`.
#[cfg(feature = "encryption")]
pub(crate) async fn decrypt_source(
    source: crate::io::ImageSource,
    dec: &Decryption,
    info: &EncryptionInfo,
) -> Result<crate::io::ImageSource> {
    use crate::extent::Extent;
    use crate::io::ImageSource;
    use futures::io::AsyncRead;
    use futures::{StreamExt, TryStreamExt};
    let stream = match source {
        ImageSource::Sequential { stream, .. } => stream,
        ImageSource::RandomAccess(r) => {
            let r = DecryptingReader::open(r, dec, info).await?;
            return Ok(ImageSource::RandomAccess(std::sync::Arc::new(r)));
        }
    };
    let to_io = |e: Error| std::io::Error::other(e);
    let ciphertext = stream
        .map(move |r| {
            r.map_err(to_io).map(|e| match e {
                Extent::Data { bytes, .. } => bytes,
                other => bytes::Bytes::from(vec![0u8; other.len() as usize]),
            })
        })
        .into_async_read();
    let decryptor = age::Decryptor::new_async_buffered(ciphertext)
        .await
        .map_err(|e| decrypt_error(e, info))?;
    let mut plain = decryptor
        .decrypt_async(dec.identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| decrypt_error(e, info))?;
    let mut offset = 0u64;
    // One 1 MiB buffer at a time, kept across `Pending` (not allocated again on every poll).
    let (mut buf, mut filled) = (Vec::new(), 0usize);
    let stream = futures::stream::poll_fn(move |cx| {
        use std::task::Poll;
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
            filled = 0;
        }
        // Fill a whole buffer where the reader allows it (age hands out 64 KiB at a time).
        loop {
            match std::pin::Pin::new(&mut plain).poll_read(cx, &mut buf[filled..]) {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(n)) => {
                    filled += n;
                    if filled == buf.len() {
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(Err(Error::new(
                        ErrorKind::ChecksumMismatch,
                        format!("decrypting the object failed (tampered or corrupt): {e}"),
                    ))));
                }
                Poll::Pending if filled == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if filled == 0 {
            return Poll::Ready(None);
        }
        let mut out = std::mem::take(&mut buf);
        out.truncate(filled);
        let e = Extent::Data {
            offset,
            bytes: bytes::Bytes::from(out),
        };
        offset += filled as u64;
        filled = 0;
        Poll::Ready(Some(Ok(e)))
    })
    .boxed();
    Ok(ImageSource::Sequential { size: None, stream })
}

/// Random access to the plaintext of an encrypted object: a read at any offset fetches and
/// opens only the 64 KiB chunks it covers (each authenticated on its own; a tampered one is
/// `ChecksumMismatch`, a truncated object `Corrupt` when opened). The header is read and the
/// file key unwrapped by [`DecryptingReader::open`], so a wrong identity is `Auth` at once.
#[cfg(feature = "encryption")]
pub struct DecryptingReader {
    inner: std::sync::Arc<dyn crate::io::ReadAt>,
    session: std::sync::Arc<stream::Session>,
    layout: stream::Layout,
}

#[cfg(feature = "encryption")]
impl std::fmt::Debug for DecryptingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecryptingReader({:?})", self.layout)
    }
}

#[cfg(feature = "encryption")]
impl DecryptingReader {
    /// Opens the encrypted object `inner` (ciphertext, read by range) with `dec`; `info` (from
    /// the manifest) names the recipients in errors.
    pub async fn open(
        inner: std::sync::Arc<dyn crate::io::ReadAt>,
        dec: &Decryption,
        info: &EncryptionInfo,
    ) -> Result<DecryptingReader> {
        let head_len = inner.size().min(stream::MAX_PREFIX as u64) as usize;
        let head = inner.read_exact_at(0, head_len).await?;
        let session = stream::Session::open(&head, &dec.identities).map_err(|e| {
            if e.kind() == ErrorKind::Auth {
                Error::new(
                    ErrorKind::Auth,
                    format!(
                        "none of the given identities can decrypt this object (it is encrypted for {})",
                        info.recipients.join(", ")
                    ),
                )
            } else {
                e
            }
        })?;
        let layout = stream::Layout::of(session.prefix().len() as u64, inner.size())?;
        Ok(DecryptingReader {
            inner,
            session: std::sync::Arc::new(session),
            layout,
        })
    }
}

#[cfg(feature = "encryption")]
#[async_trait::async_trait]
impl crate::io::ReadAt for DecryptingReader {
    fn size(&self) -> u64 {
        self.layout.plain
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<bytes::Bytes> {
        use stream::{CHUNK, SEALED_CHUNK};
        let end = offset.saturating_add(len as u64).min(self.layout.plain);
        if end <= offset {
            return Ok(bytes::Bytes::new());
        }
        let (first, last) = (offset / CHUNK as u64, (end - 1) / CHUNK as u64);
        let at = self.layout.prefix + first * SEALED_CHUNK as u64;
        let stored_end =
            (self.layout.prefix + (last + 1) * SEALED_CHUNK as u64).min(self.inner.size());
        let sealed = self
            .inner
            .read_exact_at(at, (stored_end - at) as usize)
            .await?;
        let (session, chunks) = (self.session.clone(), self.layout.chunks);
        let skip = (offset - first * CHUNK as u64) as usize;
        let want = (end - offset) as usize;
        // Opening is CPU work: off the async threads.
        tokio::task::spawn_blocking(move || {
            let mut plain = Vec::with_capacity(want + CHUNK);
            let mut buf = Vec::with_capacity(SEALED_CHUNK);
            for (i, c) in sealed.chunks(SEALED_CHUNK).enumerate() {
                let index = first + i as u64;
                buf.clear();
                buf.extend_from_slice(c);
                session.open_chunk(index, index + 1 == chunks, &mut buf)?;
                plain.extend_from_slice(&buf);
            }
            Ok(bytes::Bytes::from(plain).slice(skip..skip + want))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("decryption task failed: {e}")))?
    }
}

#[cfg(feature = "encryption")]
fn decrypt_error(e: age::DecryptError, info: &EncryptionInfo) -> Error {
    match e {
        age::DecryptError::NoMatchingKeys | age::DecryptError::KeyDecryptionFailed => Error::new(
            ErrorKind::Auth,
            format!(
                "none of the given identities can decrypt this object (it is encrypted for {})",
                info.recipients.join(", ")
            ),
        ),
        other => Error::new(
            ErrorKind::ChecksumMismatch,
            format!("the encrypted object's header is corrupt or tampered with: {other}"),
        ),
    }
}

/// Without the feature, nothing can be decrypted.
#[cfg(not(feature = "encryption"))]
pub(crate) async fn decrypt_source(
    _source: crate::io::ImageSource,
    _dec: &Decryption,
    _info: &EncryptionInfo,
) -> Result<crate::io::ImageSource> {
    Err(Error::unsupported(
        "client-side encryption needs virtrigaud built with the `encryption` feature",
    ))
}

/// `chunks` encrypted: the age header, then the ciphertext of every byte (zeros included), as
/// data chunks of the size the encoder wrote. The keys are the export's own
/// ([`Encryption::session`], a resumed header) or new ones. The encryption runs on a blocking
/// worker of its own (like the object SHA-256), fed through short queues, so it overlaps with
/// the encoder and the writes instead of adding to them.
#[cfg(feature = "encryption")]
pub(crate) fn encrypt_chunks(mut chunks: ChunkStream, enc: &Encryption) -> Result<ChunkStream> {
    use crate::format::Chunk;
    use futures::StreamExt;

    let session = match &enc.session {
        Some(s) => s.clone(),
        None => std::sync::Arc::new(stream::Session::new(&enc.parsed)?),
    };
    let mut sealer = stream::Sealer::new(session);
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<Chunk>>(2);
    // The feeder: pulls the encoder, hands plaintext to the worker, passes errors on.
    let err_tx = out_tx.clone();
    tokio::spawn(async move {
        while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => {
                    if in_tx.send(c).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = err_tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    // The worker: seals; ends when the plaintext ends (then seals the last chunk) or when
    // nobody reads the ciphertext any more.
    tokio::task::spawn_blocking(move || {
        static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];
        while let Some(c) = in_rx.blocking_recv() {
            let mut out = Vec::with_capacity(c.len() as usize + (c.len() as usize >> 12) + 4096);
            let r = match c {
                Chunk::Data(b) => sealer.push(&b, &mut out),
                Chunk::Zeros(mut n) => {
                    let mut r = Ok(());
                    while n > 0 && r.is_ok() {
                        let k = n.min(ZEROS.len() as u64) as usize;
                        r = sealer.push(&ZEROS[..k], &mut out);
                        n -= k as u64;
                    }
                    r
                }
            };
            if let Err(e) = r {
                let _ = out_tx.blocking_send(Err(e));
                return;
            }
            if !out.is_empty()
                && out_tx
                    .blocking_send(Ok(Chunk::Data(bytes::Bytes::from(out))))
                    .is_err()
            {
                return;
            }
        }
        let mut out = Vec::with_capacity(stream::SEALED_CHUNK + stream::MAX_PREFIX.min(4096));
        let last = sealer
            .finish(&mut out)
            .map(|_| Chunk::Data(bytes::Bytes::from(out)));
        let _ = out_tx.blocking_send(last);
    });
    let mut out_rx = out_rx;
    Ok(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)).boxed())
}

/// Without the feature there is no [`Encryption`] to apply.
#[cfg(not(feature = "encryption"))]
pub(crate) fn encrypt_chunks(_chunks: ChunkStream, _enc: &Encryption) -> Result<ChunkStream> {
    Err(Error::unsupported(
        "client-side encryption needs virtrigaud built with the `encryption` feature",
    ))
}

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
//! State of this work (issue #14, part 1), said plainly: **export** encrypts, and the object
//! decrypts with the standard `age` binary to exactly the unencrypted object (tested). **Import
//! and verify of an encrypted object are not implemented yet**: they fail with `Unsupported`
//! before anything is created, naming the recipients and the manual way (`age -d`). Random
//! access, resume of an encrypted export (the file key would have to be wrapped for the
//! recipient inside the checkpoint) and the command line's `--encrypt-to`/`--identity` are
//! left. Encryption turns the holes of a raw object into data: stage as qcow2 (the default).

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

/// Encryption of an export for one or more recipients.
#[derive(Clone)]
pub struct Encryption {
    recipients: Vec<String>,
    #[cfg(feature = "encryption")]
    parsed: Vec<age::x25519::Recipient>,
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

    /// What the manifest records.
    pub fn info(&self) -> EncryptionInfo {
        EncryptionInfo {
            scheme: "age".into(),
            recipients: self.recipients.clone(),
        }
    }
}

/// The error for an encrypted object that an import or verification met.
pub fn cannot_decrypt_yet(info: &EncryptionInfo, key: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "{key} is encrypted ({} for {}); importing or verifying an encrypted object is not \
             implemented yet: decrypt it first with `age -d -i IDENTITY`",
            info.scheme,
            info.recipients.join(", ")
        ),
    )
}

/// `chunks` encrypted: the age header, then the ciphertext of every byte (zeros included), as
/// data chunks of the size the encoder wrote.
#[cfg(feature = "encryption")]
pub(crate) fn encrypt_chunks(chunks: ChunkStream, enc: &Encryption) -> Result<ChunkStream> {
    use crate::format::Chunk;
    use futures::StreamExt;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// The ciphertext age writes, taken out after every plaintext write.
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let io = |e: std::io::Error| Error::new(ErrorKind::Io, format!("age encryption: {e}"));
    let buf = Arc::new(Mutex::new(Vec::new()));
    let recipients = enc.parsed.iter().map(|r| r as &dyn age::Recipient);
    let writer = age::Encryptor::with_recipients(recipients)
        .map_err(|e| Error::invalid(format!("age encryption: {e}")))?
        .wrap_output(Out(buf.clone()))
        .map_err(io)?;
    let take = |buf: &Arc<Mutex<Vec<u8>>>| -> Result<Vec<u8>> {
        Ok(std::mem::take(&mut *buf.lock().map_err(|_| {
            Error::new(ErrorKind::Io, "age encryption: poisoned buffer")
        })?))
    };
    let state = (chunks, Some(writer), buf);
    Ok(
        futures::stream::unfold(state, move |(mut chunks, mut writer, buf)| async move {
            loop {
                let w = writer.as_mut()?;
                let step: Result<()> = match chunks.next().await {
                    Some(Ok(Chunk::Data(b))) => w.write_all(&b).map_err(io),
                    Some(Ok(Chunk::Zeros(mut n))) => {
                        let zeros = [0u8; 64 << 10];
                        let mut r = Ok(());
                        while n > 0 && r.is_ok() {
                            let k = n.min(zeros.len() as u64) as usize;
                            r = w.write_all(&zeros[..k]).map_err(io);
                            n -= k as u64;
                        }
                        r
                    }
                    Some(Err(e)) => Err(e),
                    None => match writer.take() {
                        Some(w) => w.finish().map(|_| ()).map_err(io),
                        None => Ok(()),
                    },
                };
                if let Err(e) = step {
                    return Some((Err(e), (chunks, None, buf)));
                }
                let out = match take(&buf) {
                    Ok(o) => o,
                    Err(e) => return Some((Err(e), (chunks, None, buf))),
                };
                if !out.is_empty() {
                    return Some((
                        Ok(Chunk::Data(bytes::Bytes::from(out))),
                        (chunks, writer, buf),
                    ));
                }
                writer.as_ref()?;
            }
        })
        .boxed(),
    )
}

/// Without the feature there is no [`Encryption`] to apply.
#[cfg(not(feature = "encryption"))]
pub(crate) fn encrypt_chunks(_chunks: ChunkStream, _enc: &Encryption) -> Result<ChunkStream> {
    Err(Error::unsupported(
        "client-side encryption needs virtrigaud built with the `encryption` feature",
    ))
}

//! The age v1 format (<https://age-encryption.org/v1>) written and read chunk by chunk, so that
//! an encrypted export can be resumed and an encrypted object read at any offset.
//!
//! Why this exists beside the `age` crate: its `Encryptor` draws a fresh file key and payload
//! nonce for every object and hides both, so an export killed midway cannot reproduce the
//! ciphertext it had already uploaded; and its reader is one stream. The format is simple and
//! fixed: a text header (the file key wrapped for each recipient, then an HMAC of the header),
//! a 16-byte nonce, then ChaCha20-Poly1305 chunks of 64 KiB of plaintext, chunk *i* sealed with
//! the nonce `i` (11 bytes, big-endian) ‖ `last`. Chunk *i* is therefore at a known offset and
//! can be sealed or opened on its own.
//!
//! No primitive is ours: the recipient stanzas are made and opened by the `age` crate
//! (`Recipient::wrap_file_key`, `Identity::unwrap_stanzas`), the keys come from age-core's HKDF,
//! the chunks from RustCrypto's ChaCha20-Poly1305 and the header MAC from HMAC-SHA-256, the same
//! crates the `age` crate uses. What this module adds is the framing, and it is checked both
//! ways: the `age` crate's own `Decryptor` reads what [`Session`] writes (unit tests below), and
//! the `age` command-line tool decrypts stored objects (`tests/encryption.rs`).

use age_core::format::{FILE_KEY_BYTES, FileKey, Stanza};
use age_core::secrecy::ExposeSecret;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hmac::Mac;

use crate::{Error, ErrorKind, Result};

/// Plaintext bytes per chunk.
pub(crate) const CHUNK: usize = 64 * 1024;
/// The Poly1305 tag after each chunk.
pub(crate) const TAG: usize = 16;
/// Stored bytes of a full chunk.
pub(crate) const SEALED_CHUNK: usize = CHUNK + TAG;
/// The payload nonce after the header.
const NONCE: usize = 16;
/// The version line.
const INTRO: &[u8] = b"age-encryption.org/v1\n";
/// The most header bytes we read (the header holds one short stanza per recipient).
pub(crate) const MAX_PREFIX: usize = 256 << 10;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// An age file's keys: the header (with the payload nonce) that starts the object, and the
/// payload key that seals or opens any chunk. The file key itself is not kept.
pub(crate) struct Session {
    prefix: Vec<u8>,
    aead: ChaCha20Poly1305,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session(prefix {} bytes, key redacted)",
            self.prefix.len()
        )
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::new(ErrorKind::Io, format!("no randomness for a file key: {e}")))?;
    Ok(b)
}

fn header_mac(file_key: &FileKey, header: &[u8]) -> Result<HmacSha256> {
    let key = age_core::primitives::hkdf(&[], b"header", file_key.expose_secret());
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&key)
        .map_err(|_| Error::new(ErrorKind::Io, "HMAC key"))?;
    mac.update(header);
    Ok(mac)
}

fn payload(file_key: &FileKey, nonce: &[u8]) -> ChaCha20Poly1305 {
    let key = age_core::primitives::hkdf(nonce, b"payload", file_key.expose_secret());
    ChaCha20Poly1305::new(&key.into())
}

/// The nonce of chunk `index`: the counter in 11 bytes, big-endian, then the last-chunk flag.
fn chunk_nonce(index: u64, last: bool) -> chacha20poly1305::Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n.into()
}

impl Session {
    /// A new file key and nonce, wrapped for `recipients`.
    pub(crate) fn new(recipients: &[age::x25519::Recipient]) -> Result<Session> {
        use age::Recipient as _;
        if recipients.is_empty() {
            return Err(Error::invalid("encryption needs at least one recipient"));
        }
        let file_key = FileKey::new(Box::new(random::<FILE_KEY_BYTES>()?));
        let mut header = INTRO.to_vec();
        for r in recipients {
            let (stanzas, _labels) = r
                .wrap_file_key(&file_key)
                .map_err(|e| Error::invalid(format!("wrapping the file key: {e}")))?;
            for s in stanzas {
                write_stanza(&mut header, &s);
            }
        }
        header.extend_from_slice(b"---");
        let mac = header_mac(&file_key, &header)?.finalize().into_bytes();
        header.push(b' ');
        header.extend_from_slice(B64.encode(mac).as_bytes());
        header.push(b'\n');
        let nonce = random::<NONCE>()?;
        header.extend_from_slice(&nonce);
        Ok(Session {
            aead: payload(&file_key, &nonce),
            prefix: header,
        })
    }

    /// Opens the prefix of an age file (`bytes` may run on into the payload) with one of
    /// `identities`: the file key unwrapped and the header MAC checked. A prefix no identity
    /// opens is `Auth`; a malformed or tampered header is `ChecksumMismatch`.
    pub(crate) fn open(bytes: &[u8], identities: &[age::x25519::Identity]) -> Result<Session> {
        use age::Identity as _;
        let parsed = parse_header(bytes)?;
        let file_key = identities
            .iter()
            .find_map(|i| i.unwrap_stanzas(&parsed.stanzas))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Auth,
                    "none of the given identities can decrypt this object",
                )
            })?
            .map_err(|e| Error::new(ErrorKind::Auth, format!("unwrapping the file key: {e}")))?;
        header_mac(&file_key, &bytes[..parsed.mac_covers])?
            .verify_slice(&parsed.mac)
            .map_err(|_| bad("its header MAC does not match (tampered header)"))?;
        let end = parsed.header_len + NONCE;
        let nonce = bytes
            .get(parsed.header_len..end)
            .ok_or_else(|| bad("it ends inside the payload nonce"))?;
        Ok(Session {
            aead: payload(&file_key, nonce),
            prefix: bytes[..end].to_vec(),
        })
    }

    /// The header and nonce that start the object.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Seals chunk `index` in place: `buf` holds its plaintext (at most [`CHUNK`] bytes) and
    /// gets its tag appended.
    pub(crate) fn seal(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<()> {
        self.aead
            .encrypt_in_place(&chunk_nonce(index, last), &[], buf)
            .map_err(|_| Error::new(ErrorKind::Io, "sealing a chunk failed"))
    }

    /// Opens chunk `index` in place (`buf`: its ciphertext and tag); a chunk that fails its
    /// tag is `ChecksumMismatch`.
    pub(crate) fn open_chunk(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<()> {
        self.aead
            .decrypt_in_place(&chunk_nonce(index, last), &[], buf)
            .map_err(|_| {
                Error::new(
                    ErrorKind::ChecksumMismatch,
                    format!(
                        "encrypted chunk {index} fails its authentication (tampered or corrupt)"
                    ),
                )
            })
    }
}

fn bad(why: &str) -> Error {
    Error::new(
        ErrorKind::ChecksumMismatch,
        format!("the encrypted object's header is corrupt: {why}"),
    )
}

/// `-> tag args…` then the body in base64 lines of 64 characters, the last one shorter
/// (empty when the body fills whole lines).
fn write_stanza(out: &mut Vec<u8>, s: &Stanza) {
    out.extend_from_slice(b"->");
    for word in std::iter::once(&s.tag).chain(&s.args) {
        out.push(b' ');
        out.extend_from_slice(word.as_bytes());
    }
    out.push(b'\n');
    let body = B64.encode(&s.body);
    let mut rest = body.as_bytes();
    loop {
        let n = rest.len().min(64);
        out.extend_from_slice(&rest[..n]);
        out.push(b'\n');
        if n < 64 {
            break;
        }
        rest = &rest[n..];
    }
}

/// A parsed header.
#[derive(Debug)]
struct Header {
    stanzas: Vec<Stanza>,
    /// Bytes the MAC covers (up to and including `---`).
    mac_covers: usize,
    mac: Vec<u8>,
    /// Bytes up to and including the MAC line's newline.
    header_len: usize,
}

/// Reads the header at the start of `bytes`.
fn parse_header(bytes: &[u8]) -> Result<Header> {
    let mut pos = 0usize;
    let mut line = || -> Result<(usize, &[u8])> {
        let start = pos;
        let rest = bytes.get(pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("it ends inside the header"))?;
        pos += n + 1;
        Ok((start, &rest[..n]))
    };
    let (_, intro) = line()?;
    if intro != &INTRO[..INTRO.len() - 1] {
        return Err(bad("it does not start with age-encryption.org/v1"));
    }
    let mut stanzas = Vec::new();
    loop {
        let (start, l) = line()?;
        if let Some(mac) = l.strip_prefix(b"--- ") {
            if stanzas.is_empty() {
                return Err(bad("it has no recipient stanza"));
            }
            let mac = B64.decode(mac).map_err(|_| bad("its MAC is not base64"))?;
            return Ok(Header {
                stanzas,
                mac_covers: start + 3,
                mac,
                header_len: start + l.len() + 1,
            });
        }
        let words = l
            .strip_prefix(b"-> ")
            .ok_or_else(|| bad("a line is neither a stanza nor the MAC"))?;
        let words = std::str::from_utf8(words).map_err(|_| bad("a stanza is not text"))?;
        let mut words = words.split(' ');
        let tag = words.next().unwrap_or_default().to_string();
        if tag.is_empty() {
            return Err(bad("a stanza has no tag"));
        }
        let args: Vec<String> = words.map(str::to_string).collect();
        let mut body = Vec::new();
        loop {
            let (_, b) = line()?;
            if b.len() > 64 {
                return Err(bad("a stanza body line is longer than 64 characters"));
            }
            body.extend_from_slice(b);
            if b.len() < 64 {
                break;
            }
        }
        let body = B64
            .decode(&body)
            .map_err(|_| bad("a stanza body is not base64"))?;
        stanzas.push(Stanza { tag, args, body });
    }
}

/// Where the chunks of an object of `stored` bytes lie, behind a prefix of `prefix` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Bytes before the first chunk.
    pub prefix: u64,
    /// Number of chunks (at least 1).
    pub chunks: u64,
    /// Plaintext size.
    pub plain: u64,
}

impl Layout {
    /// The layout of a stored object, or `Corrupt` for a size no age file can have (a
    /// truncated object, most often).
    pub(crate) fn of(prefix: u64, stored: u64) -> Result<Layout> {
        let payload = stored
            .checked_sub(prefix)
            .filter(|&p| p >= TAG as u64)
            .ok_or_else(|| Error::corrupt("the encrypted object ends before its first chunk"))?;
        let chunks = payload.div_ceil(SEALED_CHUNK as u64);
        let last = payload - (chunks - 1) * SEALED_CHUNK as u64;
        // A last chunk is never empty unless it is the only one.
        if last < TAG as u64 || (last == TAG as u64 && chunks > 1) {
            return Err(Error::corrupt(
                "the encrypted object's size is not that of an age file (truncated?)",
            ));
        }
        Ok(Layout {
            prefix,
            chunks,
            plain: payload - chunks * TAG as u64,
        })
    }
}

/// Seals a plaintext stream chunk by chunk: [`Sealer::push`] as bytes come, then
/// [`Sealer::finish`]. The output of one session is the same for the same plaintext, however
/// it is split.
pub(crate) struct Sealer {
    session: std::sync::Arc<Session>,
    index: u64,
    buf: Vec<u8>,
    started: bool,
}

impl Sealer {
    pub(crate) fn new(session: std::sync::Arc<Session>) -> Sealer {
        Sealer {
            session,
            index: 0,
            buf: Vec::with_capacity(SEALED_CHUNK),
            started: false,
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            out.extend_from_slice(self.session.prefix());
            self.started = true;
        }
    }

    /// Adds plaintext; appends to `out` every chunk that is complete and known not to be the
    /// last (a full chunk is sealed when the next byte arrives).
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.start(out);
        while !data.is_empty() {
            if self.buf.len() == CHUNK {
                self.session.seal(self.index, false, &mut self.buf)?;
                out.extend_from_slice(&self.buf);
                self.buf.clear();
                self.index += 1;
            }
            let n = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        Ok(())
    }

    /// Seals the last chunk.
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) -> Result<()> {
        self.start(out);
        self.session.seal(self.index, true, &mut self.buf)?;
        out.extend_from_slice(&self.buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Arc;

    fn keys() -> (age::x25519::Identity, age::x25519::Recipient) {
        let id = age::x25519::Identity::generate();
        let r = id.to_public();
        (id, r)
    }

    fn seal_all(s: &Arc<Session>, plain: &[u8], piece: usize) -> Vec<u8> {
        let mut sealer = Sealer::new(s.clone());
        let mut out = Vec::new();
        for p in plain.chunks(piece.max(1)) {
            sealer.push(p, &mut out).unwrap();
        }
        sealer.finish(&mut out).unwrap();
        out
    }

    fn age_decrypt(
        bytes: &[u8],
        id: &age::x25519::Identity,
    ) -> std::result::Result<Vec<u8>, String> {
        let d = age::Decryptor::new(bytes).map_err(|e| e.to_string())?;
        let mut r = d
            .decrypt(std::iter::once(id as &dyn age::Identity))
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn plain(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn the_age_crate_reads_what_we_write_at_every_chunk_boundary() {
        let (id, r) = keys();
        let s = Arc::new(Session::new(&[r]).unwrap());
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17] {
            let p = plain(n);
            let sealed = seal_all(&s, &p, 4096);
            assert_eq!(age_decrypt(&sealed, &id).unwrap(), p, "{n} bytes");
            let layout = Layout::of(s.prefix().len() as u64, sealed.len() as u64).unwrap();
            assert_eq!(layout.plain, n as u64);
        }
    }

    #[test]
    fn one_session_seals_the_same_plaintext_the_same_way_however_it_is_split() {
        let (_, r) = keys();
        let s = Arc::new(Session::new(&[r]).unwrap());
        let p = plain(3 * CHUNK + 5);
        assert_eq!(seal_all(&s, &p, 1 << 20), seal_all(&s, &p, 999));
        // A new session is a new key and nonce.
        let (_, r2) = keys();
        let s2 = Arc::new(Session::new(&[r2]).unwrap());
        assert_ne!(
            seal_all(&s, &p, 999)[s.prefix().len()..],
            seal_all(&s2, &p, 999)[s2.prefix().len()..]
        );
    }

    #[test]
    fn a_session_reopened_from_the_stored_header_continues_the_same_ciphertext() {
        let (id, r) = keys();
        let s = Arc::new(Session::new(&[r]).unwrap());
        let p = plain(2 * CHUNK + 3);
        let sealed = seal_all(&s, &p, 1000);
        let again = Arc::new(Session::open(s.prefix(), std::slice::from_ref(&id)).unwrap());
        assert_eq!(again.prefix(), s.prefix());
        assert_eq!(seal_all(&again, &p, 4096), sealed);
        // Every chunk opens on its own.
        let layout = Layout::of(again.prefix().len() as u64, sealed.len() as u64).unwrap();
        assert_eq!(layout.chunks, 3);
        for i in 0..layout.chunks {
            let at = layout.prefix as usize + i as usize * SEALED_CHUNK;
            let end = (at + SEALED_CHUNK).min(sealed.len());
            let mut b = sealed[at..end].to_vec();
            again.open_chunk(i, i + 1 == layout.chunks, &mut b).unwrap();
            assert_eq!(b, p[i as usize * CHUNK..(i as usize * CHUNK + b.len())]);
        }
    }

    #[test]
    fn we_read_what_the_age_crate_writes() {
        use std::io::Write;
        let (id, r) = keys();
        let p = plain(CHUNK + 100);
        let mut out = Vec::new();
        let mut w = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
            .unwrap()
            .wrap_output(&mut out)
            .unwrap();
        w.write_all(&p).unwrap();
        w.finish().unwrap();
        let s = Session::open(&out, std::slice::from_ref(&id)).unwrap();
        let layout = Layout::of(s.prefix().len() as u64, out.len() as u64).unwrap();
        assert_eq!(layout.plain, p.len() as u64);
        let mut last = out[layout.prefix as usize + SEALED_CHUNK..].to_vec();
        s.open_chunk(1, true, &mut last).unwrap();
        assert_eq!(last, p[CHUNK..]);
    }

    #[test]
    fn wrong_identities_tampered_headers_chunks_and_sizes_are_refused() {
        let (id, r) = keys();
        let (other, _) = keys();
        let s = Arc::new(Session::new(&[r]).unwrap());
        let p = plain(CHUNK + 10);
        let sealed = seal_all(&s, &p, 4096);
        let e = Session::open(&sealed, std::slice::from_ref(&other)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        // A flipped bit in the MAC.
        let mac_at = s.prefix().len() - NONCE - 5;
        let mut t = sealed.clone();
        t[mac_at] ^= if t[mac_at] == b'A' { 2 } else { 1 };
        let e = Session::open(&t, std::slice::from_ref(&id)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
        // A flipped byte in chunk 0.
        let layout = Layout::of(s.prefix().len() as u64, sealed.len() as u64).unwrap();
        let mut c = sealed[layout.prefix as usize..][..SEALED_CHUNK].to_vec();
        c[100] ^= 1;
        let e = s.open_chunk(0, false, &mut c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);
        // Chunk 0 presented as the last one fails too (truncation is caught by the flag).
        let mut c = sealed[layout.prefix as usize..][..SEALED_CHUNK].to_vec();
        assert!(s.open_chunk(0, true, &mut c).is_err());
        // A size that leaves an empty last chunk after full ones, or no tag at all.
        assert!(Layout::of(10, 10 + SEALED_CHUNK as u64 + TAG as u64).is_err());
        assert!(Layout::of(10, 10 + 5).is_err());
        assert!(Layout::of(10, 9).is_err());
        // Garbage is not a header.
        for g in [
            &b"age-encryption.org/v2\n"[..],
            b"",
            b"age-encryption.org/v1\n--- AAAA\n",
        ] {
            assert_eq!(
                Session::open(g, std::slice::from_ref(&id))
                    .unwrap_err()
                    .kind(),
                ErrorKind::ChecksumMismatch
            );
        }
    }
}

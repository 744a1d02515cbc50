//! Deterministic sample data for tests, benchmarks and examples (this crate's, the facade's
//! and yours): the same seed always gives the same bytes.

/// `len` bytes of text-like data from a small vocabulary (deflate shrinks it about 5:1).
///
/// ```
/// let t = virtrigaud_core::testdata::text(7, 1000);
/// assert_eq!(t.len(), 1000);
/// assert_eq!(t, virtrigaud_core::testdata::text(7, 1000));
/// ```
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 11] = [
        "virtrigaud ",
        "moves ",
        "disks ",
        "between ",
        "hypervisors ",
        "through ",
        "storage, ",
        "verified ",
        "end ",
        "to ",
        "end.\n",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

/// `len` pseudo-random bytes (xorshift64, one byte per step): incompressible, and the same for
/// the same seed.
///
/// ```
/// let n = virtrigaud_core::testdata::noise(3, 4096);
/// assert_eq!(n, virtrigaud_core::testdata::noise(3, 4096));
/// assert_ne!(n, virtrigaud_core::testdata::noise(4, 4096));
/// ```
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

//! The store-and-forward record format: what the offline buffer writes, one record per
//! reading (or batch), appended to a segment.
//!
//! ```text
//! record = magic "FRR1" | len: u32 LE | crc32(seq ‖ payload): u32 LE | seq: u64 LE | payload[len]
//! ```
//!
//! A power cut mid-append leaves a torn record at the end of a segment; bit rot leaves a
//! damaged one in the middle. [`scan`] reads every intact record, reports the damaged byte
//! ranges, and resynchronises on the next magic whose record checks out: one bad record never
//! costs the records after it.

use alloc::vec::Vec;
use core::ops::Range;

/// Marks the start of a record.
pub const MAGIC: [u8; 4] = *b"FRR1";
/// Bytes before the payload.
pub const HEADER: usize = 4 + 4 + 4 + 8;
/// Largest payload accepted when reading (a longer length is damage).
pub const MAX_PAYLOAD: usize = 1 << 20;

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends the record of `payload` (numbered `seq`) to `out`.
pub fn encode_into(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The record of `payload`.
pub fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    encode_into(&mut v, seq, payload);
    v
}

/// One intact record found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where the record starts in the scanned bytes.
    pub offset: usize,
    /// Its sequence number.
    pub seq: u64,
    /// Where its payload is in the scanned bytes.
    pub payload: Range<usize>,
}

impl Found {
    /// Where the next record starts.
    pub fn end(&self) -> usize {
        self.payload.end
    }
}

/// What [`scan`] found in a segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The intact records, in order.
    pub records: Vec<Found>,
    /// Damaged byte ranges skipped in the middle.
    pub damaged: Vec<Range<usize>>,
    /// Bytes of an incomplete record at the end (a torn append), if any.
    pub torn_tail: usize,
}

/// The record at `at`, when an intact one starts there; `Err(true)` when it is cut off by the
/// end of `bytes`.
fn record_at(bytes: &[u8], at: usize) -> Result<Found, bool> {
    let rest = &bytes[at..];
    if rest.len() < HEADER {
        return Err(MAGIC.starts_with(&rest[..rest.len().min(4)]));
    }
    if rest[..4] != MAGIC {
        return Err(false);
    }
    let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
    let len = word(4) as usize;
    let crc = word(8);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&rest[12..20]);
    let seq = u64::from_le_bytes(seq_bytes);
    if len > MAX_PAYLOAD {
        return Err(false);
    }
    if rest.len() < HEADER + len {
        return Err(true);
    }
    let payload = &rest[HEADER..HEADER + len];
    if checksum(seq, payload) != crc {
        return Err(false);
    }
    Ok(Found { offset: at, seq, payload: at + HEADER..at + HEADER + len })
}

/// Reads every intact record of a segment.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Ok(found) => {
                at = found.end();
                out.records.push(found);
            }
            Err(cut) => {
                // Resynchronise: the next offset where an intact record starts.
                let next = (at + 1..bytes.len())
                    .filter(|&i| bytes[i..].starts_with(&MAGIC[..(bytes.len() - i).min(4)]))
                    .find(|&i| record_at(bytes, i).is_ok());
                match next {
                    Some(i) => {
                        out.damaged.push(at..i);
                        at = i;
                    }
                    None => {
                        // Nothing intact after this point: a torn append if the bytes look
                        // like the start of a record cut short, damage otherwise.
                        if cut {
                            out.torn_tail = bytes.len() - at;
                        } else {
                            out.damaged.push(at..bytes.len());
                        }
                        break;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn three() -> Vec<u8> {
        let mut v = Vec::new();
        for (seq, p) in [(1u64, &b"alpha"[..]), (2, b"beta"), (3, b"gamma")] {
            encode_into(&mut v, seq, p);
        }
        v
    }

    fn seqs(s: &Scan) -> Vec<u64> {
        s.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn intact_records_read_back() {
        let v = three();
        let s = scan(&v);
        assert_eq!(seqs(&s), vec![1, 2, 3]);
        assert_eq!(&v[s.records[1].payload.clone()], b"beta");
        assert_eq!((s.damaged.len(), s.torn_tail), (0, 0));
    }

    #[test]
    fn a_torn_append_at_any_byte_loses_only_that_record() {
        let full = three();
        let last = scan(&full).records[2].offset;
        for cut in last + 1..full.len() {
            let s = scan(&full[..cut]);
            assert_eq!(seqs(&s), vec![1, 2], "cut at {cut}");
            assert_eq!(s.torn_tail, cut - last, "cut at {cut}");
            assert!(s.damaged.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_the_rest_is_kept() {
        let full = three();
        let second = scan(&full).records[1].clone();
        for i in second.offset..second.end() {
            let mut v = full.clone();
            v[i] ^= 0x5a;
            let s = scan(&v);
            assert_eq!(seqs(&s), vec![1, 3], "flipped byte {i}");
            assert_eq!(s.damaged, vec![second.offset..second.end()], "flipped byte {i}");
        }
        // Garbage between records, and a length that claims too much.
        let mut v = full.clone();
        v.splice(second.offset..second.offset, [0u8, 1, 2, b'F', b'R']);
        assert_eq!(seqs(&scan(&v)), vec![1, 2, 3]);
        let mut v = full;
        v[second.offset + 4..second.offset + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(seqs(&scan(&v)), vec![1, 3]);
    }
}

//! The write-ahead log: one directory per shard, each a sequence of segment files named by
//! the sequence number of their first entry. A shard appends a group of entries and fsyncs
//! once (group commit); the caller acknowledges only after [`WalWriter::append`] returns.
//!
//! Entry layout (little endian):
//! `magic u32 | len u32 | crc32 u32 | seq u64 | stream_len u16 | stream | Arrow IPC stream`
//! where `len` counts the bytes after the crc and the crc covers them. Replay stops at the
//! first torn or corrupt entry of a segment (a crash mid-write), which was never
//! acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ferrite_engine::{StreamBatch, StreamName};

use crate::error::{Error, Result, io};

const MAGIC: u32 = 0x4C41_5746; // "FWAL"
const HEADER: usize = 12;

/// One entry read back from the log.
#[derive(Debug)]
pub struct WalEntry {
    /// Per-shard sequence number.
    pub seq: u64,
    /// The rows.
    pub batch: StreamBatch,
}

/// A segment file on disk.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Sequence number of its first entry.
    pub first_seq: u64,
    /// Its path.
    pub path: PathBuf,
}

/// The appending end of one shard's log.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    file: Option<File>,
    current: Option<Segment>,
    next_seq: u64,
    epoch: u64,
    buf: Vec<u8>,
}

/// Lists a shard directory's segments in order.
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("list wal", dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io("list wal", dir))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else { continue };
        if let Ok(first_seq) = stem.parse::<u64>() {
            out.push(Segment { first_seq, path: e.path() });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Reads every intact entry of a segment.
pub fn read_segment(path: &Path) -> Result<Vec<WalEntry>> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io("read wal", path))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + HEADER <= bytes.len() {
        let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if word(pos) != MAGIC {
            tracing::warn!(path = %path.display(), offset = pos, "wal: bad magic; ignoring the rest of the segment");
            break;
        }
        let len = word(pos + 4) as usize;
        let crc = word(pos + 8);
        let body_start = pos + HEADER;
        let Some(body) = bytes.get(body_start..body_start + len) else {
            tracing::warn!(path = %path.display(), offset = pos, "wal: torn entry at the end; ignoring it");
            break;
        };
        if crc32fast::hash(body) != crc || body.len() < 10 {
            tracing::warn!(path = %path.display(), offset = pos, "wal: checksum mismatch; ignoring the rest of the segment");
            break;
        }
        let seq = u64::from_le_bytes(body[0..8].try_into().map_err(|_| corrupt(path, "seq"))?);
        let slen = u16::from_le_bytes([body[8], body[9]]) as usize;
        let name = body
            .get(10..10 + slen)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt(path, "stream name"))?;
        let stream = StreamName::new(name)?;
        let ipc = &body[10 + slen..];
        let reader = StreamReader::try_new(ipc, None)?;
        for batch in reader {
            out.push(WalEntry { seq, batch: StreamBatch::new(stream.clone(), batch?) });
        }
        pos = body_start + len;
    }
    Ok(out)
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::CorruptCatalog { path: path.display().to_string(), message: format!("wal entry with invalid {what}") }
}

fn encode(buf: &mut Vec<u8>, seq: u64, stream: &StreamName, batch: &RecordBatch) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&[0; 8]); // len and crc, filled below
    buf.extend_from_slice(&seq.to_le_bytes());
    let name = stream.as_str().as_bytes();
    buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
    buf.extend_from_slice(name);
    {
        let mut w = StreamWriter::try_new(&mut *buf, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    let body_start = start + HEADER;
    let len = (buf.len() - body_start) as u32;
    let crc = crc32fast::hash(&buf[body_start..]);
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

impl WalWriter {
    /// Opens the shard directory; the next entry gets `next_seq`.
    pub fn open(dir: &Path, next_seq: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io("create wal dir", dir))?;
        Ok(Self { dir: dir.to_owned(), file: None, current: None, next_seq, epoch: 0, buf: Vec::new() })
    }

    /// Sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one entry per batch and fsyncs; returns the sequence number of each.
    pub fn append(&mut self, batches: &[StreamBatch]) -> Result<Vec<u64>> {
        self.buf.clear();
        let mut seqs = Vec::with_capacity(batches.len());
        for sb in batches {
            encode(&mut self.buf, self.next_seq + seqs.len() as u64, &sb.stream, &sb.batch)?;
            seqs.push(self.next_seq + seqs.len() as u64);
        }
        if self.file.is_none() {
            let path = self.dir.join(format!("{:020}.wal", self.next_seq));
            let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io("open wal segment", &path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("sync wal dir", &self.dir))?;
            self.current = Some(Segment { first_seq: self.next_seq, path });
            self.file = Some(f);
        }
        let (Some(f), Some(seg)) = (self.file.as_mut(), self.current.as_ref()) else {
            return Err(Error::Io {
                op: "append wal",
                path: self.dir.display().to_string(),
                source: std::io::Error::other("no segment"),
            });
        };
        f.write_all(&self.buf).map_err(io("append wal", &seg.path))?;
        f.sync_data().map_err(io("fsync wal", &seg.path))?;
        self.next_seq += seqs.len() as u64;
        Ok(seqs)
    }

    /// Number of rotations so far: entries appended in the same epoch are all on the same
    /// side of every persist cut.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes in the last appended group.
    pub fn last_append_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Closes the current segment; the next append starts a new one. Returns the last
    /// sequence number written so far (`next_seq - 1`).
    pub fn rotate(&mut self) -> u64 {
        self.file = None;
        self.current = None;
        self.epoch += 1;
        self.next_seq.saturating_sub(1)
    }

    /// Deletes every segment whose entries all have `seq <= upto`.
    pub fn remove_persisted(&self, upto: u64) -> Result<usize> {
        let segs = list_segments(&self.dir)?;
        let mut removed = 0;
        for (i, s) in segs.iter().enumerate() {
            if self.current.as_ref().is_some_and(|c| c.path == s.path) {
                continue;
            }
            // A segment ends where the next one (or the writer's position) starts.
            let end = segs.get(i + 1).map(|n| n.first_seq).unwrap_or(self.next_seq);
            if end.saturating_sub(1) <= upto && end > s.first_seq || end == s.first_seq {
                std::fs::remove_file(&s.path).map_err(io("remove wal segment", &s.path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

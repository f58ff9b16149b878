//! The write-ahead log: one directory per shard, each a sequence of segment files named by
//! the sequence number of their first entry. A shard appends a group of entries and fsyncs
//! once (group commit); the caller acknowledges only after [`WalWriter::append`] returns.
//!
//! Entry layout (little endian):
//! `magic u32 | len u32 | crc32 u32 | seq u64 | stream_len u16 | stream | Arrow IPC stream`
//! where `len` counts the bytes after the crc and the crc covers them. The magic says who
//! wrote the rows: `FWAL` a client (ingest), `FWAD` a rule (derived rows, which recovery
//! after a checkpoint can derive again).
//!
//! Invariants:
//! - A failed append (`write_all` or `sync_data` errors: disk full, EIO) leaves nothing
//!   behind: the segment is truncated back to its length before the append, and until that
//!   truncation has succeeded no further entry is written to it. So an acknowledged entry is
//!   never preceded by garbage.
//! - Replay reads every intact entry. A bad entry at the very end of a segment is a torn
//!   write (a crash mid-append, never acknowledged) and is ignored; a bad region followed by
//!   intact entries is corruption: the entries after it are still recovered, the segment is
//!   copied to `quarantine/` and the error is logged and counted, never skipped quietly.
//! - A writer never appends to a segment it did not create in this process: after a
//!   restart the first append starts a fresh segment, so a torn tail stays a tail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ferrite_engine::{StreamBatch, StreamName};

use crate::error::{Error, Result, io};

const MAGIC: u32 = 0x4C41_5746; // "FWAL"
const MAGIC_DERIVED: u32 = 0x4441_5746; // "FWAD"
const HEADER: usize = 12;

/// One entry read back from the log.
#[derive(Debug)]
pub struct WalEntry {
    /// Per-shard sequence number.
    pub seq: u64,
    /// Whether a rule derived it (see the module docs).
    pub derived: bool,
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

/// What replay found in one segment.
#[derive(Debug, Default)]
pub struct SegmentRead {
    /// Every intact entry, in file order.
    pub entries: Vec<WalEntry>,
    /// Bytes at the end that do not form an intact entry (a torn, unacknowledged write).
    pub torn_tail: usize,
    /// Bad regions followed by intact entries: `(offset, length, what was wrong)`.
    pub corrupt: Vec<(usize, usize, String)>,
}

/// An injected fault, for tests of the append path.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// The next write stores only this many bytes, then fails (disk full mid-write).
    PartialWrite(usize),
    /// The next fsync fails after the write went through.
    Sync,
    /// Truncating after a failure fails too, this many times.
    Truncate(usize),
}

/// The appending end of one shard's log.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    file: Option<File>,
    current: Option<Segment>,
    /// Length of the current segment after the last successful append.
    len: u64,
    /// Set after a failed append whose garbage could not be truncated yet: the next append
    /// retries the truncation before writing anything.
    dirty: bool,
    next_seq: u64,
    epoch: u64,
    buf: Vec<u8>,
    #[cfg(test)]
    pub(crate) faults: Vec<Fault>,
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

fn is_magic(w: u32) -> bool {
    w == MAGIC || w == MAGIC_DERIVED
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Checks the entry framed at `pos`: `Ok(end)` when magic, length and checksum hold.
fn frame_at(bytes: &[u8], pos: usize) -> std::result::Result<usize, &'static str> {
    if pos + HEADER > bytes.len() {
        return Err("truncated header");
    }
    if !is_magic(word(bytes, pos)) {
        return Err("bad magic");
    }
    let len = word(bytes, pos + 4) as usize;
    let body_start = pos + HEADER;
    let Some(body) = bytes.get(body_start..body_start.saturating_add(len)) else {
        return Err("entry runs past the end of the segment");
    };
    if body.len() < 10 || crc32fast::hash(body) != word(bytes, pos + 8) {
        return Err("checksum mismatch");
    }
    Ok(body_start + len)
}

/// Reads every intact entry of a segment; see the module docs for torn tails and corruption.
pub fn read_segment(path: &Path) -> Result<SegmentRead> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io("read wal", path))?;
    let mut out = SegmentRead::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let end = match frame_at(&bytes, pos) {
            Ok(end) => end,
            Err(reason) => {
                // Is there an intact entry further on? Then this is not a torn tail.
                let resync = (pos + 1..bytes.len().saturating_sub(HEADER - 1))
                    .find(|&p| is_magic(word(&bytes, p)) && frame_at(&bytes, p).is_ok());
                match resync {
                    Some(next) => {
                        out.corrupt.push((pos, next - pos, reason.to_owned()));
                        pos = next;
                        continue;
                    }
                    None => {
                        out.torn_tail = bytes.len() - pos;
                        break;
                    }
                }
            }
        };
        let derived = word(&bytes, pos) == MAGIC_DERIVED;
        let body = &bytes[pos + HEADER..end];
        let seq = u64::from_le_bytes(body[0..8].try_into().map_err(|_| corrupt(path, "seq"))?);
        let slen = u16::from_le_bytes([body[8], body[9]]) as usize;
        let name = body
            .get(10..10 + slen)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt(path, "stream name"))?;
        let stream = StreamName::from_key(name)?;
        let ipc = body.get(10 + slen..).ok_or_else(|| corrupt(path, "body"))?;
        let reader = StreamReader::try_new(ipc, None)?;
        for batch in reader {
            out.entries.push(WalEntry { seq, derived, batch: StreamBatch::new(stream.clone(), batch?) });
        }
        pos = end;
    }
    Ok(out)
}

/// Copies a damaged segment into `{dir}/../quarantine/` (once) and returns where it went.
pub fn quarantine(segment: &Path) -> Result<PathBuf> {
    let shard_dir = segment.parent().unwrap_or(Path::new("."));
    let qdir = shard_dir.parent().unwrap_or(shard_dir).join("quarantine");
    std::fs::create_dir_all(&qdir).map_err(io("create wal quarantine", &qdir))?;
    let shard = shard_dir.file_name().and_then(|n| n.to_str()).unwrap_or("shard");
    let name = segment.file_name().and_then(|n| n.to_str()).unwrap_or("segment.wal");
    let target = qdir.join(format!("{shard}-{name}"));
    if !target.exists() {
        std::fs::copy(segment, &target).map_err(io("quarantine wal segment", segment))?;
    }
    Ok(target)
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::CorruptCatalog { path: path.display().to_string(), message: format!("wal entry with invalid {what}") }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.wal")
}

fn encode(buf: &mut Vec<u8>, seq: u64, derived: bool, stream: &StreamName, batch: &RecordBatch) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&(if derived { MAGIC_DERIVED } else { MAGIC }).to_le_bytes());
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
    /// Opens the shard directory; the next entry gets `next_seq`, in a segment of its own.
    ///
    /// A leftover file with that segment's name can only hold bytes that replay found no
    /// entry in (a torn first write): it is moved to quarantine, never appended to.
    pub fn open(dir: &Path, next_seq: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io("create wal dir", dir))?;
        let leftover = dir.join(segment_name(next_seq));
        if leftover.exists() {
            let kept = quarantine(&leftover)?;
            std::fs::remove_file(&leftover).map_err(io("remove torn wal segment", &leftover))?;
            tracing::warn!(segment = %leftover.display(), kept = %kept.display(), "wal: a segment held only a torn write; starting a fresh one");
        }
        Ok(Self {
            dir: dir.to_owned(),
            file: None,
            current: None,
            len: 0,
            dirty: false,
            next_seq,
            epoch: 0,
            buf: Vec::new(),
            #[cfg(test)]
            faults: Vec::new(),
        })
    }

    /// Sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one entry per batch and fsyncs; returns the sequence number of each. On an
    /// error nothing of the group stays in the log (see the module's invariants), and the
    /// caller must not acknowledge it. `derived`: the rows are rules' outputs.
    pub fn append(&mut self, batches: &[StreamBatch], derived: bool) -> Result<Vec<u64>> {
        self.buf.clear();
        let mut seqs = Vec::with_capacity(batches.len());
        for sb in batches {
            encode(&mut self.buf, self.next_seq + seqs.len() as u64, derived, &sb.stream, &sb.batch)?;
            seqs.push(self.next_seq + seqs.len() as u64);
        }
        if self.dirty {
            self.truncate_to_last_good()?;
        }
        if self.file.is_none() {
            let path = self.dir.join(segment_name(self.next_seq));
            // Truncate: a file of this name can only hold a failed first append of ours.
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(io("open wal segment", &path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("sync wal dir", &self.dir))?;
            self.current = Some(Segment { first_seq: self.next_seq, path });
            self.file = Some(f);
            self.len = 0;
        }
        if let Err(e) = self.write_group() {
            self.dirty = true;
            if let Err(t) = self.truncate_to_last_good() {
                tracing::error!(error = %t, "wal: cannot remove a failed append yet; the next append retries first");
            }
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        self.next_seq += seqs.len() as u64;
        Ok(seqs)
    }

    fn write_group(&mut self) -> Result<()> {
        let len = self.buf.len();
        #[cfg(test)]
        let (len, injected) = match self.faults.first().copied() {
            Some(Fault::PartialWrite(n)) => {
                self.faults.remove(0);
                (n.min(len), Some("injected: no space left on device"))
            }
            Some(Fault::Sync) => {
                self.faults.remove(0);
                (len, Some("injected: input/output error"))
            }
            _ => (len, None),
        };
        let (Some(f), Some(seg)) = (self.file.as_mut(), self.current.as_ref()) else {
            return Err(Error::Io {
                op: "append wal",
                path: self.dir.display().to_string(),
                source: std::io::Error::other("no segment"),
            });
        };
        f.seek(SeekFrom::Start(self.len)).map_err(io("append wal", &seg.path))?;
        if ferrite_engine::failpoint::fires("wal.mid_append") {
            // A torn tail, as a power cut mid-write leaves it.
            let _ = f.write_all(&self.buf[..len / 2]).and_then(|()| f.sync_data());
            ferrite_engine::failpoint::kill("wal.mid_append");
        }
        f.write_all(&self.buf[..len]).map_err(io("append wal", &seg.path))?;
        ferrite_engine::failpoint::kill_point("wal.before_fsync");
        #[cfg(test)]
        if let Some(what) = injected {
            return Err(io("append wal", &seg.path)(std::io::Error::other(what)));
        }
        f.sync_data().map_err(io("fsync wal", &seg.path))
    }

    /// Cuts the current segment back to its last good length and makes that durable.
    fn truncate_to_last_good(&mut self) -> Result<()> {
        let (Some(f), Some(seg)) = (self.file.as_mut(), self.current.as_ref()) else {
            self.dirty = false;
            return Ok(());
        };
        #[cfg(test)]
        if let Some(Fault::Truncate(n)) = self.faults.first_mut() {
            *n -= 1;
            if *n == 0 {
                self.faults.remove(0);
            }
            return Err(io("truncate wal", &seg.path)(std::io::Error::other("injected: input/output error")));
        }
        f.set_len(self.len).and_then(|()| f.sync_data()).map_err(io("truncate wal", &seg.path))?;
        self.dirty = false;
        Ok(())
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
        // A segment whose failed append could not be cut off yet stays open, so that the
        // next append retries the truncation before writing.
        let keep_open = self.dirty && self.truncate_to_last_good().is_err();
        if !keep_open {
            self.file = None;
            self.current = None;
        }
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

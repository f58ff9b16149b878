//! The offline buffer on disk: a directory of segment files (`{id:016x}.seg`) of
//! [`ferrite_agent_core::record`] records, and a `cursor` file saying how far the platform
//! has acknowledged them and how many were dropped.
//!
//! - Every reading goes through the spool, online or not: live readings and back-fill leave
//!   in one order, with their original event times.
//! - An append is fsynced before [`FileSpool::push`] returns (unless `sync` is off): a power
//!   cut loses at most the record being written, which the next open detects (torn tail,
//!   cut off the file) without touching the records before it.
//! - When the spool is full the oldest segment goes; its unsent records are counted, and the
//!   count survives restarts until [`FileSpool::take_dropped`] (report it on reconnect).
//! - The cursor is written atomically (temporary file, rename) after acknowledgements, so a
//!   restart resumes where the platform's acknowledgements stopped. A record sent but not
//!   yet acknowledged when the agent stops is sent again: delivery is at least once, and
//!   each reading carries its `seq` to tell a repeat. The cursor is not fsynced after each
//!   acknowledgement (three fsyncs per message would cost more than the message): a power
//!   cut can move it back a little, and those records are sent again. Dropping records
//!   (a full spool) fsyncs it, so that the count of dropped records survives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferrite_agent_core::record;
use ferrite_agent_core::spool::{Action, Cursor, Segment, Spool};

/// A record waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its sequence number.
    pub seq: u64,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Bytes the cursor moves when it is acknowledged (the record and any damage skipped
    /// before it).
    pub advance: u64,
}

/// The spool in a directory.
#[derive(Debug)]
pub struct FileSpool {
    dir: PathBuf,
    spool: Spool,
    sync: bool,
    /// Damaged bytes found when opening (logged by the caller).
    pub damaged_on_open: u64,
    /// Torn bytes cut off the last segment when opening.
    pub torn_on_open: u64,
    /// The segment appends go to, kept open.
    appending: Option<(u64, File)>,
    /// Acknowledgements not yet written to the cursor file ([`FileSpool::flush`]).
    cursor_dirty: bool,
}

impl Drop for FileSpool {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

const CURSOR: &str = "cursor";

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn cursor_bytes(c: Cursor, dropped: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    for x in [c.segment, c.offset, c.acked, dropped] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    // Stored as one record: its checksum tells a half-written cursor file.
    record::encode(0, &v)
}

fn read_cursor(dir: &Path) -> (Cursor, u64) {
    let Ok(bytes) = std::fs::read(dir.join(CURSOR)) else { return (Cursor::default(), 0) };
    let scan = record::scan(&bytes);
    let Some(found) = scan.records.first() else { return (Cursor::default(), 0) };
    let p = &bytes[found.payload.clone()];
    if p.len() != 32 {
        return (Cursor::default(), 0);
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    (Cursor { segment: word(0), offset: word(1), acked: word(2) }, word(3))
}

impl FileSpool {
    /// Opens (or creates) the spool in `dir`, at most `capacity` bytes in segments of
    /// `segment_bytes`; `sync` fsyncs every append and cursor write.
    pub fn open(dir: &Path, capacity: u64, segment_bytes: u64, sync: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut segments = Vec::new();
        let (mut damaged, mut torn) = (0u64, 0u64);
        let mut ids: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        ids.sort_unstable();
        for id in ids {
            let path = seg_path(dir, id);
            let bytes = std::fs::read(&path)?;
            let scan = record::scan(&bytes);
            damaged += scan.damaged.iter().map(|r| (r.end - r.start) as u64).sum::<u64>();
            if scan.torn_tail > 0 {
                // A power cut mid-append: cut the torn bytes so that appends follow the last
                // intact record.
                torn += scan.torn_tail as u64;
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len((bytes.len() - scan.torn_tail) as u64)?;
                if sync {
                    f.sync_all()?;
                }
            }
            let len = (bytes.len() - scan.torn_tail) as u64;
            segments.push(Segment { id, bytes: len, records: scan.records.len() as u64 });
        }
        let (cursor, dropped) = read_cursor(dir);
        let mut spool = Spool::restore(capacity, segment_bytes, segments, cursor);
        // The dropped count carried over from before the restart.
        spool.add_dropped(dropped);
        Ok(Self {
            dir: dir.to_owned(),
            spool,
            sync,
            damaged_on_open: damaged,
            torn_on_open: torn,
            appending: None,
            cursor_dirty: false,
        })
    }

    /// Records waiting to be sent.
    pub fn pending(&self) -> u64 {
        self.spool.pending()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.spool.bytes()
    }

    /// Records dropped to make room, not yet reported.
    pub fn dropped(&self) -> u64 {
        self.spool.dropped()
    }

    /// Returns the dropped count and resets it (durably), once reported.
    pub fn take_dropped(&mut self) -> std::io::Result<u64> {
        let n = self.spool.take_dropped();
        self.write_cursor()?;
        Ok(n)
    }

    /// Appends a record; returns false when it was larger than the whole spool (counted as
    /// dropped).
    pub fn push(&mut self, seq: u64, payload: &[u8]) -> std::io::Result<bool> {
        let rec = record::encode(seq, payload);
        let Some(actions) = self.spool.append(rec.len() as u64) else {
            self.write_cursor()?;
            return Ok(false);
        };
        let mut cursor_moved = false;
        for a in actions {
            match a {
                Action::Create(id) => {
                    File::create(seg_path(&self.dir, id))?;
                    if self.sync {
                        File::open(&self.dir)?.sync_all()?;
                    }
                }
                Action::Delete(id) => {
                    if self.appending.as_ref().is_some_and(|(a, _)| *a == id) {
                        self.appending = None;
                    }
                    remove(&seg_path(&self.dir, id))?;
                    cursor_moved = true;
                }
                Action::Append(id) => {
                    if self.appending.as_ref().is_none_or(|(a, _)| *a != id) {
                        self.appending = Some((id, OpenOptions::new().append(true).open(seg_path(&self.dir, id))?));
                    }
                    if let Some((_, f)) = self.appending.as_mut() {
                        f.write_all(&rec)?;
                        if self.sync {
                            f.sync_data()?;
                        }
                    }
                }
            }
        }
        if cursor_moved {
            self.write_cursor()?;
        }
        Ok(true)
    }

    /// Up to `max` records from the cursor on, in order (reads the segments; nothing moves
    /// until [`FileSpool::ack`]).
    pub fn peek(&self, max: usize) -> std::io::Result<Vec<Pending>> {
        let mut out = Vec::new();
        let cursor = self.spool.cursor();
        for seg in self.spool.segments() {
            if out.len() >= max {
                break;
            }
            if seg.id < cursor.segment {
                continue;
            }
            let from = if seg.id == cursor.segment { cursor.offset } else { 0 };
            let mut f = File::open(seg_path(&self.dir, seg.id))?;
            f.seek(SeekFrom::Start(from))?;
            let mut bytes = Vec::new();
            f.take(seg.bytes.saturating_sub(from)).read_to_end(&mut bytes)?;
            let scan = record::scan(&bytes);
            let mut prev = 0;
            for found in scan.records {
                if out.len() >= max {
                    break;
                }
                out.push(Pending {
                    seq: found.seq,
                    payload: bytes[found.payload.clone()].to_vec(),
                    advance: (found.end() - prev) as u64,
                });
                prev = found.end();
            }
        }
        Ok(out)
    }

    /// The platform acknowledged these records (the first ones [`FileSpool::peek`] gave, in
    /// order): the cursor moves past them, fully sent segments go. The cursor file is
    /// written when a segment goes, else by [`FileSpool::flush`] (the agent calls it a few
    /// times a second, and on the way out).
    pub fn ack(&mut self, sent: &[Pending]) -> std::io::Result<()> {
        let mut deleted = false;
        for p in sent {
            for a in self.spool.ack(p.advance) {
                if let Action::Delete(id) = a {
                    if self.appending.as_ref().is_some_and(|(a, _)| *a == id) {
                        self.appending = None;
                    }
                    remove(&seg_path(&self.dir, id))?;
                    deleted = true;
                }
            }
        }
        self.cursor_dirty = true;
        if deleted { self.flush() } else { Ok(()) }
    }

    /// Writes the cursor if acknowledgements moved it since the last write.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.cursor_dirty {
            self.write_cursor_with(false)?;
            self.cursor_dirty = false;
        }
        Ok(())
    }

    fn write_cursor(&mut self) -> std::io::Result<()> {
        self.cursor_dirty = false;
        self.write_cursor_with(self.sync)
    }

    fn write_cursor_with(&self, sync: bool) -> std::io::Result<()> {
        let bytes = cursor_bytes(self.spool.cursor(), self.spool.dropped());
        let tmp = self.dir.join("cursor.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            if sync {
                f.sync_all()?;
            }
        }
        std::fs::rename(&tmp, self.dir.join(CURSOR))?;
        if sync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        // Fixed width: every record is as long as every other.
        format!("{{\"ts\":{},\"v\":\"{i:06}\"}}", 1_764_000_000_000u64 + i).into_bytes()
    }

    fn seqs(p: &[Pending]) -> Vec<u64> {
        p.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn a_restart_resumes_after_the_last_acknowledgement_in_order() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut s = FileSpool::open(dir.path(), 1 << 20, 1024, true)?;
            for i in 0..100 {
                assert!(s.push(i, &payload(i))?);
            }
            let first = s.peek(40)?;
            assert_eq!(seqs(&first), (0..40).collect::<Vec<_>>());
            s.ack(&first)?;
            // Read but not acknowledged when the agent stops: sent again after the restart.
            assert_eq!(s.peek(5)?.len(), 5);
        }
        let mut s = FileSpool::open(dir.path(), 1 << 20, 1024, true)?;
        assert_eq!(s.pending(), 60);
        let rest = s.peek(1000)?;
        assert_eq!(seqs(&rest), (40..100).collect::<Vec<_>>());
        assert_eq!(rest[0].payload, payload(40));
        s.ack(&rest)?;
        assert_eq!((s.pending(), s.bytes()), (0, 0));
        let segs = std::fs::read_dir(dir.path())?
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg")))
            .count();
        assert_eq!(segs, 0, "fully sent segments are deleted");
        s.push(100, &payload(100))?;
        assert_eq!(seqs(&s.peek(10)?), vec![100]);
        Ok(())
    }

    #[test]
    fn a_power_cut_mid_append_loses_only_the_record_being_written() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut s = FileSpool::open(dir.path(), 1 << 20, 1 << 16, true)?;
            for i in 0..10 {
                s.push(i, &payload(i))?;
            }
        }
        // The 11th record, cut after 9 bytes.
        let seg = seg_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&seg)?;
        f.write_all(&record::encode(10, &payload(10))[..9])?;
        drop(f);
        let mut s = FileSpool::open(dir.path(), 1 << 20, 1 << 16, true)?;
        assert_eq!(s.torn_on_open, 9);
        s.push(11, &payload(11))?;
        let all = s.peek(100)?;
        assert_eq!(seqs(&all), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11], "appends follow the last intact record");
        Ok(())
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_cursor_moves_past_it() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut s = FileSpool::open(dir.path(), 1 << 20, 1 << 16, true)?;
            for i in 0..5 {
                s.push(i, &payload(i))?;
            }
        }
        let seg = seg_path(dir.path(), 0);
        let mut bytes = std::fs::read(&seg)?;
        let third = record::scan(&bytes).records[2].clone();
        bytes[third.payload.start + 3] ^= 0xff;
        std::fs::write(&seg, &bytes)?;
        let mut s = FileSpool::open(dir.path(), 1 << 20, 1 << 16, true)?;
        assert!(s.damaged_on_open > 0);
        let all = s.peek(100)?;
        assert_eq!(seqs(&all), vec![0, 1, 3, 4]);
        s.ack(&all[..3])?;
        drop(s);
        let s = FileSpool::open(dir.path(), 1 << 20, 1 << 16, true)?;
        assert_eq!(seqs(&s.peek(100)?), vec![4]);
        Ok(())
    }

    #[test]
    fn when_full_the_oldest_go_and_the_count_survives_a_restart() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let rec = record::encode(0, &payload(0)).len() as u64;
        {
            // Room for 20 records in segments of 5.
            let mut s = FileSpool::open(dir.path(), rec * 20, rec * 5, true)?;
            for i in 0..30 {
                s.push(i, &payload(i))?;
            }
            assert_eq!(s.dropped(), 10);
        }
        let mut s = FileSpool::open(dir.path(), rec * 20, rec * 5, true)?;
        assert_eq!(s.dropped(), 10, "reported on the next reconnect, even after a restart");
        assert_eq!(seqs(&s.peek(100)?), (10..30).collect::<Vec<_>>(), "the newest are kept, in order");
        assert_eq!(s.take_dropped()?, 10);
        drop(s);
        let s = FileSpool::open(dir.path(), rec * 20, rec * 5, true)?;
        assert_eq!(s.dropped(), 0);
        Ok(())
    }
}

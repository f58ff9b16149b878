//! The offline buffer's bookkeeping: a bounded queue of readings in segments, oldest dropped
//! first when full, consumed in order from a cursor as the platform acknowledges them.
//!
//! The caller owns the storage (files on Linux, flash pages on a microcontroller): [`Spool`]
//! says which segment to append to, create or delete, and counts what it had to drop, so the
//! device can report it on reconnect. Records are written with [`crate::record`]; the cursor
//! is a position in the oldest segment, saved by the caller after each acknowledgement.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// One segment of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Its number (segments are numbered in the order they were created).
    pub id: u64,
    /// Bytes in it.
    pub bytes: u64,
    /// Records in it.
    pub records: u64,
}

/// The next record to send: in segment `segment`, at byte `offset`, after `acked` records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The segment.
    pub segment: u64,
    /// Byte offset of the next record in it.
    pub offset: u64,
    /// Records of the segment before `offset` (already acknowledged).
    pub acked: u64,
}

/// What the caller must do to its storage, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create an empty segment.
    Create(u64),
    /// Delete a segment (fully sent, or dropped to make room).
    Delete(u64),
    /// Append the record to this segment.
    Append(u64),
}

/// The bookkeeping of a spool of at most `capacity` bytes in segments of `segment_bytes`.
#[derive(Debug, Clone)]
pub struct Spool {
    segments: VecDeque<Segment>,
    capacity: u64,
    segment_bytes: u64,
    cursor: Cursor,
    dropped: u64,
    next_id: u64,
}

impl Spool {
    /// An empty spool. `segment_bytes` is at least 1 and at most `capacity`.
    pub fn new(capacity: u64, segment_bytes: u64) -> Self {
        let segment_bytes = segment_bytes.clamp(1, capacity.max(1));
        Self { segments: VecDeque::new(), capacity, segment_bytes, cursor: Cursor::default(), dropped: 0, next_id: 0 }
    }

    /// A spool as found in storage after a restart: its segments (any order) and the saved
    /// cursor (a cursor into a segment that is gone starts at the oldest one).
    pub fn restore(capacity: u64, segment_bytes: u64, mut segments: Vec<Segment>, cursor: Cursor) -> Self {
        segments.sort_by_key(|s| s.id);
        let mut spool = Self::new(capacity, segment_bytes);
        spool.next_id = segments.last().map_or(0, |s| s.id + 1);
        spool.segments = segments.into();
        spool.cursor = match spool.segments.front() {
            Some(first) if cursor.segment < first.id || !spool.segments.iter().any(|s| s.id == cursor.segment) => {
                Cursor { segment: first.id, offset: 0, acked: 0 }
            }
            _ => cursor,
        };
        spool
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum::<u64>() - self.cursor_acked()
    }

    fn cursor_acked(&self) -> u64 {
        if self.segments.front().is_some_and(|s| s.id == self.cursor.segment) { self.cursor.acked } else { 0 }
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter()
    }

    /// Where sending resumes.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Records dropped to make room since the last [`Spool::take_dropped`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds to the dropped count (the count saved before a restart).
    pub fn add_dropped(&mut self, n: u64) {
        self.dropped = self.dropped.saturating_add(n);
    }

    /// Returns and resets the dropped count (once reported to the platform).
    pub fn take_dropped(&mut self) -> u64 {
        core::mem::take(&mut self.dropped)
    }

    /// Makes room for a record of `len` bytes and says where it goes. When the spool is full,
    /// the oldest segments go first (their unsent records count as dropped). A record larger
    /// than the whole capacity is not stored (`None`): count it as dropped.
    pub fn append(&mut self, len: u64) -> Option<Vec<Action>> {
        if len > self.capacity {
            self.dropped += 1;
            return None;
        }
        let mut actions = Vec::new();
        let roll = self.segments.back().is_none_or(|s| s.bytes > 0 && s.bytes + len > self.segment_bytes);
        // Room: what stays plus this record within the capacity.
        while self.bytes() + len > self.capacity {
            let Some(old) = self.segments.pop_front() else { break };
            let acked = if old.id == self.cursor.segment { self.cursor.acked } else { 0 };
            self.dropped += old.records - acked.min(old.records);
            actions.push(Action::Delete(old.id));
            if let Some(next) = self.segments.front() {
                self.cursor = Cursor { segment: next.id, offset: 0, acked: 0 };
            }
        }
        if roll || self.segments.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            self.segments.push_back(Segment { id, bytes: 0, records: 0 });
            actions.push(Action::Create(id));
            if self.segments.len() == 1 {
                self.cursor = Cursor { segment: id, offset: 0, acked: 0 };
            }
        }
        if let Some(last) = self.segments.back_mut() {
            last.bytes += len;
            last.records += 1;
            actions.push(Action::Append(last.id));
        }
        Some(actions)
    }

    /// The platform acknowledged the record at the cursor, `len` bytes long. Returns the
    /// segments to delete (a fully sent segment that is not being written to).
    pub fn ack(&mut self, len: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.cursor.offset += len;
        self.cursor.acked += 1;
        while let Some(first) = self.segments.front().copied() {
            let done = first.id == self.cursor.segment && self.cursor.acked >= first.records;
            if !done || self.segments.len() == 1 {
                break;
            }
            self.segments.pop_front();
            actions.push(Action::Delete(first.id));
            if let Some(next) = self.segments.front() {
                self.cursor = Cursor { segment: next.id, offset: 0, acked: 0 };
            }
        }
        // The only segment, fully sent: empty it (delete; the next append creates a new one).
        if let Some(only) = self.segments.front().copied()
            && self.segments.len() == 1
            && self.cursor.segment == only.id
            && self.cursor.acked >= only.records
        {
            self.segments.clear();
            actions.push(Action::Delete(only.id));
            self.cursor = Cursor { segment: self.next_id, offset: 0, acked: 0 };
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn appends_roll_segments_and_acks_delete_them() {
        let mut s = Spool::new(1000, 100);
        assert_eq!(s.append(60), Some(vec![Action::Create(0), Action::Append(0)]));
        assert_eq!(s.append(30), Some(vec![Action::Append(0)]));
        assert_eq!(s.append(30), Some(vec![Action::Create(1), Action::Append(1)]), "90 + 30 > 100");
        assert_eq!(s.pending(), 3);
        assert!(s.ack(60).is_empty());
        assert_eq!(s.ack(30), vec![Action::Delete(0)]);
        assert_eq!(s.cursor(), Cursor { segment: 1, offset: 0, acked: 0 });
        assert_eq!(s.ack(30), vec![Action::Delete(1)], "the last segment, fully sent");
        assert_eq!((s.pending(), s.bytes()), (0, 0));
        assert_eq!(s.append(10), Some(vec![Action::Create(2), Action::Append(2)]));
    }

    #[test]
    fn when_full_the_oldest_go_and_are_counted() {
        let mut s = Spool::new(300, 100);
        for _ in 0..6 {
            s.append(50);
        }
        assert_eq!(s.bytes(), 300);
        s.ack(50); // one record of segment 0 sent
        let actions = s.append(50);
        assert_eq!(actions, Some(vec![Action::Delete(0), Action::Create(3), Action::Append(3)]));
        assert_eq!(s.dropped(), 1, "segment 0 held two records, one already sent");
        assert_eq!(s.cursor(), Cursor { segment: 1, offset: 0, acked: 0 });
        assert_eq!(s.pending(), 5);
        assert_eq!(s.take_dropped(), 1);
        assert_eq!(s.dropped(), 0);
        assert_eq!(s.append(301), None, "larger than the spool");
        assert_eq!(s.dropped(), 1);
    }

    #[test]
    fn a_restart_resumes_at_the_saved_cursor() {
        let segs = vec![Segment { id: 8, bytes: 90, records: 3 }, Segment { id: 7, bytes: 100, records: 2 }];
        let s = Spool::restore(1000, 100, segs.clone(), Cursor { segment: 7, offset: 50, acked: 1 });
        assert_eq!(s.segments().map(|s| s.id).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(s.pending(), 4);
        let lost = Spool::restore(1000, 100, segs, Cursor { segment: 3, offset: 10, acked: 1 });
        assert_eq!(lost.cursor(), Cursor { segment: 7, offset: 0, acked: 0 });
        let mut s = s;
        assert_eq!(s.append(10), Some(vec![Action::Append(8)]));
        assert_eq!(s.append(1), Some(vec![Action::Create(9), Action::Append(9)]));
    }
}

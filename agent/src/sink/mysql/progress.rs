//! The forwarder's watermark, the heart of exactly-once: batches are written in parallel and commit in any
//! order, but only the last seq before which *every* batch committed may be recorded (in MySQL's offsets row,
//! inside a batch's own transaction, and in the local cursor). A crash with a later batch committed and an
//! earlier one not then resumes before the gap, never after it; the later batch's rows are sent again and are
//! no-ops (unique `event_id`).

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub(super) struct Progress {
    watermark: u64,
    /// The highest offset a committed transaction wrote to the offsets table.
    offset_written: u64,
    /// (first seq, last seq, committed), in dispatch order, oldest first.
    batches: VecDeque<(u64, u64, bool)>,
}

/// What a commit changed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Committed {
    /// The new watermark, if it moved.
    pub moved: Option<u64>,
    /// MySQL's recorded offset is behind the watermark (batches finished out of order): record it on its own.
    pub lagging: bool,
}

impl Progress {
    /// Forwarding resumes after `watermark`.
    pub fn start(&mut self, watermark: u64) {
        self.watermark = watermark;
    }

    #[cfg(test)]
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// A batch of seqs `first..=last` was handed to a writer.
    pub fn dispatched(&mut self, first: u64, last: u64) {
        self.batches.push_back((first, last, false));
    }

    /// The offset the transaction of the batch `first..=last` may record: its own end if every earlier batch
    /// has committed, else the watermark.
    pub fn offset_for(&self, first: u64, last: u64) -> u64 {
        match self.batches.front() {
            Some(&(front, _, _)) if front == first => last,
            _ => self.watermark,
        }
    }

    /// The batch starting at `first` committed, having recorded `offset_written`.
    pub fn committed(&mut self, first: u64, offset_written: u64) -> Committed {
        self.offset_written = self.offset_written.max(offset_written);
        if let Some(batch) = self.batches.iter_mut().find(|b| b.0 == first) {
            batch.2 = true;
        }
        let before = self.watermark;
        while let Some(&(_, last, true)) = self.batches.front() {
            self.watermark = last;
            self.batches.pop_front();
        }
        Committed {
            moved: (self.watermark != before).then_some(self.watermark),
            lagging: self.watermark > self.offset_written,
        }
    }

    /// An offset was recorded on its own.
    pub fn offset_recorded(&mut self, offset: u64) {
        self.offset_written = self.offset_written.max(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_commits_move_the_watermark_batch_by_batch() {
        let mut p = Progress::default();
        p.start(100);
        p.dispatched(101, 110);
        p.dispatched(111, 120);
        assert_eq!(p.offset_for(101, 110), 110, "the oldest batch records its own end");
        assert_eq!(p.committed(101, 110), Committed { moved: Some(110), lagging: false });
        assert_eq!(p.offset_for(111, 120), 120);
        assert_eq!(p.committed(111, 120), Committed { moved: Some(120), lagging: false });
        assert_eq!(p.watermark(), 120);
    }

    #[test]
    fn a_later_batch_committing_first_never_moves_the_watermark_past_the_gap() {
        let mut p = Progress::default();
        p.start(0);
        p.dispatched(1, 10);
        p.dispatched(11, 20);
        p.dispatched(21, 30);
        // The third and second finish first: they may only record the watermark (0), never their own end.
        assert_eq!(p.offset_for(21, 30), 0);
        assert_eq!(p.committed(21, 0), Committed { moved: None, lagging: false });
        assert_eq!(p.offset_for(11, 20), 0);
        assert_eq!(p.committed(11, 0), Committed { moved: None, lagging: false });
        assert_eq!(p.watermark(), 0, "a crash now resumes before the first batch");
        // The first commits: the watermark jumps over all three, and MySQL's offset (10) lags behind it.
        assert_eq!(p.offset_for(1, 10), 10);
        assert_eq!(p.committed(1, 10), Committed { moved: Some(30), lagging: true });
        p.offset_recorded(30);
        p.dispatched(31, 40);
        assert_eq!(p.committed(31, 40), Committed { moved: Some(40), lagging: false });
    }

    #[test]
    fn a_batch_that_failed_and_is_not_committed_holds_the_watermark() {
        let mut p = Progress::default();
        p.start(5);
        p.dispatched(6, 9);
        p.dispatched(10, 12);
        assert_eq!(p.committed(10, 5), Committed { moved: None, lagging: false });
        // However long the first one retries, everything after it waits.
        for _ in 0..3 {
            assert_eq!(p.offset_for(10, 12), 5);
            assert_eq!(p.watermark(), 5);
        }
        assert_eq!(p.committed(6, 9), Committed { moved: Some(12), lagging: true });
    }

    #[test]
    fn an_offset_recorded_on_its_own_ends_the_lag() {
        let mut p = Progress::default();
        p.dispatched(1, 2);
        p.dispatched(3, 4);
        p.committed(3, 0);
        assert!(p.committed(1, 2).lagging);
        p.offset_recorded(4);
        p.dispatched(5, 6);
        assert!(!p.committed(5, 6).lagging);
        assert_eq!(p.watermark(), 6);
    }
}

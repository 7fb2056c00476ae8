//! The keys of the mirror's table that Redis has yet to take: the fold marks them, the sync takes them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Table keys changed since Redis last took them, each with the generation of its last change, so that a
/// key changed again while its push was in flight stays dirty. Taken oldest first, so that under constant
/// change every key gets its turn.
#[derive(Default)]
pub(super) struct Dirty {
    pub(super) keys: HashMap<Vec<u8>, u64>,
    /// Dirty keys not being pushed, oldest first.
    queue: VecDeque<Vec<u8>>,
    generation: u64,
    /// Keys Redis refused because of what it holds (a key of another type under the prefix): retried now
    /// and then rather than every round, so that they do not hold up the others.
    pub(super) parked: Vec<Vec<u8>>,
    parked_since: Option<Instant>,
}

impl Dirty {
    pub(super) fn mark(&mut self, keys: impl IntoIterator<Item = Vec<u8>>) {
        self.generation += 1;
        for key in keys {
            if self.keys.insert(key.clone(), self.generation).is_none() {
                self.queue.push_back(key);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Up to `max` keys to push; give them back with [`Dirty::finish`].
    pub(super) fn take(&mut self, max: usize) -> Vec<(Vec<u8>, u64)> {
        let n = max.min(self.queue.len());
        let keys = &self.keys;
        self.queue
            .drain(..n)
            .map(|key| {
                let generation = keys.get(&key).copied().unwrap_or_default();
                (key, generation)
            })
            .collect()
    }

    /// After a push: what Redis took is clean unless it changed meanwhile; what it refused because of its
    /// keys is parked; the rest (not sent, or a failure) stays dirty.
    pub(super) fn finish(&mut self, taken: Vec<(Vec<u8>, u64)>, outcome: impl Fn(&[u8]) -> Outcome) {
        for (key, generation) in taken {
            match outcome(&key) {
                Outcome::Written if self.keys.get(&key) == Some(&generation) => {
                    self.keys.remove(&key);
                }
                Outcome::Parked if self.keys.get(&key) == Some(&generation) => {
                    self.keys.remove(&key);
                    self.parked_since.get_or_insert_with(Instant::now);
                    self.parked.push(key);
                }
                _ => self.queue.push_back(key),
            }
        }
    }

    /// Parked keys become dirty again once they have waited `after`.
    pub(super) fn unpark(&mut self, after: Duration) {
        if self.parked_since.is_some_and(|since| since.elapsed() >= after) {
            self.parked_since = None;
            let parked = std::mem::take(&mut self.parked);
            self.mark(parked);
        }
    }
}

/// What became of one key in a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Written,
    /// Redis refused it for what it holds under the key.
    Parked,
    /// Not sent, or Redis could not take it now.
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_changed_during_its_push_stays_dirty_and_waits_its_turn() {
        let (a, b, c) = (b"a".to_vec(), b"b".to_vec(), b"c".to_vec());
        let mut dirty = Dirty::default();
        dirty.mark([a.clone(), b.clone()]);
        let taken = dirty.take(10);
        dirty.mark([a.clone(), c.clone()]);
        dirty.finish(taken, |_| Outcome::Written);
        assert_eq!(dirty.keys.len(), 2);
        assert_eq!(dirty.take(1)[0].0, c, "c became dirty before a's second change was seen");
        let taken = dirty.take(1);
        assert_eq!(taken[0].0, a);
        dirty.finish(taken, |_| Outcome::Retry);
        assert_eq!(dirty.take(5).len(), 1, "a failed push keeps its keys dirty");
    }

    #[test]
    fn parked_keys_come_back_after_a_while() {
        let mut dirty = Dirty::default();
        dirty.mark([b"a".to_vec(), b"b".to_vec()]);
        let taken = dirty.take(10);
        dirty.finish(taken, |key| if key == b"a" { Outcome::Parked } else { Outcome::Written });
        assert!(dirty.is_empty());
        dirty.unpark(Duration::from_secs(60));
        assert!(dirty.is_empty(), "too early");
        dirty.unpark(Duration::ZERO);
        assert_eq!(dirty.take(10), vec![(b"a".to_vec(), 2)]);
    }
}

//! The timer heap behind `call_later` / `call_at`.
//!
//! A binary min-heap ordered by deadline, then by insertion sequence, so two
//! timers due at the same instant run in the order they were scheduled (as in
//! asyncio). Cancelled timers are removed lazily when they reach the top; when
//! more than half of a large heap is cancelled it is rebuilt, so a program that
//! schedules and cancels many timeouts does not grow the heap without bound.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Instant;

use super::HandleState;

/// Rebuild the heap when at least this many entries are cancelled and they
/// are more than half of it (asyncio uses the same kind of threshold).
const MIN_CANCELLED_FOR_CLEANUP: usize = 100;

struct Entry {
    when: Instant,
    seq: u64,
    handle: Rc<HandleState>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.when == other.when && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .when
            .cmp(&self.when)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Pending timers of one loop.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Timers {
    /// Schedules `handle` to become ready at `when`.
    pub(crate) fn push(&mut self, when: Instant, handle: Rc<HandleState>) {
        self.seq += 1;
        self.heap.push(Entry {
            when,
            seq: self.seq,
            handle,
        });
        self.maybe_compact();
    }

    /// The deadline of the earliest timer that is not cancelled.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(top) = self.heap.peek() {
            if top.handle.is_cancelled() {
                self.heap.pop();
            } else {
                return Some(top.when);
            }
        }
        None
    }

    /// Moves every timer due at or before `now` into `out`, earliest first.
    pub(crate) fn pop_expired(&mut self, now: Instant, out: &mut impl FnMut(Rc<HandleState>)) {
        while let Some(top) = self.heap.peek() {
            if top.when > now {
                break;
            }
            let Some(entry) = self.heap.pop() else { break };
            if !entry.handle.is_cancelled() {
                out(entry.handle);
            }
        }
    }

    /// Number of entries still in the heap (cancelled ones included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Takes every timer out (used by `close`, which also drops their
    /// callbacks).
    pub(crate) fn drain(&mut self) -> Vec<Rc<HandleState>> {
        self.heap.drain().map(|e| e.handle).collect()
    }

    fn maybe_compact(&mut self) {
        let len = self.heap.len();
        if len < 2 * MIN_CANCELLED_FOR_CLEANUP || self.seq % 64 != 0 {
            return;
        }
        let cancelled = self.heap.iter().filter(|e| e.handle.is_cancelled()).count();
        if cancelled >= MIN_CANCELLED_FOR_CLEANUP && cancelled * 2 > len {
            self.heap.retain(|e| !e.handle.is_cancelled());
        }
    }
}

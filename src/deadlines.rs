//! The next deadline of every room, smallest first: an indexed binary min-heap.
//!
//! The timing thread keeps one entry per room it serves and asks for the earliest. This
//! module owns only that order. All memory is taken at construction for a fixed number of
//! slots (`--max-rooms`), so inserting, moving and removing a room never allocate: the
//! timing thread must not, on its tick path. Each slot knows its place in the heap, so a room
//! is removed or re-timed in O(log n) without searching, and no stale entry ever lingers.
//! Ties are broken by slot, so rooms due at the same instant come out in a stable order.

/// A min-heap of `(deadline, slot)` over slots `0..capacity`, at most one entry per slot.
#[derive(Clone, Debug)]
pub struct DeadlineHeap {
    /// `(deadline_ns, slot)`, heap-ordered.
    heap: Vec<(u64, u32)>,
    /// For each slot, its index in `heap`, or `ABSENT`.
    position: Vec<u32>,
}

const ABSENT: u32 = u32::MAX;

impl DeadlineHeap {
    /// A heap for slots `0..capacity` (at most `u32::MAX − 1`).
    pub fn with_capacity(capacity: usize) -> DeadlineHeap {
        let capacity = capacity.min(ABSENT as usize - 1);
        DeadlineHeap {
            heap: Vec::with_capacity(capacity),
            position: vec![ABSENT; capacity],
        }
    }

    pub fn capacity(&self) -> usize {
        self.position.len()
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.position
            .get(slot as usize)
            .is_some_and(|&p| p != ABSENT)
    }

    /// The deadline of `slot`, if it has one.
    pub fn deadline(&self, slot: u32) -> Option<u64> {
        let p = *self.position.get(slot as usize)?;
        (p != ABSENT).then(|| self.heap[p as usize].0)
    }

    /// The earliest `(deadline, slot)`.
    pub fn peek(&self) -> Option<(u64, u32)> {
        self.heap.first().copied()
    }

    /// Sets `slot`'s deadline, inserting it if absent. False (and nothing done) for a slot
    /// beyond the capacity.
    pub fn set(&mut self, slot: u32, deadline: u64) -> bool {
        let Some(&p) = self.position.get(slot as usize) else {
            return false;
        };
        if p == ABSENT {
            let at = self.heap.len();
            // Within capacity by construction: one entry per slot.
            self.heap.push((deadline, slot));
            self.position[slot as usize] = at as u32;
            self.sift_up(at);
        } else {
            let at = p as usize;
            let old = self.heap[at].0;
            self.heap[at].0 = deadline;
            if deadline < old {
                self.sift_up(at);
            } else {
                self.sift_down(at);
            }
        }
        true
    }

    /// Removes `slot`'s entry; returns its deadline.
    pub fn remove(&mut self, slot: u32) -> Option<u64> {
        let p = *self.position.get(slot as usize)?;
        if p == ABSENT {
            return None;
        }
        let at = p as usize;
        let last = self.heap.len() - 1;
        self.swap(at, last);
        let (deadline, _) = self.heap.pop()?;
        self.position[slot as usize] = ABSENT;
        if at < self.heap.len() {
            self.sift_down(at);
            self.sift_up(at);
        }
        Some(deadline)
    }

    /// Removes and returns the earliest `(deadline, slot)`.
    pub fn pop(&mut self) -> Option<(u64, u32)> {
        let (deadline, slot) = self.peek()?;
        self.remove(slot);
        Some((deadline, slot))
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.position[self.heap[a].1 as usize] = a as u32;
        self.position[self.heap[b].1 as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[at] >= self.heap[parent] {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let (left, right) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if left < self.heap.len() && self.heap[left] < self.heap[least] {
                least = left;
            }
            if right < self.heap.len() && self.heap[right] < self.heap[least] {
                least = right;
            }
            if least == at {
                break;
            }
            self.swap(at, least);
            at = least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn earliest_first_ties_by_slot() {
        let mut h = DeadlineHeap::with_capacity(4);
        assert!(h.set(2, 50));
        assert!(h.set(0, 70));
        assert!(h.set(3, 50));
        assert!(h.set(1, 10));
        assert!(!h.set(4, 1), "beyond capacity");
        assert_eq!(h.pop(), Some((10, 1)));
        assert_eq!(h.pop(), Some((50, 2)));
        assert_eq!(h.pop(), Some((50, 3)));
        assert_eq!(h.pop(), Some((70, 0)));
        assert_eq!(h.pop(), None);
    }

    #[test]
    fn moving_and_removing_keep_the_order() {
        let mut h = DeadlineHeap::with_capacity(3);
        h.set(0, 10);
        h.set(1, 20);
        h.set(2, 30);
        h.set(0, 40);
        assert_eq!(h.peek(), Some((20, 1)));
        assert_eq!(h.remove(1), Some(20));
        assert_eq!(h.remove(1), None);
        assert!(!h.contains(1));
        assert_eq!(h.deadline(0), Some(40));
        assert_eq!(h.pop(), Some((30, 2)));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn never_grows_past_its_first_allocation() {
        let mut h = DeadlineHeap::with_capacity(64);
        let before = h.heap.capacity();
        for round in 0..100u64 {
            for slot in 0..64u32 {
                h.set(slot, round * 1000 + u64::from(slot * 7 % 13));
            }
            for slot in (0..64u32).step_by(3) {
                h.remove(slot);
            }
        }
        assert_eq!(h.heap.capacity(), before);
    }

    proptest! {
        /// Against a model: after any sequence of sets and removes, the heap holds exactly the
        /// model's entries and pops them in (deadline, slot) order.
        #[test]
        fn behaves_like_a_sorted_map(ops in proptest::collection::vec((0u32..16, 0u64..1000, any::<bool>()), 0..200)) {
            let mut h = DeadlineHeap::with_capacity(16);
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            for (slot, deadline, insert) in ops {
                if insert {
                    h.set(slot, deadline);
                    model.insert(slot, deadline);
                } else {
                    prop_assert_eq!(h.remove(slot), model.remove(&slot));
                }
                prop_assert_eq!(h.len(), model.len());
                let least = model.iter().map(|(s, d)| (*d, *s)).min();
                prop_assert_eq!(h.peek(), least);
            }
            let mut expected: Vec<(u64, u32)> = model.iter().map(|(s, d)| (*d, *s)).collect();
            expected.sort_unstable();
            let mut popped = Vec::new();
            while let Some(e) = h.pop() {
                popped.push(e);
            }
            prop_assert_eq!(popped, expected);
        }
    }
}

//! Peer id allocation exactly as QEMU's `ivshmem-server` does it.
//!
//! Ids are 16 bits. A counter starts at 0; each new peer gets the first id at or after the
//! counter that no connected peer uses, and the counter moves past it. So ids increase, an id in
//! use is skipped, ids are not reused until the counter wraps around after 65535.

/// Hands out peer ids (a pure type: the caller says which ids are in use).
#[derive(Debug, Clone, Default)]
pub struct IdAllocator {
    next: u16,
}

impl IdAllocator {
    /// An allocator whose first id is 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// An allocator whose next candidate is `next` (for tests of the wrap-around).
    pub fn starting_at(next: u16) -> Self {
        IdAllocator { next }
    }

    /// The next candidate id.
    pub fn next_candidate(&self) -> u16 {
        self.next
    }

    /// Allocates the first id from the counter on that `in_use` says is free, or `None` when
    /// all 65536 ids are in use.
    pub fn allocate(&mut self, in_use: impl Fn(u16) -> bool) -> Option<u16> {
        for _ in 0..=u32::from(u16::MAX) {
            let candidate = self.next;
            self.next = self.next.wrapping_add(1);
            if !in_use(candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ids_increase_from_zero_and_are_not_reused_before_wrap() {
        let mut ids = IdAllocator::new();
        let mut used = BTreeSet::new();
        for expected in 0..5u16 {
            let id = ids.allocate(|i| used.contains(&i)).unwrap();
            assert_eq!(id, expected);
            used.insert(id);
        }
        // Peer 1 leaves: the next id is still 5, not 1.
        used.remove(&1);
        assert_eq!(ids.allocate(|i| used.contains(&i)), Some(5));
    }

    #[test]
    fn ids_in_use_are_skipped_and_the_counter_wraps() {
        let mut ids = IdAllocator::starting_at(65534);
        let used: BTreeSet<u16> = [65535, 0, 1].into_iter().collect();
        assert_eq!(ids.allocate(|i| used.contains(&i)), Some(65534));
        assert_eq!(ids.allocate(|i| used.contains(&i)), Some(2));
        assert_eq!(ids.next_candidate(), 3);
    }

    #[test]
    fn exhaustion_is_none_and_the_last_free_id_is_found() {
        let mut ids = IdAllocator::starting_at(100);
        assert_eq!(ids.allocate(|_| true), None);
        assert_eq!(ids.allocate(|i| i != 99), Some(99));
    }

    proptest! {
        #[test]
        fn allocated_id_is_free_and_first_free_from_counter(
            start in any::<u16>(),
            used in prop::collection::btree_set(any::<u16>(), 0..64),
        ) {
            let mut ids = IdAllocator::starting_at(start);
            let id = ids.allocate(|i| used.contains(&i)).unwrap();
            prop_assert!(!used.contains(&id));
            // Every id between the counter and the result was in use.
            let mut c = start;
            while c != id {
                prop_assert!(used.contains(&c));
                c = c.wrapping_add(1);
            }
            prop_assert_eq!(ids.next_candidate(), id.wrapping_add(1));
        }
    }
}

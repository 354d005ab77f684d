//! Peer id allocation exactly as QEMU's `ivshmem-server` does it.
//!
//! Ids are 16 bits. A counter starts at 0; each new peer gets the first id at or after the
//! counter that no connected peer uses, and the counter moves past it. So ids increase, an id in
//! use is skipped, ids are not reused until the counter wraps around after 65535.

/// How a region chooses peer ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdPolicy {
    /// QEMU's: increasing from 0, skipping ids in use, wrapping after 65535 ([`IdAllocator`]).
    #[default]
    Increasing,
    /// The lowest id not in use, below the region's peer limit ([`lowest_free`]): what a
    /// QNX-style region needs, where a client's index is its bit in the notification bitsets.
    LowestFree,
}

impl IdPolicy {
    /// The configuration word: `increasing` or `lowest-free`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdPolicy::Increasing => "increasing",
            IdPolicy::LowestFree => "lowest-free",
        }
    }
}

impl std::fmt::Display for IdPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no id policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("id policy {0:?}: expected \"increasing\" or \"lowest-free\"")]
pub struct UnknownIdPolicy(pub String);

impl std::str::FromStr for IdPolicy {
    type Err = UnknownIdPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "increasing" => Ok(IdPolicy::Increasing),
            "lowest-free" => Ok(IdPolicy::LowestFree),
            other => Err(UnknownIdPolicy(other.to_string())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for IdPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The lowest id below `limit` that `in_use` says is free.
pub fn lowest_free(limit: usize, in_use: impl Fn(u16) -> bool) -> Option<u16> {
    let limit = limit.min(1 << 16);
    (0..limit)
        .filter_map(|i| u16::try_from(i).ok())
        .find(|&i| !in_use(i))
}

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

    #[test]
    fn lowest_free_reuses_ids_below_the_limit() {
        let used: BTreeSet<u16> = [0, 1, 3].into_iter().collect();
        assert_eq!(lowest_free(16, |i| used.contains(&i)), Some(2));
        assert_eq!(lowest_free(2, |i| used.contains(&i)), None);
        assert_eq!(lowest_free(0, |_| false), None);
        assert_eq!(lowest_free(usize::MAX, |i| i < 65535), Some(65535));
        assert_eq!("lowest-free".parse(), Ok(IdPolicy::LowestFree));
        assert_eq!("increasing".parse(), Ok(IdPolicy::Increasing));
        "random".parse::<IdPolicy>().unwrap_err();
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

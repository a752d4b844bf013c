//! A least-recently-used map bounded in bytes: the gateway's prompt cache
//! and the denoiser's embedding cache.
//!
//! Every entry is counted as the bytes its owner says (value *and* key)
//! plus [`ENTRY_OVERHEAD`] for the bookkeeping, so a flood of tiny values
//! under long keys is bounded as surely as a few large ones. Eviction takes
//! the oldest entry from an ordered index: O(log n) per insert.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Bytes charged per entry on top of its key and value: the map's and the
/// index's slots and the allocations behind them (a conservative round
/// figure; measured RSS per tiny entry is ~150–250 bytes).
pub const ENTRY_OVERHEAD: usize = 256;

pub struct ByteLru<K, V> {
    /// Value, charged bytes, last use.
    entries: HashMap<K, (V, usize, u64)>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, K>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> ByteLru<K, V> {
    pub fn new(max_bytes: usize) -> Self {
        ByteLru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            max_bytes,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let now = self.clock;
        match self.entries.get_mut(key) {
            Some((v, _, used)) => {
                self.order.remove(used);
                *used = now;
                self.order.insert(now, key.clone());
                self.hits += 1;
                Some(v.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Insert `value`, counted as `size` bytes (key and value) plus
    /// [`ENTRY_OVERHEAD`], evicting the least recently used entries to stay
    /// within the bound (an entry larger than the bound is not kept).
    pub fn insert(&mut self, key: K, value: V, size: usize) {
        let size = size.saturating_add(ENTRY_OVERHEAD);
        self.remove(&key);
        if size > self.max_bytes {
            return;
        }
        while self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, s, _)) = self.entries.remove(&oldest) {
                self.bytes -= s;
            }
        }
        self.clock += 1;
        self.bytes += size;
        self.order.insert(self.clock, key.clone());
        self.entries.insert(key, (value, size, self.clock));
    }

    fn remove(&mut self, key: &K) {
        if let Some((_, old, used)) = self.entries.remove(key) {
            self.bytes -= old;
            self.order.remove(&used);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes charged, overhead included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const O: usize = ENTRY_OVERHEAD;

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let mut c = ByteLru::new(250 + 2 * O);
        c.insert("a", 1, 100);
        c.insert("b", 2, 100);
        assert_eq!(c.get(&"a"), Some(1)); // a is now newer than b
        c.insert("c", 3, 100); // 300 > 250: evict b
        assert_eq!(c.get(&"b"), None);
        assert!(c.get(&"a").is_some() && c.get(&"c").is_some());
        assert_eq!(
            (c.len(), c.bytes(), c.hits, c.misses),
            (2, 200 + 2 * O, 3, 1)
        );
        c.insert("huge", 4, 251 + 2 * O);
        assert_eq!(c.get(&"huge"), None, "larger than the bound: not kept");
        c.insert("a", 5, 50); // replacing frees the old size
        assert_eq!((c.get(&"a"), c.bytes()), (Some(5), 150 + 2 * O));
        assert_eq!(c.order.len(), c.entries.len());
    }

    #[test]
    fn tiny_entries_are_bounded_by_their_overhead() {
        let mut c = ByteLru::new(100 * O);
        for i in 0..10_000u32 {
            c.insert(i, (), 0);
        }
        assert_eq!(c.len(), 100, "10,000 zero-byte entries: 100 kept");
        assert_eq!(c.bytes(), 100 * O);
        assert_eq!(c.order.len(), 100);
        assert!(c.get(&9_999).is_some() && c.get(&0).is_none());
    }

    #[test]
    fn an_oversized_replacement_drops_the_old_entry() {
        let mut c = ByteLru::new(2 * O);
        c.insert("k", 1, 10);
        c.insert("k", 2, 3 * O);
        assert_eq!((c.get(&"k"), c.bytes(), c.order.len()), (None, 0, 0));
    }
}

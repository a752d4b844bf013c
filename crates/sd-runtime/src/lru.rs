//! A least-recently-used map bounded in bytes: the gateway's prompt cache
//! and the denoiser's embedding cache.

use std::collections::HashMap;
use std::hash::Hash;

pub struct ByteLru<K, V> {
    entries: HashMap<K, (V, usize, u64)>,
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
                *used = now;
                self.hits += 1;
                Some(v.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Insert `value`, counted as `size` bytes, evicting the least recently
    /// used entries to stay within the bound (a value larger than the bound
    /// is not kept).
    pub fn insert(&mut self, key: K, value: V, size: usize) {
        if size > self.max_bytes {
            return;
        }
        if let Some((_, old, _)) = self.entries.remove(&key) {
            self.bytes -= old;
        }
        while self.bytes + size > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, s, _)) = self.entries.remove(&oldest) {
                self.bytes -= s;
            }
        }
        self.clock += 1;
        self.bytes += size;
        self.entries.insert(key, (value, size, self.clock));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let mut c = ByteLru::new(250);
        c.insert("a", 1, 100);
        c.insert("b", 2, 100);
        assert_eq!(c.get(&"a"), Some(1)); // a is now newer than b
        c.insert("c", 3, 100); // 300 > 250: evict b
        assert_eq!(c.get(&"b"), None);
        assert!(c.get(&"a").is_some() && c.get(&"c").is_some());
        assert_eq!((c.len(), c.bytes(), c.hits, c.misses), (2, 200, 3, 1));
        c.insert("huge", 4, 251);
        assert_eq!(c.get(&"huge"), None, "larger than the bound: not kept");
        c.insert("a", 5, 50); // replacing frees the old size
        assert_eq!((c.get(&"a"), c.bytes()), (Some(5), 150));
    }
}

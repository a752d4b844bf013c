//! The denoiser's embedding cache: text embeddings by caller-chosen id, so a
//! generation sends its 77×768 floats once, not once per step. Bounded in
//! bytes; least recently used entries go first.

use std::collections::HashMap;

use tch::Tensor;

pub struct EmbeddingCache {
    entries: HashMap<String, (Tensor, u64)>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

fn size_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl EmbeddingCache {
    pub fn new(max_bytes: usize) -> Self {
        EmbeddingCache {
            entries: HashMap::new(),
            bytes: 0,
            max_bytes,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn get(&mut self, id: &str) -> Option<Tensor> {
        self.clock += 1;
        let now = self.clock;
        match self.entries.get_mut(id) {
            Some((t, used)) => {
                *used = now;
                self.hits += 1;
                Some(t.shallow_clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, id: String, t: &Tensor) {
        let size = size_of(t);
        if size > self.max_bytes {
            return;
        }
        self.clock += 1;
        if let Some((old, _)) = self.entries.remove(&id) {
            self.bytes -= size_of(&old);
        }
        while self.bytes + size > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((t, _)) = self.entries.remove(&oldest) {
                self.bytes -= size_of(&t);
            }
        }
        self.bytes += size;
        self.entries.insert(id, (t.shallow_clone(), self.clock));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

// SAFETY: cached tensors are never written to after insertion; the cache
// itself sits behind a Mutex.
unsafe impl Send for EmbeddingCache {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let t = || Tensor::zeros([10], (tch::Kind::Float, tch::Device::Cpu)); // 40 bytes
        let mut c = EmbeddingCache::new(100);
        c.insert("a".into(), &t());
        c.insert("b".into(), &t());
        assert!(c.get("a").is_some()); // a is now newer than b
        c.insert("c".into(), &t()); // 120 > 100: evict b
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.len(), 2);
        // Too big to cache at all.
        c.insert(
            "huge".into(),
            &Tensor::zeros([100], (tch::Kind::Float, tch::Device::Cpu)),
        );
        assert!(c.get("huge").is_none());
    }
}

//! The denoiser's embedding cache: text embeddings by caller-chosen id, so a
//! generation sends its 77×768 floats once, not once per step. Bounded in
//! bytes; least recently used entries go first.

use sd_runtime::lru::ByteLru;
use tch::Tensor;

/// A cached tensor; clones share its storage.
struct Shared(Tensor);

impl Clone for Shared {
    fn clone(&self) -> Self {
        Shared(self.0.shallow_clone())
    }
}

pub struct EmbeddingCache(ByteLru<String, Shared>);

impl EmbeddingCache {
    pub fn new(max_bytes: usize) -> Self {
        EmbeddingCache(ByteLru::new(max_bytes))
    }

    pub fn get(&mut self, id: &str) -> Option<Tensor> {
        self.0.get(&id.to_string()).map(|s| s.0)
    }

    pub fn insert(&mut self, id: String, t: &Tensor) {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        self.0.insert(id, Shared(t.shallow_clone()), size);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_tensors_by_id_within_the_byte_bound() {
        let t = || Tensor::zeros([10], (tch::Kind::Float, tch::Device::Cpu)); // 40 bytes
        let mut c = EmbeddingCache::new(100);
        c.insert("a".into(), &t());
        c.insert("b".into(), &t());
        assert!(c.get("a").is_some());
        c.insert("c".into(), &t()); // 120 > 100: evict b
        assert!(c.get("b").is_none());
        assert_eq!(c.get("a").map(|t| t.size()), Some(vec![10]));
        assert_eq!(c.len(), 2);
    }
}

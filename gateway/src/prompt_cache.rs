//! Prompt embeddings the gateway has already paid for, by (text-encoder
//! model id, clip_skip, prompt). Bounded in bytes, least recently used out
//! first. Each entry also carries the id the denoiser caches it under, so a
//! repeated prompt costs neither a text-encoder call nor an embedding
//! transfer.

use std::hash::{DefaultHasher, Hash, Hasher};

use sd_proto::v1::Tensor as WireTensor;
use sd_runtime::lru::ByteLru;

#[derive(Clone, Debug)]
pub struct CachedEmbedding {
    /// Key the denoiser caches this tensor under.
    pub id: String,
    /// (1, tokens, hidden).
    pub tensor: WireTensor,
    /// SDXL family: the pooled embedding, (1, pooled).
    pub pooled: Option<WireTensor>,
    /// The textual-inversion embeddings the prompt used, by name.
    pub textual_inversions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PromptKey {
    pub model: String,
    pub clip_skip: u32,
    /// `PromptSyntax` as sent to the text encoder.
    pub syntax: i32,
    pub prompt: String,
    /// FLUX: the T5 tokens it was padded or cut to (0 for other families).
    pub max_sequence_length: u32,
    /// The LoRA adapters and scales it was encoded with (canonical: sorted,
    /// `name:scale` joined by `;`; empty: none).
    pub loras: String,
}

impl PromptKey {
    /// A stable id for the denoiser's cache.
    pub fn embedding_id(&self) -> String {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        let a = h.finish();
        self.prompt.len().hash(&mut h);
        format!("emb-{a:016x}{:016x}", h.finish())
    }
}

/// Prompt embeddings by key, bounded in bytes.
pub struct PromptCache(ByteLru<PromptKey, CachedEmbedding>);

impl PromptCache {
    pub fn new(max_bytes: usize) -> Self {
        PromptCache(ByteLru::new(max_bytes))
    }

    pub fn get(&mut self, key: &PromptKey) -> Option<CachedEmbedding> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: PromptKey, mut value: CachedEmbedding) {
        // A decoded tensor's bytes are a slice of the buffer the whole
        // response was read into, and keep all of it alive (about 3× the
        // tensor on the tiny model); keep a copy of exactly what is counted.
        value.tensor.data = value.tensor.data.to_vec().into();
        if let Some(p) = value.pooled.as_mut() {
            p.data = p.data.to_vec().into();
        }
        let pooled = value
            .pooled
            .as_ref()
            .map_or(0, |p| p.data.len() + p.shape.len() * 8);
        let size = value.tensor.data.len()
            + pooled
            + value.tensor.shape.len() * 8
            + value.id.len()
            + 2 * (key.prompt.len() + key.model.len());
        self.0.insert(key, value, size);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn hits(&self) -> u64 {
        self.0.hits
    }

    pub fn misses(&self) -> u64 {
        self.0.misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: usize) -> CachedEmbedding {
        CachedEmbedding {
            id: "x".into(),
            pooled: None,
            textual_inversions: Vec::new(),
            tensor: WireTensor {
                shape: vec![bytes as i64 / 4],
                dtype: 1,
                data: vec![0u8; bytes].into(),
            },
        }
    }

    fn key(p: &str) -> PromptKey {
        PromptKey {
            syntax: 0,
            model: "m".into(),
            clip_skip: 0,
            prompt: p.into(),
            max_sequence_length: 0,
            loras: String::new(),
        }
    }

    #[test]
    fn lru_within_bytes() {
        // Each entry: 100 data + 8 shape + 1 id + 2 × (1 + 1) key bytes + overhead.
        let each = 113 + sd_runtime::lru::ENTRY_OVERHEAD;
        let mut c = PromptCache::new(2 * each + each / 2);
        c.insert(key("a"), entry(100));
        c.insert(key("b"), entry(100));
        assert!(c.get(&key("a")).is_some());
        c.insert(key("c"), entry(100));
        assert!(c.get(&key("b")).is_none(), "b was least recently used");
        assert!(c.get(&key("a")).is_some() && c.get(&key("c")).is_some());
        assert_eq!((c.len(), c.hits(), c.misses()), (2, 3, 1));
    }

    #[test]
    fn an_entry_holds_its_own_bytes_not_the_buffer_they_came_in() {
        let buffer = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let mut e = entry(0);
        e.tensor.data = buffer.slice(1000..1100);
        let mut c = PromptCache::new(1 << 20);
        c.insert(key("a"), e);
        let kept = c.get(&key("a")).unwrap().tensor.data;
        assert_eq!(&kept[..], &buffer[1000..1100]);
        let inside = buffer.as_ptr_range();
        assert!(
            !inside.contains(&kept.as_ptr()),
            "the entry keeps the whole 1 MiB buffer alive"
        );
    }

    #[test]
    fn ids_differ_by_model_prompt_and_clip_skip() {
        let a = key("a").embedding_id();
        assert_eq!(a, key("a").embedding_id());
        assert_ne!(a, key("b").embedding_id());
        let mut k = key("a");
        k.clip_skip = 1;
        assert_ne!(a, k.embedding_id());
    }
}

//! The denoiser's embedding cache: text embeddings by caller-chosen id, so a
//! generation sends its 77×768 floats once, not once per step. Bounded in
//! bytes; least recently used entries go first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sd_runtime::lru::ByteLru;
use sd_service::step::Cond;
use sd_service::ServiceError;
use tch::Tensor;

/// A libtorch tensor's own allocations beside its data (TensorImpl,
/// storage, sizes and strides): a few hundred bytes.
const TENSOR_OVERHEAD: usize = 512;

pub struct EmbeddingCache(ByteLru<String, Cond>);

impl EmbeddingCache {
    pub fn new(max_bytes: usize) -> Self {
        EmbeddingCache(ByteLru::new(max_bytes))
    }

    pub fn get(&mut self, id: &str) -> Option<Cond> {
        self.0.get(&id.to_string())
    }

    /// Keep `c` under `id`, counted as its bytes, the id's (twice: the map
    /// and the LRU index each hold it) and the entry's bookkeeping.
    pub fn insert(&mut self, id: String, c: &Cond) {
        let tensors = 1 + usize::from(c.pooled.is_some());
        let size = c.data_bytes() + 2 * id.len() + tensors * TENSOR_OVERHEAD;
        self.0.insert(id, c.clone(), size);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Most embeddings one stream holds: a generation sends two (cond and
/// uncond); room for a changed prompt.
pub const MAX_HELD: usize = 4;

/// What streams may hold even when the cache is smaller (or off): 16 MiB,
/// some seventy 77×768 embeddings in fp32.
pub const MIN_HELD_BYTES: usize = 16 << 20;

/// Bytes all streams together may hold (one budget, shared by clones).
#[derive(Clone)]
pub struct HeldBudget {
    used: Arc<AtomicUsize>,
    max: usize,
}

impl HeldBudget {
    pub fn new(max: usize) -> Self {
        HeldBudget {
            used: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Take `bytes` from the budget, or say how much is held.
    fn take(&self, bytes: usize) -> Result<(), usize> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                (u + bytes <= self.max).then_some(u + bytes)
            })
            .map(|_| ())
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// Most session tensors one stream holds (a generation's time ids, masks,
/// reference images, 8 ControlNet hints and 8 IP-Adapters' embeddings).
pub const MAX_HELD_TENSORS: usize = 24;

/// What a stream holds under an id.
enum Kept {
    Embedding(Cond),
    Tensor(Tensor),
}

/// The embeddings and session tensors one PredictStream sent in full, by
/// id: they outlive cache eviction for the stream's life, so a stream never
/// misses its own. At most [`MAX_HELD`] embeddings and
/// [`MAX_HELD_TENSORS`] tensors, their bytes taken from the budget all
/// streams share (given back when the stream ends); a stream that would
/// hold more is refused with RESOURCE_EXHAUSTED.
pub struct Held {
    by_id: HashMap<String, (Kept, usize)>,
    budget: HeldBudget,
}

impl Held {
    pub fn new(budget: HeldBudget) -> Self {
        Held {
            by_id: HashMap::new(),
            budget,
        }
    }

    pub fn get(&self, id: &str) -> Option<Cond> {
        match self.by_id.get(id) {
            Some((Kept::Embedding(c), _)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The session tensor held under `id`.
    pub fn tensor(&self, id: &str) -> Option<Tensor> {
        match self.by_id.get(id) {
            Some((Kept::Tensor(t), _)) => Some(t.shallow_clone()),
            _ => None,
        }
    }

    /// Hold `c` under `id` (replacing what the id held), or refuse.
    pub fn hold(&mut self, id: &str, c: &Cond, field: &str) -> Result<(), ServiceError> {
        let size = c.data_bytes() + id.len();
        self.keep(id, Kept::Embedding(c.clone()), size, field)
    }

    /// Hold session tensor `t` under `id`, or refuse.
    pub fn hold_tensor(&mut self, id: &str, t: &Tensor, field: &str) -> Result<(), ServiceError> {
        let size = t.numel() * t.kind().elt_size_in_bytes() + id.len();
        self.keep(id, Kept::Tensor(t.shallow_clone()), size, field)
    }

    fn keep(&mut self, id: &str, kept: Kept, size: usize, field: &str) -> Result<(), ServiceError> {
        let exhausted = |description: String| ServiceError::Exhausted {
            field: field.to_string(),
            description,
        };
        let tensor = matches!(kept, Kept::Tensor(_));
        let (kind, max) = if tensor {
            ("session tensors", MAX_HELD_TENSORS)
        } else {
            ("embeddings", MAX_HELD)
        };
        let count = self
            .by_id
            .values()
            .filter(|(k, _)| matches!(k, Kept::Tensor(_)) == tensor)
            .count();
        if !self.by_id.contains_key(id) && count >= max {
            return Err(exhausted(format!(
                "this stream already holds {max} {kind}, at most {max}"
            )));
        }
        let old = self.by_id.get(id).map_or(0, |(_, s)| *s);
        if size > old {
            let more = size - old;
            self.budget.take(more).map_err(|used| {
                exhausted(format!(
                    "streams hold {used} bytes of embeddings; {more} more would pass {} (--embedding-cache-mib)",
                    self.budget.max
                ))
            })?;
        } else {
            self.budget.give(old - size);
        }
        self.by_id.insert(id.to_string(), (kept, size));
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let bytes = self.by_id.values().map(|(_, s)| s).sum();
        self.budget.give(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &Tensor) -> Cond {
        Cond {
            hidden: t.shallow_clone(),
            pooled: None,
        }
    }

    #[test]
    fn a_pooled_embedding_counts_too() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let c = Cond {
            hidden: Tensor::zeros([10], f),
            pooled: Some(Tensor::zeros([5], f)),
        };
        let entry = 60 + 2 + 2 * TENSOR_OVERHEAD + sd_runtime::lru::ENTRY_OVERHEAD;
        let mut cache = EmbeddingCache::new(2 * entry);
        cache.insert("a".into(), &c);
        cache.insert("b".into(), &c);
        assert_eq!(cache.len(), 2);
        cache.insert("c".into(), &c);
        assert_eq!(cache.len(), 2, "two such entries fill the bound");
        let got = cache.get("c").unwrap();
        assert_eq!(got.pooled.map(|p| p.size()), Some(vec![5]));
    }

    #[test]
    fn keeps_tensors_by_id_within_the_byte_bound() {
        let t = || Tensor::zeros([10], (tch::Kind::Float, tch::Device::Cpu)); // 40 bytes
        let entry = 40 + 2 + TENSOR_OVERHEAD + sd_runtime::lru::ENTRY_OVERHEAD;
        let mut c = EmbeddingCache::new(2 * entry + entry / 2);
        c.insert("a".into(), &cond(&t()));
        c.insert("b".into(), &cond(&t()));
        assert!(c.get("a").is_some());
        c.insert("c".into(), &cond(&t())); // 3 entries > 2.5: evict b
        assert!(c.get("b").is_none());
        assert_eq!(c.get("a").map(|c| c.hidden.size()), Some(vec![10]));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_stream_holds_a_bounded_number_of_embeddings() {
        let t = Tensor::zeros([1, 77, 8], (tch::Kind::Float, tch::Device::Cpu));
        let mut h = Held::new(HeldBudget::new(1 << 20));
        for i in 0..MAX_HELD {
            h.hold(&format!("e{i}"), &cond(&t), "cond").unwrap();
        }
        h.hold("e0", &cond(&t), "cond")
            .expect("replacing one it holds is fine");
        let e = h
            .hold("new", &cond(&t), "uncond")
            .expect_err("one too many");
        assert!(
            matches!(&e, ServiceError::Exhausted { field, .. } if field == "uncond"),
            "{e}"
        );
        assert!(h.get("e3").is_some() && h.get("new").is_none());
    }

    #[test]
    fn all_streams_share_one_byte_budget() {
        let t = Tensor::zeros([1, 77, 8], (tch::Kind::Float, tch::Device::Cpu)); // 2,464 bytes
        let each = 2464 + 2;
        let budget = HeldBudget::new(3 * each);
        let mut a = Held::new(budget.clone());
        let mut b = Held::new(budget.clone());
        a.hold("a1", &cond(&t), "cond").unwrap();
        a.hold("a2", &cond(&t), "uncond").unwrap();
        b.hold("b1", &cond(&t), "cond").unwrap();
        let e = b
            .hold("b2", &cond(&t), "uncond")
            .expect_err("the budget is spent");
        assert!(e.to_string().contains("streams hold"), "{e}");
        a.hold("a1", &cond(&t), "cond")
            .expect("replacing gives back the old bytes");
        assert_eq!(budget.used(), 3 * each);
        drop(a);
        assert_eq!(budget.used(), each, "an ended stream gives its bytes back");
        b.hold("b2", &cond(&t), "uncond").unwrap();
    }

    #[test]
    fn long_ids_count_against_the_bound() {
        let tiny = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let mut c = EmbeddingCache::new(1 << 20);
        for i in 0..1000 {
            c.insert(format!("{i:0>120}"), &cond(&tiny));
        }
        // 4 + 240 + 512 + 256 bytes each: about 1,040 fit in 1 MiB, not 250,000.
        let each = 4 + 240 + TENSOR_OVERHEAD + sd_runtime::lru::ENTRY_OVERHEAD;
        assert_eq!(c.len(), 1000.min((1 << 20) / each));
        for i in 1000..3000 {
            c.insert(format!("{i:0>120}"), &cond(&tiny));
        }
        assert_eq!(c.len(), (1 << 20) / each);
    }
}

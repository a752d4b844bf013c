//! Images kept for OpenAI's `response_format: "url"`: each under a random,
//! unguessable id for an hour, at most a set number of bytes all together
//! (the oldest go first), in memory — a gateway restart forgets them, as a
//! client of such URLs expects of short-lived links.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// How long a stored image stays fetchable.
pub const IMAGE_TTL: Duration = Duration::from_secs(3600);

struct Entry {
    bytes: Bytes,
    content_type: &'static str,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Ids oldest first (an id whose entry is gone is skipped).
    order: VecDeque<String>,
    bytes: usize,
}

pub struct ImageStore {
    inner: Mutex<Inner>,
    max_bytes: usize,
    ttl: Duration,
}

impl ImageStore {
    pub fn new(max_bytes: usize) -> Self {
        Self::with_ttl(max_bytes, IMAGE_TTL)
    }

    pub fn with_ttl(max_bytes: usize, ttl: Duration) -> Self {
        ImageStore {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            ttl,
        }
    }

    /// Keep `bytes`; the id to fetch them by (None: larger than the store).
    pub fn put(&self, bytes: Bytes, content_type: &'static str) -> Option<String> {
        if bytes.len() > self.max_bytes {
            return None;
        }
        let id = random_id();
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.expire(now);
        while s.bytes + bytes.len() > self.max_bytes {
            let Some(old) = s.order.pop_front() else {
                break;
            };
            if let Some(e) = s.entries.remove(&old) {
                s.bytes -= e.bytes.len();
            }
        }
        s.bytes += bytes.len();
        s.order.push_back(id.clone());
        s.entries.insert(
            id.clone(),
            Entry {
                bytes,
                content_type,
                expires: now + self.ttl,
            },
        );
        Some(id)
    }

    /// The image stored under `id`, while it is still kept.
    pub fn get(&self, id: &str) -> Option<(Bytes, &'static str)> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.expire(Instant::now());
        s.entries.get(id).map(|e| (e.bytes.clone(), e.content_type))
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|s| s.bytes).unwrap_or(0)
    }
}

impl Inner {
    /// Drop what expired (ids are in insertion order, so expiry order).
    fn expire(&mut self, now: Instant) {
        while let Some(id) = self.order.front() {
            match self.entries.get(id) {
                Some(e) if e.expires > now => break,
                Some(_) => {
                    if let Some(e) = self.entries.remove(id) {
                        self.bytes -= e.bytes.len();
                    }
                    self.order.pop_front();
                }
                None => {
                    self.order.pop_front();
                }
            }
        }
    }
}

/// 128 random bits from the kernel, hex: an id nobody can guess or
/// enumerate. (Without /dev/urandom, std's per-process random hasher keys.)
fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in b.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_come_back_by_id_until_evicted() {
        let s = ImageStore::new(10);
        let a = s.put(Bytes::from(vec![1; 4]), "image/png").unwrap();
        let b = s.put(Bytes::from(vec![2; 4]), "image/png").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(s.get(&a).unwrap().0, vec![1u8; 4]);
        // A third image pushes the oldest out: 12 > 10 bytes.
        let c = s.put(Bytes::from(vec![3; 4]), "image/png").unwrap();
        assert!(s.get(&a).is_none());
        assert!(s.get(&b).is_some() && s.get(&c).is_some());
        assert_eq!(s.bytes(), 8);
        // Larger than the whole store: not kept.
        assert!(s.put(Bytes::from(vec![0; 11]), "image/png").is_none());
        assert!(s.get("nope").is_none());
    }

    #[test]
    fn images_expire() {
        let s = ImageStore::with_ttl(100, Duration::from_millis(20));
        let a = s.put(Bytes::from(vec![1; 4]), "image/png").unwrap();
        assert!(s.get(&a).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.get(&a).is_none());
        assert_eq!(s.bytes(), 0);
    }
}

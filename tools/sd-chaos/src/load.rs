//! Mixed load from concurrent clients: sizes, steps, schedulers, unary and
//! streamed calls, image-to-image, and calls the harness cancels or gives a
//! short deadline on purpose (counted apart from failures).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{generate_event, GenerateRequest};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

/// What kind of call a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    Stream,
    Img2Img,
    /// A stream the harness drops after a few events.
    Cancel,
    /// A call with a deadline too short for it, most of the time.
    Deadline,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(Code, String),
    /// Cancelled by the harness on purpose.
    Cancelled,
    /// Its short deadline passed (on purpose).
    DeadlineHit,
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The phase it was sent in.
    pub phase: usize,
    pub kind: Kind,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
}

impl Record {
    pub fn latency(&self) -> Duration {
        self.ended - self.started
    }
}

/// A small seeded generator (splitmix64): the same seed, the same mix.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

const SCHEDULERS: &[&str] = &[
    "ddim", "pndm", "euler", "euler-a", "lms", "heun", "dpmpp-2m", "unipc", "lcm",
];
const PROMPTS: &[&str] = &[
    "a lighthouse at dusk",
    "an oil painting of a harbour",
    "a red bicycle in the snow",
    "a cat reading a newspaper",
    "mountains above the clouds",
    "a bowl of ramen, studio light",
];

/// What the clients share: the phase now, counts, the records, when to stop.
pub struct Load {
    pub phase: AtomicUsize,
    sent: AtomicUsize,
    done: AtomicUsize,
    in_flight: AtomicUsize,
    max_requests: usize,
    stop: AtomicBool,
    pause: AtomicBool,
    records: Mutex<Vec<Record>>,
    init_image: Vec<u8>,
}

impl Load {
    pub fn new(max_requests: usize) -> anyhow::Result<Arc<Load>> {
        Ok(Arc::new(Load {
            phase: AtomicUsize::new(0),
            sent: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_requests,
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            records: Mutex::new(Vec::new()),
            init_image: gradient_png(64, 64)?,
        }))
    }

    /// Requests completed (whatever their outcome).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether every request allowed has been sent.
    pub fn exhausted(&self) -> bool {
        self.sent.load(Ordering::SeqCst) >= self.max_requests
    }

    /// Send no more requests.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Hold new requests back (those in flight finish) until resumed.
    pub fn pause(&self, on: bool) {
        self.pause.store(on, Ordering::SeqCst);
    }

    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Claim the next request, waiting while paused; None when done.
    async fn claim(&self) -> Option<usize> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            if !self.pause.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let n = self.sent.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_requests {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(n)
    }

    fn record(&self, r: Record) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
        self.done.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The share of each kind, in percent (unary, stream, img2img, cancel,
/// deadline), and the percentage of prompts never seen before.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub kinds: [u64; 5],
    pub unique_prompts: u64,
}

impl Mix {
    fn kind(&self, rng: &mut Rng) -> Kind {
        let total: u64 = self.kinds.iter().sum();
        let mut x = rng.below(total);
        let kinds = [
            Kind::Unary,
            Kind::Stream,
            Kind::Img2Img,
            Kind::Cancel,
            Kind::Deadline,
        ];
        for (k, share) in kinds.into_iter().zip(self.kinds) {
            if x < share {
                return k;
            }
            x -= share;
        }
        Kind::Unary
    }
}

/// One client: requests until the load says stop; every outcome recorded.
pub async fn client(url: String, load: Arc<Load>, mix: Mix, seed: u64) {
    let mut rng = Rng::new(seed);
    let channel = match tonic::transport::Endpoint::from_shared(url) {
        Ok(e) => e.connect_lazy(),
        Err(_) => return,
    };
    let mut client = GenerationClient::new(channel).max_decoding_message_size(64 << 20);
    while let Some(n) = load.claim().await {
        let kind = mix.kind(&mut rng);
        let req = request(&mut rng, kind, n, &load.init_image, mix.unique_prompts);
        let phase = load.phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let outcome = run(&mut client, kind, req, &mut rng).await;
        let failed = matches!(outcome, Outcome::Failed(..));
        load.record(Record {
            phase,
            kind,
            started,
            ended: Instant::now(),
            outcome,
        });
        if failed {
            // As a client would: not straight back at a service that refused.
            tokio::time::sleep(AFTER_FAILURE).await;
        }
    }
}

/// A client's pause after a failed request.
pub const AFTER_FAILURE: Duration = Duration::from_millis(250);

/// A request of `kind`: a small size, a few steps, any scheduler; prompts
/// from a short list (the caches hit) or, `unique` percent of them, of
/// their own (the text encoder works, the caches fill).
pub fn request(rng: &mut Rng, kind: Kind, n: usize, init: &[u8], unique: u64) -> GenerateRequest {
    let side = *rng.pick(&[32u32, 48, 64]);
    let prompt = if rng.below(100) < unique {
        format!("{} #{n}", rng.pick(PROMPTS))
    } else {
        rng.pick(PROMPTS).to_string()
    };
    let steps = match kind {
        Kind::Deadline | Kind::Cancel => 10 + rng.below(20) as u32,
        _ => 2 + rng.below(9) as u32,
    };
    let mut req = GenerateRequest {
        prompt,
        steps,
        width: side,
        height: side,
        scheduler: rng.pick(SCHEDULERS).to_string(),
        seed: Some(rng.next()),
        ..Default::default()
    };
    if kind == Kind::Img2Img {
        req.init_image = init.to_vec().into();
        req.strength = Some(0.6);
        req.steps = req.steps.max(4);
    }
    req
}

/// How long the harness lets an ordinary request take before calling it
/// lost (no request of the mix needs more than seconds).
const PATIENCE: Duration = Duration::from_secs(120);

async fn run(
    client: &mut GenerationClient<Channel>,
    kind: Kind,
    req: GenerateRequest,
    rng: &mut Rng,
) -> Outcome {
    match kind {
        Kind::Unary | Kind::Img2Img => unary(client, req, PATIENCE).await,
        Kind::Deadline => {
            let short = Duration::from_millis(50 + rng.below(350));
            match unary(client, req, short).await {
                // tonic's own timer ends the call as CANCELLED.
                Outcome::Failed(Code::DeadlineExceeded | Code::Cancelled, _) => {
                    Outcome::DeadlineHit
                }
                other => other,
            }
        }
        Kind::Stream => stream(client, req, None).await,
        Kind::Cancel => stream(client, req, Some(1 + rng.below(3) as usize)).await,
    }
}

async fn unary(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
    timeout: Duration,
) -> Outcome {
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    match client.generate(r).await {
        Ok(r) if !r.get_ref().images.is_empty() => Outcome::Ok,
        Ok(_) => Outcome::Failed(Code::Unknown, "no image".into()),
        Err(s) => failed(&s),
    }
}

/// A GenerateStream read to its result, or dropped after `cancel_after`
/// events.
async fn stream(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
    cancel_after: Option<usize>,
) -> Outcome {
    let mut r = tonic::Request::new(req);
    r.set_timeout(PATIENCE);
    let mut events = match client.generate_stream(r).await {
        Ok(s) => s.into_inner(),
        Err(s) => return failed(&s),
    };
    let mut seen = 0;
    while let Some(ev) = events.next().await {
        match ev.map(|e| e.event) {
            Ok(Some(generate_event::Event::Result(_))) => return Outcome::Ok,
            Ok(_) => seen += 1,
            Err(s) => return failed(&s),
        }
        if cancel_after.is_some_and(|n| seen >= n) {
            return Outcome::Cancelled;
        }
    }
    Outcome::Failed(Code::Unknown, "stream ended without a result".into())
}

fn failed(s: &tonic::Status) -> Outcome {
    let message: String = s.message().chars().take(120).collect();
    Outcome::Failed(s.code(), message)
}

/// A `w`×`h` RGB gradient as PNG bytes: the image-to-image input.
pub fn gradient_png(w: u32, h: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    let pixels: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x * 4) as u8, (y * 4) as u8, 128]))
        .collect();
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_follows_its_shares_and_its_seed() {
        let mix = Mix {
            kinds: [50, 20, 10, 10, 10],
            unique_prompts: 0,
        };
        let mut rng = Rng::new(7);
        let kinds: Vec<Kind> = (0..10_000).map(|_| mix.kind(&mut rng)).collect();
        let share = |k| kinds.iter().filter(|&&x| x == k).count();
        assert!((4700..5300).contains(&share(Kind::Unary)));
        assert!((800..1200).contains(&share(Kind::Deadline)));
        let mut again = Rng::new(7);
        assert_eq!(mix.kind(&mut again), kinds[0]);
    }

    #[test]
    fn the_init_image_is_a_png() {
        let png = gradient_png(64, 64).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }
}

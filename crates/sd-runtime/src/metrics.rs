//! Prometheus metrics, one registry per process, served on `/metrics`:
//! request and per-step latency by method and stage, requests by gRPC code,
//! queue depth and work in flight, cache hits and misses, model load time.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub stage: String,
}

/// The `stage` label of `sd_step_duration_seconds`: every phase a process
/// times, named once (the docs list [`Phase::ALL`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Phase {
    /// Gateway: the prompts' embeddings (cache or text encoder).
    Text,
    /// Gateway: the init image through the VAE encoder (image-to-image).
    EncodeImage,
    /// Gateway: one denoising step, as the step loop sees it.
    Denoise,
    /// Gateway: the final latents through the VAE decoder.
    Decode,
    /// Gateway: encoding the result images (PNG/JPEG/WebP).
    ImageEncode,
    /// Gateway: a whole generation.
    Generation,
    /// Text encoder: one CLIP forward.
    TextForward,
    /// Denoiser: time a call waited in the batcher's queue.
    UnetQueue,
    /// Denoiser: one UNet forward (a batch of calls).
    UnetForward,
    /// Autoencoder: one VAE decode.
    VaeDecode,
    /// Autoencoder: one VAE encode.
    VaeEncode,
}

impl Phase {
    pub const ALL: [Phase; 11] = [
        Phase::Text,
        Phase::EncodeImage,
        Phase::Denoise,
        Phase::Decode,
        Phase::ImageEncode,
        Phase::Generation,
        Phase::TextForward,
        Phase::UnetQueue,
        Phase::UnetForward,
        Phase::VaeDecode,
        Phase::VaeEncode,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Text => "text",
            Phase::EncodeImage => "encode_image",
            Phase::Denoise => "denoise",
            Phase::Decode => "decode",
            Phase::ImageEncode => "image_encode",
            Phase::Generation => "generation",
            Phase::TextForward => "text_forward",
            Phase::UnetQueue => "unet_queue",
            Phase::UnetForward => "unet_forward",
            Phase::VaeDecode => "vae_decode",
            Phase::VaeEncode => "vae_encode",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An async job's or webhook's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: String,
    pub result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<CodeLabels, Counter>,
    pub request_seconds: HistogramFamily<MethodLabels>,
    pub step_seconds: HistogramFamily<PhaseLabels>,
    pub in_flight: Gauge,
    pub queue_depth: Gauge,
    pub cache: Family<CacheLabels, Counter>,
    pub load_seconds: Family<PhaseLabels, Gauge<f64, AtomicU64>>,
    pub batch_items: Histogram,
    pub threads: Family<ThreadLabels, Gauge>,
    pub lora_load_seconds: Histogram,
    pub lora_cache_bytes: Gauge,
    /// Async jobs queued in the store (all gateways'), and the oldest's age.
    pub jobs_queued: Gauge,
    pub jobs_oldest_queued_seconds: Gauge<f64, AtomicU64>,
    /// Jobs this gateway finished (completed, failed, cancelled), started
    /// (`started`, `resumed` after another gateway's) and webhooks sent.
    pub jobs: Family<OutcomeLabels, Counter>,
    pub webhooks: Family<OutcomeLabels, Counter>,
}

/// The async jobs' metrics (gateways with a job store).
#[allow(clippy::type_complexity)]
fn job_metrics(
    registry: &mut Registry,
) -> (
    Gauge,
    Gauge<f64, AtomicU64>,
    Family<OutcomeLabels, Counter>,
    Family<OutcomeLabels, Counter>,
) {
    let jobs_queued = Gauge::default();
    registry.register(
        "jobs_queued",
        "Async jobs waiting in the job store (every gateway's)",
        jobs_queued.clone(),
    );
    let jobs_oldest_queued_seconds = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "jobs_oldest_queued_seconds",
        "Age of the oldest queued async job",
        jobs_oldest_queued_seconds.clone(),
    );
    let jobs = Family::<OutcomeLabels, Counter>::default();
    registry.register(
        "jobs",
        "Async jobs this gateway started, resumed and finished, by outcome",
        jobs.clone(),
    );
    let webhooks = Family::<OutcomeLabels, Counter>::default();
    registry.register(
        "webhooks",
        "Webhook delivery attempts, by outcome",
        webhooks.clone(),
    );
    (jobs_queued, jobs_oldest_queued_seconds, jobs, webhooks)
}

impl Metrics {
    /// Metrics of one service (`service` becomes a constant label).
    pub fn new(service: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix_and_labels(
            "sd",
            [(
                std::borrow::Cow::Borrowed("service"),
                std::borrow::Cow::Owned(service.to_string()),
            )]
            .into_iter(),
        );
        let requests = Family::<CodeLabels, Counter>::default();
        let request_seconds: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        let step_seconds: HistogramFamily<PhaseLabels> =
            Family::new_with_constructor(latency_histogram);
        let in_flight = Gauge::default();
        let queue_depth = Gauge::default();
        let cache = Family::<CacheLabels, Counter>::default();
        let load_seconds = Family::<PhaseLabels, Gauge<f64, AtomicU64>>::default();
        let batch_items = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        let threads = Family::<ThreadLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests by method and gRPC status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency by method",
            request_seconds.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Latency by stage: a generation's phases (text, encode_image, denoise = one step, decode, image_encode, generation), model forwards (text_forward, unet_forward, vae_decode, vae_encode) and the UNet queue wait (unet_queue)",
            step_seconds.clone(),
        );
        registry.register("in_flight", "Requests being worked on", in_flight.clone());
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            queue_depth.clone(),
        );
        registry.register(
            "cache_requests",
            "Cache lookups by cache and result (hit/miss)",
            cache.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time to load each model component",
            load_seconds.clone(),
        );
        registry.register(
            "unet_batch_items",
            "Latents per UNet forward (dynamic batching; a guided latent counts twice)",
            batch_items.clone(),
        );
        let lora_load_seconds = latency_histogram();
        registry.register(
            "lora_load_seconds",
            "Time to read a LoRA file and fit it to the model (cache misses)",
            lora_load_seconds.clone(),
        );
        let lora_cache_bytes = Gauge::default();
        registry.register(
            "lora_cache_bytes",
            "Bytes of LoRA adapters held loaded",
            lora_cache_bytes.clone(),
        );
        registry.register(
            "model_threads",
            "A model service's forwards at once (workers) and libtorch threads (intra_op per forward, inter_op)",
            threads.clone(),
        );
        let (jobs_queued, jobs_oldest_queued_seconds, jobs, webhooks) = job_metrics(&mut registry);
        Arc::new(Metrics {
            registry,
            requests,
            request_seconds,
            step_seconds,
            in_flight,
            queue_depth,
            cache,
            load_seconds,
            batch_items,
            threads,
            lora_load_seconds,
            lora_cache_bytes,
            jobs_queued,
            jobs_oldest_queued_seconds,
            jobs,
            webhooks,
        })
    }

    /// Count an async job's or webhook's outcome.
    pub fn count(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Publish a model service's thread choice (`kind`: workers, intra_op, inter_op).
    pub fn set_threads(&self, kind: &str, n: usize) {
        self.threads
            .get_or_create(&ThreadLabels {
                kind: kind.to_string(),
            })
            .set(n as i64);
    }

    /// Count one finished request.
    pub fn record(&self, method: &str, elapsed: Duration, code: tonic::Code) {
        self.requests
            .get_or_create(&CodeLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.request_seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Time `f` and record it under `method`.
    pub async fn observe<T>(
        &self,
        method: &str,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let start = std::time::Instant::now();
        self.in_flight.inc();
        let r = f.await;
        self.in_flight.dec();
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.record(method, start.elapsed(), code);
        r
    }

    pub fn cache_lookup(&self, cache: &str, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                cache: cache.to_string(),
                result: if hit { "hit" } else { "miss" }.to_string(),
            })
            .inc();
    }

    pub fn loaded(&self, component: &str, seconds: f64) {
        self.load_seconds
            .get_or_create(&PhaseLabels {
                stage: component.to_string(),
            })
            .set(seconds);
    }

    pub fn step_batch(&self, items: f64) {
        self.batch_items.observe(items);
    }

    pub fn step(&self, stage: Phase, elapsed: Duration) {
        self.step_seconds
            .get_or_create(&PhaseLabels {
                stage: stage.as_str().to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serve `/metrics` on `addr` (printed on stdout as `metrics on ADDR`).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding metrics on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    println!("metrics on {local}");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_its_own_label_and_the_help_names_it() {
        let labels: std::collections::BTreeSet<&str> =
            Phase::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(labels.len(), Phase::ALL.len());
        let m = Metrics::new("test");
        for s in Phase::ALL {
            m.step(s, Duration::from_millis(1));
        }
        let text = m.encode();
        let help = text
            .lines()
            .find(|l| l.starts_with("# HELP sd_step_duration_seconds"))
            .unwrap_or_default()
            .to_string();
        for s in Phase::ALL {
            assert!(help.contains(s.as_str()), "help misses {s}: {help}");
            assert!(text.contains(&format!("stage=\"{s}\"")), "{s} not recorded");
        }
    }

    #[test]
    fn the_architecture_doc_lists_every_stage() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ARCHITECTURE.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        for s in Phase::ALL {
            assert!(
                doc.contains(&format!("`{s}`")),
                "docs/ARCHITECTURE.md misses `{s}`"
            );
        }
    }
}

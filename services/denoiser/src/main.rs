//! sd-denoiser: the UNet as a gRPC service. One Predict is one denoising
//! step for a batch of latents, with classifier-free guidance applied here
//! so only the guided prediction travels back.

mod batch;
mod cache;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use sd_models::{Component, ModelDir, UNet};
use sd_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use sd_proto::v1::{
    DenoiserInfo, DenoiserInfoRequest, Dtype, Embedding, PredictRequest, PredictResponse,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Stage};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_service::compute::{forward_calls, Call};
use sd_service::{from_wire, handle, status, to_wire, ModelArgs, Worker};
use tch::Tensor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::cache::EmbeddingCache;

/// Metadata key on a FAILED_PRECONDITION answer naming the embedding id to resend.
pub const EMBEDDING_MISS: &str = "sd-embedding-miss";

/// Serve a model's UNet over gRPC (sd.v1.Denoiser).
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Bytes of text embeddings kept by id (MiB).
    #[arg(long, env = "SD_EMBEDDING_CACHE_MIB", default_value_t = 256)]
    embedding_cache_mib: usize,
    /// Largest batch: latents per call, and per UNet forward when batching
    /// (a guided latent counts twice).
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 16)]
    max_batch: i64,
    /// Run each Predict on its own instead of merging concurrent ones.
    #[arg(long, env = "SD_NO_BATCHING")]
    no_batching: bool,
    /// How long a Predict may wait for others to share its UNet forward
    /// when no session is expected back (ms). 0: never wait; calls that
    /// queued while the UNet was busy still share the next forward, so
    /// batching costs nothing when the service is idle.
    #[arg(long, env = "SD_MAX_WAIT_MS", default_value_t = 0)]
    max_wait_ms: u64,
    /// How long a batch may wait for the generations expected back for
    /// their next step (callers that send a session id), so concurrent
    /// generations stay in step and share forwards; never longer than the
    /// last forward of that shape took. 0 turns it off.
    #[arg(long, env = "SD_SESSION_WAIT_MS", default_value_t = 20)]
    session_wait_ms: u64,
}

/// The gRPC service: a handle on the shared core (streams outlive a call).
struct Service(Arc<Core>);

struct Core {
    unet: Arc<UNet>,
    batcher: Option<(batch::Batcher, sd_runtime::admission::Admission)>,
    cache: Arc<Mutex<EmbeddingCache>>,
    worker: Worker,
    info: DenoiserInfo,
    max_batch: i64,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
}

/// The embeddings a stream sent in full, by id (a stream's own survive
/// cache eviction).
type Held = HashMap<String, Tensor>;

impl Core {
    /// The embedding tensor for `e`: as sent (and then cached), or held by
    /// the stream, or from the cache.
    fn embedding(
        &self,
        e: Option<&Embedding>,
        field: &str,
        held: Option<&mut Held>,
    ) -> Result<Tensor, Status> {
        let e = e.ok_or_else(|| Status::invalid_argument(format!("{field} is missing")))?;
        if e.tensor.is_none() {
            if let Some(t) = held.as_ref().and_then(|h| h.get(&e.id)) {
                self.metrics.cache_lookup("embedding", true);
                return Ok(t.shallow_clone());
            }
        }
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Status::internal("embedding cache poisoned"))?;
        match &e.tensor {
            Some(t) => {
                self.metrics.cache_lookup("embedding", false);
                let t = from_wire(Some(t), &format!("{field}.tensor"))?;
                if !e.id.is_empty() {
                    cache.insert(e.id.clone(), &t);
                    tracing::debug!(id = %e.id, cached = cache.len(), "embedding cached");
                    if let Some(h) = held {
                        h.insert(e.id.clone(), t.shallow_clone());
                    }
                }
                Ok(t)
            }
            None => cache
                .get(&e.id)
                .inspect(|_| self.metrics.cache_lookup("embedding", true))
                .ok_or_else(|| {
                    let mut s = Status::failed_precondition(format!(
                        "{field}: embedding id `{}` is not cached; resend it",
                        e.id
                    ));
                    if let Ok(v) = e.id.parse() {
                        s.metadata_mut().insert(EMBEDDING_MISS, v);
                    }
                    s
                }),
        }
    }
}

fn check_embedding(t: &Tensor, batch: i64, dim: i64, field: &str) -> Result<(), Status> {
    let s = t.size();
    if s.len() != 3 || !(s[0] == 1 || s[0] == batch) || s[1] < 1 || s[2] != dim {
        return Err(Status::invalid_argument(format!(
            "{field}: shape {s:?}, expected (1 or {batch}, tokens, {dim})"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Denoiser for Service {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let core = &self.0;
        handle(&core.lifecycle, &core.metrics, "Predict", request, |req| {
            let session = batch::Session {
                // Callers' ids keep clear of the stream sessions' high bit.
                id: req.session_id & !STREAM_BIT,
                steps_after: req.steps_after,
            };
            core.predict_inner(req, session, None)
        })
        .await
    }

    type PredictStreamStream =
        Pin<Box<dyn Stream<Item = Result<PredictResponse, Status>> + Send + 'static>>;

    async fn predict_stream(
        &self,
        request: Request<Streaming<PredictRequest>>,
    ) -> Result<Response<Self::PredictStreamStream>, Status> {
        let core = self.0.clone();
        // The stream is in flight until it ends: a drain waits for it.
        let work = core.lifecycle.begin()?;
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _work = work;
            let id = STREAM_SESSIONS.fetch_add(1, Ordering::Relaxed) | STREAM_BIT;
            let mut held = Held::new();
            loop {
                let req = match inbound.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(s) => {
                        tracing::debug!("predict stream ended: {s}");
                        break;
                    }
                };
                let span = sd_service::rpc_span("Predict");
                sd_runtime::telemetry::adopt_map(&req.trace_context, &span);
                let session = batch::Session {
                    id,
                    steps_after: req.steps_after,
                };
                let result = core
                    .metrics
                    .observe("Predict", core.predict_inner(req, session, Some(&mut held)))
                    .instrument(span)
                    .await;
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    break; // the caller went away, or the error ends the stream
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _: Request<DenoiserInfoRequest>,
    ) -> Result<Response<DenoiserInfo>, Status> {
        Ok(Response::new(self.0.info.clone()))
    }
}

/// Ids for stream sessions: the high bit set, which unary callers' own
/// `session_id`s have cleared, so the two never name the same session.
static STREAM_SESSIONS: AtomicU64 = AtomicU64::new(1);
const STREAM_BIT: u64 = 1 << 63;

impl Core {
    async fn predict_inner(
        &self,
        req: PredictRequest,
        session: batch::Session,
        mut held: Option<&mut Held>,
    ) -> Result<PredictResponse, Status> {
        let latents = from_wire(req.latents.as_ref(), "latents")?;
        let shape = latents.size();
        let c = self.info.latent_channels as i64;
        if shape.len() != 4 || shape[1] != c || shape[0] < 1 || shape[2] < 1 || shape[3] < 1 {
            return Err(Status::invalid_argument(format!(
                "latents: shape {shape:?}, expected (batch, {c}, height, width)"
            )));
        }
        let batch = shape[0];
        if batch > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "latents: batch {batch} exceeds {}",
                self.max_batch
            )));
        }
        if !(req.timesteps.len() == 1 || req.timesteps.len() as i64 == batch)
            || req.timesteps.iter().any(|t| !t.is_finite())
        {
            return Err(Status::invalid_argument(format!(
                "timesteps: {} finite values needed (or 1), got {:?}",
                batch, req.timesteps
            )));
        }
        if !req.guidance_scale.is_finite() {
            return Err(Status::invalid_argument("guidance_scale must be finite"));
        }
        let out_dtype = match Dtype::try_from(req.output_dtype) {
            Ok(Dtype::Unspecified) => Dtype::try_from(req.latents.as_ref().map_or(1, |l| l.dtype))
                .unwrap_or(Dtype::Float32),
            Ok(d) => d,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "output_dtype: unknown value {}",
                    req.output_dtype
                )))
            }
        };
        let dim = self.info.context_dim as i64;
        let cond = self.embedding(req.cond.as_ref(), "cond", held.as_deref_mut())?;
        check_embedding(&cond, batch, dim, "cond")?;
        let guided = req.uncond.is_some() && req.guidance_scale > 1.0;
        let uncond = if guided {
            let u = self.embedding(req.uncond.as_ref(), "uncond", held)?;
            check_embedding(&u, batch, dim, "uncond")?;
            if u.size()[1] != cond.size()[1] {
                return Err(Status::invalid_argument(
                    "uncond: token count differs from cond",
                ));
            }
            Some(u)
        } else {
            None
        };
        let call = Call {
            latents,
            timesteps: Tensor::from_slice(&req.timesteps),
            cond,
            uncond,
            guidance: req.guidance_scale as f64,
        };
        if let Some((batcher, admission)) = &self.batcher {
            let _slot = admission.admit().await?;
            let out = batcher.submit(call, session).await?;
            return Ok(PredictResponse {
                output: Some(to_wire(&out, out_dtype)?),
            });
        }
        let unet = self.unet.clone();
        let output = self
            .worker
            .run(Stage::UnetForward, move || {
                let out = forward_calls(&unet, &[&call]).map_err(status)?.remove(0);
                to_wire(&out, out_dtype)
            })
            .await?;
        Ok(PredictResponse {
            output: Some(output),
        })
    }
}

/// The model's prediction type, from its scheduler config (diffusers' default: epsilon).
fn prediction_type(scheduler_json: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(scheduler_json)?;
    Ok(v.get("prediction_type")
        .and_then(|p| p.as_str())
        .unwrap_or("epsilon")
        .to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (server, tls) = (args.server.clone(), args.tls.clone());
    sd_service::serve_model(
        "denoiser",
        "sd.v1.Denoiser",
        &server,
        &tls,
        move |metrics, lifecycle| load(args, metrics, lifecycle),
    )
}

/// Load the UNet and what the gateway needs to know; warm up.
fn load(
    args: Args,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) -> anyhow::Result<DenoiserServer<Service>> {
    let max = args.server.max_message_bytes();
    let placement = args.model.placement()?;
    let dir = ModelDir::open(&args.model.model)?;
    let unet = sd_service::timed_load(&metrics, "unet", || dir.load_unet(placement))?;
    let vae: sd_models::config::VaeConfig =
        sd_models::config::read_json(&dir.config_path(Component::Vae))?;
    let scheduler_path = dir.scheduler_config_path();
    let scheduler_config_json = std::fs::read_to_string(&scheduler_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let c = unet.config().clone();
    // Warm up: one forward before reporting SERVING.
    let side = c.sample_size.clamp(1, 16);
    let f = (tch::Kind::Float, tch::Device::Cpu);
    let _ = unet.forward(
        &Tensor::zeros([1, c.in_channels, side, side], f),
        &Tensor::from_slice(&[1.0f32]),
        &Tensor::zeros([1, 77, c.context_dim()], f),
    )?;
    let info = DenoiserInfo {
        model_id: sd_service::model_id(
            &dir,
            &[Component::TextEncoder, Component::Unet, Component::Vae],
        ),
        model_name: dir
            .root()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        latent_channels: c.in_channels as u32,
        vae_scale_factor: vae.scale_factor() as u32,
        sample_size: c.sample_size as u32,
        prediction_type: prediction_type(&scheduler_config_json)
            .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?,
        scheduler_config_json,
        context_dim: c.context_dim() as u32,
    };
    tracing::info!(model = %info.model_id, "denoiser ready");
    let unet = Arc::new(unet);
    let batcher = if args.no_batching {
        None
    } else {
        let config = batch::BatchConfig {
            max_items: args.max_batch,
            max_wait: std::time::Duration::from_millis(args.max_wait_ms),
            session_wait: std::time::Duration::from_millis(args.session_wait_ms),
            workers: args.model.concurrency.max(1),
        };
        let admission = sd_runtime::admission::Admission::new(
            "denoiser",
            (args.max_batch as usize).max(1) * 2,
            args.model.max_queue,
        );
        Some((
            batch::Batcher::start(unet.clone(), config, metrics.clone())?,
            admission,
        ))
    };
    let service = Service(Arc::new(Core {
        unet,
        batcher,
        cache: Arc::new(Mutex::new(EmbeddingCache::new(
            args.embedding_cache_mib << 20,
        ))),
        worker: Worker::new(&args.model, metrics.clone()),
        info,
        max_batch: args.max_batch,
        lifecycle,
        metrics,
    }));
    Ok(DenoiserServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

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
    Tensor as WireTensor,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Stage};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_sampling::{Prediction, SchedulerConfig};
use sd_service::compute::{forward_calls, Call};
use sd_service::{from_wire, handle, to_wire, ModelArgs, ServiceError, Timings, Worker};
use tch::Tensor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::Session;
use crate::cache::EmbeddingCache;

/// Longest embedding id kept (the gateway's are 36 bytes): an id travels
/// back in the details of an embedding miss, so it must stay small.
const MAX_EMBEDDING_ID_BYTES: usize = 128;

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

#[tonic::async_trait]
impl Denoiser for Service {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let core = &self.0;
        handle(&core.lifecycle, &core.metrics, "Predict", request, |req| {
            let session = Session::caller(req.session_id, req.steps_after);
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
            let id = STREAM_SESSIONS.fetch_add(1, Ordering::Relaxed);
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
                let session = Session::stream(id, req.steps_after);
                let work = core.predict_inner(req, session, Some(&mut held));
                let result = sd_service::answer(&core.metrics, "Predict", span, work).await;
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

/// Ids of stream sessions (`SessionKey::Stream`), one per stream.
static STREAM_SESSIONS: AtomicU64 = AtomicU64::new(1);

impl Core {
    /// One step: check the request, resolve its embeddings, run the UNet
    /// (batched or alone) and answer in the asked dtype.
    async fn predict_inner(
        &self,
        req: PredictRequest,
        session: Session,
        held: Option<&mut Held>,
    ) -> Result<PredictResponse, ServiceError> {
        let latents = self.checked_latents(req.latents.as_ref())?;
        let batch = latents.size()[0];
        let timesteps = checked_timesteps(&req.timesteps, batch)?;
        let guidance = checked_guidance(req.guidance_scale)?;
        let out_dtype = output_dtype(&req)?;
        let (cond, uncond) = self.conditioning(&req, batch, held)?;
        let call = Call {
            latents,
            timesteps,
            cond,
            uncond,
            guidance,
        };
        let (output, timings) = self.forward(call, session, out_dtype).await?;
        timings.record(&tracing::Span::current());
        self.metrics.step(Stage::UnetQueue, timings.queue);
        Ok(PredictResponse {
            output: Some(output),
        })
    }

    /// The latents, (1..=max_batch, latent channels, h >= 1, w >= 1).
    fn checked_latents(&self, t: Option<&WireTensor>) -> Result<Tensor, ServiceError> {
        let latents = from_wire(t, "latents")?;
        let s = latents.size();
        let c = self.info.latent_channels as i64;
        if s.len() != 4 || s[1] != c || s[0] < 1 || s[2] < 1 || s[3] < 1 {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("shape {s:?}, expected (batch, {c}, height, width)"),
            ));
        }
        if s[0] > self.max_batch {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("batch {} exceeds {}", s[0], self.max_batch),
            ));
        }
        Ok(latents)
    }

    /// The text conditioning: cond, and uncond when guided (guidance > 1
    /// and an uncond sent), each (1 or batch, tokens, context dim), with
    /// the same tokens.
    fn conditioning(
        &self,
        req: &PredictRequest,
        batch: i64,
        mut held: Option<&mut Held>,
    ) -> Result<(Tensor, Option<Tensor>), ServiceError> {
        let dim = self.info.context_dim as i64;
        let cond = self.embedding(req.cond.as_ref(), "cond", held.as_deref_mut())?;
        check_embedding(&cond, batch, dim, "cond")?;
        if !(req.uncond.is_some() && req.guidance_scale > 1.0) {
            return Ok((cond, None));
        }
        let uncond = self.embedding(req.uncond.as_ref(), "uncond", held)?;
        check_embedding(&uncond, batch, dim, "uncond")?;
        if uncond.size()[1] != cond.size()[1] {
            return Err(ServiceError::invalid(
                "uncond",
                "token count differs from cond",
            ));
        }
        Ok((cond, Some(uncond)))
    }

    /// The embedding tensor for `e`: as sent (and then cached), or held by
    /// the stream, or from the cache.
    fn embedding(
        &self,
        e: Option<&Embedding>,
        field: &str,
        held: Option<&mut Held>,
    ) -> Result<Tensor, ServiceError> {
        let e = e.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
        check_embedding_id(e, field)?;
        if e.tensor.is_none() {
            if let Some(t) = held.as_ref().and_then(|h| h.get(&e.id)) {
                self.metrics.cache_lookup("embedding", true);
                return Ok(t.shallow_clone());
            }
        }
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        let Some(wire) = &e.tensor else {
            return cache
                .get(&e.id)
                .inspect(|_| self.metrics.cache_lookup("embedding", true))
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                });
        };
        self.metrics.cache_lookup("embedding", false);
        let t = from_wire(Some(wire), &format!("{field}.tensor"))?;
        if !e.id.is_empty() {
            cache.insert(e.id.clone(), &t);
            tracing::debug!(id = %sd_proto::status::quote(&e.id), cached = cache.len(), "embedding cached");
            if let Some(h) = held {
                h.insert(e.id.clone(), t.shallow_clone());
            }
        }
        Ok(t)
    }

    /// Run the call through the batcher, or alone on a worker; its output
    /// on the wire and its timings.
    async fn forward(
        &self,
        call: Call,
        session: Session,
        out_dtype: Dtype,
    ) -> Result<(WireTensor, Timings), ServiceError> {
        if let Some((batcher, admission)) = &self.batcher {
            let _slot = admission.admit().await?;
            let (out, timings) = batcher.submit(call, session).await?;
            return Ok((to_wire(&out, out_dtype)?, timings));
        }
        let unet = self.unet.clone();
        self.worker
            .run_timed(Stage::UnetForward, move || {
                let out = forward_calls(&unet, &[&call])?.remove(0);
                to_wire(&out, out_dtype)
            })
            .await
    }
}

/// An embedding names a short id, or sends its tensor, or both.
fn check_embedding_id(e: &Embedding, field: &str) -> Result<(), ServiceError> {
    if e.id.len() > MAX_EMBEDDING_ID_BYTES {
        return Err(ServiceError::invalid(
            format!("{field}.id"),
            format_args!("{} bytes, at most {MAX_EMBEDDING_ID_BYTES}", e.id.len()),
        ));
    }
    if e.id.is_empty() && e.tensor.is_none() {
        return Err(ServiceError::invalid(field, "neither an id nor a tensor"));
    }
    Ok(())
}

fn check_embedding(t: &Tensor, batch: i64, dim: i64, field: &str) -> Result<(), ServiceError> {
    let s = t.size();
    if s.len() != 3 || !(s[0] == 1 || s[0] == batch) || s[1] < 1 || s[2] != dim {
        return Err(ServiceError::invalid(
            field,
            format_args!("shape {s:?}, expected (1 or {batch}, tokens, {dim})"),
        ));
    }
    Ok(())
}

/// One finite timestep per latent, or one for all.
fn checked_timesteps(timesteps: &[f32], batch: i64) -> Result<Tensor, ServiceError> {
    if !(timesteps.len() == 1 || timesteps.len() as i64 == batch) {
        return Err(ServiceError::invalid(
            "timesteps",
            format_args!("{} values given, 1 or {batch} needed", timesteps.len()),
        ));
    }
    if let Some(i) = timesteps.iter().position(|t| !t.is_finite()) {
        return Err(ServiceError::invalid(
            "timesteps",
            format_args!("value {i} is {}, finite values needed", timesteps[i]),
        ));
    }
    Ok(Tensor::from_slice(timesteps))
}

fn checked_guidance(scale: f32) -> Result<f64, ServiceError> {
    if !scale.is_finite() {
        return Err(ServiceError::invalid("guidance_scale", "must be finite"));
    }
    Ok(scale as f64)
}

/// The dtype to answer in: as asked, or (unspecified) the latents' own.
fn output_dtype(req: &PredictRequest) -> Result<Dtype, ServiceError> {
    match Dtype::try_from(req.output_dtype) {
        Ok(Dtype::Unspecified) => {
            Ok(Dtype::try_from(req.latents.as_ref().map_or(1, |l| l.dtype))
                .unwrap_or(Dtype::Float32))
        }
        Ok(d) => Ok(d),
        Err(_) => Err(ServiceError::invalid(
            "output_dtype",
            format_args!("unknown value {}", req.output_dtype),
        )),
    }
}

/// The model's prediction type, from its scheduler config (diffusers' default: epsilon).
fn prediction_type(scheduler_json: &str) -> anyhow::Result<Prediction> {
    Ok(SchedulerConfig::from_json(scheduler_json)?.prediction()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (server, tls) = (args.server.clone(), args.tls.clone());
    sd_service::serve_model(
        sd_proto::Stage::Denoiser,
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
            .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?
            .as_str()
            .to_string(),
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

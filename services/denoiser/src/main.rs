//! sd-denoiser: the UNet as a gRPC service. One Predict is one denoising
//! step for a batch of latents, with classifier-free guidance applied here
//! so only the guided prediction travels back.

mod batch;
mod cache;
mod checks;
mod cost;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use sd_models::lora::Applied;
use sd_models::{Component, UNet};
use sd_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use sd_proto::v1::{
    DenoiserInfo, DenoiserInfoRequest, Dtype, Embedding, ListLorasRequest, ListLorasResponse,
    LoraRef, PredictRequest, PredictResponse, Tensor as WireTensor,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Stage};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_sampling::{Prediction, SchedulerConfig};
use sd_service::compute::{forward_calls, Call, XlConditioning};
use sd_service::lora::{LoraArgs, LoraStore};
use sd_service::{from_wire, handle, to_wire, ModelArgs, ServiceError, Timings, Worker};
use tch::Tensor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::Session;
use crate::cache::{Cond, EmbeddingCache, Held, HeldBudget};
use crate::checks::Bounds;

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
    #[command(flatten)]
    lora: LoraArgs,
    /// Bytes of text embeddings kept by id (MiB), ids and bookkeeping
    /// counted; also what all step streams together may hold (at least
    /// 16 MiB).
    #[arg(long, env = "SD_EMBEDDING_CACHE_MIB", default_value_t = 256)]
    embedding_cache_mib: usize,
    /// Largest image side in pixels: latents may be this over the VAE's
    /// scale factor per side.
    #[arg(long, env = "SD_MAX_SIDE", default_value_t = 2048)]
    max_side: i64,
    /// Largest batch: latents per call, and per UNet forward when batching
    /// (a guided latent counts twice).
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 16)]
    max_batch: i64,
    /// Seconds to spend at start measuring what a UNet forward costs on
    /// this device (published in Info; the gateway admits by it). 0: one
    /// warm-up forward, no cost published.
    #[arg(long, env = "SD_CALIBRATION_SECONDS", default_value_t = 10.0)]
    calibration_seconds: f64,
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
    /// What all streams together may hold: the cache's bound, at least
    /// [`cache::MIN_HELD_BYTES`].
    held: HeldBudget,
    worker: Worker,
    info: DenoiserInfo,
    /// What a forward costs, kept current (None: not measured).
    cost: Option<Arc<cost::LiveCost>>,
    bounds: Bounds,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    /// LoRA adapters (--lora-dir), fitted to the UNet.
    loras: Arc<LoraStore>,
}

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
            let mut held = Held::new(core.held.clone());
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
                let answer = sd_service::answer(&core.metrics, "Predict", span, work);
                // A caller gone mid-step takes its step with it: dropping the
                // work drops its place in the batcher's queue.
                let result = tokio::select! {
                    r = answer => r,
                    () = tx.closed() => break,
                };
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
        let mut info = self.0.info.clone();
        info.cost = self.0.cost.as_ref().map(|c| c.snapshot());
        Ok(Response::new(info))
    }

    async fn list_loras(
        &self,
        request: Request<ListLorasRequest>,
    ) -> Result<Response<ListLorasResponse>, Status> {
        let core = &self.0;
        let req = request.into_inner();
        core.loras(&req.check).await.map_err(Status::from)?;
        let store = core.loras.clone();
        // A check (every generation with LoRAs asks one) lists the checked
        // adapters alone: no scan of a folder that may hold thousands.
        let loras = tokio::task::spawn_blocking(move || {
            if req.check.is_empty() {
                store.list()
            } else {
                Ok(store.infos(&req.check))
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)?;
        Ok(Response::new(ListLorasResponse { loras }))
    }
}

/// Ids of stream sessions (`SessionKey::Stream`), one per stream.
static STREAM_SESSIONS: AtomicU64 = AtomicU64::new(1);

impl Core {
    /// The adapters a request names: those found on disk in the last
    /// second at once (every step of a generation names them), else looked
    /// at (and loaded on a cache miss) off the async threads.
    async fn loras(&self, refs: &[LoraRef]) -> Result<Arc<[Applied]>, ServiceError> {
        if refs.is_empty() {
            return Ok(Arc::from(Vec::new()));
        }
        if let Some(set) = self.loras.resolve_recent(refs)? {
            return Ok(set);
        }
        let (store, refs) = (self.loras.clone(), refs.to_vec());
        tokio::task::spawn_blocking(move || store.resolve(&refs))
            .await
            .map_err(|e| ServiceError::Task(e.to_string()))?
    }

    /// One step: check the request, resolve its embeddings, run the UNet
    /// (batched or alone) and answer in the asked dtype.
    async fn predict_inner(
        &self,
        req: PredictRequest,
        session: Session,
        held: Option<&mut Held>,
    ) -> Result<PredictResponse, ServiceError> {
        let latents = self.bounds.latents(req.latents.as_ref())?;
        let batch = latents.size()[0];
        let timesteps = self.bounds.timesteps(&req.timesteps, batch)?;
        let guidance = checks::guidance(req.guidance_scale)?;
        let out_dtype = checks::output_dtype(&req)?;
        let (cond, uncond) = self.conditioning(&req, batch, held)?;
        let xl = match (
            cond.pooled,
            self.bounds
                .time_ids(req.time_ids.as_ref(), batch, "time_ids")?,
        ) {
            (Some(cond_pooled), Some(time_ids)) => {
                let negative_time_ids = self
                    .bounds
                    .time_ids(req.negative_time_ids.as_ref(), batch, "negative_time_ids")?
                    .unwrap_or_else(|| time_ids.shallow_clone());
                Some(XlConditioning {
                    cond_pooled,
                    uncond_pooled: uncond
                        .as_ref()
                        .and_then(|u| u.pooled.as_ref().map(Tensor::shallow_clone)),
                    time_ids,
                    negative_time_ids,
                })
            }
            (Some(_), None) => {
                return Err(ServiceError::invalid(
                    "time_ids",
                    "missing: an SDXL-family model needs the size and crop conditioning",
                ))
            }
            (None, _) => None,
        };
        let call = Call {
            latents,
            timesteps,
            cond: cond.hidden,
            uncond: uncond.map(|u| u.hidden),
            guidance,
            xl,
            loras: self.loras(&req.loras).await?,
        };
        let (output, timings) = self.forward(call, session, out_dtype).await?;
        timings.record(&tracing::Span::current());
        self.metrics.step(Stage::UnetQueue, timings.queue);
        Ok(PredictResponse {
            output: Some(output),
        })
    }

    /// The text conditioning: cond, and uncond when guided (guidance > 1
    /// and an uncond sent), each (1 or batch, tokens, context dim), with
    /// the same tokens, and their pooled embeddings for SDXL models. An
    /// LCM UNet takes the guidance as an embedding: no uncond.
    fn conditioning(
        &self,
        req: &PredictRequest,
        batch: i64,
        mut held: Option<&mut Held>,
    ) -> Result<(Cond, Option<Cond>), ServiceError> {
        let cond = self.embedding(req.cond.as_ref(), "cond", batch, held.as_deref_mut())?;
        if !(req.uncond.is_some() && req.guidance_scale > 1.0) {
            return Ok((cond, None));
        }
        if self.info.time_cond_dim > 0 {
            return Err(ServiceError::invalid(
                "uncond",
                "this LCM UNet takes guidance_scale as an embedding, with no unconditional branch: send no uncond",
            ));
        }
        // A cond and uncond of different token counts (AUTOMATIC1111's
        // chunked prompts) each condition their own half of the guidance.
        let uncond = self.embedding(req.uncond.as_ref(), "uncond", batch, held)?;
        Ok((cond, Some(uncond)))
    }

    /// The embedding (and pooled embedding) for `e`, checked for a batch
    /// of `batch`: as sent (checked in full, then cached and held by the
    /// stream), or held by the stream, or from the cache.
    fn embedding(
        &self,
        e: Option<&Embedding>,
        field: &str,
        batch: i64,
        held: Option<&mut Held>,
    ) -> Result<Cond, ServiceError> {
        let e = e.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
        checks::embedding_id(e, field)?;
        let checked = |c: Cond| -> Result<Cond, ServiceError> {
            self.bounds.embedding(&c.hidden, batch, field)?;
            if let Some(p) = &c.pooled {
                self.bounds
                    .pooled_fits(p, batch, &format!("{field}.pooled"))?;
            }
            Ok(c)
        };
        if e.tensor.is_none() {
            if let Some(c) = held.as_ref().and_then(|h| h.get(&e.id)) {
                self.metrics.cache_lookup("embedding", true);
                return checked(c);
            }
        }
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        let Some(wire) = &e.tensor else {
            let c = cache
                .get(&e.id)
                .inspect(|_| self.metrics.cache_lookup("embedding", true))
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                })?;
            return checked(c);
        };
        self.metrics.cache_lookup("embedding", false);
        // Checked in full before it is kept.
        let hidden = from_wire(Some(wire), &format!("{field}.tensor"))?;
        self.bounds.embedding(&hidden, batch, field)?;
        sd_service::finite(&hidden, &format!("{field}.tensor"))?;
        let c = Cond {
            hidden,
            pooled: self.bounds.pooled(e.pooled.as_ref(), batch, field)?,
        };
        if !e.id.is_empty() {
            if let Some(h) = held {
                h.hold(&e.id, &c, field)?;
            }
            cache.insert(e.id.clone(), &c);
            tracing::debug!(id = %sd_proto::status::quote(&e.id), cached = cache.len(), "embedding cached");
        }
        Ok(c)
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
        let (positions, rows) = (call.positions(), call.rows());
        let (out, timings) = self
            .worker
            .run_timed(Stage::UnetForward, move || {
                let out = forward_calls(&unet, &[&call])?.remove(0);
                to_wire(&out, out_dtype)
            })
            .await?;
        if let Some(cost) = &self.cost {
            cost.observe(positions, rows, timings.forward);
        }
        Ok((out, timings))
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

/// One forward before serving; with a calibration budget, the measured
/// cost of a forward (which starts with one).
fn warm_up(
    unet: &UNet,
    args: &Args,
    scale_factor: i64,
) -> anyhow::Result<Option<sd_proto::v1::UnetCost>> {
    let budget = cost::Budget {
        time: std::time::Duration::from_secs_f64(args.calibration_seconds.clamp(0.0, 3600.0)),
        max_side: args.max_side / scale_factor.max(1),
    };
    if budget.time.is_zero() {
        let c = unet.config();
        let side = c.sample_size.clamp(1, 16);
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let _ = unet.forward_probe(
            &Tensor::zeros([1, c.in_channels, side, side], f),
            &Tensor::from_slice(&[1.0f32]),
            &Tensor::zeros([1, 77, c.context_dim()], f),
        )?;
        return Ok(None);
    }
    Ok(Some(cost::measure(unet, budget)?))
}

/// Load the UNet and what the gateway needs to know; warm up.
fn load(
    args: Args,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) -> anyhow::Result<DenoiserServer<Service>> {
    let max = args.server.max_message_bytes();
    let placement = args.model.placement()?;
    let dir = args.model.model_dir()?;
    let unet = sd_service::timed_load(&metrics, "unet", || dir.load_unet(placement))?;
    let vae: sd_models::config::VaeConfig =
        sd_models::config::read_json(&dir.config_path(Component::Vae))?;
    let scheduler_path = dir.scheduler_config_path();
    let scheduler_config_json = std::fs::read_to_string(&scheduler_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let scheduler = SchedulerConfig::from_json(&scheduler_config_json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let c = unet.config().clone();
    let threads = args.model.apply_threads(
        sd_service::machine::Role::Denoiser {
            unet_parameters: unet.parameters(),
        },
        &metrics,
    );
    let family = sd_service::family::Family::of(&dir, &unet)?;
    let loras = Arc::new(LoraStore::new(
        &args.lora,
        unet.modules().clone(),
        dir.unet_layers_per_block()?,
        placement,
        metrics.clone(),
    )?);
    // Warm up (measuring the cost, unless told not to) before SERVING.
    let cost = warm_up(&unet, &args, vae.scale_factor() as i64)?;
    let info = DenoiserInfo {
        model_id: sd_service::model_id(&dir, family.components()),
        model_name: dir.name(),
        latent_channels: c.in_channels as u32,
        vae_scale_factor: vae.scale_factor() as u32,
        sample_size: c.sample_size as u32,
        prediction_type: prediction_type(&scheduler_config_json)
            .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?
            .as_str()
            .to_string(),
        scheduler_config_json,
        context_dim: c.context_dim() as u32,
        cost,
        pooled_dim: family.pooled_dim as u32,
        time_ids_len: family.time_ids_len as u32,
        time_cond_dim: c.time_cond_proj_dim.unwrap_or(0).max(0) as u32,
        force_zeros_for_empty_prompt: family.force_zeros,
        requires_aesthetics_score: family.requires_aesthetics,
        default_guidance: family.default_guidance,
        default_steps: family.default_steps,
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
            workers: threads.workers,
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
    let cache_bytes = args.embedding_cache_mib << 20;
    let live_cost = info.cost.clone().map(|c| Arc::new(cost::LiveCost::new(c)));
    if let (Some((batcher, _)), Some(c)) = (&batcher, &live_cost) {
        batcher.observe(c.clone());
    }
    let service = Service(Arc::new(Core {
        unet,
        batcher,
        cache: Arc::new(Mutex::new(EmbeddingCache::new(cache_bytes))),
        held: HeldBudget::new(cache_bytes.max(cache::MIN_HELD_BYTES)),
        cost: live_cost,
        loras,
        worker: Worker::new(threads.workers, args.model.max_queue, metrics.clone()),
        bounds: Bounds {
            latent_channels: info.latent_channels as i64,
            context_dim: info.context_dim as i64,
            max_batch: args.max_batch,
            max_latent_side: args.max_side / i64::from(info.vae_scale_factor.max(1)),
            max_timestep: scheduler.num_train_timesteps() as f32,
            xl: (family.pooled_dim > 0).then_some((family.pooled_dim, family.time_ids_len)),
        },
        info,
        lifecycle,
        metrics,
    }));
    Ok(DenoiserServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

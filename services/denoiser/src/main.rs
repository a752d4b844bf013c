//! sd-denoiser: the model's denoising network (a [`Denoiser`]: the UNet for
//! the SD families) as a gRPC service. One Predict is one denoising step
//! for a batch of latents, with classifier-free guidance applied here so
//! only the guided prediction travels back.

mod batch;
mod cache;
mod cost;
mod load;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use sd_models::lora::Applied;
use sd_models::Denoiser;
use sd_proto::v1::denoiser_server::Denoiser as DenoiserRpc;
use sd_proto::v1::{
    DenoiserInfo, DenoiserInfoRequest, Dtype, Embedding, ListControlNetsRequest,
    ListControlNetsResponse, ListIpAdaptersRequest, ListIpAdaptersResponse, ListLorasRequest,
    ListLorasResponse, LoraRef, PredictRequest, PredictResponse, SessionTensor,
    Tensor as WireTensor,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Phase};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_service::compute::{forward_calls, Call};
use sd_service::control::{ControlArgs, ControlStore};
use sd_service::ip::{IpArgs, IpStore};
use sd_service::lora::{LoraArgs, LoraStore};
use sd_service::step::{Bounds, Cond, Resolver, Step};
use sd_service::{handle, to_wire, ModelArgs, ServiceError, Timings, Worker};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::Session;
use crate::cache::{EmbeddingCache, Held, HeldBudget};

/// Serve a model's denoising network over gRPC (sd.v1.Denoiser).
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
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    ip: IpArgs,
    /// FLUX: serve this transformer file instead of the model's own (BFL's
    /// layout as downloaded, ComfyUI's prefixed one, or diffusers' names;
    /// bf16, fp16, fp32 or fp8 e4m3/e5m2, upcast to --precision at load).
    #[arg(long, env = "SD_TRANSFORMER")]
    transformer: Option<std::path::PathBuf>,
    /// FLUX.1 and FLUX.2 Klein: keep the transformer blocks' linear weights
    /// in fp8 e4m3 with one scale per tensor (half bf16's memory): `upcast`
    /// computes each layer in --precision from them, `scaled` with scaled
    /// fp8 matrix products (the activations quantized per call; Hopper's
    /// fp8 tensor cores); `off` keeps them as loaded.
    #[arg(long, env = "SD_FP8", default_value = "off")]
    fp8: sd_models::Fp8,
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
    net: Arc<Denoiser>,
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
    /// LoRA adapters (--lora-dir), fitted to the network.
    loras: Arc<LoraStore>,
    /// ControlNets (--controlnet-dir).
    controls: Arc<ControlStore>,
    /// IP-Adapters (--ip-adapter-dir).
    ip_adapters: Arc<IpStore>,
}

#[tonic::async_trait]
impl DenoiserRpc for Service {
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

    async fn list_control_nets(
        &self,
        request: Request<ListControlNetsRequest>,
    ) -> Result<Response<ListControlNetsResponse>, Status> {
        let store = self.0.controls.clone();
        let req = request.into_inner();
        let controlnets = tokio::task::spawn_blocking(move || {
            if req.check.is_empty() {
                return Ok(store
                    .list()?
                    .into_iter()
                    .map(sd_service::control::info)
                    .collect());
            }
            req.check
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    // Named as the request's unit, which the gateway checks.
                    let field = format!("controlnets[{i}].name");
                    store.get(name, &field)?;
                    store
                        .info(name)
                        .map(sd_service::control::info)
                        .ok_or_else(|| ServiceError::invalid(field, "gone from the folder"))
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)?;
        Ok(Response::new(ListControlNetsResponse { controlnets }))
    }

    async fn list_ip_adapters(
        &self,
        request: Request<ListIpAdaptersRequest>,
    ) -> Result<Response<ListIpAdaptersResponse>, Status> {
        let store = self.0.ip_adapters.clone();
        let req = request.into_inner();
        let ip_adapters = tokio::task::spawn_blocking(move || {
            if req.check.is_empty() {
                return Ok(store
                    .list()?
                    .into_iter()
                    .map(sd_service::ip::info)
                    .collect());
            }
            req.check
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let field = format!("ip_adapters[{i}].name");
                    store.get(name, &field)?;
                    store
                        .info(name)
                        .map(sd_service::ip::info)
                        .ok_or_else(|| ServiceError::invalid(field, "gone from the folder"))
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)?;
        Ok(Response::new(ListIpAdaptersResponse { ip_adapters }))
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

    /// One step: check the request, resolve its embeddings, run the
    /// network (batched or alone) and answer in the asked dtype.
    async fn predict_inner(
        &self,
        req: PredictRequest,
        session: Session,
        held: Option<&mut Held>,
    ) -> Result<PredictResponse, ServiceError> {
        let mut source = Source { core: self, held };
        let Step {
            mut call,
            out_dtype,
            controls,
            ip,
        } = Step::decode(&req, &self.bounds, &mut source)?;
        if !ip.is_empty() {
            let store = self.ip_adapters.clone();
            call.ip = if sd_service::ip::needs_blocking(&ip, &store) {
                tokio::task::spawn_blocking(move || sd_service::ip::resolve(ip, &store))
                    .await
                    .map_err(|e| ServiceError::Task(e.to_string()))??
            } else {
                sd_service::ip::resolve(ip, &store)?
            };
        }
        if !controls.is_empty() {
            let store = self.controls.clone();
            let (resolved, keeps) = if sd_service::control::needs_blocking(&controls, &store) {
                tokio::task::spawn_blocking(move || sd_service::control::resolve(controls, &store))
                    .await
                    .map_err(|e| ServiceError::Task(e.to_string()))??
            } else {
                sd_service::control::resolve(controls, &store)?
            };
            // The stream holds each hint's embedding in its image's place.
            for (id, t, field) in keeps {
                source.keep(&id, &t, &field)?;
            }
            call.controls = resolved;
        }
        call.loras = self.loras(&req.loras).await?;
        let (output, timings) = self.forward(call, session, out_dtype).await?;
        timings.record(&tracing::Span::current());
        self.metrics.step(Phase::UnetQueue, timings.queue);
        Ok(PredictResponse {
            output: Some(output),
        })
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
        let net = self.net.clone();
        let (positions, rows) = (call.positions(), call.rows());
        let share = rows as f64 / (rows as f64 + call.control_rows());
        let (out, timings) = self
            .worker
            .run_timed(Phase::UnetForward, move || {
                let out = forward_calls(&net, &[&call])?.remove(0);
                to_wire(&out, out_dtype)
            })
            .await?;
        if let Some(cost) = &self.cost {
            cost.observe(positions, rows, timings.forward.mul_f64(share));
        }
        Ok((out, timings))
    }
}

/// A step's embeddings: sent in full (checked, then cached and held by the
/// stream), or held by the stream, or from the cache; its session tensors:
/// sent (held by the stream once checked), or held by the stream.
struct Source<'a> {
    core: &'a Core,
    held: Option<&'a mut Held>,
}

impl Resolver for Source<'_> {
    fn embedding(&mut self, e: &Embedding, field: &str, batch: i64) -> Result<Cond, ServiceError> {
        let core = self.core;
        if e.tensor.is_none() {
            if let Some(c) = self.held.as_ref().and_then(|h| h.get(&e.id)) {
                core.metrics.cache_lookup("embedding", true);
                return Ok(c);
            }
        }
        let mut cache = core
            .cache
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        if e.tensor.is_none() {
            return cache
                .get(&e.id)
                .inspect(|_| core.metrics.cache_lookup("embedding", true))
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                });
        }
        core.metrics.cache_lookup("embedding", false);
        // Checked in full before it is kept.
        let c = core.bounds.sent(e, field, batch)?;
        if !e.id.is_empty() {
            if let Some(h) = self.held.as_deref_mut() {
                h.hold(&e.id, &c, field)?;
            }
            cache.insert(e.id.clone(), &c);
            tracing::debug!(id = %sd_proto::status::quote(&e.id), cached = cache.len(), "embedding cached");
        }
        Ok(c)
    }

    fn tensor(&mut self, t: &SessionTensor, field: &str) -> Result<tch::Tensor, ServiceError> {
        if t.tensor.is_some() {
            return sd_service::from_wire(t.tensor.as_ref(), &format!("{field}.tensor"));
        }
        self.held
            .as_ref()
            .and_then(|h| h.tensor(&t.id))
            .ok_or_else(|| ServiceError::EmbeddingMiss {
                field: field.to_string(),
                id: t.id.clone(),
            })
    }

    fn keep(&mut self, id: &str, t: &tch::Tensor, field: &str) -> Result<(), ServiceError> {
        match self.held.as_deref_mut() {
            Some(h) => h.hold_tensor(id, t, field),
            // A unary caller sends its session tensors every time.
            None => Ok(()),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (server, tls) = (args.server.clone(), args.tls.clone());
    sd_service::serve_model(
        sd_proto::Stage::Denoiser,
        &server,
        &tls,
        move |metrics, lifecycle| load::load(args, metrics, lifecycle),
    )
}

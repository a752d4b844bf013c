//! Shared by the text-encoder, denoiser and autoencoder services.

pub mod compute;
pub mod error;
pub mod family;
pub mod lora;
pub mod machine;
pub mod step;
pub mod text;
pub mod threads;

pub use error::ServiceError;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_models::{DeviceSpec, Placement, Precision};
use sd_proto::v1::{Dtype, Tensor as WireTensor};
use sd_runtime::admission::Admission;
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Stage};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use tch::{Kind, Tensor};
use tonic::Status;

/// Flags for the model a service loads and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a directory in the diffusers layout, or a single-file
    /// checkpoint (`.safetensors`, original CompVis/Stability layout) of SD
    /// 1.x, SD 2.x, SDXL base or refiner, recognised from its keys.
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// For a single-file checkpoint: a diffusers model directory whose
    /// configs, tokenizers and scheduler describe it (its weights are not
    /// read), in place of the recognised family's standard configs.
    #[arg(long, env = "SD_MODEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision: fp32 or bf16 on a CPU (bf16 about twice as fast where the
    /// CPU has AVX512-BF16 or AMX), fp16 or bf16 on CUDA.
    #[arg(long, env = "SD_PRECISION", default_value = "fp32")]
    pub precision: Precision,
    /// Forward passes run at once, each on its own thread with libtorch's
    /// intra-op threads (the denoiser: UNet workers, each taking batches).
    /// Unset: from the machine (see `machine`: one on a GPU; on a CPU one,
    /// or one per core for a denoiser with a small UNet).
    #[arg(long, env = "SD_MODEL_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Calls that may wait for a forward pass; beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MODEL_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// libtorch intra-op threads per forward (0: from the machine — the
    /// cores this process may use, divided between the workers; at most 4
    /// on a GPU).
    #[arg(long, env = "SD_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,
    /// libtorch inter-op threads (0: from the machine, 1: the services'
    /// eager forwards never use more).
    #[arg(long, env = "SD_INTEROP_THREADS", default_value_t = 0)]
    pub interop_threads: usize,
    /// Wait this long before loading (exercises start-up health in tests).
    #[arg(long, env = "SD_LOAD_DELAY_MS", default_value_t = 0, hide = true)]
    pub load_delay_ms: u64,
}

impl ModelArgs {
    /// The model to serve, as `--model` and `--config` name it.
    pub fn model_dir(&self) -> sd_models::Result<sd_models::ModelDir> {
        sd_models::ModelDir::open_with_config(&self.model, self.config.as_deref())
    }

    /// The placement to load to (after the optional start-up delay).
    pub fn placement(&self) -> anyhow::Result<Placement> {
        if self.load_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.load_delay_ms));
        }
        let placement = Placement::new(self.device, self.precision)?;
        if placement.device == tch::Device::Cpu && self.precision == Precision::Bf16 {
            warn_without_native_bf16();
        }
        Ok(placement)
    }
}

impl ModelArgs {
    /// Workers and libtorch threads for `role` on this machine, the flags
    /// on top of [`machine::rule`].
    pub fn threads(&self, role: machine::Role) -> machine::Threads {
        let given = |n: usize| (n > 0).then_some(n);
        machine::choose(
            role,
            self.device,
            machine::available_cores(),
            machine::Overrides {
                workers: self.concurrency.and_then(given),
                intra_op: given(self.torch_threads),
                inter_op: given(self.interop_threads),
            },
        )
    }

    /// Choose the threads for `role`, set libtorch's to them and publish
    /// them (`sd_model_threads`); call once, before the first forward.
    pub fn apply_threads(&self, role: machine::Role, metrics: &Metrics) -> machine::Threads {
        let t = self.threads(role);
        metrics.set_threads("workers", t.workers);
        metrics.set_threads("intra_op", t.intra_op);
        metrics.set_threads("inter_op", t.inter_op);
        tch::set_num_threads(t.intra_op as i32);
        // libtorch refuses a second setting (or one after its pool
        // started); the first call per process is this one.
        if tch::get_num_interop_threads() != t.inter_op as i32 {
            tch::set_num_interop_threads(t.inter_op as i32);
        }
        tracing::info!(
            cores = machine::available_cores(),
            "{t} ({})",
            if self.concurrency.is_some() || self.torch_threads > 0 || self.interop_threads > 0 {
                "flags over the machine's rule"
            } else {
                "the machine's rule"
            }
        );
        t
    }
}

/// bf16 on a CPU without native bf16 runs (oneDNN converts to fp32 and
/// back), but slower than fp32: say so at start rather than refuse.
fn warn_without_native_bf16() {
    match sd_models::device::cpu_has_native_bf16() {
        Some(true) => tracing::info!("bf16 on a CPU with native bf16 (AVX512-BF16 or AMX)"),
        Some(false) => tracing::warn!(
            "bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): it runs emulated, slower than fp32; use --precision fp32 here"
        ),
        None => tracing::warn!("bf16 on a CPU whose bf16 support is unknown (/proc/cpuinfo unreadable)"),
    }
}

/// A wire tensor as a CPU tch tensor (f32/f16/bf16 as sent), after checking
/// that its shape is sane (dimensions, strides) and its bytes fit it, so
/// libtorch never sees an unchecked shape. `field` names it in errors.
pub fn from_wire(t: Option<&WireTensor>, field: &str) -> Result<Tensor, ServiceError> {
    let t = t.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
    sd_proto::wire::validate(t).map_err(|e| ServiceError::invalid(field, e))?;
    let kind = match Dtype::try_from(t.dtype) {
        Ok(Dtype::Float32) => Kind::Float,
        Ok(Dtype::Float16) => Kind::Half,
        Ok(Dtype::Bfloat16) => Kind::BFloat16,
        _ => {
            return Err(ServiceError::invalid(
                field,
                format_args!("unsupported dtype {}", t.dtype),
            ))
        }
    };
    Ok(Tensor::f_from_data_size(&t.data, &t.shape, kind)?)
}

/// Refuse NaN and infinite values in `t` (the networks would only spread
/// them through every later step).
pub fn finite(t: &Tensor, field: &str) -> Result<(), ServiceError> {
    if t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0 {
        return Ok(());
    }
    Err(ServiceError::invalid(field, "holds NaN or infinite values"))
}

/// A tch tensor on the wire as `dtype` (unspecified: float32).
pub fn to_wire(t: &Tensor, dtype: Dtype) -> Result<WireTensor, ServiceError> {
    let (kind, dtype) = match dtype {
        Dtype::Float16 => (Kind::Half, Dtype::Float16),
        Dtype::Bfloat16 => (Kind::BFloat16, Dtype::Bfloat16),
        Dtype::Float32 | Dtype::Unspecified => (Kind::Float, Dtype::Float32),
    };
    let t = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_contiguous())?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(WireTensor {
        shape: t.size(),
        dtype: dtype as i32,
        data: data.into(),
    })
}

/// How long a call waited for the model and how long the model worked on
/// it (for a batched call: the whole forward it shared).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub queue: Duration,
    pub forward: Duration,
}

impl Timings {
    /// Record on `span` (an [`rpc_span`]) as `queue_ms` and `forward_ms`.
    pub fn record(&self, span: &tracing::Span) {
        span.record("queue_ms", self.queue.as_secs_f64() * 1e3);
        span.record("forward_ms", self.forward.as_secs_f64() * 1e3);
    }
}

/// Runs model work on `concurrency` model threads of its own (see
/// [`threads`]), at most `max_queue` calls waiting (beyond:
/// RESOURCE_EXHAUSTED).
#[derive(Clone)]
pub struct Worker {
    admission: Admission,
    metrics: Arc<Metrics>,
    threads: Arc<threads::ModelThreads>,
}

impl Worker {
    /// `workers` forwards at once, `max_queue` calls waiting.
    pub fn new(workers: usize, max_queue: usize, metrics: Arc<Metrics>) -> Self {
        Worker {
            admission: Admission::new("model service", workers, max_queue),
            metrics,
            threads: Arc::new(threads::ModelThreads::new(workers)),
        }
    }

    /// Run `f` (timed as `stage` in the step-duration metric).
    pub async fn run<T: Send + 'static>(
        &self,
        stage: Stage,
        f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.run_timed(stage, f).await.map(|(v, _)| v)
    }

    /// Run `f` (timed as `stage` in the step-duration metric), and say how
    /// long it waited for a slot and a thread, and how long it ran. `f`
    /// runs in the caller's span.
    pub async fn run_timed<T: Send + 'static>(
        &self,
        stage: Stage,
        f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<(T, Timings), ServiceError> {
        let queued = Instant::now();
        self.metrics
            .queue_depth
            .set(self.admission.queued() as i64 + 1);
        let slot = self.admission.admit().await;
        self.metrics.queue_depth.set(self.admission.queued() as i64);
        let slot = slot?;
        let metrics = self.metrics.clone();
        let span = tracing::Span::current();
        self.threads
            .run(move || {
                let _slot = slot;
                let _span = span.enter();
                let _guard = tch::no_grad_guard();
                let start = Instant::now();
                let r = f();
                let forward = start.elapsed();
                metrics.step(stage, forward);
                r.map(|v| {
                    let queue = start - queued;
                    (v, Timings { queue, forward })
                })
            })
            .await?
    }
}

/// A model service's whole life: sd-runtime's one start-up path
/// ([`sd_runtime::server::run`]) on the async runtime, with `load` on a
/// blocking thread while health keeps answering. With an internal token
/// (`--internal-token-file` or `SD_INTERNAL_TOKEN`), every call but health
/// and reflection must carry it.
pub fn serve_model<S: sd_runtime::server::GrpcService>(
    stage: sd_proto::Stage,
    server: &ServerArgs,
    tls: &ServerTlsArgs,
    load: impl FnOnce(Arc<Metrics>, Lifecycle) -> anyhow::Result<S> + Send + 'static,
) -> anyhow::Result<()> {
    let who = sd_runtime::server::Identity {
        name: stage.name(),
        otel_name: stage.name(),
        grpc_name: stage.grpc_service(),
    };
    let access = sd_runtime::server::Access::Internal(tls.internal.load()?);
    let runtime = server.runtime()?;
    // The loaded service outlives the server, to the end of the process:
    // dropping it would free the model under a forward still running, or
    // wait for that forward, past the drain.
    let kept = Arc::new(std::sync::OnceLock::new());
    let keep = kept.clone();
    runtime.block_on(sd_runtime::server::run(who, server, tls, access, |cx| {
        blocking(move || {
            let service = load(cx.metrics, cx.lifecycle)?;
            let _ = keep.set(service.clone());
            Ok(service)
        })
    }))?;
    exit_leaving_model_threads(runtime)
}

/// End a model service that has stopped serving, at once and with status
/// 0, without running libtorch's static destructors. A forward may still
/// be running on a model thread — one whose caller left (its result is no
/// longer wanted) or one still running when the drain time ran out — and
/// returning from `main` would destroy libtorch's globals under it: the
/// forward then fails inside libtorch, and the process ends with a worker
/// panic and a libtorch backtrace. Waiting for that forward instead would
/// hold the process past its drain time (a forward at a large size takes
/// minutes on a CPU), until whoever stops it kills it. Nothing of ours
/// needs those destructors: telemetry was flushed when the server stopped,
/// stdout is flushed here.
fn exit_leaving_model_threads(runtime: tokio::runtime::Runtime) -> ! {
    // Tasks still on the runtime get a moment to end; model work on the
    // blocking pool is not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: _exit(2) takes no pointers and ends the process; it skips
    // exit handlers by design (see above).
    unsafe { libc::_exit(0) }
}

/// Run blocking model loading off the async runtime (health keeps answering).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("loading task failed: {e}"))?
}

/// A short identity for a model directory's weights: a hash of the configs,
/// the safetensors headers and sizes, and samples of the data. Changes when
/// the weights do, without reading gigabytes at start.
pub fn model_id(dir: &sd_models::ModelDir, components: &[sd_models::Component]) -> String {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = DefaultHasher::new();
    for c in components {
        if let Ok(cfg) = std::fs::read(dir.config_path(*c)) {
            h.write(&cfg);
        }
        if let Ok(path) = dir.weights_path(*c, false) {
            if let Ok(mut f) = std::fs::File::open(&path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                h.write_u64(len);
                let mut buf = vec![0u8; 1 << 16];
                for pos in [0, len / 3, len / 2, len.saturating_sub(1 << 16)] {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        let n = f.read(&mut buf).unwrap_or(0);
                        h.write(&buf[..n]);
                    }
                }
            }
        }
    }
    let name = dir.name();
    format!("{name}@{:016x}", h.finish())
}

/// [`timed_load`] when there are metrics to record into; else just load.
pub fn maybe_timed_load<T>(
    metrics: Option<&Metrics>,
    what: &str,
    f: impl FnOnce() -> sd_models::Result<T>,
) -> anyhow::Result<T> {
    match metrics {
        Some(m) => timed_load(m, what, f),
        None => f().map_err(|e| anyhow::anyhow!("loading {what}: {e}")),
    }
}

/// Load, log how long it took and record it in `metrics`.
pub fn timed_load<T>(
    metrics: &Metrics,
    what: &str,
    f: impl FnOnce() -> sd_models::Result<T>,
) -> anyhow::Result<T> {
    let start = std::time::Instant::now();
    let v = f().map_err(|e| anyhow::anyhow!("loading {what}: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    metrics.loaded(what, seconds);
    tracing::info!(what, seconds, "loaded");
    Ok(v)
}

/// The span of one call (or one message of a stream) to `method`; the
/// caller joins it to the sender's trace.
pub fn rpc_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        otel.name = method,
        method,
        trace_id = tracing::field::Empty,
        queue_ms = tracing::field::Empty,
        forward_ms = tracing::field::Empty,
    )
}

/// Run a handler: refused while draining, counted for the drain, timed in
/// the metrics, in a span joined to the caller's trace.
pub async fn handle<T, R, Fut>(
    lifecycle: &Lifecycle,
    metrics: &Metrics,
    method: &'static str,
    request: tonic::Request<R>,
    f: impl FnOnce(R) -> Fut,
) -> Result<tonic::Response<T>, Status>
where
    Fut: std::future::Future<Output = Result<T, ServiceError>>,
{
    let span = rpc_span(method);
    sd_runtime::telemetry::adopt(&request, &span);
    let _work = lifecycle.begin()?;
    answer(metrics, method, span, f(request.into_inner()))
        .await
        .map(tonic::Response::new)
}

/// Answer one call (or one message of a stream) in `span`: the error
/// becomes its status inside the span, so what it logs carries the
/// caller's trace id; timed and counted by code in the metrics.
pub async fn answer<T>(
    metrics: &Metrics,
    method: &'static str,
    span: tracing::Span,
    work: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, Status> {
    use tracing::Instrument;
    metrics
        .observe(method, async { work.await.map_err(Status::from) })
        .instrument(span)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(shape: Vec<i64>, dtype: i32, bytes: usize) -> WireTensor {
        WireTensor {
            shape,
            dtype,
            data: vec![0u8; bytes].into(),
        }
    }

    fn refusal(t: Option<&WireTensor>) -> Status {
        Status::from(from_wire(t, "latents").expect_err("refused"))
    }

    #[test]
    fn from_wire_refuses_bad_shapes_before_libtorch_sees_them() {
        let f32 = Dtype::Float32 as i32;
        for (t, words) in [
            (wire(vec![1, 4, 0, 1 << 62], f32, 0), "bad shape"),
            (wire(vec![1, -4], f32, 0), "negative"),
            (wire(vec![1; 9], f32, 4), "dimensions"),
            (wire(vec![2, 2], f32, 15), "bytes"),
            (wire(vec![2], 9, 8), "unsupported dtype"),
        ] {
            let s = refusal(Some(&t));
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(s.message().starts_with("latents: "), "{s:?}");
            assert!(s.message().contains(words), "{s:?}");
            let v = sd_proto::status::field_violations(&s);
            assert_eq!(v[0].field, "latents");
        }
        assert_eq!(refusal(None).message(), "latents: missing");
    }

    #[test]
    fn tensors_cross_the_wire_in_each_dtype() {
        let t = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 3.0]).view([2, 2]);
        for d in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
            let w = to_wire(&t, d).unwrap();
            assert_eq!(w.shape, vec![2, 2]);
            let back = from_wire(Some(&w), "t").unwrap().to_kind(Kind::Float);
            assert_eq!(
                Vec::<f32>::try_from(back.flatten(0, -1)).unwrap(),
                vec![0.5, -1.0, 2.0, 3.0]
            );
        }
    }
}

#[cfg(test)]
mod span_tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects the fields recorded on spans after they were created.
    struct Recorded(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Names<'a>(&'a mut Vec<String>);
            impl tracing::field::Visit for Names<'_> {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push(format!("{}={v:?}", f.name()));
                }
            }
            values.record(&mut Names(
                &mut self.0.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
    }

    #[tokio::test]
    async fn a_worker_call_reports_its_timings_on_the_rpc_span() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Recorded(seen.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let worker = Worker::new(1, 1, Metrics::new("test"));
        let span = rpc_span("Test");
        let work = worker.run_timed(Stage::TextForward, || {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        let ((), t) = tracing::Instrument::instrument(work, span.clone())
            .await
            .unwrap();
        assert!(t.forward >= Duration::from_millis(20), "{t:?}");
        t.record(&span);
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).join(" ");
        assert!(
            seen.contains("queue_ms=") && seen.contains("forward_ms="),
            "{seen}"
        );
    }
}

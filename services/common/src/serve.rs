//! A model service's start-up and its calls: `serve_model` on
//! sd-runtime's path (loading on a blocking thread), the timed loads, the
//! rpc span and the handler wrapper.

use std::sync::Arc;
use std::time::Duration;

use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::Metrics;
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use tonic::Status;

use crate::ServiceError;

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

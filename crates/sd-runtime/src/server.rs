//! Running a server the same way in every binary: listening (and answering
//! health, NOT_SERVING) from the first moment, loading the model while
//! doing so, reporting SERVING only once it is loaded and warm, and
//! draining on SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;

use crate::internal::InternalToken;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::tls::ServerTlsArgs;
use crate::{Health, ServerArgs};

/// A gRPC service as a server hosts it (what tonic's generated servers are).
pub trait GrpcService:
    tonic::codegen::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tonic::codegen::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Who a server process is.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// The `service` label of its metrics (`gateway`, `denoiser`, …).
    pub name: &'static str,
    /// Its OpenTelemetry service name unless `OTEL_SERVICE_NAME` says otherwise.
    pub otel_name: &'static str,
    /// The gRPC service its health reports on (`sd.v1.Denoiser`, …).
    pub grpc_name: &'static str,
}

/// Who may call a server's own service (health and reflection are open to
/// all, for probes and tools).
#[derive(Debug, Clone)]
pub enum Access {
    /// The public API: the gateway checks its API keys itself.
    Public,
    /// A model service behind the gateway: with a token, every call must
    /// carry it; without one, the service is open (local development).
    Internal(Option<InternalToken>),
}

impl Access {
    /// Say at start who may call; the token to require, if any.
    fn announce(self) -> Option<InternalToken> {
        match self {
            Access::Public => None,
            Access::Internal(Some(token)) => {
                tracing::info!("internal token required on every call but health and reflection");
                Some(token)
            }
            Access::Internal(None) => {
                tracing::warn!(
                    "no internal token (--internal-token-file or SD_INTERNAL_TOKEN): this service \
                     takes calls from anyone who can reach its port; fine for local development, \
                     not for a network others share"
                );
                None
            }
        }
    }
}

/// What a server's `load` gets from the start-up path.
#[derive(Clone)]
pub struct Context {
    pub metrics: Arc<Metrics>,
    pub lifecycle: Lifecycle,
    pub health: Arc<Health>,
}

/// A server process's whole life, the same for the gateway and the model
/// services: telemetry; health (NOT_SERVING) on the listening socket from
/// the first moment; metrics; `load` while health keeps answering; SERVING
/// once it is done; serving until SIGTERM and the drain. `access` says who
/// may call the service itself.
pub async fn run<S, F, Fut>(
    who: Identity,
    args: &ServerArgs,
    tls: &ServerTlsArgs,
    access: Access,
    load: F,
) -> anyhow::Result<()>
where
    S: GrpcService,
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<S>>,
{
    let telemetry = crate::init_telemetry(args.log_json, who.otel_name);
    let guard = access.announce();
    let (health, health_service) = Health::new(who.grpc_name).await;
    let health = Arc::new(health);
    let (incoming, _) = crate::listen(args.listen).await?;
    let metrics = Metrics::new(who.name);
    if let Some(addr) = args.metrics_listen {
        crate::metrics::serve(addr, metrics.clone()).await?;
    }
    let lifecycle = Lifecycle::new();
    let context = Context {
        metrics,
        lifecycle: lifecycle.clone(),
        health: health.clone(),
    };
    let result = serve_loading(
        incoming,
        health,
        health_service,
        lifecycle,
        args,
        tls,
        Lazy::guarded(guard),
        load(context),
    )
    .await;
    drop(telemetry);
    result
}

/// A gRPC service that exists before its model is loaded: until `set`, every
/// call is UNAVAILABLE ("loading"), so clients retry elsewhere. With a
/// guard, a call without the internal token is UNAUTHENTICATED, loaded or
/// not.
pub struct Lazy<S> {
    inner: Arc<OnceLock<S>>,
    guard: Option<Arc<InternalToken>>,
}

impl<S> Clone for Lazy<S> {
    fn clone(&self) -> Self {
        Lazy {
            inner: self.inner.clone(),
            guard: self.guard.clone(),
        }
    }
}

impl<S> Default for Lazy<S> {
    fn default() -> Self {
        Lazy {
            inner: Arc::new(OnceLock::new()),
            guard: None,
        }
    }
}

impl<S> Lazy<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requiring `token` on every call, when there is one.
    pub fn guarded(token: Option<InternalToken>) -> Self {
        Lazy {
            guard: token.map(Arc::new),
            ..Self::default()
        }
    }

    pub fn set(&self, s: S) {
        let _ = self.inner.set(s);
    }
}

impl<S: NamedService> NamedService for Lazy<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tonic::codegen::Service<Request<Body>> for Lazy<S>
where
    S: tonic::codegen::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if let Some(guard) = &self.guard {
            if let Err(refused) = guard.check(req.headers()) {
                tracing::warn!(
                    path = req.uri().path(),
                    "refused a call: {}",
                    refused.message()
                );
                return Box::pin(async move { Ok(refused.into_http()) });
            }
        }
        match self.inner.get() {
            Some(s) => {
                let mut s = s.clone();
                Box::pin(async move { s.call(req).await })
            }
            None => Box::pin(async {
                Ok(tonic::Status::unavailable("still loading the model").into_http())
            }),
        }
    }
}

/// Serve `service` (plus health and reflection) on `incoming` while `load`
/// runs; install its result and report SERVING when it succeeds; drain on
/// SIGTERM. Returns when the server stops (or with `load`'s error).
#[allow(clippy::too_many_arguments)]
async fn serve_loading<S, F>(
    incoming: TcpIncoming,
    health: Arc<Health>,
    health_service: tonic_health::pb::health_server::HealthServer<
        tonic_health::server::HealthService,
    >,
    lifecycle: Lifecycle,
    args: &ServerArgs,
    tls: &ServerTlsArgs,
    service: Lazy<S>,
    load: F,
) -> anyhow::Result<()>
where
    S: GrpcService,
    F: Future<Output = anyhow::Result<S>>,
{
    let mut builder = tonic::transport::Server::builder();
    if let Some(cfg) = tls.config()? {
        builder = builder.tls_config(cfg)?;
    }
    let drain = Duration::from_secs(args.drain_secs);
    let (shutdown, bound) = lifecycle.shutdown_pair(health.clone(), drain, Duration::from_secs(2));
    let (reflection_v1, reflection_v1alpha) = crate::reflection(S::NAME)?;
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service.clone());
    let server = tokio::spawn(async move {
        tokio::select! {
            r = router.serve_with_incoming_shutdown(incoming, shutdown) => r.map_err(anyhow::Error::from),
            _ = bound => Ok(()),
        }
    });
    let loaded = load.await?;
    service.set(loaded);
    if !lifecycle.draining() {
        health.serving().await;
        tracing::info!("SERVING");
    }
    server.await??;
    tracing::info!("stopped");
    Ok(())
}

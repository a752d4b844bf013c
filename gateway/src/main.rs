//! sd-gateway: serve `sd.v1.Generation` in front of the model services.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use sd_gateway::auth::{ApiKeys, AuthArgs};
use sd_gateway::backends::{BackendArgs, Backends};
use sd_gateway::pipeline::Generator;
use sd_gateway::plan::Limits;
use sd_gateway::prompt_cache::PromptCache;
use sd_gateway::service::GenerationService;
use sd_proto::v1::generation_server::GenerationServer;
use sd_runtime::admission::Admission;
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::Metrics;
use sd_runtime::tls::{ClientTlsArgs, ServerTlsArgs};
use sd_runtime::ServerArgs;
use tonic::service::interceptor::InterceptedService;

/// The sdserve gateway: text-to-image and image-to-image over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    backends: BackendArgs,
    #[command(flatten)]
    backend_tls: ClientTlsArgs,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    auth: AuthArgs,
    /// Generations run at once.
    #[arg(long, env = "SD_MAX_CONCURRENT", default_value_t = 4)]
    max_concurrent: usize,
    /// Generations that may wait for a slot; beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
    /// Bytes of prompt embeddings kept in the gateway (MiB).
    #[arg(long, env = "SD_PROMPT_CACHE_MIB", default_value_t = 256)]
    prompt_cache_mib: usize,
    /// Log prompts at info level.
    #[arg(long, env = "SD_LOG_PROMPTS")]
    log_prompts: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = sd_runtime::init_telemetry(args.server.log_json, "sd-gateway");
    let (health, health_svc) = sd_runtime::Health::new("sd.v1.Generation").await;
    let health = Arc::new(health);
    let (incoming, _) = sd_runtime::listen(args.server.listen).await?;
    let metrics = Metrics::new("gateway");
    if let Some(addr) = args.server.metrics_listen {
        sd_runtime::metrics::serve(addr, metrics.clone()).await?;
    }
    // Public messages: a request carries at most an init image; a response
    // at most max_images encoded images (PNG ≤ 3 bytes/pixel + headers).
    let max_in = args.limits.max_init_image_bytes + (1 << 20);
    let max_out =
        (args.limits.max_images as usize) * (args.limits.max_side as usize).pow(2) * 3 + (4 << 20);
    let internal = args.server.max_message_bytes();
    let backends = Backends::connect(&args.backends, internal, args.backend_tls.load()?)?;
    let facts = backends
        .model_facts(Duration::from_secs(args.backends.backend_wait_secs))
        .await?;
    tracing::info!(model = %facts.id, scheduler = %facts.default_scheduler, "model services ready");
    let lifecycle = Lifecycle::new();
    let keys = ApiKeys::new(args.auth.keys()?);
    if keys.enabled() {
        tracing::info!("API keys required");
    }
    let service = GenerationService {
        generator: Generator {
            backends: backends.clone(),
            facts: Arc::new(facts),
            cache: Arc::new(Mutex::new(PromptCache::new(args.prompt_cache_mib << 20))),
            metrics: metrics.clone(),
        },
        limits: Arc::new(args.limits),
        admission: Admission::new("gateway", args.max_concurrent, args.max_queue),
        lifecycle: lifecycle.clone(),
        metrics,
        log_prompts: args.log_prompts,
    };
    // SERVING only while every stage has a SERVING replica (and not draining).
    let watch_health = health.clone();
    let watch_life = lifecycle.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ok = !watch_life.draining() && backends.all_serving();
            if last != Some(ok) {
                if ok {
                    watch_health.serving().await;
                } else if !watch_life.draining() {
                    tracing::warn!("a stage has no SERVING replica: NOT_SERVING");
                    watch_health.not_serving().await;
                }
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = args.tls.config()? {
        builder = builder.tls_config(tls)?;
    }
    let generation = GenerationServer::new(service)
        .max_decoding_message_size(max_in)
        .max_encoding_message_size(max_out);
    let drain = Duration::from_secs(args.server.drain_secs);
    let (shutdown, bound) = lifecycle.shutdown_pair(health.clone(), drain, Duration::from_secs(2));
    let server = builder
        .add_service(health_svc)
        .add_service(sd_runtime::reflection()?)
        .add_service(InterceptedService::new(generation, keys))
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        r = server => r?,
        _ = bound => {},
    }
    tracing::info!("stopped");
    Ok(())
}

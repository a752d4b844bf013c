//! sd-gateway: serve `sd.v1.Generation` in front of the model services.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use sd_gateway::backends::{BackendArgs, Backends};
use sd_gateway::pipeline::Generator;
use sd_gateway::plan::Limits;
use sd_gateway::prompt_cache::PromptCache;
use sd_gateway::service::GenerationService;
use sd_proto::v1::generation_server::GenerationServer;
use sd_runtime::ServerArgs;

/// The sdserve gateway: text-to-image and image-to-image over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    backends: BackendArgs,
    #[command(flatten)]
    limits: Limits,
    /// Bytes of prompt embeddings kept in the gateway (MiB).
    #[arg(long, env = "SD_PROMPT_CACHE_MIB", default_value_t = 256)]
    prompt_cache_mib: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sd_runtime::init_telemetry(args.server.log_json);
    let (health, health_svc) = sd_runtime::Health::new("sd.v1.Generation").await;
    let (incoming, _) = sd_runtime::listen(args.server.listen).await?;
    let max = args.server.max_message_bytes();
    let backends = Backends::connect(&args.backends, max)?;
    let facts = backends
        .model_facts(Duration::from_secs(args.backends.backend_wait_secs))
        .await?;
    tracing::info!(model = %facts.id, scheduler = %facts.default_scheduler, "model services ready");
    let service = GenerationService {
        generator: Generator {
            backends,
            facts: Arc::new(facts),
            cache: Arc::new(Mutex::new(PromptCache::new(args.prompt_cache_mib << 20))),
        },
        limits: Arc::new(args.limits),
    };
    health.serving().await;
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(sd_runtime::reflection()?)
        .add_service(
            GenerationServer::new(service)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, sd_runtime::shutdown_signal())
        .await?;
    Ok(())
}

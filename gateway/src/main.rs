//! sd-gateway: serve `sd.v1.Generation` in front of the model services.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use sd_gateway::auth::{ApiKeys, AuthArgs};
use sd_gateway::backends::{BackendArgs, Backends, Transport};
use sd_gateway::facts::ModelFacts;
use sd_gateway::limits::Limits;
use sd_gateway::pipeline::Generator;
use sd_gateway::prompt_cache::PromptCache;
use sd_gateway::service::GenerationService;
use sd_proto::v1::generation_server::GenerationServer;
use sd_proto::v1::Dtype;
use sd_runtime::admission::Admission;
use sd_runtime::internal::{InternalToken, SendToken};
use sd_runtime::server::Access;
use sd_runtime::tls::{ClientTlsArgs, ServerTlsArgs};
use sd_runtime::ServerArgs;

/// The sdserve gateway: text-to-image and image-to-image over gRPC.
#[derive(Parser, Debug, Clone)]
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
    #[command(flatten)]
    http: sd_gateway::http::HttpArgs,
    #[command(flatten)]
    jobs: sd_gateway::queue::JobArgs,
    /// Generations run at once.
    #[arg(long, env = "SD_MAX_CONCURRENT", default_value_t = 4)]
    max_concurrent: usize,
    /// Generations that may wait for a slot; beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
    /// Predicted UNet seconds that may wait for a slot, all queued
    /// generations together (the denoiser's measured cost predicts them);
    /// beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_QUEUE_SECONDS", default_value_t = 1200.0)]
    max_queue_seconds: f64,
    /// Bytes of prompt embeddings kept in the gateway (MiB).
    #[arg(long, env = "SD_PROMPT_CACHE_MIB", default_value_t = 256)]
    prompt_cache_mib: usize,
    /// Element type of latents and predictions on the wire each step: f32,
    /// f16 or bf16, or `auto`, the type the denoiser computes in (its
    /// --precision: half the bytes for a half-precision model, and the same
    /// images — the network casts its input to that type first, and its
    /// prediction is made in it).
    #[arg(long, env = "SD_WIRE_DTYPE", default_value = "auto", value_parser = parse_dtype)]
    wire_dtype: Wire,
    /// Log prompts at info level.
    #[arg(long, env = "SD_LOG_PROMPTS")]
    log_prompts: bool,
    /// Another model behind this gateway, with its own model services:
    /// `NAME=TEXT_ENCODER,DENOISER,AUTOENCODER` (each a URL, or several
    /// joined by `|`, or `dns://host:port`); repeatable (`;` between routes
    /// in SD_MODEL_ROUTES). Requests name it in `model`; the services above
    /// (--text-encoder, …) are the default model.
    #[arg(long = "model-route", env = "SD_MODEL_ROUTES", value_delimiter = ';')]
    model_routes: Vec<String>,
}

/// `NAME=TE,DEN,AE` → (NAME, the backends' addresses).
fn parse_route(route: &str, base: &BackendArgs) -> anyhow::Result<(String, BackendArgs)> {
    let (name, urls) = route.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("--model-route `{route}`: expected NAME=TEXT_ENCODER,DENOISER,AUTOENCODER")
    })?;
    let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty() && urls.len() == 3 && urls.iter().all(|u| !u.is_empty()),
        "--model-route `{route}`: expected NAME=TEXT_ENCODER,DENOISER,AUTOENCODER"
    );
    let replicas = |u: &str| u.replace('|', ",");
    Ok((
        name.to_string(),
        BackendArgs {
            text_encoder: replicas(urls[0]),
            denoiser: replicas(urls[1]),
            autoencoder: replicas(urls[2]),
            ..base.clone()
        },
    ))
}

/// The wire's element type: the denoiser's own, or one given.
#[derive(Debug, Clone, Copy)]
enum Wire {
    Auto,
    Is(Dtype),
}

impl Wire {
    /// The type for a model whose denoiser computes in `compute`.
    fn for_model(self, compute: Dtype) -> Dtype {
        match self {
            Wire::Auto => compute,
            Wire::Is(d) => d,
        }
    }
}

fn parse_dtype(s: &str) -> Result<Wire, String> {
    match s {
        "auto" => Ok(Wire::Auto),
        "f32" | "fp32" | "float32" => Ok(Wire::Is(Dtype::Float32)),
        "f16" | "fp16" | "float16" => Ok(Wire::Is(Dtype::Float16)),
        "bf16" | "bfloat16" => Ok(Wire::Is(Dtype::Bfloat16)),
        other => Err(format!("`{other}`: expected auto, f32, f16 or bf16")),
    }
}

/// What the gateway reads from files and the environment before it
/// listens, so a mistake there stops it at once.
struct Secrets {
    keys: ApiKeys,
    token: Option<InternalToken>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secrets = Secrets {
        keys: ApiKeys::new(args.auth.keys()?),
        token: args.tls.internal.load()?,
    };
    let who = sd_runtime::server::Identity {
        name: "gateway",
        otel_name: "sd-gateway",
        grpc_name: "sd.v1.Generation",
    };
    args.server.runtime()?.block_on(async {
        // HTTP listens from the start (503 until the model is reached), and
        // says where before gRPC's `listening on` line.
        let door = match args.http.http_listen {
            Some(addr) => {
                let timeout = Duration::from_secs(args.http.http_read_timeout_secs.max(1));
                let door = sd_gateway::http::Door::bind(addr, timeout).await?;
                println!("{}{}", sd_gateway::http::HTTP_LINE, door.local_addr());
                Some(door)
            }
            None => None,
        };
        sd_runtime::server::run(who, &args.server, &args.tls, Access::Public, |cx| {
            connect(&args, secrets, cx, door)
        })
        .await
    })
}

/// SERVING only while every stage has a SERVING replica (and not draining).
fn report_health(
    lifecycle: sd_runtime::lifecycle::Lifecycle,
    health: Arc<sd_runtime::Health>,
    all_backends: Vec<Backends>,
) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ok = !lifecycle.draining() && all_backends.iter().all(Backends::all_serving);
            if last != Some(ok) && !lifecycle.draining() {
                if ok {
                    health.serving().await;
                } else {
                    tracing::warn!("a stage has no SERVING replica: NOT_SERVING");
                    health.not_serving().await;
                }
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// The async job store, when `--redis` names one.
async fn job_store(
    args: &sd_gateway::queue::JobArgs,
) -> anyhow::Result<Option<sd_gateway::queue::Shared>> {
    let Some(url) = &args.redis else {
        return Ok(None);
    };
    let jobs = Arc::new(sd_gateway::queue::Jobs::new(args, url).await?);
    tracing::info!(
        redis = %sd_gateway::queue::store::redact(url),
        worker = %jobs.worker,
        "async jobs served"
    );
    Ok(Some(jobs))
}

/// How often the gateway rereads the denoiser's UNet cost.
const COST_REFRESH: Duration = Duration::from_secs(30);

/// Keep `cost` as the denoiser publishes it (it mends its start-up
/// measurement with the forwards it runs).
fn refresh_cost(backends: Backends, cost: sd_gateway::facts::SharedCost) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(COST_REFRESH).await;
            match backends.denoiser_cost().await {
                Ok(Some(c)) => cost.set(Some(c)),
                Ok(None) => {}
                Err(e) => tracing::debug!("UNet cost not refreshed: {e:#}"),
            }
        }
    });
}

/// Reach the model services, learn the model, and build the service.
async fn connect(
    args: &Args,
    secrets: Secrets,
    cx: sd_runtime::server::Context,
    door: Option<sd_gateway::http::Door>,
) -> anyhow::Result<GenerationServer<GenerationService>> {
    let sd_runtime::server::Context {
        metrics,
        lifecycle,
        health,
    } = cx;
    // Public messages: a request carries at most an init image; a response
    // at most max_images encoded images (PNG ≤ 3 bytes/pixel + headers).
    let max_in = args.limits.max_init_image_bytes + (1 << 20);
    let max_out =
        (args.limits.max_images as usize) * (args.limits.max_side as usize).pow(2) * 3 + (4 << 20);
    let internal = args.server.max_message_bytes();
    let Secrets { keys, token } = secrets;
    if token.is_none() {
        tracing::info!("no internal token: calling the model services without one");
    }
    let transport = Transport {
        tls: args.backend_tls.load()?,
        token: SendToken::new(token),
    };
    let backends = Backends::connect(&args.backends, internal, transport.clone())?;
    let facts = backends
        .model_facts(Duration::from_secs(args.backends.backend_wait_secs))
        .await?;
    tracing::info!(model = %facts.id, scheduler = %facts.default_scheduler, "model services ready");
    if keys.enabled() {
        tracing::info!("API keys required");
    }
    if facts.cost.get().is_none() {
        tracing::warn!(
            "the denoiser published no UNet cost: requests are not bounded in predicted seconds"
        );
    }
    refresh_cost(backends.clone(), facts.cost.clone());
    // One prompt cache for all models: its keys name the text model.
    let cache = Arc::new(Mutex::new(PromptCache::new(args.prompt_cache_mib << 20)));
    let generator = |backends: &Backends, facts: ModelFacts| Generator {
        stages: Arc::new(backends.clone()),
        wire: args.wire_dtype.for_model(facts.compute_dtype),
        facts: Arc::new(facts),
        cache: cache.clone(),
        metrics: metrics.clone(),
    };
    let default = generator(&backends, facts);
    let mut others = Vec::new();
    let mut all_backends = vec![backends.clone()];
    for route in &args.model_routes {
        let (name, route_args) = parse_route(route, &args.backends)?;
        anyhow::ensure!(
            name != default.facts.name && others.iter().all(|g: &Generator| g.facts.name != name),
            "--model-route: `{name}` is served twice"
        );
        let b = Backends::connect(&route_args, internal, transport.clone())?;
        let mut facts = b
            .model_facts(Duration::from_secs(args.backends.backend_wait_secs))
            .await?;
        // The route's name is the one clients use.
        facts.name = name;
        tracing::info!(model = %facts.id, name = %facts.name, "model services ready");
        refresh_cost(b.clone(), facts.cost.clone());
        others.push(generator(&b, facts));
        all_backends.push(b);
    }
    let jobs = job_store(&args.jobs).await?;
    let service = Arc::new(GenerationService {
        generator: default,
        others,
        limits: Arc::new(args.limits.clone()),
        admission: Admission::new("gateway", args.max_concurrent, args.max_queue)
            .with_max_queue_seconds(args.max_queue_seconds),
        lifecycle: lifecycle.clone(),
        metrics,
        log_prompts: args.log_prompts,
        keys,
        jobs: jobs.clone(),
    });
    if let Some(jobs) = jobs {
        let workers = Some(args.jobs.job_workers).filter(|&n| n > 0);
        let workers = workers.unwrap_or(args.max_concurrent);
        sd_gateway::queue::worker::spawn(service.clone(), jobs, workers);
    }
    if let Some(door) = door {
        door.open(Arc::new(sd_gateway::http::Http::new(
            service.clone(),
            &args.http,
        )));
    }
    report_health(lifecycle, health, all_backends);
    Ok(GenerationServer::from_arc(service)
        .max_decoding_message_size(max_in)
        .max_encoding_message_size(max_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_is_the_denoisers_type_unless_one_is_given() {
        let auto = parse_dtype("auto").unwrap_or(Wire::Is(Dtype::Unspecified));
        assert_eq!(auto.for_model(Dtype::Bfloat16), Dtype::Bfloat16);
        assert_eq!(auto.for_model(Dtype::Float32), Dtype::Float32);
        let f32 = parse_dtype("f32").unwrap_or(Wire::Auto);
        assert_eq!(f32.for_model(Dtype::Bfloat16), Dtype::Float32);
        assert!(parse_dtype("f8").is_err());
        // The flag parses as the gateway reads it, default and given.
        let args = |extra: &[&str]| {
            let mut v = vec!["sd-gateway"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).map(|a| a.wire_dtype.for_model(Dtype::Float16))
        };
        assert_eq!(args(&[]).ok(), Some(Dtype::Float16));
        assert_eq!(args(&["--wire-dtype", "bf16"]).ok(), Some(Dtype::Bfloat16));
    }
}

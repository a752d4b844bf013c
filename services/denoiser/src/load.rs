//! The denoiser's start-up: the network of the model's family, what the
//! gateway needs to know about it (published in Info), the warm-up (and the
//! cost measurement), the batcher.

use std::sync::{Arc, Mutex};

use sd_models::config::VaeConfig;
use sd_models::{Component, Denoiser, Layout};
use sd_proto::v1::denoiser_server::DenoiserServer;
use sd_proto::v1::{DenoiserInfo, LatentLayout};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::Metrics;
use sd_sampling::{Prediction, SchedulerConfig};
use sd_service::family::Profile;
use sd_service::lora::LoraStore;
use sd_service::step::Bounds;
use sd_service::Worker;

use crate::cache::{self, EmbeddingCache, HeldBudget};
use crate::{batch, cost, Args, Core, Service};

/// The model's prediction type, from its scheduler config (diffusers' default: epsilon).
fn prediction_type(scheduler_json: &str) -> anyhow::Result<Prediction> {
    Ok(SchedulerConfig::from_json(scheduler_json)?.prediction()?)
}

/// One forward before serving; with a calibration budget, the measured
/// cost of a forward (which starts with one).
fn warm_up(
    net: &Denoiser,
    layout: &Layout,
    args: &Args,
) -> anyhow::Result<Option<sd_proto::v1::ForwardCost>> {
    let budget = cost::Budget {
        time: std::time::Duration::from_secs_f64(args.calibration_seconds.clamp(0.0, 3600.0)),
        max_side: (args.max_side / layout.vae_scale_factor.max(1))
            .min(net.max_latent_side().unwrap_or(i64::MAX)),
    };
    if budget.time.is_zero() {
        let _ = net.probe(1, layout.native_side.clamp(1, 16), net.typical_tokens())?;
        return Ok(None);
    }
    Ok(Some(cost::measure(net, layout, budget)?))
}

/// Load the network and what the gateway needs to know; warm up.
pub fn load(
    args: Args,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) -> anyhow::Result<DenoiserServer<Service>> {
    let max = args.server.max_message_bytes();
    let placement = args.model.placement()?;
    let mut dir = args.model.model_dir()?;
    if let Some(file) = &args.transformer {
        dir = dir
            .with_transformer(file)
            .map_err(|e| anyhow::anyhow!("--transformer: {e}"))?;
    }
    dir = dir
        .with_fp8(args.fp8)
        .map_err(|e| anyhow::anyhow!("--fp8: {e}"))?;
    let net = sd_service::timed_load(&metrics, "unet", || Denoiser::load(&dir, placement))?;
    let vae = VaeConfig::read(&dir.config_path(Component::Vae))?;
    let layout = net.layout(&vae);
    let scheduler_path = dir.scheduler_config_path();
    let scheduler_config_json = std::fs::read_to_string(&scheduler_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let scheduler = SchedulerConfig::from_json(&scheduler_config_json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let prediction = prediction_type(&scheduler_config_json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let threads = args.model.apply_threads(
        sd_service::machine::Role::Denoiser {
            unet_parameters: net.parameters(),
        },
        &metrics,
    );
    let profile = Profile::of(&dir, &net)?;
    let loras = Arc::new(LoraStore::new(
        &args.lora,
        net.modules().clone(),
        dir.unet_layers_per_block()?,
        placement,
        metrics.clone(),
    )?);
    // Warm up (measuring the cost, unless told not to) before SERVING.
    let cost = warm_up(&net, &layout, &args)?;
    let bounds = Bounds::of(
        &net,
        &layout,
        &profile.params,
        args.max_batch,
        // Within what the network can place (Z-Image's position table).
        net.max_latent_side().map_or(args.max_side, |l| {
            args.max_side.min(l * layout.vae_scale_factor)
        }),
        scheduler.num_train_timesteps() as f32,
    );
    let info = DenoiserInfo {
        model_id: sd_service::model_id(&dir, sd_service::family::components(profile.family)),
        model_name: dir.name(),
        prediction_type: prediction.as_str().to_string(),
        scheduler_config_json,
        cost,
        compute_dtype: sd_service::dtype_of(placement.kind) as i32,
        ..published(&net, &layout, profile)
    };
    tracing::info!(model = %info.model_id, family = %dir.family(), "denoiser ready");
    let net = Arc::new(net);
    let (controls, ip_adapters) = stores(&args, &net, &layout)?;
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
            batch::Batcher::start(net.clone(), config, metrics.clone())?,
            admission,
        ))
    };
    let cache_bytes = args.embedding_cache_mib << 20;
    let live_cost = info.cost.clone().map(|c| Arc::new(cost::LiveCost::new(c)));
    if let (Some((batcher, _)), Some(c)) = (&batcher, &live_cost) {
        batcher.observe(c.clone());
    }
    let service = Service(Arc::new(Core {
        net,
        batcher,
        cache: Arc::new(Mutex::new(EmbeddingCache::new(cache_bytes))),
        held: HeldBudget::new(cache_bytes.max(cache::MIN_HELD_BYTES)),
        cost: live_cost,
        loras,
        controls,
        ip_adapters,
        worker: Worker::new(threads.workers, args.model.max_queue, metrics.clone()),
        bounds,
        info,
        lifecycle,
        metrics,
    }));
    Ok(DenoiserServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// The folders of ControlNets and IP-Adapters requests may name.
type Stores = (
    Arc<sd_service::control::ControlStore>,
    Arc<sd_service::ip::IpStore>,
);

fn stores(args: &Args, net: &Arc<Denoiser>, layout: &Layout) -> anyhow::Result<Stores> {
    let placement = args.model.placement()?;
    let controls = sd_service::control::store(
        &args.control,
        net.control_base(),
        placement,
        Some(measure_controlnets(net.clone(), layout)),
    )?;
    let ip = sd_service::ip::store(&args.ip, net.clone(), placement)?;
    Ok((Arc::new(controls), Arc::new(ip)))
}

/// How a loaded ControlNet is measured against the UNet: one row at the
/// model's native latent side (at most 64), the typical text length; the
/// better of two timed forwards of each after a warm-up.
fn measure_controlnets(net: Arc<Denoiser>, layout: &Layout) -> sd_service::control::Measure {
    let side = layout.native_side.clamp(8, 64);
    Box::new(move |control| {
        let tokens = net.typical_tokens();
        let time = |f: &dyn Fn() -> bool| -> Option<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let start = std::time::Instant::now();
                if !f() {
                    return None;
                }
                best = best.min(start.elapsed().as_secs_f64());
            }
            Some(best)
        };
        let unet = time(&|| net.probe(1, side, tokens).is_ok())?;
        let cn = time(&|| control.probe(1, side, tokens).is_ok())?;
        (unet > 0.0).then(|| cn / unet)
    })
}

/// What the network and the family say about the model in Info.
fn published(net: &Denoiser, layout: &Layout, profile: Profile) -> DenoiserInfo {
    DenoiserInfo {
        latent_channels: layout.latent_channels as u32,
        vae_scale_factor: layout.vae_scale_factor as u32,
        sample_size: layout.native_side as u32,
        context_dim: net.context_dim() as u32,
        time_cond_dim: net.time_cond_dim().max(0) as u32,
        guidance_embedded: net.guidance_input().is_some(),
        default_guidance: profile.default_guidance,
        default_steps: profile.default_steps,
        example_prompts: profile.example_prompts,
        family: sd_proto::v1::ModelFamily::from(profile.family) as i32,
        family_params: Some(profile.params),
        layout: Some(LatentLayout {
            latent_channels: layout.latent_channels as u32,
            in_channels: layout.in_channels as u32,
            vae_scale_factor: layout.vae_scale_factor as u32,
            size_multiple: layout.size_multiple as u32,
            packed: layout.packed,
        }),
        ..Default::default()
    }
}

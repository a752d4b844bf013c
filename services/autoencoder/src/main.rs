//! sd-autoencoder: the VAE as a gRPC service. Decode turns normalised latents
//! into RGB 8-bit images (for every generation); Encode turns pixels into the
//! latent distribution (for image-to-image), leaving the sampling to the
//! caller so seeds follow diffusers.

use std::sync::Arc;

use clap::Parser;
use sd_models::config::VaeConfig;
use sd_models::{Component, ModelDir, Vae};
use sd_proto::v1::autoencoder_server::{Autoencoder, AutoencoderServer};
use sd_proto::v1::{
    AutoencoderInfo, AutoencoderInfoRequest, DecodeRequest, DecodeResponse, Dtype,
    EncodeImageRequest, EncodeImageResponse,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Phase};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_service::compute::to_rgb8;
use sd_service::{from_wire, handle, to_wire, ModelArgs, ServiceError, Worker};
use tch::{Kind, Tensor};
use tonic::{Request, Response, Status};

/// Serve a model's VAE over gRPC (sd.v1.Autoencoder).
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Most images one call may carry.
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 16)]
    max_batch: i64,
    /// Largest image side in pixels (decoded or encoded).
    #[arg(long, env = "SD_MAX_SIDE", default_value_t = 2048)]
    max_side: i64,
    /// Most pixels one call may decode or encode, all its images together
    /// (decoding takes ~0.5 KB of memory per output pixel on CPU). Larger
    /// batches are split by the caller (published in Info).
    #[arg(long, env = "SD_MAX_PIXELS", default_value_t = 2048 * 2048)]
    max_pixels: i64,
    /// Serve this VAE instead of the model's own (e.g. a fine-tuned or
    /// fp16-safe VAE): a VAE folder with `config.json` and weights, or a
    /// model directory with `vae/`. It must fit the model: the same latent
    /// channels and scale factor.
    #[arg(long, env = "SD_VAE")]
    vae: Option<std::path::PathBuf>,
}

struct Service {
    vae: Arc<Vae>,
    worker: Worker,
    info: AutoencoderInfo,
    max_batch: i64,
    max_side: i64,
    max_pixels: i64,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
}

impl Service {
    /// `t` is (1..=max_batch, channels, h, w) standing for images of
    /// `h × per_unit` by `w × per_unit` pixels: h and w positive multiples
    /// of `multiple`, each image side at most `max_side` pixels, the whole
    /// call at most `max_pixels`, every value finite.
    fn check(&self, t: &Tensor, field: &str, layout: Layout) -> Result<(), ServiceError> {
        let s = t.size();
        let Layout {
            channels,
            multiple,
            per_unit,
        } = layout;
        let max = self.max_side / per_unit;
        let ok = s.len() == 4
            && (1..=self.max_batch).contains(&s[0])
            && s[1] == channels
            && (1..=max).contains(&s[2])
            && (1..=max).contains(&s[3])
            && s[2] % multiple == 0
            && s[3] % multiple == 0;
        if !ok {
            return Err(ServiceError::invalid(
                field,
                format_args!(
                    "shape {s:?}, expected (1..={}, {channels}, h, w) with h, w multiples of {multiple} up to {max} ({} pixels)",
                    self.max_batch, self.max_side
                ),
            ));
        }
        let pixels = s[0] * s[2] * s[3] * per_unit * per_unit;
        if pixels > self.max_pixels {
            return Err(ServiceError::invalid(
                field,
                format_args!(
                    "{} images of {}×{} pixels are {pixels} pixels, at most {} per call",
                    s[0],
                    s[3] * per_unit,
                    s[2] * per_unit,
                    self.max_pixels
                ),
            ));
        }
        sd_service::finite(t, field)
    }

    fn latents_layout(&self) -> Layout {
        Layout {
            channels: self.info.latent_channels as i64,
            multiple: 1,
            per_unit: self.info.scale_factor as i64,
        }
    }

    fn pixels_layout(&self) -> Layout {
        Layout {
            channels: 3,
            multiple: self.info.scale_factor as i64,
            per_unit: 1,
        }
    }
}

/// How a tensor stands for images: its channels, the multiple its sides
/// must be, and pixels per element along a side.
#[derive(Clone, Copy)]
struct Layout {
    channels: i64,
    multiple: i64,
    per_unit: i64,
}

#[tonic::async_trait]
impl Autoencoder for Service {
    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        handle(&self.lifecycle, &self.metrics, "Decode", request, |r| {
            self.decode_inner(r)
        })
        .await
    }

    async fn encode(
        &self,
        request: Request<EncodeImageRequest>,
    ) -> Result<Response<EncodeImageResponse>, Status> {
        handle(&self.lifecycle, &self.metrics, "Encode", request, |r| {
            self.encode_inner(r)
        })
        .await
    }

    async fn info(
        &self,
        _: Request<AutoencoderInfoRequest>,
    ) -> Result<Response<AutoencoderInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}

impl Service {
    async fn decode_inner(&self, request: DecodeRequest) -> Result<DecodeResponse, ServiceError> {
        let latents = from_wire(request.latents.as_ref(), "latents")?;
        self.check(&latents, "latents", self.latents_layout())?;
        let vae = self.vae.clone();
        let (scale, shift) = vae.config().normalization();
        let images = self
            .worker
            .run(Phase::VaeDecode, move || {
                // diffusers' order: latents / scaling_factor + shift_factor.
                // FLUX.2: the batch norm undone and the patches unfolded.
                let z = vae
                    .from_denoiser(&(latents.to_kind(Kind::Float) / scale + shift))
                    .map_err(|e| ServiceError::model_input("latents", e))?;
                let pixels = vae
                    .decode(&z)
                    .map_err(|e| ServiceError::model_input("latents", e))?;
                to_rgb8(&pixels)
            })
            .await?;
        Ok(DecodeResponse { images })
    }

    async fn encode_inner(
        &self,
        request: EncodeImageRequest,
    ) -> Result<EncodeImageResponse, ServiceError> {
        let pixels = from_wire(request.pixels.as_ref(), "pixels")?;
        self.check(&pixels, "pixels", self.pixels_layout())?;
        let vae = self.vae.clone();
        let (mean, std) = self
            .worker
            .run(Phase::VaeEncode, move || {
                let d = vae
                    .encode(&pixels)
                    .map_err(|e| ServiceError::model_input("pixels", e))?;
                // In the denoiser's space (FLUX.2: patchified, normalised).
                let input = |e| ServiceError::model_input("pixels", e);
                let mean = vae.to_denoiser(&d.mean).map_err(input)?;
                let std = vae.std_to_denoiser(&d.std).map_err(input)?;
                Ok((
                    to_wire(&mean, Dtype::Float32)?,
                    to_wire(&std, Dtype::Float32)?,
                ))
            })
            .await?;
        Ok(EncodeImageResponse {
            mean: Some(mean),
            std: Some(std),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (server, tls) = (args.server.clone(), args.tls.clone());
    sd_service::serve_model(
        sd_proto::Stage::Autoencoder,
        &server,
        &tls,
        move |metrics, lifecycle| load(args, metrics, lifecycle),
    )
}

/// A VAE given with `--vae` must fit the model it is served with: its
/// latents as many channels and its scale factor the same as the model's
/// own VAE's (which the UNet and the gateway's sizes assume).
fn check_fits(vae: &Vae, own: &ModelDir) -> anyhow::Result<()> {
    let theirs = VaeConfig::read(&own.config_path(Component::Vae))?;
    let (c, f) = (vae.config().latent_channels, vae.scale_factor());
    let (want_c, want_f) = (theirs.latent_channels, theirs.scale_factor());
    anyhow::ensure!(
        (c, f) == (want_c, want_f),
        "--vae: this VAE has {c} latent channels and scale factor {f}; the model's has \
         {want_c} and {want_f}"
    );
    Ok(())
}

/// Load the VAE; warm up.
fn load(
    args: Args,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) -> anyhow::Result<AutoencoderServer<Service>> {
    let max = args.server.max_message_bytes();
    let placement = args.model.placement()?;
    let threads = args
        .model
        .apply_threads(sd_service::machine::Role::Autoencoder, &metrics);
    let own = args.model.model_dir()?;
    let dir = match &args.vae {
        Some(v) => own
            .clone()
            .with_vae(v)
            .map_err(|e| anyhow::anyhow!("--vae: {e}"))?,
        None => own.clone(),
    };
    let vae_config = VaeConfig::read(&dir.config_path(Component::Vae))?;
    let vae_placement =
        sd_service::family::vae_placement(placement, dir.family(), vae_config.force_upcast);
    if vae_placement.kind != placement.kind {
        tracing::info!("the VAE runs in fp32 (force_upcast), as diffusers' SDXL pipelines run it");
    }
    let vae = sd_service::timed_load(&metrics, "vae", || dir.load_vae(vae_placement))?;
    if args.vae.is_some() {
        check_fits(&vae, &own)?;
    }
    let c = vae.config().clone();
    // Warm up: one decode before reporting SERVING.
    let _ = vae.decode(&Tensor::zeros(
        [1, c.latent_channels, 4, 4],
        (Kind::Float, tch::Device::Cpu),
    ))?;
    let (scale, shift) = c.normalization();
    // The latents as the denoiser sees them: FLUX.2's 2×2 patches are 4×
    // the channels at twice the scale.
    let patch = if vae.patched() { 2 } else { 1 };
    let info = AutoencoderInfo {
        model_id: sd_service::model_id(&dir, &[Component::Vae]),
        scale_factor: (vae.scale_factor() * patch) as u32,
        scaling_factor: scale as f32,
        latent_channels: (c.latent_channels * patch * patch) as u32,
        max_pixels: args.max_pixels.max(1) as u64,
        family: sd_proto::v1::ModelFamily::from(dir.family()) as i32,
        normalization: Some(sd_proto::v1::LatentNormalization {
            scale: scale as f32,
            shift: shift as f32,
        }),
    };
    let service = Service {
        vae: Arc::new(vae),
        worker: Worker::new(threads.workers, args.model.max_queue, metrics.clone()),
        info,
        max_batch: args.max_batch,
        max_side: args.max_side,
        max_pixels: args.max_pixels.max(1),
        lifecycle,
        metrics,
    };
    Ok(AutoencoderServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

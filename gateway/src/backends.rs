//! Clients for the three model services and what the gateway learns from
//! them at start (it reads no model files).

use std::time::Duration;

use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfo, AutoencoderInfoRequest, DenoiserInfo, DenoiserInfoRequest, TextEncoderInfo,
    TextEncoderInfoRequest,
};
use sd_sampling::{SchedulerConfig, SchedulerKind};
use tonic::transport::{Channel, Endpoint};

/// Where the model services are.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Text-encoder service URL.
    #[arg(
        long,
        env = "SD_TEXT_ENCODER",
        default_value = "http://127.0.0.1:50052"
    )]
    pub text_encoder: String,
    /// Denoiser service URL.
    #[arg(long, env = "SD_DENOISER", default_value = "http://127.0.0.1:50053")]
    pub denoiser: String,
    /// Autoencoder service URL.
    #[arg(long, env = "SD_AUTOENCODER", default_value = "http://127.0.0.1:50054")]
    pub autoencoder: String,
    /// How long to wait at start for the services to answer.
    #[arg(long, env = "SD_BACKEND_WAIT_SECS", default_value_t = 300)]
    pub backend_wait_secs: u64,
}

/// What the step loop needs to know about the model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub id: String,
    pub name: String,
    pub latent_channels: usize,
    pub scale_factor: u32,
    pub sample_size: u32,
    pub scaling_factor: f32,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    pub prediction_type: String,
    pub text_layers: u32,
    pub text_model_id: String,
}

#[derive(Clone)]
pub struct Backends {
    pub text: TextEncoderClient<Channel>,
    pub denoiser: DenoiserClient<Channel>,
    pub autoencoder: AutoencoderClient<Channel>,
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}

impl Backends {
    pub fn connect(args: &BackendArgs, max_message_bytes: usize) -> anyhow::Result<Self> {
        Ok(Backends {
            text: TextEncoderClient::new(channel(&args.text_encoder)?)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            denoiser: DenoiserClient::new(channel(&args.denoiser)?)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            autoencoder: AutoencoderClient::new(channel(&args.autoencoder)?)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        })
    }

    /// Ask every service about the model, retrying until they answer or
    /// `wait` runs out.
    pub async fn model_facts(&self, wait: Duration) -> anyhow::Result<ModelFacts> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.try_facts().await {
                Ok(f) => return Ok(f),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("waiting for model services: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_facts(&self) -> anyhow::Result<ModelFacts> {
        let d: DenoiserInfo = self
            .denoiser
            .clone()
            .info(DenoiserInfoRequest {})
            .await?
            .into_inner();
        let a: AutoencoderInfo = self
            .autoencoder
            .clone()
            .info(AutoencoderInfoRequest {})
            .await?
            .into_inner();
        let t: TextEncoderInfo = self
            .text
            .clone()
            .info(TextEncoderInfoRequest {})
            .await?
            .into_inner();
        let scheduler_config = SchedulerConfig::from_json(&d.scheduler_config_json)?;
        let default_scheduler = scheduler_config
            .class_name()
            .and_then(SchedulerKind::from_diffusers_class)
            .unwrap_or(SchedulerKind::Pndm);
        if a.latent_channels != d.latent_channels || a.scale_factor != d.vae_scale_factor {
            anyhow::bail!(
                "autoencoder ({} channels, ×{}) and denoiser ({} channels, ×{}) disagree: different models?",
                a.latent_channels,
                a.scale_factor,
                d.latent_channels,
                d.vae_scale_factor
            );
        }
        if t.hidden_size != d.context_dim {
            anyhow::bail!(
                "text encoder width {} differs from the denoiser's context width {}: different models?",
                t.hidden_size,
                d.context_dim
            );
        }
        Ok(ModelFacts {
            id: d.model_id,
            name: d.model_name,
            latent_channels: d.latent_channels as usize,
            scale_factor: d.vae_scale_factor,
            sample_size: d.sample_size,
            scaling_factor: a.scaling_factor,
            scheduler_config,
            default_scheduler,
            prediction_type: d.prediction_type,
            text_layers: t.num_layers,
            text_model_id: t.model_id,
        })
    }
}

//! The three model stages as seen from the gateway: a pool of replicas each
//! (see `pool.rs`), and what the gateway learns from them at start — it reads
//! no model files.

use std::sync::Arc;
use std::time::Duration;

use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfoRequest, DenoiserInfo, DenoiserInfoRequest, TextEncoderInfoRequest, UnetCost,
};
use sd_runtime::deadline::Deadline;
use sd_runtime::internal::SendToken;
use sd_runtime::tls::ClientTls;
use sd_sampling::{SchedulerConfig, SchedulerKind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Stage;
use crate::facts::{Family, ModelFacts, SharedCost};
use crate::pool::Pool;

/// Where the model services are: comma-separated URLs, or `dns://host:port`
/// for every address a name resolves to (re-resolved while running).
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Text-encoder replicas.
    #[arg(
        long,
        env = "SD_TEXT_ENCODER",
        default_value = "http://127.0.0.1:50052"
    )]
    pub text_encoder: String,
    /// Denoiser replicas.
    #[arg(long, env = "SD_DENOISER", default_value = "http://127.0.0.1:50053")]
    pub denoiser: String,
    /// Autoencoder replicas.
    #[arg(long, env = "SD_AUTOENCODER", default_value = "http://127.0.0.1:50054")]
    pub autoencoder: String,
    /// How long to wait at start for the services to answer (seconds).
    #[arg(long, env = "SD_BACKEND_WAIT_SECS", default_value_t = 300)]
    pub backend_wait_secs: u64,
    /// How often replicas are re-resolved and health-checked (milliseconds).
    #[arg(long, env = "SD_BACKEND_REFRESH_MS", default_value_t = 1000)]
    pub backend_refresh_ms: u64,
}

/// A channel to a model service that puts the internal token (when there
/// is one) on every call.
pub type Internal = InterceptedService<Channel, SendToken>;

/// How the gateway reaches the model services.
#[derive(Clone, Default)]
pub struct Transport {
    /// TLS toward them (and a client certificate for mutual TLS).
    pub tls: Option<ClientTls>,
    /// The internal token they require.
    pub token: SendToken,
}

/// Whether a start-up call failed because a model service refused the
/// gateway's internal token.
fn refused_token(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::error::Error>()
        .is_some_and(crate::error::Error::is_credentials)
}

#[derive(Clone)]
pub struct Backends {
    pub text: Arc<Pool>,
    pub denoiser: Arc<Pool>,
    pub autoencoder: Arc<Pool>,
    pub max_message_bytes: usize,
    /// Puts the internal token on every call.
    pub token: SendToken,
}

impl Backends {
    pub fn connect(
        args: &BackendArgs,
        max_message_bytes: usize,
        transport: Transport,
    ) -> anyhow::Result<Self> {
        let tls = transport.tls;
        let b = Backends {
            text: Pool::new(Stage::TextEncoder, &args.text_encoder, tls.clone())?,
            denoiser: Pool::new(Stage::Denoiser, &args.denoiser, tls.clone())?,
            autoencoder: Pool::new(Stage::Autoencoder, &args.autoencoder, tls)?,
            max_message_bytes,
            token: transport.token,
        };
        let every = Duration::from_millis(args.backend_refresh_ms.max(50));
        for p in b.pools() {
            p.watch(every);
        }
        Ok(b)
    }

    pub fn pools(&self) -> [&Arc<Pool>; 3] {
        [&self.text, &self.denoiser, &self.autoencoder]
    }

    /// Every stage has at least one SERVING replica.
    pub fn all_serving(&self) -> bool {
        self.pools().iter().all(|p| p.any_serving())
    }

    fn internal(&self, ch: Channel) -> Internal {
        InterceptedService::new(ch, self.token.clone())
    }

    pub fn text_client(&self, ch: Channel) -> TextEncoderClient<Internal> {
        TextEncoderClient::new(self.internal(ch))
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    pub fn denoiser_client(&self, ch: Channel) -> DenoiserClient<Internal> {
        DenoiserClient::new(self.internal(ch))
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    pub fn autoencoder_client(&self, ch: Channel) -> AutoencoderClient<Internal> {
        AutoencoderClient::new(self.internal(ch))
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// Ask every stage about the model, retrying until they answer or
    /// `wait` runs out.
    pub async fn model_facts(&self, wait: Duration) -> anyhow::Result<ModelFacts> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.try_facts().await {
                Ok(f) => return Ok(f),
                // A refused token does not get better by waiting.
                Err(e) if tokio::time::Instant::now() < deadline && !refused_token(&e) => {
                    tracing::info!("waiting for model services: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The denoiser's current UNet cost (it keeps it current as it runs).
    pub async fn denoiser_cost(&self) -> anyhow::Result<Option<UnetCost>> {
        let dl = Deadline::after(Duration::from_secs(10));
        Ok(self.denoiser_info(&dl).await?.cost)
    }

    async fn denoiser_info(&self, dl: &Deadline) -> anyhow::Result<DenoiserInfo> {
        Ok(self
            .denoiser
            .call(dl, |ch, _| async move {
                Ok(self
                    .denoiser_client(ch)
                    .info(DenoiserInfoRequest {})
                    .await?
                    .into_inner())
            })
            .await?)
    }

    async fn try_facts(&self) -> anyhow::Result<ModelFacts> {
        let dl = Deadline::after(Duration::from_secs(10));
        let d = self.denoiser_info(&dl).await?;
        let a = self
            .autoencoder
            .call(&dl, |ch, _| async move {
                Ok(self
                    .autoencoder_client(ch)
                    .info(AutoencoderInfoRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        let t = self
            .text
            .call(&dl, |ch, _| async move {
                Ok(self
                    .text_client(ch)
                    .info(TextEncoderInfoRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
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
            max_decode_pixels: a.max_pixels,
            cost: SharedCost::new(d.cost),
            scheduler_config,
            default_scheduler,
            prediction: d.prediction_type.parse()?,
            text_layers: t.num_layers,
            text_model_id: t.model_id,
            family: Family {
                pooled_dim: d.pooled_dim,
                time_ids_len: d.time_ids_len,
                time_cond_dim: d.time_cond_dim,
                force_zeros_for_empty_prompt: d.force_zeros_for_empty_prompt,
                requires_aesthetics_score: d.requires_aesthetics_score,
                // Older denoisers publish none.
                default_guidance: if d.default_guidance > 0.0 {
                    d.default_guidance
                } else {
                    Family::default().default_guidance
                },
                default_steps: d.default_steps,
            },
        })
    }
}

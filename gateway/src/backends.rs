//! The three model stages as seen from the gateway: a pool of replicas each
//! (see `pool.rs`), and what the gateway learns from them at start — it reads
//! no model files.

use std::sync::Arc;
use std::time::Duration;

use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfo, AutoencoderInfoRequest, DenoiserInfo, DenoiserInfoRequest, ForwardCost,
    TextEncoderInfo, TextEncoderInfoRequest,
};
use sd_proto::Family;
use sd_runtime::deadline::Deadline;
use sd_runtime::internal::SendToken;
use sd_runtime::tls::ClientTls;
use sd_sampling::{SchedulerConfig, SchedulerKind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Stage;
use crate::facts::{Layout, ModelFacts, Normalization, Profile, SharedCost};
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
    pub async fn denoiser_cost(&self) -> anyhow::Result<Option<ForwardCost>> {
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
        let facts = Published {
            denoiser: &d,
            autoencoder: &a,
            text: &t,
        }
        .check()?;
        // Older denoisers publish none: their float32.
        let compute_dtype = sd_proto::v1::Dtype::try_from(d.compute_dtype)
            .ok()
            .filter(|t| *t != sd_proto::v1::Dtype::Unspecified)
            .unwrap_or(sd_proto::v1::Dtype::Float32);
        Ok(ModelFacts {
            compute_dtype,
            id: d.model_id,
            name: d.model_name,
            layout: facts.layout,
            sample_size: d.sample_size,
            normalization: facts.normalization,
            max_decode_pixels: a.max_pixels,
            cost: SharedCost::new(d.cost),
            scheduler_config,
            default_scheduler,
            prediction: d.prediction_type.parse()?,
            text_layers: t.num_layers,
            text_model_id: t.model_id,
            textual_inversions: t.textual_inversions,
            profile: facts.profile,
            image_encoder: t.image_encoder,
        })
    }
}

/// What the three services published about their model, before the
/// gateway serves it.
struct Published<'a> {
    denoiser: &'a DenoiserInfo,
    autoencoder: &'a AutoencoderInfo,
    text: &'a TextEncoderInfo,
}

/// What the gateway takes from it, checked.
struct Checked {
    layout: Layout,
    normalization: Normalization,
    profile: Profile,
}

impl Published<'_> {
    /// The services hold one model: the same family, the VAE's latents
    /// the network's, the text width the network's context width.
    fn check(&self) -> anyhow::Result<Checked> {
        let (d, a, t) = (self.denoiser, self.autoencoder, self.text);
        let family = Family::from_wire(d.family).map_err(|e| anyhow::anyhow!("denoiser: {e}"))?;
        for (stage, theirs) in [("text encoder", t.family), ("autoencoder", a.family)] {
            let theirs = Family::from_wire(theirs).map_err(|e| anyhow::anyhow!("{stage}: {e}"))?;
            anyhow::ensure!(
                theirs == family,
                "the {stage} serves an {theirs} model, the denoiser an {family} one: different models?"
            );
        }
        let mut params = d
            .family_params
            .clone()
            .ok_or_else(|| anyhow::anyhow!("denoiser: no family parameters published"))?;
        // FLUX: the longest T5 prompt both the text encoder's tokenizer and
        // the denoiser take.
        if let sd_proto::v1::denoiser_info::FamilyParams::Flux(f) = &mut params {
            if t.max_tokens > 0 {
                f.max_sequence_length = f.max_sequence_length.min(t.max_tokens);
            }
        }
        let params_family = Family::of_params(&params);
        anyhow::ensure!(
            params_family == family,
            "denoiser: {params_family} parameters for an {family} model"
        );
        let l = d
            .layout
            .ok_or_else(|| anyhow::anyhow!("denoiser: no latent layout published"))?;
        let layout = Layout {
            latent_channels: l.latent_channels as usize,
            in_channels: l.in_channels as usize,
            scale_factor: l.vae_scale_factor,
            size_multiple: l.size_multiple,
            packed: l.packed,
        };
        anyhow::ensure!(
            layout.latent_channels > 0
                && layout.in_channels >= layout.latent_channels
                && layout.scale_factor > 0
                && layout.size_multiple > 0
                && layout.size_multiple.is_multiple_of(layout.scale_factor),
            "denoiser: an impossible latent layout {l:?}"
        );
        if a.latent_channels as usize != layout.latent_channels
            || a.scale_factor != layout.scale_factor
        {
            anyhow::bail!(
                "autoencoder ({} channels, ×{}) and denoiser ({} channels, ×{}) disagree: different models?",
                a.latent_channels,
                a.scale_factor,
                layout.latent_channels,
                layout.scale_factor
            );
        }
        if t.hidden_size != d.context_dim {
            anyhow::bail!(
                "text encoder width {} differs from the denoiser's context width {}: different models?",
                t.hidden_size,
                d.context_dim
            );
        }
        let n = a
            .normalization
            .ok_or_else(|| anyhow::anyhow!("autoencoder: no latent normalization published"))?;
        anyhow::ensure!(
            n.scale.is_finite() && n.scale != 0.0 && n.shift.is_finite(),
            "autoencoder: an impossible latent normalization {n:?}"
        );
        Ok(Checked {
            layout,
            normalization: Normalization {
                scale: n.scale,
                shift: n.shift,
            },
            profile: Profile {
                params,
                time_cond_dim: d.time_cond_dim,
                // Older denoisers say it by the LCM embedding's width alone.
                guidance_embedded: d.guidance_embedded || d.time_cond_dim > 0,
                // Older denoisers publish none.
                default_guidance: if d.default_guidance > 0.0 {
                    d.default_guidance
                } else {
                    Profile::default().default_guidance
                },
                default_steps: d.default_steps,
                example_prompts: d.example_prompts.clone(),
            },
        })
    }
}

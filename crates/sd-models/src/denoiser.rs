//! The denoising network behind one seam. The denoiser service, its
//! batcher, its cost probe, the guidance core and the benchmark hold a
//! [`Denoiser`], never a particular network: each family's network is one
//! variant, chosen once at load by the model's [`Family`].
//!
//! An enum, not a trait object: the set of networks is closed (what
//! sdserve serves), a forward is matched once per batch (no virtual call per
//! layer to save), and adding a family is a compile error here and wherever
//! else the network must decide — a trait would let a new network silently
//! take a default.

use tch::{Kind, Tensor};

use crate::config::VaeConfig;
use crate::control::ControlResiduals;
use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::flux::FluxTransformer;
use crate::flux2::{Flux2Transformer, References};
use crate::model_dir::{Family, ModelDir};
use crate::unet::{Added, UNet};
use crate::zimage::ZImageTransformer;

/// The networks sdserve runs to denoise.
pub enum Denoiser {
    /// SD 1.x/2.x and SDXL: `UNet2DConditionModel`.
    Unet(Box<UNet>),
    /// FLUX.1: `FluxTransformer2DModel`.
    Flux(Box<FluxTransformer>),
    /// FLUX.2 Klein: `Flux2Transformer2DModel`.
    Flux2(Box<Flux2Transformer>),
    /// Z-Image: `ZImageTransformer2DModel`.
    ZImage(Box<ZImageTransformer>),
}

/// How a network takes guidance as an input (instead of, or beside, a
/// second unconditional row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceInput {
    /// An LCM UNet: the sinusoidal embedding (this wide) of the guidance
    /// scale less one; no unconditional row.
    Embedding(i64),
    /// FLUX.1-dev: the distilled guidance value itself, one per row (B,);
    /// real classifier-free guidance may still add unconditional rows.
    Value,
}

/// What one forward is conditioned on, whatever the network: one row per
/// batch item in each tensor.
#[derive(Debug, Clone, Copy)]
pub struct Conditioning<'a> {
    /// The text embeddings the network attends to (B, tokens, dim).
    pub context: &'a Tensor,
    /// The pooled text embedding (B, dim): SDXL.
    pub pooled: Option<&'a Tensor>,
    /// The family's extra vector per item: SDXL's size and crop time ids
    /// (B, n).
    pub time_ids: Option<&'a Tensor>,
    /// Guidance as an input of the network, not a second row: LCM's
    /// guidance embedding (B, dim); FLUX.1-dev's guidance values (B,).
    pub guidance: Option<&'a Tensor>,
    /// Image conditioning taken beside the latents (concatenated on the
    /// channels): an inpainting UNet's mask and masked-image latents
    /// (B, in_channels - latent_channels, h, w).
    pub image: Option<&'a Tensor>,
    /// ControlNets' residuals (a UNet's or FLUX's).
    pub control: Option<&'a ControlResiduals>,
    /// FLUX.2 Klein: reference images' tokens, attended to beside the
    /// generated ones.
    pub references: Option<References<'a>>,
}

/// How the network's latents are laid out, as the denoiser publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Channels of the VAE's latents (what the scheduler steps).
    pub latent_channels: i64,
    /// Channels the network takes: the latents and any image conditioning.
    pub in_channels: i64,
    /// Pixels per latent along a side (the VAE's scale factor).
    pub vae_scale_factor: i64,
    /// Image sides must be multiples of this many pixels.
    pub size_multiple: i64,
    /// Whether the network takes latents packed into patch tokens.
    pub packed: bool,
    /// The network's native latent side (its sample size).
    pub native_side: i64,
}

impl Denoiser {
    /// The network of the model in `dir`, for its family.
    pub fn load(dir: &ModelDir, placement: Placement) -> Result<Self> {
        match dir.family() {
            Family::Sd | Family::Sdxl => Ok(Denoiser::Unet(Box::new(dir.load_unet(placement)?))),
            Family::Flux => Ok(Denoiser::Flux(Box::new(dir.load_transformer(placement)?))),
            Family::Klein => Ok(Denoiser::Flux2(Box::new(
                dir.load_flux2_transformer(placement)?,
            ))),
            Family::ZImage => Ok(Denoiser::ZImage(Box::new(
                dir.load_zimage_transformer(placement)?,
            ))),
        }
    }

    /// Predict the model output for `latents` at `timesteps` (one per item,
    /// or one for all) under `cond`.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        cond: Conditioning,
    ) -> Result<Tensor> {
        match self {
            Denoiser::Unet(unet) => {
                if cond.references.is_some() {
                    return Err(ModelError::Input("a UNet takes no reference images".into()));
                }
                let control = match cond.control {
                    None => None,
                    Some(ControlResiduals::Unet(r)) => Some(r),
                    Some(ControlResiduals::Flux(_)) => {
                        return Err(ModelError::Input(
                            "a FLUX ControlNet's samples given to a UNet".into(),
                        ))
                    }
                };
                let added = Added {
                    text_embeds: cond.pooled,
                    time_ids: cond.time_ids,
                    timestep_cond: cond.guidance,
                    control,
                };
                match cond.image {
                    None => unet.forward_with(latents, timesteps, cond.context, added),
                    Some(image) => {
                        let x = concat_channels(latents, image)?;
                        unet.forward_with(&x, timesteps, cond.context, added)
                    }
                }
            }
            Denoiser::Flux(flux) => {
                if cond.image.is_some() || cond.time_ids.is_some() || cond.references.is_some() {
                    return Err(ModelError::Input(
                        "FLUX takes no image conditioning, time ids or reference images (not \
                         served yet)"
                            .into(),
                    ));
                }
                let control = match cond.control {
                    None => None,
                    Some(ControlResiduals::Flux(r)) => Some(r),
                    Some(ControlResiduals::Unet(_)) => {
                        return Err(ModelError::Input(
                            "a UNet ControlNet's residuals given to FLUX".into(),
                        ))
                    }
                };
                flux.forward(
                    latents,
                    timesteps,
                    cond.context,
                    cond.pooled,
                    cond.guidance,
                    control,
                )
            }
            Denoiser::Flux2(flux) => {
                if cond.image.is_some()
                    || cond.control.is_some()
                    || cond.time_ids.is_some()
                    || cond.pooled.is_some()
                {
                    return Err(ModelError::Input(
                        "FLUX.2 takes no pooled embedding, image conditioning, ControlNet \
                         residuals or time ids"
                            .into(),
                    ));
                }
                flux.forward(
                    latents,
                    timesteps,
                    cond.context,
                    cond.guidance,
                    cond.references,
                )
            }
            Denoiser::ZImage(z) => {
                if cond.image.is_some()
                    || cond.control.is_some()
                    || cond.time_ids.is_some()
                    || cond.pooled.is_some()
                    || cond.guidance.is_some()
                    || cond.references.is_some()
                {
                    return Err(ModelError::Input(
                        "Z-Image takes no pooled embedding, guidance input, image conditioning, \
                         ControlNet residuals, time ids or reference images"
                            .into(),
                    ));
                }
                let captions: Vec<Tensor> = (0..cond.context.size()[0])
                    .map(|i| cond.context.get(i))
                    .collect();
                // The pipeline negates the network's output: the flow's velocity.
                Ok(-z.forward(latents, timesteps, &captions)?)
            }
        }
    }

    /// A forward of `rows` items at a latent side of `side` with zeros for
    /// every input: warm-up and the cost model, where only the time counts.
    pub fn probe(&self, rows: i64, side: i64, tokens: i64) -> Result<Tensor> {
        let f = (Kind::Float, tch::Device::Cpu);
        match self {
            Denoiser::Unet(unet) => {
                let c = unet.config();
                unet.forward_probe(
                    &Tensor::zeros([rows, c.in_channels, side, side], f),
                    &Tensor::from_slice(&vec![500.0f32; rows as usize]),
                    &Tensor::zeros([rows, tokens, c.context_dim()], f),
                )
            }
            Denoiser::Flux(flux) => {
                let c = flux.config();
                // `side` latents: an even number for the 2×2 packing.
                let side = (side + 1) / 2 * 2;
                flux.forward(
                    &Tensor::zeros([rows, c.latent_channels(), side, side], f),
                    &Tensor::from_slice(&vec![500.0f32; rows as usize]),
                    &Tensor::zeros([rows, tokens, c.joint_attention_dim], f),
                    Some(&Tensor::zeros([rows, c.pooled_projection_dim], f)),
                    Some(&Tensor::from_slice(&vec![3.5f32; rows as usize])),
                    None,
                )
            }
            Denoiser::Flux2(flux) => {
                let c = flux.config();
                let guidance = Tensor::from_slice(&vec![4.0f32; rows as usize]);
                flux.forward(
                    &Tensor::zeros([rows, c.in_channels, side, side], f),
                    &Tensor::from_slice(&vec![500.0f32; rows as usize]),
                    &Tensor::zeros([rows, tokens, c.joint_attention_dim], f),
                    c.guidance_embeds.then_some(&guidance),
                    None,
                )
            }
            Denoiser::ZImage(z) => {
                let c = z.config();
                let side = (side + 1) / 2 * 2;
                let captions: Vec<Tensor> = (0..rows)
                    .map(|_| Tensor::zeros([tokens, c.cap_feat_dim], f))
                    .collect();
                z.forward(
                    &Tensor::zeros([rows, c.in_channels, side, side], f),
                    &Tensor::from_slice(&vec![500.0f32; rows as usize]),
                    &captions,
                )
            }
        }
    }

    /// The latent layout, given the model's VAE.
    pub fn layout(&self, vae: &VaeConfig) -> Layout {
        let scale = vae.scale_factor();
        match self {
            Denoiser::Unet(unet) => {
                let c = unet.config();
                Layout {
                    latent_channels: vae.latent_channels,
                    in_channels: c.in_channels,
                    vae_scale_factor: scale,
                    // diffusers' SD pipelines ask multiples of the VAE's scale.
                    size_multiple: scale,
                    packed: false,
                    native_side: c.sample_size,
                }
            }
            Denoiser::Flux(flux) => Layout {
                latent_channels: vae.latent_channels,
                in_channels: flux.config().latent_channels(),
                vae_scale_factor: scale,
                // 2×2 latent patches: sides are multiples of twice the scale.
                size_multiple: 2 * scale,
                packed: true,
                // The pipelines' default_sample_size: 1024 px at scale 8.
                native_side: 128,
            },
            // The pipeline patchifies the VAE's latents 2×2: the network and
            // the scheduler see 4× the channels at twice the scale.
            Denoiser::Flux2(flux) => Layout {
                latent_channels: 4 * vae.latent_channels,
                in_channels: flux.config().in_channels,
                vae_scale_factor: 2 * scale,
                size_multiple: 2 * scale,
                packed: false,
                // default_sample_size 128 at scale 8: 1024 px.
                native_side: 64,
            },
            Denoiser::ZImage(z) => Layout {
                latent_channels: vae.latent_channels,
                in_channels: z.config().in_channels,
                vae_scale_factor: scale,
                // 2×2 patches inside the network.
                size_multiple: 2 * scale,
                packed: true,
                // The pipeline's 1024 px default.
                native_side: 128,
            },
        }
    }

    /// The largest latent side the network can place (Z-Image's position
    /// table; None: no bound of its own).
    pub fn max_latent_side(&self) -> Option<i64> {
        match self {
            Denoiser::ZImage(z) => {
                let l = &z.config().axes_lens;
                Some(2 * l[1].min(l[2]))
            }
            Denoiser::Unet(_) | Denoiser::Flux(_) | Denoiser::Flux2(_) => None,
        }
    }

    /// Whether the network attends to reference images' tokens (FLUX.2).
    pub fn takes_references(&self) -> bool {
        matches!(self, Denoiser::Flux2(_))
    }

    /// Text tokens a typical call brings (CLIP's 77; FLUX: T5's default
    /// 512): the warm-up's and the cost model's context length.
    pub fn typical_tokens(&self) -> i64 {
        match self {
            Denoiser::Unet(_) => 77,
            Denoiser::Flux(_) | Denoiser::Flux2(_) => 512,
            // The prompt's own tokens: a short prompt's, in its chat turn.
            Denoiser::ZImage(_) => 64,
        }
    }

    /// Width of the text embeddings the network attends to.
    pub fn context_dim(&self) -> i64 {
        match self {
            Denoiser::Unet(unet) => unet.config().context_dim(),
            Denoiser::Flux(flux) => flux.config().joint_attention_dim,
            Denoiser::Flux2(flux) => flux.config().joint_attention_dim,
            Denoiser::ZImage(z) => z.config().cap_feat_dim,
        }
    }

    /// How the network takes guidance as an input (None: guidance is
    /// classifier-free alone, a second row).
    pub fn guidance_input(&self) -> Option<GuidanceInput> {
        match self {
            Denoiser::Unet(unet) => unet.time_cond_dim().map(GuidanceInput::Embedding),
            Denoiser::Flux(flux) => flux
                .config()
                .guidance_embeds
                .then_some(GuidanceInput::Value),
            Denoiser::Flux2(flux) => flux
                .config()
                .guidance_embeds
                .then_some(GuidanceInput::Value),
            Denoiser::ZImage(_) => None,
        }
    }

    /// Width of an LCM UNet's guidance embedding (0: none).
    pub fn time_cond_dim(&self) -> i64 {
        match self.guidance_input() {
            Some(GuidanceInput::Embedding(d)) => d,
            Some(GuidanceInput::Value) | None => 0,
        }
    }

    /// Width of the pooled text embedding, where the network alone fixes
    /// it (FLUX); an SDXL UNet's shares `add_embedding` with its time ids,
    /// so its family parameters say it (None here).
    pub fn pooled_dim(&self) -> Option<i64> {
        match self {
            Denoiser::Unet(_) => None,
            Denoiser::Flux(flux) => Some(flux.config().pooled_projection_dim),
            Denoiser::Flux2(_) | Denoiser::ZImage(_) => None,
        }
    }

    /// Whether the network takes SDXL's pooled embedding and time ids.
    pub fn takes_text_time(&self) -> bool {
        match self {
            Denoiser::Unet(unet) => unet.takes_text_time(),
            Denoiser::Flux(_) | Denoiser::Flux2(_) | Denoiser::ZImage(_) => false,
        }
    }

    /// SDXL's added conditioning: (the sinusoidal width of each time id,
    /// the width `add_embedding` takes); None for a network without it.
    pub fn text_time_dims(&self) -> Option<(i64, i64)> {
        match self {
            Denoiser::Unet(unet) => unet.config().text_time(),
            Denoiser::Flux(_) | Denoiser::Flux2(_) | Denoiser::ZImage(_) => None,
        }
    }

    /// Parameters in its weights.
    pub fn parameters(&self) -> u64 {
        match self {
            Denoiser::Unet(unet) => unet.parameters(),
            Denoiser::Flux(flux) => flux.parameters(),
            Denoiser::Flux2(flux) => flux.parameters(),
            Denoiser::ZImage(z) => z.parameters(),
        }
    }

    /// Its LoRA-capable layers.
    pub fn modules(&self) -> &crate::modules::ModuleIndex {
        match self {
            Denoiser::Unet(unet) => unet.modules(),
            Denoiser::Flux(flux) => flux.modules(),
            Denoiser::Flux2(flux) => flux.modules(),
            Denoiser::ZImage(z) => z.modules(),
        }
    }

    /// The network ControlNets are loaded for (None: it takes none).
    pub fn control_base(&self) -> Option<crate::control::ControlBase> {
        match self {
            Denoiser::Unet(unet) => Some(crate::control::ControlBase::Unet(Box::new(
                unet.config().clone(),
            ))),
            Denoiser::Flux(flux) => Some(crate::control::ControlBase::Flux(flux.config().clone())),
            Denoiser::Flux2(_) | Denoiser::ZImage(_) => None,
        }
    }

    /// FLUX.1's double- and single-stream block counts (None: another
    /// network).
    pub fn flux_blocks(&self) -> Option<(usize, usize)> {
        match self {
            Denoiser::Flux(flux) => Some((
                flux.config().num_layers.max(0) as usize,
                flux.config().num_single_layers.max(0) as usize,
            )),
            Denoiser::Unet(_) | Denoiser::Flux2(_) | Denoiser::ZImage(_) => None,
        }
    }

    /// The UNet, where the caller needs the network itself (tests, tools).
    pub fn unet(&self) -> Option<&UNet> {
        match self {
            Denoiser::Unet(unet) => Some(unet.as_ref()),
            Denoiser::Flux(_) | Denoiser::Flux2(_) | Denoiser::ZImage(_) => None,
        }
    }
}

impl From<UNet> for Denoiser {
    fn from(unet: UNet) -> Self {
        Denoiser::Unet(Box::new(unet))
    }
}

/// `latents` and `image` side by side on the channel axis (same batch and size).
fn concat_channels(latents: &Tensor, image: &Tensor) -> Result<Tensor> {
    let (l, i) = (latents.size(), image.size());
    if l.len() != 4 || i.len() != 4 || l[0] != i[0] || l[2..] != i[2..] {
        return Err(ModelError::Input(format!(
            "image conditioning {i:?} does not match latents {l:?} (batch, _, h, w)"
        )));
    }
    Ok(Tensor::cat(&[latents, &image.to_kind(latents.kind())], 1))
}

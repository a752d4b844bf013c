//! diffusers' `UNet2DConditionModel` as SD 1.x, 2.x and the SDXL family use
//! it: a sinusoidal time embedding (for SDXL plus the pooled text embedding
//! and the size/crop time ids through `add_embedding`; for LCM UNets plus
//! the guidance scale's embedding through `cond_proj`), down blocks
//! (resnets, optional cross-attention transformers, a downsampler), a mid
//! block, up blocks fed the skip connections, and an output head. A
//! ControlNet's residuals, when given, are added to the skip connections and
//! the mid block's output, as diffusers adds them.
//!
//! `transformer.rs`: the cross-attention; `blocks.rs`: the blocks and their
//! loader; `embeddings.rs`: the conditioning embedding; here the model.

mod blocks;
pub mod controlnet;
mod embeddings;
mod transformer;

use std::path::Path;

use tch::{Kind, Tensor};

use crate::blocks::ResnetBlock;
use crate::config::{config_err, read_json, UNetConfig};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::weights::Weights;

use blocks::{DownBlock, UNetLoader, UpBlock};
use embeddings::AddEmbedding;
use transformer::SpatialTransformer;

/// What SDXL-family UNets take beside the latents, timesteps and text
/// embeddings: one row per batch item each.
#[derive(Debug, Default, Clone, Copy)]
pub struct Added<'a> {
    /// The pooled, projected text embedding (batch, d): SDXL.
    pub text_embeds: Option<&'a Tensor>,
    /// Size and crop conditioning (batch, n): SDXL's `original_size +
    /// crops_coords_top_left + target_size`, the refiner's with an
    /// aesthetic score.
    pub time_ids: Option<&'a Tensor>,
    /// The guidance scale's embedding (batch, `time_cond_proj_dim`): LCM.
    pub timestep_cond: Option<&'a Tensor>,
    /// A ControlNet's residuals (or several ControlNets' summed).
    pub control: Option<&'a Residuals>,
}

/// What a ControlNet adds to a UNet forward, one row per batch item: one
/// tensor per skip connection, in the order the down path makes them
/// (`conv_in`'s output, each down-block layer's, each downsampler's), each
/// the shape of the skip it is added to; and one for the mid block's output.
/// The mid block itself takes the unadded features, as in diffusers.
#[derive(Debug)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// The UNet's encoding half — the conditioning embedding, `conv_in`, the
/// down blocks and the mid block — which a ControlNet copies.
pub(crate) struct Encoder {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// LCM: the guidance embedding's projection, added before `linear_1`.
    time_cond_proj: Option<Linear>,
    add_embedding: Option<AddEmbedding>,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    placement: Placement,
}

/// The denoising UNet, loaded from `unet/`.
pub struct UNet {
    enc: Encoder,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    parameters: u64,
    _storage: crate::weights::Storage,
    /// Its LoRA-capable layers.
    modules: crate::modules::ModuleIndex,
}

impl UNet {
    /// Its LoRA-capable layers (canonical paths).
    pub fn modules(&self) -> &crate::modules::ModuleIndex {
        &self.modules
    }
}

impl Encoder {
    /// The encoding half of the network in `weights` (diffusers' names),
    /// configured by `c` (read from `config_path`, named in errors).
    pub(crate) fn load(c: UNetConfig, config_path: &Path, weights: &Weights) -> Result<Self> {
        let (down_specs, _) = c.blocks(config_path)?;
        let last_down = down_specs
            .last()
            .ok_or_else(|| config_err(config_path, "`block_out_channels` is empty".into()))?;
        let loader = UNetLoader::new(weights, &c);
        let down = loader.down_blocks(&down_specs)?;
        let (mid_resnets, mid_attention) = loader.mid_block(last_down)?;
        let (vb, ch0, temb) = (&loader.vb, c.block_out_channels[0], loader.temb);
        let conv_in = Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch0, 3, 1, 1)?;
        let time_linear_1 = Linear::load(&vb.pp("time_embedding.linear_1"), ch0, temb, true)?;
        let time_linear_2 = Linear::load(&vb.pp("time_embedding.linear_2"), temb, temb, true)?;
        let time_cond_proj = c
            .time_cond_proj_dim
            .map(|d| Linear::load(&vb.pp("time_embedding.cond_proj"), d, ch0, false))
            .transpose()?;
        let add_embedding = c
            .text_time()
            .map(|(time_dim, input_dim)| -> Result<AddEmbedding> {
                Ok(AddEmbedding {
                    time_dim,
                    input_dim,
                    linear_1: Linear::load(
                        &vb.pp("add_embedding.linear_1"),
                        input_dim,
                        temb,
                        true,
                    )?,
                    linear_2: Linear::load(&vb.pp("add_embedding.linear_2"), temb, temb, true)?,
                })
            })
            .transpose()?;
        Ok(Encoder {
            conv_in,
            time_linear_1,
            time_linear_2,
            time_cond_proj,
            add_embedding,
            down,
            mid_resnets,
            mid_attention,
            placement: weights.placement(),
            config: c,
        })
    }

    pub(crate) fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub(crate) fn placement(&self) -> Placement {
        self.placement
    }

    /// The sample (on the device, in the model's precision) through
    /// `conv_in` (plus a ControlNet's `hint` embedding), the down blocks
    /// and the mid block, under the conditioning embedding `emb`: the mid
    /// block's output and the skip connections, in the order the down path
    /// makes them.
    pub(crate) fn run(
        &self,
        sample: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        hint: Option<&Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut xs = self.conv_in.forward(sample);
        if let Some(hint) = hint {
            xs += hint;
        }
        let mut skips = vec![xs.shallow_clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(emb));
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context);
                }
                skips.push(xs.shallow_clone());
            }
            if let Some(down) = &block.downsample {
                xs = down.forward(&xs);
                skips.push(xs.shallow_clone());
            }
        }
        xs = self.mid_resnets[0].forward(&xs, Some(emb));
        xs = self.mid_attention.forward(&xs, context);
        xs = self.mid_resnets[1].forward(&xs, Some(emb));
        (xs, skips)
    }
}

impl UNet {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let c: UNetConfig = read_json(config_path)?;
        let (_, up_specs) = c.blocks(config_path)?;
        let loader = UNetLoader::new(weights, &c);
        let up = loader.up_blocks(&up_specs)?;
        let (vb, ch0) = (&loader.vb, c.block_out_channels[0]);
        let norm_out =
            GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?;
        let conv_out = Conv2d::load(&vb.pp("conv_out"), ch0, c.out_channels, 3, 1, 1)?;
        let enc = Encoder::load(c.clone(), config_path, weights)?;
        Ok(UNet {
            modules: weights.module_index(),
            enc,
            up,
            norm_out,
            conv_out,
            parameters: weights.parameter_count(),
            _storage: weights.storage(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.enc.config
    }

    /// Parameters in its weights file (SD 1.5: 859.5M).
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    pub fn placement(&self) -> Placement {
        self.enc.placement
    }

    /// Whether this UNet takes SDXL's added conditioning (pooled text
    /// embeddings and time ids).
    pub fn takes_text_time(&self) -> bool {
        self.enc.add_embedding.is_some()
    }

    /// Its cross-attention layers' diffusers paths in the order diffusers
    /// lists its attention processors (down blocks, up blocks, then the
    /// mid block): how IP-Adapter files number them.
    pub fn cross_attention_keys(&self) -> Vec<String> {
        let down = self.enc.down.iter().flat_map(|b| &b.attentions);
        let up = self.up.iter().flat_map(|b| &b.attentions);
        down.chain(up)
            .chain(std::iter::once(&self.enc.mid_attention))
            .flat_map(|t| t.cross_keys())
            .collect()
    }

    /// LCM UNets: the width of the guidance embedding they take.
    pub fn time_cond_dim(&self) -> Option<i64> {
        self.enc.config.time_cond_proj_dim
    }

    fn check_inputs(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<()> {
        let s = sample.size();
        let [b, c, h, w] = s[..] else {
            return Err(ModelError::Input(format!(
                "latents must be 4-d (batch, channels, h, w), got {s:?}"
            )));
        };
        if b < 1 || c != self.enc.config.in_channels || h < 1 || w < 1 {
            return Err(ModelError::Input(format!(
                "latents {s:?}: expected (batch >= 1, {}, h, w)",
                self.enc.config.in_channels
            )));
        }
        let t = timesteps.size();
        if !(t.len() == 1 && (t[0] == b || t[0] == 1)) {
            return Err(ModelError::Input(format!(
                "timesteps {t:?}: expected one per batch item ({b}) or one for all"
            )));
        }
        let ctx = context.size();
        let dim = self.enc.config.context_dim();
        if !(ctx.len() == 3 && ctx[0] == b && ctx[1] >= 1 && ctx[2] == dim) {
            return Err(ModelError::Input(format!(
                "text embeddings {ctx:?}: expected ({b}, tokens, {dim})"
            )));
        }
        for (name, t) in [("latents", sample), ("text embeddings", context)] {
            if !t.is_floating_point() {
                return Err(ModelError::Input(format!(
                    "{name} must be a float tensor, got {:?}",
                    t.kind()
                )));
            }
        }
        Ok(())
    }

    /// Predict the model output (noise, or v for v-prediction models) for a
    /// batch of latents, one timestep per item, and the text conditioning.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, Added::default())
    }

    /// A forward with zeros for whatever added conditioning this UNet takes:
    /// warm-up and timing, where only the cost matters.
    pub fn forward_probe(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let b = sample.size().first().copied().unwrap_or(1);
        let f = (Kind::Float, tch::Device::Cpu);
        let (text, ids) = match &self.enc.add_embedding {
            // Any split of add_embedding's width between the two costs the same.
            Some(add) => (
                Some(Tensor::zeros([b, add.input_dim - add.time_dim], f)),
                Some(Tensor::zeros([b, 1], f)),
            ),
            None => (None, None),
        };
        let cond = self
            .enc
            .config
            .time_cond_proj_dim
            .map(|d| Tensor::zeros([b, d], f));
        self.forward_with(
            sample,
            timesteps,
            context,
            Added {
                text_embeds: text.as_ref(),
                time_ids: ids.as_ref(),
                timestep_cond: cond.as_ref(),
                control: None,
            },
        )
    }

    /// [`UNet::forward`] with SDXL's added conditioning and LCM's guidance
    /// embedding, one row per batch item each.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Added,
    ) -> Result<Tensor> {
        self.check_inputs(sample, timesteps, context)?;
        self.enc.check_added(&added, sample.size()[0])?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.enc.placement;
            let sample = sample.to_device(device).to_kind(kind);
            let context = context.to_device(device).to_kind(kind);
            let b = sample.size()[0];
            let timesteps = timesteps.to_device(device).expand([b], false);
            let emb = self.enc.embedding(&timesteps, &added, b);
            let (mut xs, mut skips) = self.enc.run(&sample, &emb, &context, None);
            // The mid block took the unadded features, as in diffusers.
            if let Some(control) = added.control {
                add_residuals(&mut skips, control)?;
                xs = checked_add(&xs, &control.mid, "mid block")?;
            }

            for block in &self.up {
                for (j, resnet) in block.resnets.iter().enumerate() {
                    let skip = skips.pop().ok_or_else(|| {
                        ModelError::Torch("UNet skip connections exhausted".into())
                    })?;
                    xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1), Some(&emb));
                    if let Some(attn) = block.attentions.get(j) {
                        xs = attn.forward(&xs, &context);
                    }
                }
                if let Some(up) = &block.upsample {
                    // Upsample to the size of the skip it meets next, so odd
                    // latent sizes come back to their own size.
                    let size = skips.last().map(|s| {
                        let sz = s.size();
                        (sz[2], sz[3])
                    });
                    xs = up.forward(&xs, size);
                }
            }
            Ok(self.conv_out.forward(&self.norm_out.forward(&xs).silu()))
        })
    }
}

/// A ControlNet's down residuals added to the skips they match, in order.
fn add_residuals(skips: &mut [Tensor], control: &Residuals) -> Result<()> {
    if control.down.len() != skips.len() {
        return Err(ModelError::Input(format!(
            "{} down residuals for a UNet with {} skip connections",
            control.down.len(),
            skips.len()
        )));
    }
    for (i, (skip, r)) in skips.iter_mut().zip(&control.down).enumerate() {
        *skip = checked_add(skip, r, &format!("down residual {i}"))?;
    }
    Ok(())
}

/// `x + r` where `r` has `x`'s shape (on `x`'s device, in its precision).
fn checked_add(x: &Tensor, r: &Tensor, name: &str) -> Result<Tensor> {
    if r.size() != x.size() || !r.is_floating_point() {
        return Err(ModelError::Input(format!(
            "{name} {:?}: expected a float tensor of shape {:?}",
            r.size(),
            x.size()
        )));
    }
    Ok(x + r.to_device(x.device()).to_kind(x.kind()))
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for UNet {}

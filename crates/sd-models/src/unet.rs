//! diffusers' `UNet2DConditionModel` as SD 1.x, 2.x and the SDXL family use
//! it: a sinusoidal time embedding (for SDXL plus the pooled text embedding
//! and the size/crop time ids through `add_embedding`; for LCM UNets plus
//! the guidance scale's embedding through `cond_proj`), down blocks
//! (resnets, optional cross-attention transformers, a downsampler), a mid
//! block, up blocks fed the skip connections, and an output head.

use std::path::Path;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::blocks::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use crate::config::{config_err, read_json, UNetBlock, UNetConfig};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{attention, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::{Vb, Weights};

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast: bool,
}

impl Attention {
    fn load(vb: &Vb, dim: i64, context_dim: i64, heads: i64, upcast: bool) -> Result<Self> {
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            upcast,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(xs);
        let (q, k, v) = (
            self.to_q.forward(xs),
            self.to_k.forward(ctx),
            self.to_v.forward(ctx),
        );
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, false, self.upcast))
    }
}

/// Self-attention, cross-attention, GEGLU feed-forward; each pre-norm and residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: &Vb, dim: i64, context_dim: i64, heads: i64, upcast: bool) -> Result<Self> {
        let inner = 4 * dim;
        Ok(TransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, context_dim, heads, upcast)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::load(&vb.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::load(&vb.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None) + xs;
        let xs = self.attn2.forward(&self.norm2.forward(&xs), Some(context)) + &xs;
        let h = self.ff_proj.forward(&self.norm3.forward(&xs));
        let parts = h.chunk(2, -1);
        let h = &parts[0] * parts[1].gelu("none");
        self.ff_out.forward(&h) + xs
    }
}

enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` over continuous (B, C, H, W) input.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn load(vb: &Vb, channels: i64, block: &UNetBlock, c: &UNetConfig) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::load(&vb.pp(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&vb.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        let blocks = (0..block.transformer_depth)
            .map(|i| {
                TransformerBlock::load(
                    &vb.pp("transformer_blocks").pp(i),
                    channels,
                    block.cross_attention_dim,
                    block.heads,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: GroupNorm::load(&vb.pp("norm"), c.norm_num_groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("transformer input is 4-d");
        let to_tokens = |t: &Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let to_image = |t: &Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let normed = self.norm.forward(xs);
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)),
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => to_image(&l.forward(&tokens)),
            Projection::Conv(conv) => conv.forward(&to_image(&tokens).contiguous()),
        };
        out + xs
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

/// SDXL's `add_embedding`: the pooled text embedding and the sinusoidal
/// embeddings of the time ids, concatenated, through two linear layers.
struct AddEmbedding {
    /// Sinusoidal width of each time id (`addition_time_embed_dim`).
    time_dim: i64,
    /// What `linear_1` takes (`projection_class_embeddings_input_dim`).
    input_dim: i64,
    linear_1: Linear,
    linear_2: Linear,
}

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
}

/// The denoising UNet, loaded from `unet/`.
pub struct UNet {
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
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    placement: Placement,
    parameters: u64,
    _storage: Arc<memmap2::Mmap>,
    /// Its LoRA-capable layers.
    modules: crate::lora::ModuleIndex,
}

/// Builds the UNet's parts from its config and weights, in diffusers'
/// module layout (`down_blocks.{i}.resnets.{j}`, `mid_block`, `up_blocks.{i}`).
struct UNetLoader<'a> {
    vb: Vb<'a>,
    c: &'a UNetConfig,
    /// Width of the time embedding every resnet is conditioned on.
    temb: i64,
}

/// A block's resnets and, in a cross-attention block, the transformer after each.
type BlockLayers = (Vec<ResnetBlock>, Vec<SpatialTransformer>);

impl<'a> UNetLoader<'a> {
    fn new(weights: &'a Weights, c: &'a UNetConfig) -> Self {
        UNetLoader {
            vb: Vb::root(weights, ""),
            c,
            temb: 4 * c.block_out_channels[0],
        }
    }

    fn resnet(&self, cin: i64, cout: i64, output_scale: f64) -> ResnetSpec {
        ResnetSpec {
            cin,
            cout,
            temb: Some(self.temb),
            groups: self.c.norm_num_groups,
            eps: self.c.norm_eps,
            output_scale,
        }
    }

    /// Layer `j`'s resnet takes `resnet_in(j)` channels and gives `cout`.
    fn block_layers(
        &self,
        b: &Vb,
        spec: &UNetBlock,
        cout: i64,
        resnet_in: impl Fn(i64) -> i64,
    ) -> Result<BlockLayers> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..spec.layers {
            resnets.push(ResnetBlock::load(
                &b.pp("resnets").pp(j),
                self.resnet(resnet_in(j), cout, 1.0),
            )?);
            if spec.cross_attention {
                attentions.push(SpatialTransformer::load(
                    &b.pp("attentions").pp(j),
                    cout,
                    spec,
                    self.c,
                )?);
            }
        }
        Ok((resnets, attentions))
    }

    /// Each down block but the last ends in a downsampler.
    fn down_blocks(&self, specs: &[UNetBlock]) -> Result<Vec<DownBlock>> {
        let ch = &self.c.block_out_channels;
        let n = ch.len();
        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, spec) in specs.iter().enumerate() {
            let b = self.vb.pp("down_blocks").pp(i);
            let cout = ch[i];
            let (resnets, attentions) =
                self.block_layers(&b, spec, cout, |j| if j == 0 { cin } else { cout })?;
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    &b.pp("downsamplers.0"),
                    cout,
                    self.c.downsample_padding.unwrap_or(1),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
            cin = cout;
        }
        Ok(down)
    }

    /// Resnet, cross-attention transformer, resnet at the narrowest width,
    /// with the last down block's attention settings.
    fn mid_block(&self, last_down: &UNetBlock) -> Result<([ResnetBlock; 2], SpatialTransformer)> {
        let mid = self.vb.pp("mid_block");
        let last = self.c.block_out_channels[self.c.block_out_channels.len() - 1];
        let spec = UNetBlock {
            cross_attention: true,
            layers: 1,
            ..last_down.clone()
        };
        let scale = self.c.mid_block_scale_factor;
        let resnets = [
            ResnetBlock::load(&mid.pp("resnets.0"), self.resnet(last, last, scale))?,
            ResnetBlock::load(&mid.pp("resnets.1"), self.resnet(last, last, scale))?,
        ];
        let attention = SpatialTransformer::load(&mid.pp("attentions.0"), last, &spec, self.c)?;
        Ok((resnets, attention))
    }

    /// Up blocks run from the narrowest width back to the widest; each resnet
    /// takes the previous output concatenated with one skip connection, and
    /// each up block but the last ends in an upsampler.
    fn up_blocks(&self, specs: &[UNetBlock]) -> Result<Vec<UpBlock>> {
        let rev: Vec<i64> = self.c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rev[0];
        for (i, spec) in specs.iter().enumerate() {
            let b = self.vb.pp("up_blocks").pp(i);
            let cout = rev[i];
            // The last resnet meets the skip from the wider block before it.
            let block_in = rev[(i + 1).min(n - 1)];
            let resnet_in = |j: i64| {
                let skip = if j == spec.layers - 1 { block_in } else { cout };
                let rin = if j == 0 { prev_out } else { cout };
                rin + skip
            };
            let (resnets, attentions) = self.block_layers(&b, spec, cout, resnet_in)?;
            let upsample = if i + 1 < n {
                Some(Upsample::load(&b.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = cout;
        }
        Ok(up)
    }
}

impl UNet {
    /// Its LoRA-capable layers (canonical paths).
    pub fn modules(&self) -> &crate::lora::ModuleIndex {
        &self.modules
    }
}

impl UNet {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let c: UNetConfig = read_json(config_path)?;
        let (down_specs, up_specs) = c.blocks(config_path)?;
        let last_down = down_specs
            .last()
            .ok_or_else(|| config_err(config_path, "`block_out_channels` is empty".into()))?;
        let loader = UNetLoader::new(weights, &c);
        let down = loader.down_blocks(&down_specs)?;
        let (mid_resnets, mid_attention) = loader.mid_block(last_down)?;
        let up = loader.up_blocks(&up_specs)?;

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
        let norm_out =
            GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?;
        let conv_out = Conv2d::load(&vb.pp("conv_out"), ch0, c.out_channels, 3, 1, 1)?;
        Ok(UNet {
            modules: weights.module_index(),
            conv_in,
            time_linear_1,
            time_linear_2,
            time_cond_proj,
            add_embedding,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out,
            conv_out,
            placement: weights.placement(),
            parameters: weights.parameter_count(),
            _storage: weights.storage(),
            config: c,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Parameters in its weights file (SD 1.5: 859.5M).
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Sinusoidal embedding of one (possibly fractional) timestep per item, in fp32.
    fn timestep_embedding(&self, timesteps: &Tensor) -> Tensor {
        sinusoidal(timesteps, self.config.block_out_channels[0], &self.config)
    }

    /// Whether this UNet takes SDXL's added conditioning (pooled text
    /// embeddings and time ids).
    pub fn takes_text_time(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// LCM UNets: the width of the guidance embedding they take.
    pub fn time_cond_dim(&self) -> Option<i64> {
        self.config.time_cond_proj_dim
    }

    /// The embedding every resnet is conditioned on: the timesteps' (with
    /// the guidance embedding for LCM UNets) plus, for SDXL, the added
    /// conditioning's. `added` is checked.
    fn embedding(&self, timesteps: &Tensor, added: &Added, b: i64) -> Tensor {
        let Placement { device, kind } = self.placement;
        let mut t_emb = self.timestep_embedding(timesteps).to_kind(kind);
        if let (Some(proj), Some(cond)) = (&self.time_cond_proj, added.timestep_cond) {
            t_emb += proj.forward(&cond.to_device(device).to_kind(kind));
        }
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb).silu());
        let (Some(add), Some(text), Some(ids)) =
            (&self.add_embedding, added.text_embeds, added.time_ids)
        else {
            return emb;
        };
        // diffusers: the time ids' embeddings in fp32, concatenated with the
        // text embeddings (promoted), then cast to the model's dtype.
        let ids = ids.to_device(device).to_kind(Kind::Float).flatten(0, -1);
        let time_embeds = sinusoidal(&ids, add.time_dim, &self.config).reshape([b, -1]);
        let text = text.to_device(device).to_kind(Kind::Float);
        let add_embeds = Tensor::cat(&[text, time_embeds], -1).to_kind(kind);
        emb + add
            .linear_2
            .forward(&add.linear_1.forward(&add_embeds).silu())
    }

    /// `added` as this UNet needs it for a batch of `b`.
    fn check_added(&self, added: &Added, b: i64) -> Result<()> {
        let rows = |t: &Tensor, name: &str, width: Option<i64>| -> Result<i64> {
            let s = t.size();
            match s[..] {
                [n, w]
                    if n == b
                        && w >= 1
                        && width.is_none_or(|x| x == w)
                        && t.is_floating_point() =>
                {
                    Ok(w)
                }
                _ => Err(ModelError::Input(format!(
                    "{name} {s:?}: expected a float ({b}, {}) tensor",
                    width.map_or("n".to_string(), |w| w.to_string())
                ))),
            }
        };
        match (&self.add_embedding, added.text_embeds, added.time_ids) {
            (Some(add), Some(text), Some(ids)) => {
                let (d, n) = (
                    rows(text, "text_embeds", None)?,
                    rows(ids, "time_ids", None)?,
                );
                if d + n * add.time_dim != add.input_dim {
                    return Err(ModelError::Input(format!(
                        "text_embeds width {d} and {n} time ids × {} make {}, but this UNet's \
                         add_embedding takes {}",
                        add.time_dim,
                        d + n * add.time_dim,
                        add.input_dim
                    )));
                }
            }
            (Some(_), _, _) => {
                return Err(ModelError::Input(
                    "this UNet (SDXL family) needs text_embeds and time_ids".into(),
                ))
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(ModelError::Input(
                    "this UNet takes no text_embeds or time_ids (not an SDXL-family UNet)".into(),
                ))
            }
        }
        match (self.config.time_cond_proj_dim, added.timestep_cond) {
            (Some(d), Some(c)) => rows(c, "timestep_cond", Some(d)).map(|_| ()),
            (None, Some(_)) => Err(ModelError::Input(
                "this UNet takes no timestep_cond (not an LCM UNet)".into(),
            )),
            (_, None) => Ok(()),
        }
    }

    fn check_inputs(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<()> {
        let s = sample.size();
        let [b, c, h, w] = s[..] else {
            return Err(ModelError::Input(format!(
                "latents must be 4-d (batch, channels, h, w), got {s:?}"
            )));
        };
        if b < 1 || c != self.config.in_channels || h < 1 || w < 1 {
            return Err(ModelError::Input(format!(
                "latents {s:?}: expected (batch >= 1, {}, h, w)",
                self.config.in_channels
            )));
        }
        let t = timesteps.size();
        if !(t.len() == 1 && (t[0] == b || t[0] == 1)) {
            return Err(ModelError::Input(format!(
                "timesteps {t:?}: expected one per batch item ({b}) or one for all"
            )));
        }
        let ctx = context.size();
        let dim = self.config.context_dim();
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
        let (text, ids) = match &self.add_embedding {
            // Any split of add_embedding's width between the two costs the same.
            Some(add) => (
                Some(Tensor::zeros([b, add.input_dim - add.time_dim], f)),
                Some(Tensor::zeros([b, 1], f)),
            ),
            None => (None, None),
        };
        let cond = self
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
        self.check_added(&added, sample.size()[0])?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let sample = sample.to_device(device).to_kind(kind);
            let context = context.to_device(device).to_kind(kind);
            let b = sample.size()[0];
            let timesteps = timesteps.to_device(device).expand([b], false);
            let emb = self.embedding(&timesteps, &added, b);

            let mut xs = self.conv_in.forward(&sample);
            let mut skips = vec![xs.shallow_clone()];
            for block in &self.down {
                for (j, resnet) in block.resnets.iter().enumerate() {
                    xs = resnet.forward(&xs, Some(&emb));
                    if let Some(attn) = block.attentions.get(j) {
                        xs = attn.forward(&xs, &context);
                    }
                    skips.push(xs.shallow_clone());
                }
                if let Some(down) = &block.downsample {
                    xs = down.forward(&xs);
                    skips.push(xs.shallow_clone());
                }
            }

            xs = self.mid_resnets[0].forward(&xs, Some(&emb));
            xs = self.mid_attention.forward(&xs, &context);
            xs = self.mid_resnets[1].forward(&xs, Some(&emb));

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

/// diffusers' `get_timestep_embedding`: `dim` sinusoids of each value, in
/// fp32, cos first when the config flips them.
fn sinusoidal(timesteps: &Tensor, dim: i64, c: &UNetConfig) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()))
        / (half as f64 - c.freq_shift);
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (emb.sin(), emb.cos());
    let emb = if c.flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for UNet {}

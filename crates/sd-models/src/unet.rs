//! diffusers' `UNet2DConditionModel` as SD 1.x and 2.x use it: a sinusoidal
//! time embedding, down blocks (resnets, optional cross-attention
//! transformers, a downsampler), a mid block, up blocks fed the skip
//! connections, and an output head.

use std::path::Path;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::blocks::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use crate::config::{read_json, UNetBlock, UNetConfig};
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

/// The denoising UNet, loaded from `unet/`.
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    placement: Placement,
    _storage: Arc<memmap2::Mmap>,
}

impl UNet {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let c: UNetConfig = read_json(config_path)?;
        let (down_specs, up_specs) = c.blocks(config_path)?;
        let vb = Vb::root(weights, "");
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let resnet = |cin, cout, scale| ResnetSpec {
            cin,
            cout,
            temb: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale: scale,
        };

        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, spec) in down_specs.iter().enumerate() {
            let b = vb.pp("down_blocks").pp(i);
            let cout = ch[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..spec.layers {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::load(
                    &b.pp("resnets").pp(j),
                    resnet(rin, cout, 1.0),
                )?);
                if spec.cross_attention {
                    attentions.push(SpatialTransformer::load(
                        &b.pp("attentions").pp(j),
                        cout,
                        spec,
                        &c,
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    &b.pp("downsamplers.0"),
                    cout,
                    c.downsample_padding.unwrap_or(1),
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

        let mid = vb.pp("mid_block");
        let last = ch[n - 1];
        let mid_spec = UNetBlock {
            cross_attention: true,
            layers: 1,
            ..down_specs[n - 1].clone()
        };
        let mid_resnets = [
            ResnetBlock::load(
                &mid.pp("resnets.0"),
                resnet(last, last, c.mid_block_scale_factor),
            )?,
            ResnetBlock::load(
                &mid.pp("resnets.1"),
                resnet(last, last, c.mid_block_scale_factor),
            )?,
        ];
        let mid_attention = SpatialTransformer::load(&mid.pp("attentions.0"), last, &mid_spec, &c)?;

        let mut up = Vec::with_capacity(n);
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut prev_out = rev[0];
        for (i, spec) in up_specs.iter().enumerate() {
            let b = vb.pp("up_blocks").pp(i);
            let cout = rev[i];
            let block_in = rev[(i + 1).min(n - 1)];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..spec.layers {
                let skip = if j == spec.layers - 1 { block_in } else { cout };
                let rin = if j == 0 { prev_out } else { cout };
                resnets.push(ResnetBlock::load(
                    &b.pp("resnets").pp(j),
                    resnet(rin + skip, cout, 1.0),
                )?);
                if spec.cross_attention {
                    attentions.push(SpatialTransformer::load(
                        &b.pp("attentions").pp(j),
                        cout,
                        spec,
                        &c,
                    )?);
                }
            }
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

        Ok(UNet {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_linear_1: Linear::load(&vb.pp("time_embedding.linear_1"), ch[0], temb, true)?,
            time_linear_2: Linear::load(&vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
            placement: weights.placement(),
            _storage: weights.storage(),
            config: c,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Sinusoidal embedding of one (possibly fractional) timestep per item, in fp32.
    fn timestep_embedding(&self, timesteps: &Tensor) -> Tensor {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let device = timesteps.device();
        let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()))
            / (half as f64 - self.config.freq_shift);
        let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
        let (sin, cos) = (emb.sin(), emb.cos());
        let emb = if self.config.flip_sin_to_cos {
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
        self.check_inputs(sample, timesteps, context)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let sample = sample.to_device(device).to_kind(kind);
            let context = context.to_device(device).to_kind(kind);
            let b = sample.size()[0];
            let timesteps = timesteps.to_device(device).expand([b], false);
            let t_emb = self.timestep_embedding(&timesteps).to_kind(kind);
            let emb = self
                .time_linear_2
                .forward(&self.time_linear_1.forward(&t_emb).silu());

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

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for UNet {}

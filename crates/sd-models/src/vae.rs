//! diffusers' `AutoencoderKL`: the encoder maps pixels in [-1, 1] to a
//! diagonal Gaussian over latents (mean, log-variance); the decoder maps
//! latents back to pixels. Scaling by `scaling_factor` is the caller's: these
//! are the raw networks.

use std::path::Path;

use tch::Tensor;

use crate::blocks::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use crate::config::VaeConfig;
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{attention, Conv2d, GroupNorm, Linear};
use crate::weights::{Vb, Weights};

const EPS: f64 = 1e-6;

/// Single-head self-attention over the pixels of the mid block. Published
/// SD 1.x VAEs use the old names (`query`, `key`, `value`, `proj_attn`);
/// newer files use `to_q`, `to_k`, `to_v`, `to_out.0`. Both load.
struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn load(vb: &Vb, channels: i64, groups: i64) -> Result<Self> {
        let old = vb.contains("query.weight");
        let names = if old {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let lin = |n: &str| Linear::load(&vb.pp(n), channels, channels, true);
        Ok(VaeAttention {
            norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, EPS)?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("vae attention input is 4-d");
        let tokens = self.norm.forward(xs).view([b, c, h * w]).transpose(1, 2);
        let (q, k, v) = (
            self.q.forward(&tokens),
            self.k.forward(&tokens),
            self.v.forward(&tokens),
        );
        let out = self.out.forward(&attention(&q, &k, &v, 1, false, false));
        out.transpose(1, 2).reshape([b, c, h, w]) + xs
    }
}

struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn load(vb: &Vb, channels: i64, c: &VaeConfig) -> Result<Self> {
        let spec = resnet_spec(channels, channels, c);
        Ok(MidBlock {
            resnet0: ResnetBlock::load(&vb.pp("resnets.0"), spec)?,
            attention: if c.mid_block_add_attention {
                Some(VaeAttention::load(
                    &vb.pp("attentions.0"),
                    channels,
                    c.norm_num_groups,
                )?)
            } else {
                None
            },
            resnet1: ResnetBlock::load(&vb.pp("resnets.1"), spec)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnet0.forward(xs, None);
        if let Some(a) = &self.attention {
            xs = a.forward(&xs);
        }
        self.resnet1.forward(&xs, None)
    }
}

fn resnet_spec(cin: i64, cout: i64, c: &VaeConfig) -> ResnetSpec {
    ResnetSpec {
        cin,
        cout,
        temb: None,
        groups: c.norm_num_groups,
        eps: EPS,
        output_scale: 1.0,
    }
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let mut blocks = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let b = vb.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { cin } else { cout };
                    ResnetBlock::load(&b.pp("resnets").pp(j), resnet_spec(rin, cout, c))
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Downsample::load(&b.pp("downsamplers.0"), cout, 0)?)
            } else {
                None
            };
            blocks.push((resnets, down));
            cin = cout;
        }
        let last = ch[n - 1];
        Ok(Encoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(&vb.pp("mid_block"), last, c)?,
            norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, last, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), last, 2 * c.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.conv_in.forward(xs);
        for (resnets, down) in &self.blocks {
            for r in resnets {
                xs = r.forward(&xs, None);
            }
            if let Some(d) = down {
                xs = d.forward(&xs);
            }
        }
        let xs = self.mid.forward(&xs);
        self.conv_out.forward(&self.norm_out.forward(&xs).silu())
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut blocks = Vec::with_capacity(n);
        let mut prev = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let b = vb.pp("up_blocks").pp(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { prev } else { cout };
                    ResnetBlock::load(&b.pp("resnets").pp(j), resnet_spec(rin, cout, c))
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Upsample::load(&b.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            blocks.push((resnets, up));
            prev = cout;
        }
        let first = c.block_out_channels[0];
        Ok(Decoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1)?,
            mid: MidBlock::load(&vb.pp("mid_block"), rev[0], c)?,
            blocks,
            norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, first, EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), first, c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut xs = self.mid.forward(&self.conv_in.forward(z));
        for (resnets, up) in &self.blocks {
            for r in resnets {
                xs = r.forward(&xs, None);
            }
            if let Some(u) = up {
                xs = u.forward(&xs, None);
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&xs).silu())
    }
}

/// The latent distribution the encoder gives for each image.
pub struct LatentDist {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

/// The VAE, loaded from `vae/`.
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    latent_norm: Option<LatentNorm>,
    placement: Placement,
    _storage: crate::weights::Storage,
}

/// FLUX.2's latent normalisation: 2×2 patches of latents as channels,
/// each channel shifted by its running mean and divided by its running
/// standard deviation (`bn.running_mean`, `sqrt(bn.running_var + eps)`).
struct LatentNorm {
    mean: Tensor,
    std: Tensor,
}

/// (B, C, H, W) → (B, 4C, H/2, W/2): channel c's 2×2 patch as channels
/// 4c..4c+3 (diffusers' `_patchify_latents`).
pub fn patchify(z: &Tensor) -> Tensor {
    let (b, c, h, w) = z.size4().expect("4-d latents");
    z.view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * 4, h / 2, w / 2])
}

/// The inverse of [`patchify`].
pub fn unpatchify(x: &Tensor) -> Tensor {
    let (b, c, h, w) = x.size4().expect("4-d latents");
    x.reshape([b, c / 4, 2, 2, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([b, c / 4, h * 2, w * 2])
}

impl Vae {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let c = VaeConfig::read(config_path)?;
        let vb = Vb::root(weights, "");
        let l = c.latent_channels;
        Ok(Vae {
            encoder: Encoder::load(&vb.pp("encoder"), &c)?,
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::load(&vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
            } else {
                None
            },
            decoder: Decoder::load(&vb.pp("decoder"), &c)?,
            latent_norm: match c.batch_norm_eps {
                Some(eps) => {
                    let bn = vb.pp("bn");
                    let var = bn.get("running_var", &[4 * l])?;
                    Some(LatentNorm {
                        mean: bn.get("running_mean", &[4 * l])?.view([1, -1, 1, 1]),
                        std: (var + eps).sqrt().view([1, -1, 1, 1]),
                    })
                }
                None => None,
            },
            placement: weights.placement(),
            _storage: weights.storage(),
            config: c,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> i64 {
        self.config.scale_factor()
    }

    /// Whether latents travel patchified and batch-normalised (FLUX.2):
    /// the denoiser's latents have 4× the channels at half the size.
    pub fn patched(&self) -> bool {
        self.latent_norm.is_some()
    }

    /// The VAE's latents (B, C, H, W) as the denoiser takes them: for
    /// FLUX.2 patchified and normalised (the pipeline's image latents);
    /// otherwise as they are.
    pub fn to_denoiser(&self, z: &Tensor) -> Result<Tensor> {
        let Some(n) = &self.latent_norm else {
            return Ok(z.shallow_clone());
        };
        self.check(z, "latents", self.config.latent_channels, 2)?;
        guarded(|| {
            let z = patchify(&z.to_device(self.placement.device));
            let k = z.kind();
            Ok((z - n.mean.to_kind(k)) / n.std.to_kind(k))
        })
    }

    /// A standard deviation of the VAE's latents in the denoiser's space
    /// (FLUX.2: patchified and divided by the batch norm's; otherwise as
    /// it is).
    pub fn std_to_denoiser(&self, std: &Tensor) -> Result<Tensor> {
        let Some(n) = &self.latent_norm else {
            return Ok(std.shallow_clone());
        };
        self.check(std, "std", self.config.latent_channels, 2)?;
        guarded(|| {
            let z = patchify(&std.to_device(self.placement.device));
            let k = z.kind();
            Ok(z / n.std.to_kind(k))
        })
    }

    /// The inverse of [`Vae::to_denoiser`]: the denoiser's latents back to
    /// the VAE's, ready for [`Vae::decode`].
    pub fn from_denoiser(&self, x: &Tensor) -> Result<Tensor> {
        let Some(n) = &self.latent_norm else {
            return Ok(x.shallow_clone());
        };
        self.check(x, "latents", 4 * self.config.latent_channels, 1)?;
        guarded(|| {
            let x = x.to_device(self.placement.device);
            let k = x.kind();
            Ok(unpatchify(&(x * n.std.to_kind(k) + n.mean.to_kind(k))))
        })
    }

    fn check(&self, t: &Tensor, what: &str, channels: i64, multiple: i64) -> Result<()> {
        let s = t.size();
        let ok = s.len() == 4
            && s[0] >= 1
            && s[1] == channels
            && s[2] >= multiple
            && s[3] >= multiple
            && s[2] % multiple == 0
            && s[3] % multiple == 0;
        if !ok {
            return Err(ModelError::Input(format!(
                "{what} {s:?}: expected (batch >= 1, {channels}, h, w) with h and w positive multiples of {multiple}"
            )));
        }
        if !t.is_floating_point() {
            return Err(ModelError::Input(format!(
                "{what} must be a float tensor, got {:?}",
                t.kind()
            )));
        }
        Ok(())
    }

    /// Pixels (batch, 3, H, W) in [-1, 1] → the latent distribution (unscaled).
    pub fn encode(&self, pixels: &Tensor) -> Result<LatentDist> {
        self.check(
            pixels,
            "pixels",
            self.config.in_channels,
            self.scale_factor(),
        )?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let h = self
                .encoder
                .forward(&pixels.to_device(device).to_kind(kind));
            let h = match &self.quant_conv {
                Some(q) => q.forward(&h),
                None => h,
            };
            let parts = h.chunk(2, 1);
            let mean = parts[0].shallow_clone();
            let logvar = parts[1].clamp(-30.0, 20.0);
            let std = (&logvar * 0.5).exp();
            Ok(LatentDist { mean, logvar, std })
        })
    }

    /// Unscaled latents (batch, C, h, w) → pixels (batch, 3, h·f, w·f), roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check(latents, "latents", self.config.latent_channels, 1)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let z = latents.to_device(device).to_kind(kind);
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(&z),
                None => z,
            };
            Ok(self.decoder.forward(&z))
        })
    }
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for Vae {}

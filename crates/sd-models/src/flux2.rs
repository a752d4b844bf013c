//! FLUX.2's transformer (diffusers' `Flux2Transformer2DModel`: Klein's and
//! FLUX.2-dev's). Against FLUX.1 it changes: the latents it takes are
//! already 2×2-patchified by the pipeline (128 channels for the 32-channel
//! VAE), one token per latent pixel; the modulation is shared by all blocks
//! of a kind (one for the double blocks' image stream, one for their text
//! stream, one for the single blocks) and comes from the timestep (and
//! guidance, where distilled) alone — no pooled text; feed-forwards are
//! SwiGLU; single blocks fuse the attention's q/k/v with the MLP's input
//! projection; no projection has a bias; positions are four axes (time,
//! row, column, sequence) of a rotary embedding with base 2000, so text
//! tokens count along the fourth axis and reference images sit at their
//! own time coordinate (10, 20, …) beside the generated one (0).

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::read_json;
use crate::error::{guarded, ModelError, Result};
use crate::flux::{attend, clip_half, modulate, rotate, sinusoids_of, Mlp, Modulation, QkNorm};
use crate::layers::Linear;
use crate::modules::ModuleIndex;
use crate::weights::{Storage, Vb, Weights};

/// The keys of the transformer's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Flux2Config {
    #[serde(default = "one")]
    pub patch_size: i64,
    #[serde(default = "in_channels")]
    pub in_channels: i64,
    #[serde(default)]
    pub out_channels: Option<i64>,
    #[serde(default = "double")]
    pub num_layers: i64,
    #[serde(default = "single")]
    pub num_single_layers: i64,
    #[serde(default = "head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "heads")]
    pub num_attention_heads: i64,
    #[serde(default = "joint")]
    pub joint_attention_dim: i64,
    #[serde(default = "time_channels")]
    pub timestep_guidance_channels: i64,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<i64>,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default = "yes")]
    pub guidance_embeds: bool,
}

fn one() -> i64 {
    1
}
fn in_channels() -> i64 {
    128
}
fn double() -> i64 {
    8
}
fn single() -> i64 {
    48
}
fn head_dim() -> i64 {
    128
}
fn heads() -> i64 {
    48
}
fn joint() -> i64 {
    15360
}
fn time_channels() -> i64 {
    256
}
fn mlp_ratio() -> f64 {
    3.0
}
fn axes() -> Vec<i64> {
    vec![32, 32, 32, 32]
}
fn theta() -> f64 {
    2000.0
}
fn eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

impl Flux2Config {
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The feed-forwards' hidden width, `int(dim · mlp_ratio)`.
    fn mlp_dim(&self) -> i64 {
        (self.inner_dim() as f64 * self.mlp_ratio) as i64
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.patch_size != 1 {
            return Err(bad(format!(
                "patch_size {} (FLUX.2's pipelines patchify the latents: 1)",
                self.patch_size
            )));
        }
        if let Some(o) = self.out_channels {
            if o != self.in_channels {
                return Err(bad(format!(
                    "out_channels {o} differs from in_channels {}",
                    self.in_channels
                )));
            }
        }
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("joint_attention_dim", self.joint_attention_dim),
            (
                "timestep_guidance_channels",
                self.timestep_guidance_channels,
            ),
        ] {
            if v < 1 {
                return Err(bad(format!("`{k}` must be positive, got {v}")));
            }
        }
        if self.timestep_guidance_channels % 2 != 0 {
            return Err(bad("`timestep_guidance_channels` must be even".into()));
        }
        if self.num_layers < 0 || self.num_single_layers < 0 {
            return Err(bad("block counts must not be negative".into()));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if ![self.mlp_ratio, self.eps, self.rope_theta]
            .into_iter()
            .all(positive)
        {
            return Err(bad("mlp_ratio, eps and rope_theta must be positive".into()));
        }
        if self.axes_dims_rope.len() != 4
            || self.axes_dims_rope.iter().any(|d| *d < 2 || d % 2 != 0)
            || self.axes_dims_rope.iter().sum::<i64>() != self.attention_head_dim
        {
            return Err(bad(format!(
                "axes_dims_rope {:?}: four even sizes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            )));
        }
        Ok(())
    }
}

/// SiLU of the first half times the second half.
fn swiglu(x: &Tensor) -> Tensor {
    let halves = x.chunk(2, -1);
    halves[0].silu() * &halves[1]
}

/// `Flux2FeedForward`: linear_in to twice the hidden width, SwiGLU,
/// linear_out.
struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: i64, hidden: i64) -> Result<Self> {
        Ok(FeedForward {
            linear_in: Linear::load(&vb.pp("linear_in"), dim, 2 * hidden, false)?,
            linear_out: Linear::load(&vb.pp("linear_out"), hidden, dim, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_out.forward(&swiglu(&self.linear_in.forward(x)))
    }
}

/// One stream's q/k/v projections (no bias) and their RMS norms.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: QkNorm,
    norm_k: QkNorm,
}

impl Qkv {
    fn load(vb: &Vb, names: [&str; 5], dim: i64, head_dim: i64, eps: f64) -> Result<Self> {
        Ok(Qkv {
            q: Linear::load(&vb.pp(names[0]), dim, dim, false)?,
            k: Linear::load(&vb.pp(names[1]), dim, dim, false)?,
            v: Linear::load(&vb.pp(names[2]), dim, dim, false)?,
            norm_q: QkNorm::load(&vb.pp(names[3]), head_dim, eps)?,
            norm_k: QkNorm::load(&vb.pp(names[4]), head_dim, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, head_dim: i64) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().expect("3-d tokens");
        let split = |t: Tensor| t.view([b, s, -1, head_dim]);
        (
            self.norm_q.forward(&split(self.q.forward(x))),
            self.norm_k.forward(&split(self.k.forward(x))),
            split(self.v.forward(x)),
        )
    }
}

struct DoubleBlock {
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    fn load(vb: &Vb, c: &Flux2Config) -> Result<Self> {
        let (dim, hd, eps) = (c.inner_dim(), c.attention_head_dim, c.eps);
        let attn = vb.pp("attn");
        let main = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        let added = [
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "norm_added_q",
            "norm_added_k",
        ];
        Ok(DoubleBlock {
            img: Qkv::load(&attn, main, dim, hd, eps)?,
            txt: Qkv::load(&attn, added, dim, hd, eps)?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, false)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, false)?,
            ff: FeedForward::load(&vb.pp("ff"), dim, c.mlp_dim())?,
            ff_context: FeedForward::load(&vb.pp("ff_context"), dim, c.mlp_dim())?,
        })
    }

    fn forward(&self, img: &Tensor, txt: &Tensor, s: &Shared) -> (Tensor, Tensor) {
        let (m, c, eps) = (&s.img_mod, &s.txt_mod, s.eps);
        let (iq, ik, iv) = self
            .img
            .forward(&modulate(img, &m[0], &m[1], eps), s.head_dim);
        let (tq, tk, tv) = self
            .txt
            .forward(&modulate(txt, &c[0], &c[1], eps), s.head_dim);
        let q = rotate(&Tensor::cat(&[tq, iq], 1), &s.rope);
        let k = rotate(&Tensor::cat(&[tk, ik], 1), &s.rope);
        let v = Tensor::cat(&[tv, iv], 1);
        let a = attend(&q, &k, &v);
        let n_txt = txt.size()[1];
        let txt_a = a.narrow(1, 0, n_txt);
        let img_a = a.narrow(1, n_txt, a.size()[1] - n_txt);
        let img = img + &m[2] * self.to_out.forward(&img_a.contiguous());
        let ff = self.ff.forward(&modulate(&img, &m[3], &m[4], eps));
        let img = &img + &m[5] * ff;
        let txt = txt + &c[2] * self.to_add_out.forward(&txt_a.contiguous());
        let ff = self.ff_context.forward(&modulate(&txt, &c[3], &c[4], eps));
        let txt = &txt + &c[5] * ff;
        (img, clip_half(txt))
    }
}

/// A single-stream block: one projection to q, k, v and the MLP's input,
/// one from the attention and the MLP's output back.
struct SingleBlock {
    to_qkv_mlp: Linear,
    norm_q: QkNorm,
    norm_k: QkNorm,
    to_out: Linear,
}

impl SingleBlock {
    fn load(vb: &Vb, c: &Flux2Config) -> Result<Self> {
        let (dim, hd) = (c.inner_dim(), c.attention_head_dim);
        let attn = vb.pp("attn");
        Ok(SingleBlock {
            to_qkv_mlp: Linear::load(
                &attn.pp("to_qkv_mlp_proj"),
                dim,
                3 * dim + 2 * c.mlp_dim(),
                false,
            )?,
            norm_q: QkNorm::load(&attn.pp("norm_q"), hd, c.eps)?,
            norm_k: QkNorm::load(&attn.pp("norm_k"), hd, c.eps)?,
            to_out: Linear::load(&attn.pp("to_out"), dim + c.mlp_dim(), dim, false)?,
        })
    }

    fn forward(&self, x: &Tensor, s: &Shared) -> Tensor {
        let m = &s.single_mod;
        let (b, n, dim) = x.size3().expect("3-d tokens");
        let h = self.to_qkv_mlp.forward(&modulate(x, &m[0], &m[1], s.eps));
        let qkv = h.narrow(2, 0, 3 * dim);
        let mlp = h.narrow(2, 3 * dim, h.size()[2] - 3 * dim);
        let parts = qkv.chunk(3, -1);
        let split = |t: &Tensor| t.reshape([b, n, -1, s.head_dim]);
        let q = rotate(&self.norm_q.forward(&split(&parts[0])), &s.rope);
        let k = rotate(&self.norm_k.forward(&split(&parts[1])), &s.rope);
        let a = attend(&q, &k, &split(&parts[2]));
        let out = self.to_out.forward(&Tensor::cat(&[a, swiglu(&mlp)], 2));
        clip_half(x + &m[2] * out)
    }
}

/// What every block of one forward shares.
struct Shared {
    img_mod: Vec<Tensor>,
    txt_mod: Vec<Tensor>,
    single_mod: Vec<Tensor>,
    rope: (Tensor, Tensor),
    head_dim: i64,
    eps: f64,
}

/// Reference images' tokens for a forward: (1 or batch, tokens, channels)
/// and their positions (tokens, 4), as [`reference_ids`] lays them out.
#[derive(Debug, Clone, Copy)]
pub struct References<'a> {
    pub tokens: &'a Tensor,
    pub ids: &'a Tensor,
}

/// FLUX.2's transformer, loaded from `transformer/`.
pub struct Flux2Transformer {
    config: Flux2Config,
    x_embedder: Linear,
    context_embedder: Linear,
    time: Mlp,
    guidance: Option<Mlp>,
    img_mod: Modulation,
    txt_mod: Modulation,
    single_mod: Modulation,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
    modules: ModuleIndex,
    device: tch::Device,
    kind: Kind,
    parameters: u64,
    _storage: Storage,
}

impl Flux2Transformer {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let config: Flux2Config = read_json(config_path)?;
        config.validate(config_path)?;
        let vb = Vb::root(weights, "");
        let dim = config.inner_dim();
        let tge = vb.pp("time_guidance_embed");
        let tc = config.timestep_guidance_channels;
        let double = (0..config.num_layers)
            .map(|i| DoubleBlock::load(&vb.fp8_scope().pp("transformer_blocks").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let single = (0..config.num_single_layers)
            .map(|i| {
                SingleBlock::load(
                    &vb.fp8_scope().pp("single_transformer_blocks").pp(i),
                    &config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let guidance = if config.guidance_embeds {
            Some(Mlp::load(&tge.pp("guidance_embedder"), tc, dim, false)?)
        } else {
            None
        };
        Ok(Flux2Transformer {
            x_embedder: Linear::load(&vb.pp("x_embedder"), config.in_channels, dim, false)?,
            context_embedder: Linear::load(
                &vb.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                false,
            )?,
            time: Mlp::load(&tge.pp("timestep_embedder"), tc, dim, false)?,
            guidance,
            img_mod: Modulation::load(&vb.pp("double_stream_modulation_img"), dim, 6, false)?,
            txt_mod: Modulation::load(&vb.pp("double_stream_modulation_txt"), dim, 6, false)?,
            single_mod: Modulation::load(&vb.pp("single_stream_modulation"), dim, 3, false)?,
            double,
            single,
            norm_out: Linear::load(&vb.pp("norm_out.linear"), dim, 2 * dim, false)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim, config.in_channels, false)?,
            modules: weights.module_index(),
            device: weights.placement().device,
            kind: weights.placement().kind,
            parameters: weights.parameter_count(),
            _storage: weights.storage(),
            config,
        })
    }

    pub fn config(&self) -> &Flux2Config {
        &self.config
    }

    pub fn modules(&self) -> &ModuleIndex {
        &self.modules
    }

    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// The velocity for `latents` (B, C, h, w; C the patchified channels)
    /// at `timesteps` (σ·1000, one per item or one for all) given the
    /// prompt `context` (B, L, joint), for a guidance-distilled network the
    /// guidance per item (B,), and reference images' tokens, which attend
    /// with the generated ones and are dropped from the output.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        guidance: Option<&Tensor>,
        references: Option<References>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let size = latents.size();
        let [b, ch, h, w] = size[..] else {
            return Err(ModelError::Input(format!(
                "latents must be 4-d (batch, channels, h, w), got {size:?}"
            )));
        };
        if ch != c.in_channels || h < 1 || w < 1 {
            return Err(ModelError::Input(format!(
                "latents {size:?}: need {} channels",
                c.in_channels
            )));
        }
        let cs = context.size();
        if cs.len() != 3 || cs[0] != b || cs[2] != c.joint_attention_dim || cs[1] < 1 {
            return Err(ModelError::Input(format!(
                "context {cs:?} does not fit latents {size:?} (batch, tokens, {})",
                c.joint_attention_dim
            )));
        }
        if self.guidance.is_some() && guidance.is_none() {
            return Err(ModelError::Input(
                "this guidance-distilled transformer needs a guidance value".into(),
            ));
        }
        crate::flux::per_row_timesteps(timesteps, b)?;
        if let Some(r) = &references {
            let (ts, is) = (r.tokens.size(), r.ids.size());
            if ts.len() != 3
                || !(ts[0] == 1 || ts[0] == b)
                || ts[2] != c.in_channels
                || is != [ts[1], 4]
            {
                return Err(ModelError::Input(format!(
                    "reference tokens {ts:?} with ids {is:?}: need (1 or {b}, n, {}) and (n, 4)",
                    c.in_channels
                )));
            }
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let (dev, kind) = (self.device, self.kind);
            let n_img = h * w;
            // (B, C, h, w) → (B, h·w, C), row-major.
            let mut x = latents
                .to_device(dev)
                .to_kind(kind)
                .reshape([b, ch, n_img])
                .permute([0, 2, 1]);
            let mut ids = image_ids(h, w, 0, dev);
            if let Some(r) = &references {
                let tokens = r.tokens.to_device(dev).to_kind(kind);
                let tokens = tokens.expand([b, -1, -1], false);
                x = Tensor::cat(&[x, tokens], 1);
                ids = Tensor::cat(&[ids, r.ids.to_device(dev).to_kind(Kind::Float)], 0);
            }
            let temb = self.embed_time(timesteps, guidance, b)?;
            let shared = Shared {
                img_mod: self.img_mod.forward(&temb),
                txt_mod: self.txt_mod.forward(&temb),
                single_mod: self.single_mod.forward(&temb),
                rope: rope(c, &Tensor::cat(&[text_ids(cs[1], dev), ids], 0)),
                head_dim: c.attention_head_dim,
                eps: c.eps,
            };
            let mut img = self.x_embedder.forward(&x);
            let mut txt = self
                .context_embedder
                .forward(&context.to_device(dev).to_kind(kind));
            for block in &self.double {
                (img, txt) = block.forward(&img, &txt, &shared);
            }
            let n_txt = cs[1];
            let mut x = Tensor::cat(&[txt, img], 1);
            for block in &self.single {
                x = block.forward(&x, &shared);
            }
            let img = x.narrow(1, n_txt, n_img);
            // AdaLayerNormContinuous: scale first, then shift.
            let m = self
                .norm_out
                .forward(&temb.silu())
                .unsqueeze(1)
                .chunk(2, -1);
            let out = self.proj_out.forward(&modulate(&img, &m[1], &m[0], c.eps));
            Ok(out.permute([0, 2, 1]).reshape([b, ch, h, w]))
        })
    }

    /// The timestep (and guidance) embedding, (B, dim): the pipeline passes
    /// σ and the network multiplies by 1000, each in its precision.
    fn embed_time(&self, timesteps: &Tensor, guidance: Option<&Tensor>, b: i64) -> Result<Tensor> {
        let (dev, kind) = (self.device, self.kind);
        let channels = self.config.timestep_guidance_channels;
        let per_row = |t: &Tensor| {
            t.to_device(dev)
                .to_kind(Kind::Float)
                .reshape([-1])
                .expand([b], false)
        };
        let t = (per_row(timesteps).to_kind(kind) / 1000.0).to_kind(kind) * 1000.0;
        let mut temb = self.time.forward(&sinusoids_of(&t, channels).to_kind(kind));
        if let (Some(embedder), Some(g)) = (&self.guidance, guidance) {
            let g = per_row(g).to_kind(kind) * 1000.0;
            temb += embedder.forward(&sinusoids_of(&g, channels).to_kind(kind));
        }
        Ok(temb)
    }
}

/// Positions (h·w, 4) of an `h × w` latent grid at time `t`: (t, row,
/// column, 0), row-major.
fn image_ids(h: i64, w: i64, t: i64, device: tch::Device) -> Tensor {
    let f = (Kind::Float, device);
    let rows = Tensor::arange(h, f).repeat_interleave_self_int(w, 0, None);
    let cols = Tensor::arange(w, f).repeat([h]);
    let zeros = Tensor::zeros([h * w], f);
    Tensor::stack(&[&zeros + t as f64, rows, cols, zeros.shallow_clone()], 1)
}

/// Positions (L, 4) of `l` text tokens: (0, 0, 0, i).
fn text_ids(l: i64, device: tch::Device) -> Tensor {
    let f = (Kind::Float, device);
    let zeros = Tensor::zeros([l], f);
    Tensor::stack(&[&zeros, &zeros, &zeros, &Tensor::arange(l, f)], 1)
}

/// The positions of reference images' tokens, `grids` their latent sizes
/// (h, w) in order: the i-th at time 10·(i+1), as the Klein pipeline lays
/// them out.
pub fn reference_ids(grids: &[(i64, i64)], device: tch::Device) -> Tensor {
    let parts: Vec<Tensor> = grids
        .iter()
        .enumerate()
        .map(|(i, &(h, w))| image_ids(h, w, 10 * (i as i64 + 1), device))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Rotary cos and sin (tokens, head_dim) for positions `ids` (tokens, 4):
/// each axis's frequencies in float64, as diffusers' `Flux2PosEmbed`.
fn rope(c: &Flux2Config, ids: &Tensor) -> (Tensor, Tensor) {
    let f64s = (Kind::Double, ids.device());
    let (mut coss, mut sins) = (Vec::new(), Vec::new());
    for (axis, &d) in c.axes_dims_rope.iter().enumerate() {
        let pos = ids.select(1, axis as i64).to_kind(Kind::Double);
        let exponent = Tensor::arange_start_step(0, d, 2, f64s) / d as f64;
        let freqs = Tensor::pow_scalar(c.rope_theta, &exponent).reciprocal();
        let angles = pos.unsqueeze(1) * freqs.unsqueeze(0);
        let table = |t: Tensor| {
            t.repeat_interleave_self_int(2, 1, None)
                .to_kind(Kind::Float)
        };
        coss.push(table(angles.cos()));
        sins.push(table(angles.sin()));
    }
    (Tensor::cat(&coss, -1), Tensor::cat(&sins, -1))
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for Flux2Transformer {}

//! FLUX.1's transformer (diffusers' `FluxTransformer2DModel`): latents
//! packed into 2×2 patches as tokens, double-stream blocks (image and text
//! each with their own weights, attending jointly), single-stream blocks
//! over the joined sequence, rotary positions on three axes, and AdaLN
//! modulation from the timestep, the pooled text embedding and (dev) the
//! distilled guidance. The network takes and returns unpacked latents
//! (batch, channels, h, w): packing is its own business.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::read_json;
use crate::error::{guarded, ModelError, Result};
use crate::flux_controlnet::FluxResiduals;
use crate::layers::Linear;
use crate::modules::ModuleIndex;
use crate::weights::{Storage, Vb, Weights};

/// The keys of the transformer's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxConfig {
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
    #[serde(default = "pooled")]
    pub pooled_projection_dim: i64,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<i64>,
}

fn one() -> i64 {
    1
}
fn in_channels() -> i64 {
    64
}
fn double() -> i64 {
    19
}
fn single() -> i64 {
    38
}
fn head_dim() -> i64 {
    128
}
fn heads() -> i64 {
    24
}
fn joint() -> i64 {
    4096
}
fn pooled() -> i64 {
    768
}
fn axes() -> Vec<i64> {
    vec![16, 56, 56]
}

/// Sinusoids of the timestep and guidance embeddings.
const TIME_PROJ_DIM: i64 = 256;
/// The rotary base.
const THETA: f64 = 10000.0;

impl FluxConfig {
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of the VAE latents it denoises (the packed tokens carry
    /// four of each).
    pub fn latent_channels(&self) -> i64 {
        self.in_channels / 4
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.patch_size != 1 {
            return Err(bad(format!(
                "patch_size {} (FLUX packs 2×2 patches outside the network: 1)",
                self.patch_size
            )));
        }
        if self.in_channels < 4 || self.in_channels % 4 != 0 {
            return Err(bad(format!(
                "in_channels {} is not four latent channels' worth",
                self.in_channels
            )));
        }
        if let Some(o) = self.out_channels {
            if o != self.in_channels {
                return Err(bad(format!(
                    "out_channels {o} differs from in_channels {} (a FLUX Fill or \
                     Kontext transformer is not served yet)",
                    self.in_channels
                )));
            }
        }
        for (k, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ] {
            if v < 1 {
                return Err(bad(format!("`{k}` must be positive, got {v}")));
            }
        }
        if self.num_layers < 0 || self.num_single_layers < 0 {
            return Err(bad("block counts must not be negative".into()));
        }
        if self.axes_dims_rope.len() != 3
            || self.axes_dims_rope.iter().any(|d| *d < 2 || d % 2 != 0)
            || self.axes_dims_rope.iter().sum::<i64>() != self.attention_head_dim
        {
            return Err(bad(format!(
                "axes_dims_rope {:?}: three even sizes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            )));
        }
        Ok(())
    }
}

/// Linear → SiLU → linear (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection` with SiLU; FLUX.2's without biases).
pub(crate) struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    pub(crate) fn load(vb: &Vb, input: i64, dim: i64, bias: bool) -> Result<Self> {
        Ok(Mlp {
            linear_1: Linear::load(&vb.pp("linear_1"), input, dim, bias)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, bias)?,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

/// diffusers' `get_timestep_embedding` with FLUX's settings (cos first, no
/// frequency shift), in float32.
fn sinusoids(t: &Tensor) -> Tensor {
    sinusoids_of(t, TIME_PROJ_DIM)
}

/// The same with `channels` sinusoids (FLUX.2 reads them from its config).
pub(crate) fn sinusoids_of(t: &Tensor, channels: i64) -> Tensor {
    let half = channels / 2;
    let exponent =
        Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln())) / (half as f64);
    let emb = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    Tensor::cat(&[emb.cos(), emb.sin()], -1)
}

/// Modulation from the conditioning vector: SiLU → linear → `n` chunks
/// (FLUX.2's shared modulations have no bias).
pub(crate) struct Modulation {
    linear: Linear,
    n: i64,
}

impl Modulation {
    pub(crate) fn load(vb: &Vb, dim: i64, n: i64, bias: bool) -> Result<Self> {
        Ok(Modulation {
            linear: Linear::load(&vb.pp("linear"), dim, n * dim, bias)?,
            n,
        })
    }

    /// Each chunk (B, 1, dim), ready to broadcast over tokens.
    pub(crate) fn forward(&self, temb: &Tensor) -> Vec<Tensor> {
        self.linear
            .forward(&temb.silu())
            .unsqueeze(1)
            .chunk(self.n, -1)
    }
}

/// FLUX.1's layer-norm epsilon.
pub(crate) const EPS: f64 = 1e-6;

/// LayerNorm without affine parameters, then `x·(1+scale)+shift`.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Tensor {
    let d = x.size()[2];
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, eps, true) * (scale + 1.0) + shift
}

/// Query/key RMS norm over the head dimension (torch's `RMSNorm`).
pub(crate) struct QkNorm {
    weight: Tensor,
    eps: f64,
}

impl QkNorm {
    pub(crate) fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(QkNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().unwrap_or(&1);
        x.rms_norm([d], Some(&self.weight), self.eps)
    }
}

/// Projections of one stream's queries, keys and values, with their norms.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: QkNorm,
    norm_k: QkNorm,
}

impl Qkv {
    fn load(vb: &Vb, names: [&str; 5], dim: i64, head_dim: i64) -> Result<Self> {
        Ok(Qkv {
            q: Linear::load(&vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(&vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(&vb.pp(names[2]), dim, dim, true)?,
            norm_q: QkNorm::load(&vb.pp(names[3]), head_dim, 1e-6)?,
            norm_k: QkNorm::load(&vb.pp(names[4]), head_dim, 1e-6)?,
        })
    }

    /// (B, S, heads, head_dim) each.
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

const MAIN: [&str; 5] = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
const ADDED: [&str; 5] = [
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "norm_added_q",
    "norm_added_k",
];

/// Rotary embedding on (B, S, H, D) with cos and sin of (S, D), or per row
/// (B, S, D) (pairs of adjacent channels rotate together, as diffusers'
/// complex product), in float32.
pub(crate) fn rotate(x: &Tensor, rope: &(Tensor, Tensor)) -> Tensor {
    let (cos, sin) = rope;
    let s = x.size();
    let pairs = x.reshape([s[0], s[1], s[2], -1, 2]);
    let (re, im) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let rotated = Tensor::stack(&[-im, re], -1).flatten(3, -1);
    // (S, D) or (B, S, D) → (1 or B, S, 1, D), over the heads.
    let heads = |t: &Tensor| match t.dim() {
        2 => t.unsqueeze(0).unsqueeze(2),
        _ => t.unsqueeze(2),
    };
    (x.to_kind(Kind::Float) * heads(cos) + rotated.to_kind(Kind::Float) * heads(sin))
        .to_kind(x.kind())
}

/// Joint attention over already rotated (B, S, H, D) queries, keys, values;
/// (B, S, H·D) out.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let t = |x: &Tensor| x.transpose(1, 2);
    let out = Tensor::scaled_dot_product_attention::<Tensor>(
        &t(q),
        &t(k),
        &t(v),
        None,
        0.0,
        false,
        None,
        false,
    );
    out.transpose(1, 2).flatten(2, 3)
}

/// diffusers' `FeedForward` with tanh-approximated GELU (`net.0.proj`, `net.2`).
struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: i64) -> Result<Self> {
        Ok(FeedForward {
            up: Linear::load(&vb.pp("net.0.proj"), dim, 4 * dim, true)?,
            down: Linear::load(&vb.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(x).gelu("tanh"))
    }
}

/// A double-stream block: image and text tokens each with their own
/// modulation, projections and feed-forward, attending jointly.
pub(crate) struct DoubleBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    pub(crate) fn load(vb: &Vb, dim: i64, head_dim: i64) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(DoubleBlock {
            norm1: Modulation::load(&vb.pp("norm1"), dim, 6, true)?,
            norm1_context: Modulation::load(&vb.pp("norm1_context"), dim, 6, true)?,
            img: Qkv::load(&attn, MAIN, dim, head_dim)?,
            txt: Qkv::load(&attn, ADDED, dim, head_dim)?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, true)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, true)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
            ff_context: FeedForward::load(&vb.pp("ff_context"), dim)?,
        })
    }

    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        head_dim: i64,
    ) -> (Tensor, Tensor) {
        let m = self.norm1.forward(temb);
        let c = self.norm1_context.forward(temb);
        let img_n = modulate(img, &m[0], &m[1], EPS);
        let txt_n = modulate(txt, &c[0], &c[1], EPS);
        let (iq, ik, iv) = self.img.forward(&img_n, head_dim);
        let (tq, tk, tv) = self.txt.forward(&txt_n, head_dim);
        // Text first, as diffusers joins them.
        let q = rotate(&Tensor::cat(&[tq, iq], 1), rope);
        let k = rotate(&Tensor::cat(&[tk, ik], 1), rope);
        let v = Tensor::cat(&[tv, iv], 1);
        let a = attend(&q, &k, &v);
        let n_txt = txt.size()[1];
        let txt_a = a.narrow(1, 0, n_txt);
        let img_a = a.narrow(1, n_txt, a.size()[1] - n_txt);

        let img = img + &m[2] * self.to_out.forward(&img_a.contiguous());
        let ff = self.ff.forward(&modulate(&img, &m[3], &m[4], EPS));
        let img = &img + &m[5] * ff;

        let txt = txt + &c[2] * self.to_add_out.forward(&txt_a.contiguous());
        let ff = self.ff_context.forward(&modulate(&txt, &c[3], &c[4], EPS));
        let txt = &txt + &c[5] * ff;
        // diffusers clips the text stream here, not the image stream.
        (img, clip_half(txt))
    }
}

/// diffusers clips fp16 activations to the finite range (the text stream
/// after a double block, the joined one after a single block).
pub(crate) fn clip_half(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        x.clamp(-65504.0, 65504.0)
    } else {
        x
    }
}

/// A single-stream block over the joined text and image tokens: attention
/// and an MLP side by side, one output projection.
pub(crate) struct SingleBlock {
    norm: Modulation,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl SingleBlock {
    pub(crate) fn load(vb: &Vb, dim: i64, head_dim: i64) -> Result<Self> {
        Ok(SingleBlock {
            norm: Modulation::load(&vb.pp("norm"), dim, 3, true)?,
            qkv: Qkv::load(&vb.pp("attn"), MAIN, dim, head_dim)?,
            proj_mlp: Linear::load(&vb.pp("proj_mlp"), dim, 4 * dim, true)?,
            proj_out: Linear::load(&vb.pp("proj_out"), 5 * dim, dim, true)?,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        head_dim: i64,
    ) -> Tensor {
        let m = self.norm.forward(temb);
        let n = modulate(x, &m[0], &m[1], EPS);
        let mlp = self.proj_mlp.forward(&n).gelu("tanh");
        let (q, k, v) = self.qkv.forward(&n, head_dim);
        let a = attend(&rotate(&q, rope), &rotate(&k, rope), &v);
        let out = self.proj_out.forward(&Tensor::cat(&[a, mlp], 2));
        clip_half(x + &m[2] * out)
    }
}

/// FLUX.1's transformer, loaded from `transformer/`.
pub struct FluxTransformer {
    config: FluxConfig,
    embedders: Embedders,
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

impl FluxTransformer {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let config: FluxConfig = read_json(config_path)?;
        config.validate(config_path)?;
        let vb = Vb::root(weights, "");
        let dim = config.inner_dim();
        let (double, single) = blocks(&vb, &config)?;
        let me = FluxTransformer {
            embedders: Embedders::load(&vb, &config)?,
            double,
            single,
            norm_out: Linear::load(&vb.pp("norm_out.linear"), dim, 2 * dim, true)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim, config.in_channels, true)?,
            modules: weights.module_index(),
            device: weights.placement().device,
            kind: weights.placement().kind,
            parameters: weights.parameter_count(),
            _storage: weights.storage(),
            config,
        };
        Ok(me)
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    pub fn modules(&self) -> &ModuleIndex {
        &self.modules
    }

    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// The velocity for `latents` (B, C, h, w) at `timesteps` (σ·1000, one
    /// per item or one for all) given the T5 `context` (B, L, joint), the
    /// pooled CLIP embedding (B, pooled) and, for a guidance-distilled
    /// model, the guidance per item (B,); with ControlNets' samples added
    /// to the image tokens after each block (diffusers' rule).
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: Option<&Tensor>,
        guidance: Option<&Tensor>,
        control: Option<&FluxResiduals>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let ((b, ch, h, w), pooled) = check_inputs(c, latents, context, pooled)?;
        let cs = context.size();
        let guidance = self.embedders.time.check_guidance(guidance)?;
        per_row_timesteps(timesteps, b)?;
        if let Some(r) = control {
            r.check(b, (h / 2) * (w / 2), c.inner_dim())?;
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let dev = self.device;
            let kind = self.kind;
            let x = pack(&latents.to_device(dev).to_kind(kind));
            let e = &self.embedders;
            let temb = e.time.forward(timesteps, guidance, pooled, b, (dev, kind));
            let mut img = e.x.forward(&x);
            let mut txt = e.context.forward(&context.to_device(dev).to_kind(kind));
            let rope = rope(&self.config, cs[1], h / 2, w / 2, dev);
            let hd = c.attention_head_dim;
            let n_double = self.double.len();
            for (i, block) in self.double.iter().enumerate() {
                let (im, t) = block.forward(&img, &txt, &temb, &rope, hd);
                img = im;
                txt = t;
                if let Some(s) = control.and_then(|r| r.double_sample(i, n_double)) {
                    img += s.to_kind(kind);
                }
            }
            let n_txt = cs[1];
            let mut x = Tensor::cat(&[txt, img], 1);
            let n_single = self.single.len();
            for (i, block) in self.single.iter().enumerate() {
                x = block.forward(&x, &temb, &rope, hd);
                if let Some(s) = control.and_then(|r| r.single_sample(i, n_single)) {
                    // The image tokens, after the text's.
                    let mut image = x.narrow(1, n_txt, x.size()[1] - n_txt);
                    image += s.to_kind(kind);
                }
            }
            let img = x.narrow(1, n_txt, x.size()[1] - n_txt);
            // AdaLayerNormContinuous: scale first, then shift.
            let m = self
                .norm_out
                .forward(&temb.silu())
                .unsqueeze(1)
                .chunk(2, -1);
            let img = modulate(&img, &m[1], &m[0], EPS);
            let out = self.proj_out.forward(&img);
            Ok(unpack(&out, ch, h, w))
        })
    }
}

/// A latents tensor's (B, C, h, w).
pub(crate) type Dims = (i64, i64, i64, i64);

/// `latents` (B, C, h, w) with C the network's latent channels and even
/// sides, `context` (B, L ≥ 1, joint) and `pooled` (B, pooled) checked:
/// (B, C, h, w) and the pooled embedding.
pub(crate) fn check_inputs<'a>(
    c: &FluxConfig,
    latents: &Tensor,
    context: &Tensor,
    pooled: Option<&'a Tensor>,
) -> Result<(Dims, &'a Tensor)> {
    let size = latents.size();
    let [b, ch, h, w] = size[..] else {
        return Err(ModelError::Input(format!(
            "latents must be 4-d (batch, channels, h, w), got {size:?}"
        )));
    };
    if ch != c.latent_channels() || h % 2 != 0 || w % 2 != 0 || h < 2 || w < 2 {
        return Err(ModelError::Input(format!(
            "latents {size:?}: need {} channels and even sides",
            c.latent_channels()
        )));
    }
    let cs = context.size();
    if cs.len() != 3 || cs[0] != b || cs[2] != c.joint_attention_dim || cs[1] < 1 {
        return Err(ModelError::Input(format!(
            "context {cs:?} does not fit latents {size:?} (batch, tokens, {})",
            c.joint_attention_dim
        )));
    }
    let pooled =
        pooled.ok_or_else(|| ModelError::Input("FLUX needs the pooled text embedding".into()))?;
    if pooled.size() != [b, c.pooled_projection_dim] {
        return Err(ModelError::Input(format!(
            "pooled {:?}: need ({b}, {})",
            pooled.size(),
            c.pooled_projection_dim
        )));
    }
    Ok(((b, ch, h, w), pooled))
}

/// What the transformer and its ControlNets embed alike: the packed
/// latents (`x_embedder`), the T5 text (`context_embedder`), and the time,
/// guidance and pooled text (`time_text_embed`).
pub(crate) struct Embedders {
    pub(crate) x: Linear,
    pub(crate) context: Linear,
    pub(crate) time: TimeText,
}

impl Embedders {
    pub(crate) fn load(vb: &Vb, config: &FluxConfig) -> Result<Self> {
        let dim = config.inner_dim();
        Ok(Embedders {
            x: Linear::load(&vb.pp("x_embedder"), config.in_channels, dim, true)?,
            context: Linear::load(
                &vb.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                true,
            )?,
            time: TimeText::load(vb, config)?,
        })
    }
}

/// The time, guidance and pooled-text embedding (`time_text_embed`): the
/// vector every block's modulation is made from.
pub(crate) struct TimeText {
    time: Mlp,
    guidance: Option<Mlp>,
    text: Mlp,
}

impl TimeText {
    pub(crate) fn load(vb: &Vb, config: &FluxConfig) -> Result<Self> {
        let dim = config.inner_dim();
        let tte = vb.pp("time_text_embed");
        let guidance = if config.guidance_embeds {
            Some(Mlp::load(
                &tte.pp("guidance_embedder"),
                TIME_PROJ_DIM,
                dim,
                true,
            )?)
        } else {
            None
        };
        Ok(TimeText {
            time: Mlp::load(&tte.pp("timestep_embedder"), TIME_PROJ_DIM, dim, true)?,
            guidance,
            text: Mlp::load(
                &tte.pp("text_embedder"),
                config.pooled_projection_dim,
                dim,
                true,
            )?,
        })
    }

    /// The guidance to embed: required by a guidance-distilled network,
    /// dropped by one without (schnell: diffusers drops it).
    pub(crate) fn check_guidance<'a>(
        &self,
        guidance: Option<&'a Tensor>,
    ) -> Result<Option<&'a Tensor>> {
        match (&self.guidance, guidance) {
            (Some(_), Some(g)) => Ok(Some(g)),
            (Some(_), None) => Err(ModelError::Input(
                "this guidance-distilled network needs a guidance value".into(),
            )),
            (None, _) => Ok(None),
        }
    }

    /// The embedding (B, dim) of `timesteps` (σ·1000, one or B), the
    /// guidance (one or B) and `pooled` (B, pooled), on `dev` in `kind`.
    pub(crate) fn forward(
        &self,
        timesteps: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
        b: i64,
        (dev, kind): (tch::Device, Kind),
    ) -> Tensor {
        let t = timesteps
            .to_device(dev)
            .to_kind(Kind::Float)
            .reshape([-1])
            .expand([b], false);
        // The pipeline passes t/1000 and the network multiplies by 1000,
        // each in the network's precision.
        let t = (t.to_kind(kind) / 1000.0).to_kind(kind) * 1000.0;
        let mut temb = self.time.forward(&sinusoids(&t).to_kind(kind));
        if let (Some(mlp), Some(g)) = (&self.guidance, guidance) {
            let g = g
                .to_device(dev)
                .to_kind(Kind::Float)
                .reshape([-1])
                .expand([b], false)
                .to_kind(kind)
                * 1000.0;
            temb += mlp.forward(&sinusoids(&g).to_kind(kind));
        }
        temb + self.text.forward(&pooled.to_device(dev).to_kind(kind))
    }
}

/// The double- and single-stream blocks of a network configured as `config`.
/// Their linear layers are kept as the weights' fp8 setting says.
pub(crate) fn blocks(vb: &Vb, config: &FluxConfig) -> Result<(Vec<DoubleBlock>, Vec<SingleBlock>)> {
    let vb = vb.fp8_scope();
    let (dim, hd) = (config.inner_dim(), config.attention_head_dim);
    let double = (0..config.num_layers)
        .map(|i| DoubleBlock::load(&vb.pp("transformer_blocks").pp(i), dim, hd))
        .collect::<Result<Vec<_>>>()?;
    let single = (0..config.num_single_layers)
        .map(|i| SingleBlock::load(&vb.pp("single_transformer_blocks").pp(i), dim, hd))
        .collect::<Result<Vec<_>>>()?;
    Ok((double, single))
}

/// One timestep for all `b` rows, or one per row; anything else refused.
pub(crate) fn per_row_timesteps(timesteps: &Tensor, b: i64) -> Result<()> {
    let nt = timesteps.numel() as i64;
    if nt != 1 && nt != b {
        return Err(ModelError::Input(format!(
            "{nt} timesteps for a batch of {b}"
        )));
    }
    Ok(())
}

/// (B, C, h, w) → (B, h/2 · w/2, 4C): each 2×2 patch one token.
pub fn pack(x: &Tensor) -> Tensor {
    let s = x.size();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    x.view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4])
}

/// The inverse of [`pack`].
pub fn unpack(x: &Tensor, c: i64, h: i64, w: i64) -> Tensor {
    let b = x.size()[0];
    x.view([b, h / 2, w / 2, c, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, c, h, w])
}

/// Rotary cos and sin (tokens, head_dim) for `text` tokens (all at
/// position 0) then an `h × w` grid of image tokens (axis 1 the row, axis 2
/// the column); frequencies in float64, as diffusers computes them. Made on
/// the device each forward: a handful of small kernels, no table copied
/// from the host per step.
pub(crate) fn rope(
    c: &FluxConfig,
    text: i64,
    h: i64,
    w: i64,
    device: tch::Device,
) -> (Tensor, Tensor) {
    let f64s = (Kind::Double, device);
    let txt = Tensor::zeros([text], f64s);
    let rows = Tensor::arange(h, f64s).repeat_interleave_self_int(w, 0, None);
    let cols = Tensor::arange(w, f64s).repeat([h]);
    let positions = [
        Tensor::zeros([text + h * w], f64s),
        Tensor::cat(&[&txt, &rows], 0),
        Tensor::cat(&[&txt, &cols], 0),
    ];
    let (mut coss, mut sins) = (Vec::new(), Vec::new());
    for (pos, &d) in positions.iter().zip(&c.axes_dims_rope) {
        let freqs = (Tensor::arange_start_step(0, d, 2, f64s) / d as f64)
            .g_mul_scalar(THETA.ln())
            .exp()
            .reciprocal();
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
unsafe impl Sync for FluxTransformer {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_undone_by_unpacking_and_takes_2x2_patches() {
        let x = Tensor::arange(2 * 3 * 4 * 6, (Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 6]);
        let p = pack(&x);
        assert_eq!(p.size(), [2, 6, 12]);
        // The first token: channel 0's top-left 2×2 patch, then channel 1's.
        let first: Vec<f32> = Vec::try_from(p.get(0).get(0).narrow(0, 0, 5)).unwrap_or_default();
        assert_eq!(first, [0.0, 1.0, 6.0, 7.0, 24.0]);
        assert!(unpack(&p, 3, 4, 6).equal(&x));
    }
}

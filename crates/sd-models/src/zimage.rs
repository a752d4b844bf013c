//! Z-Image's single-stream transformer (diffusers'
//! `ZImageTransformer2DModel`, text-to-image path). Latents are cut into
//! 2×2 patches (channels last within a patch); the image tokens pass
//! "noise refiner" blocks modulated by the timestep, the caption (Qwen3's
//! hidden states, of any length per row) passes unmodulated "context
//! refiner" blocks, then image and caption tokens — image first — share
//! the main blocks. Every sequence is padded to a multiple of 32 tokens
//! (padding rows take a learned pad token), rows of a batch are padded to
//! the longest with a key mask, and positions are three rotary axes
//! (caption index, row, column) read from a table, as diffusers does.
//!
//! The network's output is what diffusers' transformer returns; the Z-Image
//! pipeline negates it to get the flow's velocity and feeds the network
//! `1 − σ` as its time. [`ZImageTransformer::forward`] takes σ·1000 as every
//! denoiser here does and applies that convention itself.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::read_json;
use crate::error::{guarded, ModelError, Result};
use crate::flux::rotate;
use crate::layers::{Linear, RmsNorm};
use crate::modules::ModuleIndex;
use crate::weights::{Storage, Vb, Weights};

/// Tokens every sequence is padded to a multiple of.
const SEQ_MULTIPLE: i64 = 32;
/// Width of the modulation's input (the timestep embedding).
const ADALN_DIM: i64 = 256;
/// Sinusoids of the timestep embedding.
const FREQ_DIM: i64 = 256;

/// The keys of the transformer's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ZImageConfig {
    #[serde(default = "patch")]
    pub all_patch_size: Vec<i64>,
    #[serde(default = "f_patch")]
    pub all_f_patch_size: Vec<i64>,
    #[serde(default = "in_channels")]
    pub in_channels: i64,
    #[serde(default = "dim")]
    pub dim: i64,
    #[serde(default = "layers")]
    pub n_layers: i64,
    #[serde(default = "refiners")]
    pub n_refiner_layers: i64,
    #[serde(default = "heads")]
    pub n_heads: i64,
    /// Read, not used: diffusers' attention has as many key/value heads as
    /// query heads.
    #[serde(default)]
    pub n_kv_heads: Option<i64>,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub qk_norm: bool,
    #[serde(default = "cap_dim")]
    pub cap_feat_dim: i64,
    #[serde(default)]
    pub siglip_feat_dim: Option<i64>,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "t_scale")]
    pub t_scale: f64,
    #[serde(default = "axes_dims")]
    pub axes_dims: Vec<i64>,
    #[serde(default = "axes_lens")]
    pub axes_lens: Vec<i64>,
}

fn patch() -> Vec<i64> {
    vec![2]
}
fn f_patch() -> Vec<i64> {
    vec![1]
}
fn in_channels() -> i64 {
    16
}
fn dim() -> i64 {
    3840
}
fn layers() -> i64 {
    30
}
fn refiners() -> i64 {
    2
}
fn heads() -> i64 {
    30
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn cap_dim() -> i64 {
    2560
}
fn theta() -> f64 {
    256.0
}
fn t_scale() -> f64 {
    1000.0
}
fn axes_dims() -> Vec<i64> {
    vec![32, 48, 48]
}
fn axes_lens() -> Vec<i64> {
    vec![1024, 512, 512]
}

impl ZImageConfig {
    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_heads.max(1)
    }

    fn adaln_dim(&self) -> i64 {
        self.dim.min(ADALN_DIM)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        if self.all_patch_size[..] != [2] || self.all_f_patch_size[..] != [1] {
            return Err(bad(format!(
                "patch sizes {:?}/{:?}: Z-Image's text-to-image transformer patches 2×2, one frame",
                self.all_patch_size, self.all_f_patch_size
            )));
        }
        if self.siglip_feat_dim.is_some() {
            return Err(bad("a SigLIP embedder (Z-Image Omni) is not served".into()));
        }
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("cap_feat_dim", self.cap_feat_dim),
        ] {
            if v < 1 {
                return Err(bad(format!("`{k}` must be positive, got {v}")));
            }
        }
        if self.n_layers < 0 || self.n_refiner_layers < 0 || self.dim % self.n_heads != 0 {
            return Err(bad(format!(
                "{} layers, {} refiner layers, dim {} over {} heads",
                self.n_layers, self.n_refiner_layers, self.dim, self.n_heads
            )));
        }
        if self.axes_dims.len() != 3
            || self.axes_lens.len() != 3
            || self.axes_dims.iter().any(|d| *d < 2 || d % 2 != 0)
            || self.axes_lens.iter().any(|l| *l < 1)
            || self.axes_dims.iter().sum::<i64>() != self.head_dim()
        {
            return Err(bad(format!(
                "axes_dims {:?} (three even sizes summing to the head width {}) with axes_lens {:?}",
                self.axes_dims,
                self.head_dim(),
                self.axes_lens
            )));
        }
        Ok(())
    }
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    /// Refiners of the caption have none.
    modulation: Option<Linear>,
}

/// What the blocks of one sequence share: rotary tables (B, S, head_dim)
/// and the key mask (B, 1, 1, S), None when no row is padded.
struct Seq<'a> {
    rope: &'a (Tensor, Tensor),
    mask: Option<&'a Tensor>,
    heads: i64,
}

impl Block {
    fn load(vb: &Vb, c: &ZImageConfig, modulated: bool) -> Result<Self> {
        let (dim, hd) = (c.dim, c.head_dim());
        let attn = vb.pp("attention");
        let ff = vb.pp("feed_forward");
        let hidden = (dim as f64 / 3.0 * 8.0) as i64;
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), dim, c.norm_eps);
        let qk = |name: &str| -> Result<Option<RmsNorm>> {
            if c.qk_norm {
                Ok(Some(RmsNorm::load(&attn.pp(name), hd, 1e-5)?))
            } else {
                Ok(None)
            }
        };
        Ok(Block {
            q: Linear::load(&attn.pp("to_q"), dim, dim, false)?,
            k: Linear::load(&attn.pp("to_k"), dim, dim, false)?,
            v: Linear::load(&attn.pp("to_v"), dim, dim, false)?,
            out: Linear::load(&attn.pp("to_out.0"), dim, dim, false)?,
            norm_q: qk("norm_q")?,
            norm_k: qk("norm_k")?,
            w1: Linear::load(&ff.pp("w1"), dim, hidden, false)?,
            w2: Linear::load(&ff.pp("w2"), hidden, dim, false)?,
            w3: Linear::load(&ff.pp("w3"), dim, hidden, false)?,
            attention_norm1: norm("attention_norm1")?,
            attention_norm2: norm("attention_norm2")?,
            ffn_norm1: norm("ffn_norm1")?,
            ffn_norm2: norm("ffn_norm2")?,
            modulation: if modulated {
                Some(Linear::load(
                    &vb.pp("adaLN_modulation.0"),
                    c.adaln_dim(),
                    4 * dim,
                    true,
                )?)
            } else {
                None
            },
        })
    }

    fn attention(&self, x: &Tensor, s: &Seq) -> Tensor {
        let (b, n, _) = x.size3().expect("3-d tokens");
        let heads = |t: Tensor| t.view([b, n, s.heads, -1]);
        let norm = |t: Tensor, n: &Option<RmsNorm>| match n {
            Some(n) => n.forward(&t),
            None => t,
        };
        let q = rotate(&norm(heads(self.q.forward(x)), &self.norm_q), s.rope);
        let k = rotate(&norm(heads(self.k.forward(x)), &self.norm_k), s.rope);
        let v = heads(self.v.forward(x));
        let t = |x: &Tensor| x.transpose(1, 2);
        let a = Tensor::scaled_dot_product_attention(
            &t(&q),
            &t(&k),
            &t(&v),
            s.mask,
            0.0,
            false,
            None,
            false,
        );
        self.out.forward(&a.transpose(1, 2).flatten(2, 3))
    }

    fn feed_forward(&self, x: &Tensor) -> Tensor {
        self.w2
            .forward(&(self.w1.forward(x).silu() * self.w3.forward(x)))
    }

    fn forward(&self, x: &Tensor, s: &Seq, adaln: Option<&Tensor>) -> Tensor {
        match (&self.modulation, adaln) {
            (Some(m), Some(c)) => {
                let mods = m.forward(c).unsqueeze(1).chunk(4, 2);
                let (scale_msa, gate_msa) = (&mods[0] + 1.0, mods[1].tanh());
                let (scale_mlp, gate_mlp) = (&mods[2] + 1.0, mods[3].tanh());
                let a = self.attention(&(self.attention_norm1.forward(x) * scale_msa), s);
                let x = x + gate_msa * self.attention_norm2.forward(&a);
                let f = self.feed_forward(&(self.ffn_norm1.forward(&x) * scale_mlp));
                &x + gate_mlp * self.ffn_norm2.forward(&f)
            }
            _ => {
                let a = self.attention(&self.attention_norm1.forward(x), s);
                let x = x + self.attention_norm2.forward(&a);
                let f = self.feed_forward(&self.ffn_norm1.forward(&x));
                &x + self.ffn_norm2.forward(&f)
            }
        }
    }
}

/// Z-Image's transformer, loaded from `transformer/`.
pub struct ZImageTransformer {
    config: ZImageConfig,
    x_embedder: Linear,
    final_linear: Linear,
    final_modulation: Linear,
    t_mlp: (Linear, Linear),
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad: Tensor,
    cap_pad: Tensor,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    modules: ModuleIndex,
    device: tch::Device,
    kind: Kind,
    parameters: u64,
    _storage: Storage,
}

impl ZImageTransformer {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let c: ZImageConfig = read_json(config_path)?;
        c.validate(config_path)?;
        let vb = Vb::root(weights, "");
        let dim = c.dim;
        let patch = 4 * c.in_channels;
        let blocks = |name: &str, n: i64, modulated: bool| {
            (0..n)
                .map(|i| Block::load(&vb.pp(name).pp(i), &c, modulated))
                .collect::<Result<Vec<_>>>()
        };
        let fl = vb.pp("all_final_layer.2-1");
        let t = vb.pp("t_embedder.mlp");
        Ok(ZImageTransformer {
            x_embedder: Linear::load(&vb.pp("all_x_embedder.2-1"), patch, dim, true)?,
            final_linear: Linear::load(&fl.pp("linear"), dim, patch, true)?,
            final_modulation: Linear::load(&fl.pp("adaLN_modulation.1"), c.adaln_dim(), dim, true)?,
            t_mlp: (
                Linear::load(&t.pp("0"), FREQ_DIM, 1024, true)?,
                Linear::load(&t.pp("2"), 1024, c.adaln_dim(), true)?,
            ),
            cap_norm: RmsNorm::load(&vb.pp("cap_embedder.0"), c.cap_feat_dim, c.norm_eps)?,
            cap_linear: Linear::load(&vb.pp("cap_embedder.1"), c.cap_feat_dim, dim, true)?,
            x_pad: vb.get("x_pad_token", &[1, dim])?,
            cap_pad: vb.get("cap_pad_token", &[1, dim])?,
            noise_refiner: blocks("noise_refiner", c.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", c.n_refiner_layers, false)?,
            layers: blocks("layers", c.n_layers, true)?,
            modules: weights.module_index(),
            device: weights.placement().device,
            kind: weights.placement().kind,
            parameters: weights.parameter_count(),
            _storage: weights.storage(),
            config: c,
        })
    }

    pub fn config(&self) -> &ZImageConfig {
        &self.config
    }

    pub fn modules(&self) -> &ModuleIndex {
        &self.modules
    }

    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// The network's output for `latents` (B, C, H, W) at `timesteps`
    /// (σ·1000, one per row or one for all), each row with its own caption
    /// (`captions[b]`: (tokens, cap_feat_dim), the prompt's tokens alone).
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        captions: &[Tensor],
    ) -> Result<Tensor> {
        let c = &self.config;
        let size = latents.size();
        let [b, ch, h, w] = size[..] else {
            return Err(ModelError::Input(format!(
                "latents must be 4-d (batch, channels, h, w), got {size:?}"
            )));
        };
        if ch != c.in_channels || h < 2 || w < 2 || h % 2 != 0 || w % 2 != 0 {
            return Err(ModelError::Input(format!(
                "latents {size:?}: need {} channels and even sides",
                c.in_channels
            )));
        }
        if captions.len() as i64 != b {
            return Err(ModelError::Input(format!(
                "{} captions for a batch of {b}",
                captions.len()
            )));
        }
        for (i, cap) in captions.iter().enumerate() {
            let s = cap.size();
            if s.len() != 2 || s[0] < 1 || s[1] != c.cap_feat_dim {
                return Err(ModelError::Input(format!(
                    "caption {i}: {s:?}, need (tokens >= 1, {})",
                    c.cap_feat_dim
                )));
            }
        }
        let (ht, wt) = (h / 2, w / 2);
        let longest = captions
            .iter()
            .map(|c| padded(c.size()[0]))
            .max()
            .unwrap_or(0);
        if longest + 1 > c.axes_lens[0] || ht > c.axes_lens[1] || wt > c.axes_lens[2] {
            return Err(ModelError::Input(format!(
                "{longest} caption tokens and a {ht}×{wt} grid exceed the position table {:?}",
                c.axes_lens
            )));
        }
        crate::flux::per_row_timesteps(timesteps, b)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            Ok(self.run(latents, timesteps, captions, (b, ch, h, w)))
        })
    }

    fn run(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        captions: &[Tensor],
        (b, ch, h, w): (i64, i64, i64, i64),
    ) -> Tensor {
        let c = &self.config;
        let (dev, kind) = (self.device, self.kind);
        let (ht, wt) = (h / 2, w / 2);
        let n_img = ht * wt;
        let img_len = padded(n_img);
        let adaln = self.embed_time(timesteps, b);
        // Image tokens: 2×2 patches, channels last within a patch.
        let patches = latents
            .to_device(dev)
            .to_kind(kind)
            .view([b, ch, ht, 2, wt, 2])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([b, n_img, 4 * ch]);
        let x = pad_rows(&self.x_embedder.forward(&patches), img_len, &self.x_pad);
        let cap_lens: Vec<i64> = captions.iter().map(|c| padded(c.size()[0])).collect();
        // Positions: the caption from 1, the image after its caption.
        let img_ids: Vec<Tensor> = cap_lens
            .iter()
            .map(|&l| image_ids(ht, wt, l + 1, img_len, dev))
            .collect();
        let x_rope = rope(c, &Tensor::stack(&img_ids, 0));
        let no_mask = Seq {
            rope: &x_rope,
            mask: None,
            heads: c.n_heads,
        };
        let mut x = x;
        for block in &self.noise_refiner {
            x = block.forward(&x, &no_mask, Some(&adaln));
        }
        let (cap, cap_rope) = self.captions(captions, &cap_lens);
        // Image first, then its caption; rows padded to the longest.
        let lens: Vec<i64> = cap_lens.iter().map(|l| img_len + l).collect();
        let total = lens.iter().copied().max().unwrap_or(img_len);
        let join = |a: &Tensor, b: &Tensor, i: usize| {
            Tensor::cat(
                &[a.get(i as i64), b.get(i as i64).narrow(0, 0, cap_lens[i])],
                0,
            )
            .constant_pad_nd([0, 0, 0, total - lens[i]])
        };
        let unified = Tensor::stack(
            &(0..captions.len())
                .map(|i| join(&x, &cap, i))
                .collect::<Vec<_>>(),
            0,
        );
        let rope_cat = |t: &Tensor, u: &Tensor| {
            Tensor::stack(
                &(0..captions.len())
                    .map(|i| join(t, u, i))
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let u_rope = (
            rope_cat(&x_rope.0, &cap_rope.0),
            rope_cat(&x_rope.1, &cap_rope.1),
        );
        let u_mask = key_mask(&lens, total, dev);
        let u_seq = Seq {
            rope: &u_rope,
            mask: u_mask.as_ref(),
            heads: c.n_heads,
        };
        let mut u = unified;
        for block in &self.layers {
            u = block.forward(&u, &u_seq, Some(&adaln));
        }
        let scale = self.final_modulation.forward(&adaln.silu()).unsqueeze(1) + 1.0;
        let d = u.size()[2];
        let u = u.layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, true) * scale;
        let out = self.final_linear.forward(&u).narrow(1, 0, n_img);
        out.view([b, ht, wt, 2, 2, ch])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, ch, h, w])
    }

    /// The captions embedded and refined: each padded to a multiple of 32
    /// with the pad token, the rows padded to the longest with a mask;
    /// (tokens (B, S, dim), their rotary tables).
    fn captions(&self, captions: &[Tensor], cap_lens: &[i64]) -> (Tensor, (Tensor, Tensor)) {
        let c = &self.config;
        let (dev, kind) = (self.device, self.kind);
        // Captions: embedded together (rows padded to the longest, so the
        // embedder sees the batch its LoRA plan expects), then each row's
        // tokens up to a multiple of 32 the pad token, zeros beyond.
        let longest = cap_lens.iter().copied().max().unwrap_or(1);
        let raw = Tensor::stack(
            &captions
                .iter()
                .map(|c| {
                    c.to_device(dev)
                        .to_kind(kind)
                        .constant_pad_nd([0, 0, 0, longest - c.size()[0]])
                })
                .collect::<Vec<_>>(),
            0,
        );
        let embedded = self.cap_linear.forward(&self.cap_norm.forward(&raw));
        let rows = |lens: Vec<i64>| {
            Tensor::stack(
                &lens
                    .iter()
                    .map(|&l| Tensor::arange(longest, (Kind::Int64, dev)).lt(l))
                    .collect::<Vec<_>>(),
                0,
            )
            .unsqueeze(-1)
        };
        let real = rows(captions.iter().map(|c| c.size()[0]).collect());
        let padded = rows(cap_lens.to_vec());
        let pad = self.cap_pad.to_kind(embedded.kind()).view([1, 1, -1]);
        let fill = pad.where_self(&padded, &embedded.zeros_like());
        let caps = embedded.where_self(&real, &fill);
        let cap_ids = Tensor::stack(
            &cap_lens
                .iter()
                .map(|&len| caption_ids(len, longest, dev))
                .collect::<Vec<_>>(),
            0,
        );
        let cap_rope = zero_padding(rope(c, &cap_ids), cap_lens);
        let cap_mask = key_mask(cap_lens, longest, dev);
        let cap_seq = Seq {
            rope: &cap_rope,
            mask: cap_mask.as_ref(),
            heads: c.n_heads,
        };
        let mut cap = caps;
        for block in &self.context_refiner {
            cap = block.forward(&cap, &cap_seq, None);
        }
        (cap, cap_rope)
    }

    /// The timestep embedding (B, adaLN width) of the network's time
    /// `(1000 − σ·1000) / 1000 · t_scale`, in float32 as the pipeline
    /// computes it, then the network's precision.
    fn embed_time(&self, timesteps: &Tensor, b: i64) -> Tensor {
        let t = timesteps
            .to_device(self.device)
            .to_kind(Kind::Float)
            .reshape([-1])
            .expand([b], false);
        let t = ((t.neg() + 1000.0) / 1000.0) * self.config.t_scale;
        let half = FREQ_DIM / 2;
        let freqs = (Tensor::arange(half, (Kind::Float, self.device)) * -(10000f64.ln())
            / half as f64)
            .exp();
        let args = t.unsqueeze(1) * freqs.unsqueeze(0);
        let emb = Tensor::cat(&[args.cos(), args.sin()], -1).to_kind(self.kind);
        self.t_mlp.1.forward(&self.t_mlp.0.forward(&emb).silu())
    }
}

/// `n` rounded up to a multiple of 32.
fn padded(n: i64) -> i64 {
    (n + SEQ_MULTIPLE - 1) / SEQ_MULTIPLE * SEQ_MULTIPLE
}

/// Tokens (B, n, dim) padded to `len` rows, the added rows the pad token.
fn pad_rows(x: &Tensor, len: i64, pad: &Tensor) -> Tensor {
    let (b, n, d) = x.size3().expect("3-d tokens");
    if len == n {
        return x.shallow_clone();
    }
    let fill = pad
        .to_kind(x.kind())
        .view([1, 1, d])
        .expand([b, len - n, d], false);
    Tensor::cat(&[x, &fill], 1)
}

/// Positions (len, 3) of an `h × w` image grid at caption index `t`, then
/// (0, 0, 0) for the padding up to `len`.
fn image_ids(h: i64, w: i64, t: i64, len: i64, device: tch::Device) -> Tensor {
    let i = (Kind::Int64, device);
    let rows = Tensor::arange(h, i).repeat_interleave_self_int(w, 0, None);
    let cols = Tensor::arange(w, i).repeat([h]);
    let grid = Tensor::stack(&[Tensor::full([h * w], t, i), rows, cols], 1);
    grid.constant_pad_nd([0, 0, 0, len - h * w])
}

/// Positions (longest, 3) of a caption padded to `len`: (1 + i, 0, 0) for
/// i < len (the padding counts on), zeros beyond.
fn caption_ids(len: i64, longest: i64, device: tch::Device) -> Tensor {
    let i = (Kind::Int64, device);
    let first = Tensor::arange_start(1, len + 1, i);
    let z = Tensor::zeros([len], i);
    Tensor::stack(&[first, z.shallow_clone(), z], 1).constant_pad_nd([0, 0, 0, longest - len])
}

/// Rotary tables for the rows of a batch padded beyond `lens`: zero there
/// (diffusers pads its complex table with zeros).
fn zero_padding((cos, sin): (Tensor, Tensor), lens: &[i64]) -> (Tensor, Tensor) {
    let s = cos.size()[1];
    let keep = Tensor::stack(
        &lens
            .iter()
            .map(|&l| Tensor::arange(s, (Kind::Int64, cos.device())).lt(l))
            .collect::<Vec<_>>(),
        0,
    )
    .unsqueeze(-1)
    .to_kind(cos.kind());
    (cos * &keep, sin * keep)
}

/// A key mask (B, 1, 1, S) when the rows' lengths differ; None when all
/// fill `total`.
fn key_mask(lens: &[i64], total: i64, device: tch::Device) -> Option<Tensor> {
    if lens.iter().all(|&l| l == total) {
        return None;
    }
    let rows: Vec<Tensor> = lens
        .iter()
        .map(|&l| Tensor::arange(total, (Kind::Int64, device)).lt(l))
        .collect();
    Some(Tensor::stack(&rows, 0).view([lens.len() as i64, 1, 1, total]))
}

/// Rotary cos and sin (B, S, head_dim) for positions `ids` (B, S, 3): each
/// axis's angles in float64, rounded to float32, then cos and sin in
/// float32 (diffusers' table of complex64), pairs of channels interleaved.
fn rope(c: &ZImageConfig, ids: &Tensor) -> (Tensor, Tensor) {
    let dev = ids.device();
    let (mut coss, mut sins) = (Vec::new(), Vec::new());
    for (axis, &d) in c.axes_dims.iter().enumerate() {
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Double, dev)) / d as f64;
        let freqs = Tensor::pow_scalar(c.rope_theta, &exponent).reciprocal();
        let pos = ids.select(2, axis as i64).to_kind(Kind::Double);
        let angles = (pos.unsqueeze(-1) * freqs).to_kind(Kind::Float);
        let table = |t: Tensor| t.repeat_interleave_self_int(2, -1, None);
        coss.push(table(angles.cos()));
        sins.push(table(angles.sin()));
    }
    (Tensor::cat(&coss, -1), Tensor::cat(&sins, -1))
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for ZImageTransformer {}

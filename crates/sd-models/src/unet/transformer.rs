//! The UNet's cross-attention: diffusers' `Transformer2DModel` over image
//! features (group norm, a projection in, transformer blocks of self- and
//! cross-attention and a GEGLU feed-forward, a projection out, residual).

use tch::Tensor;

use crate::config::{UNetBlock, UNetConfig};
use crate::error::Result;
use crate::layers::{attention, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Vb;

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast: bool,
    /// Its diffusers path (`…transformer_blocks.0.attn2`): where an
    /// IP-Adapter's keys and values for it are found.
    key: String,
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
            key: vb.prefix().to_string(),
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(xs);
        let (q, k, v) = (
            self.to_q.forward(xs),
            self.to_k.forward(ctx),
            self.to_v.forward(ctx),
        );
        let mut out = attention(&q, &k, &v, self.heads, false, self.upcast);
        if context.is_some() {
            // Image prompts' attention beside the text's (IP-Adapters).
            if let Some(extra) =
                crate::ip_adapter::contribution(&self.key, &q, self.heads, self.upcast)
            {
                out += extra;
            }
        }
        self.to_out.forward(&out)
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
pub(crate) struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub(crate) fn load(vb: &Vb, channels: i64, block: &UNetBlock, c: &UNetConfig) -> Result<Self> {
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

    /// Its cross-attention layers' diffusers paths, in order.
    pub(crate) fn cross_keys(&self) -> Vec<String> {
        self.blocks.iter().map(|b| b.attn2.key.clone()).collect()
    }

    pub(crate) fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
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

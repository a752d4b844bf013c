//! The T5 encoder (transformers' `T5EncoderModel`) that FLUX reads prompts
//! with: token embeddings, pre-norm blocks of unscaled self-attention with a
//! learned relative-position bias (bidirectional buckets, computed in the
//! first block and shared), RMS layer norms, a gated-GELU (v1.1) or ReLU
//! feed-forward, a final RMS norm. No attention mask: FLUX's pipelines pad
//! to the sequence length and let the pad tokens through.
//!
//! As transformers does, the feed-forward's output projection (`wo`) stays
//! in float32 when the rest runs in fp16 (`_keep_in_fp32_modules`, fp16
//! only: bf16 keeps it bf16); the residual stream then promotes to float32
//! after the first block, as it does there.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::read_json;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{Linear, RmsNorm};
use crate::modules::ModuleIndex;
use crate::weights::{Storage, Vb, Weights};

/// The keys of a T5 `config.json` the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: i64,
    #[serde(default = "default_distance")]
    pub relative_attention_max_distance: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> i64 {
    32
}
fn default_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// T5's feed-forward activation, from `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedForward {
    /// `gated-gelu` (T5 v1.1, FLUX's): gelu_new(wi_0 x) · wi_1 x.
    GatedGelu,
    /// `relu` (the original T5): relu(wi x).
    Relu,
}

impl T5Config {
    fn feed_forward(&self, path: &Path) -> Result<FeedForward> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(FeedForward::GatedGelu),
            "relu" => Ok(FeedForward::Relu),
            other => Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!("feed_forward_proj `{other}` (gated-gelu or relu)"),
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ];
        for (key, v) in positive {
            if v < 1 {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    message: format!("`{key}` must be positive, got {v}"),
                });
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: "`relative_attention_num_buckets` must be at least 4".into(),
            });
        }
        Ok(())
    }
}

struct Block {
    norm_attn: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_ff: RmsNorm,
    /// gated: wi_0 and wi_1; relu: wi alone.
    wi: Vec<Linear>,
    wo: Linear,
}

impl Block {
    fn load(vb: &Vb, c: &T5Config, ff: FeedForward, kind: Kind) -> Result<Self> {
        let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
        let attn = vb.pp("layer.0");
        let sa = attn.pp("SelfAttention");
        let dense = vb.pp("layer.1");
        let drd = dense.pp("DenseReluDense");
        let wi = match ff {
            FeedForward::GatedGelu => vec![
                Linear::load(&drd.pp("wi_0"), d, c.d_ff, false)?,
                Linear::load(&drd.pp("wi_1"), d, c.d_ff, false)?,
            ],
            FeedForward::Relu => vec![Linear::load(&drd.pp("wi"), d, c.d_ff, false)?],
        };
        Ok(Block {
            norm_attn: RmsNorm::load(&attn.pp("layer_norm"), d, c.layer_norm_epsilon)?,
            q: Linear::load(&sa.pp("q"), d, inner, false)?,
            k: Linear::load(&sa.pp("k"), d, inner, false)?,
            v: Linear::load(&sa.pp("v"), d, inner, false)?,
            o: Linear::load(&sa.pp("o"), inner, d, false)?,
            norm_ff: RmsNorm::load(&dense.pp("layer_norm"), d, c.layer_norm_epsilon)?,
            wi,
            // transformers' `_keep_in_fp32_modules = ["wo"]`, for fp16.
            wo: {
                let wo = Linear::load(&drd.pp("wo"), c.d_ff, d, false)?;
                if kind == Kind::Half {
                    wo.into_kind(Kind::Float)
                } else {
                    wo
                }
            },
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor, heads: i64) -> Tensor {
        let h = self.norm_attn.forward(xs);
        let (b, n, _) = h.size3().expect("3-d hidden states");
        let split = |t: Tensor| t.view([b, n, heads, -1]).transpose(1, 2);
        let (q, k, v) = (
            split(self.q.forward(&h)),
            split(self.k.forward(&h)),
            split(self.v.forward(&h)),
        );
        // Unscaled scores plus the position bias (T5 folds the scale into
        // its initialisation).
        let bias = bias.to_kind(q.kind());
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&bias),
            0.0,
            false,
            Some(1.0),
            false,
        )
        .transpose(1, 2)
        .reshape([b, n, -1]);
        let xs = xs + self.o.forward(&a);
        let h = self.norm_ff.forward(&xs);
        let h = match self.wi.as_slice() {
            [gate, up] => gate.forward(&h).gelu("tanh") * up.forward(&h),
            [wi] => wi.forward(&h).relu(),
            _ => unreachable!("one or two input projections"),
        };
        let h = h.to_kind(self.wo.kind());
        &xs + self.wo.forward(&h)
    }
}

/// The T5 encoder, loaded from `text_encoder_2/` (FLUX).
pub struct T5Encoder {
    config: T5Config,
    embed: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    modules: ModuleIndex,
    device: tch::Device,
    _storage: Storage,
}

impl T5Encoder {
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let config: T5Config = read_json(config_path)?;
        config.validate(config_path)?;
        let ff = config.feed_forward(config_path)?;
        let vb = Vb::root(weights, "encoder");
        let blocks = (0..config.num_layers)
            .map(|i| Block::load(&vb.pp("block").pp(i), &config, ff, weights.placement().kind))
            .collect::<Result<Vec<_>>>()?;
        let shape = [config.vocab_size, config.d_model];
        // Tied files keep `shared.weight` alone; others both.
        let embed = if weights.contains("encoder.embed_tokens.weight") {
            vb.pp("embed_tokens").get("weight", &shape)?
        } else {
            Vb::root(weights, "shared").get("weight", &shape)?
        };
        let relative_bias = vb
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get(
                "weight",
                &[config.relative_attention_num_buckets, config.num_heads],
            )?;
        let final_norm = RmsNorm::load(
            &vb.pp("final_layer_norm"),
            config.d_model,
            config.layer_norm_epsilon,
        )?;
        Ok(T5Encoder {
            modules: weights.module_index(),
            embed,
            relative_bias,
            blocks,
            final_norm,
            device: weights.placement().device,
            _storage: weights.storage(),
            config,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.d_model
    }

    /// Its LoRA-capable layers.
    pub fn modules(&self) -> &ModuleIndex {
        &self.modules
    }

    /// Token ids (batch, seq) → the last hidden states (batch, seq, d_model),
    /// after the final norm.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = crate::layers::token_ids(ids, self.config.vocab_size, i64::MAX)?;
        let seq = ids.size()[1];
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let ids = ids.to_device(self.device);
            let mut xs = Tensor::embedding(&self.embed, &ids, -1, false, false);
            let bias = self.position_bias(seq);
            for block in &self.blocks {
                xs = block.forward(&xs, &bias, self.config.num_heads);
            }
            Ok(self.final_norm.forward(&xs))
        })
    }

    /// (1, heads, seq, seq): the learned bias of each query–key distance.
    fn position_bias(&self, seq: i64) -> Tensor {
        let buckets = relative_buckets(
            seq,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        let idx = Tensor::from_slice(&buckets)
            .view([seq, seq])
            .to_device(self.device);
        Tensor::embedding(&self.relative_bias, &idx, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

/// transformers' `_relative_position_bucket` (bidirectional) for every
/// (query, key) pair of a `seq`-token sequence, row-major.
fn relative_buckets(seq: i64, num_buckets: i64, max_distance: i64) -> Vec<i64> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let mut out = Vec::with_capacity((seq * seq) as usize);
    for q in 0..seq {
        for k in 0..seq {
            let rel = k - q;
            let mut bucket = if rel > 0 { half } else { 0 };
            let n = rel.abs();
            bucket += if n < max_exact {
                n
            } else {
                // In float32, as torch computes it, then truncated.
                let r = ((n as f32 / max_exact as f32).ln()
                    / ((max_distance as f64 / max_exact as f64).ln() as f32)
                    * (half - max_exact) as f32) as i64;
                (max_exact + r).min(half - 1)
            };
            out.push(bucket);
        }
    }
    out
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for T5Encoder {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_near_and_logarithmic_far() {
        let b = relative_buckets(300, 32, 128);
        let at = |q: i64, k: i64| b[(q * 300 + k) as usize];
        assert_eq!(at(0, 0), 0);
        assert_eq!(at(5, 4), 1);
        assert_eq!(at(4, 5), 17);
        assert_eq!(at(0, 7), 16 + 7);
        // Far away: the last bucket of each side.
        assert_eq!(at(0, 299), 31);
        assert_eq!(at(299, 0), 15);
        // transformers' value at distance 8: 8 + int(ln(1)/... ) = 8.
        assert_eq!(at(8, 0), 8);
        assert_eq!(
            at(20, 0),
            8 + ((20f32 / 8.0).ln() / 16f32.ln() * 8.0) as i64
        );
    }
}

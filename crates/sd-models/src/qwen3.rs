//! Qwen3 (transformers' `Qwen3Model`, inside `Qwen3ForCausalLM` files) run
//! as a text encoder, as FLUX.2 Klein and Z-Image read prompts with it: the
//! chat-templated prompt padded to a fixed length, one forward with no KV
//! cache, and some of the hidden states taken — no generation.
//!
//! The network: token embeddings; pre-norm decoder layers of grouped-query
//! attention (queries and keys RMS-normed per head, then rotated by rotary
//! positions in the rotate-half layout) and a SwiGLU feed-forward; a final
//! RMS norm. Attention is causal and ignores padded keys (transformers'
//! causal mask with the tokenizer's attention mask); positions count from
//! 0 whatever the padding.
//!
//! Hidden states are numbered as transformers' `output_hidden_states`
//! numbers them: 0 the embeddings, k the output of layer k, and the last
//! (`num_hidden_layers`) after the final norm. A forward runs only the
//! layers the asked states need.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::read_json;
use crate::error::{guarded, ModelError, Result};
use crate::layers::Linear;
use crate::modules::ModuleIndex;
use crate::weights::{Storage, Vb, Weights};

/// The keys of a Qwen3 `config.json` the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 5 writes `rope_parameters`; older files `rope_theta`
    /// (and `rope_scaling`) at the top.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary base; only the default rotary type is served.
    fn rope_theta(&self, path: &Path) -> Result<f64> {
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let (theta, kind) = match &self.rope_parameters {
            Some(p) => (
                p.get("rope_theta").and_then(serde_json::Value::as_f64),
                p.get("rope_type")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string),
            ),
            None => (
                self.rope_theta,
                self.rope_scaling.as_ref().and_then(|s| {
                    s.get("rope_type")
                        .or_else(|| s.get("type"))
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_string)
                }),
            ),
        };
        if let Some(k) = kind.filter(|k| k != "default") {
            return Err(bad(format!(
                "rope type `{k}` is not served (the default rotary positions are)"
            )));
        }
        theta
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| bad("no positive `rope_theta`".into()))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim()),
        ] {
            if v < 1 {
                return bad(format!("`{key}` must be positive, got {v}"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "{} attention heads do not share {} key/value heads evenly",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "`head_dim` {} must be even (rotary pairs)",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "`hidden_act` `{}` (Qwen3's is silu)",
                self.hidden_act
            ));
        }
        if self.use_sliding_window {
            return bad("sliding-window attention is not served".into());
        }
        self.rope_theta(path).map(|_| ())
    }
}

/// Qwen3's RMS norm: the variance in float32, the normed values back in
/// the input's precision, then scaled by the weight.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        &self.weight * (x * (var + self.eps).rsqrt()).to_kind(kind)
    }
}

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// What every layer of one forward shares.
struct Shared {
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// (1, 1, seq, head_dim), in the hidden states' precision.
    cos: Tensor,
    sin: Tensor,
    /// (batch, 1, seq, seq): true where a query sees a key.
    mask: Tensor,
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3)
}

impl Layer {
    fn load(vb: &Vb, c: &Qwen3Config) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let bias = c.attention_bias;
        let eps = c.rms_norm_eps;
        Ok(Layer {
            input_norm: RmsNorm::load(&vb.pp("input_layernorm"), h, eps)?,
            q: Linear::load(&attn.pp("q_proj"), h, c.num_attention_heads * hd, bias)?,
            k: Linear::load(&attn.pp("k_proj"), h, c.num_key_value_heads * hd, bias)?,
            v: Linear::load(&attn.pp("v_proj"), h, c.num_key_value_heads * hd, bias)?,
            o: Linear::load(&attn.pp("o_proj"), c.num_attention_heads * hd, h, bias)?,
            q_norm: RmsNorm::load(&attn.pp("q_norm"), hd, eps)?,
            k_norm: RmsNorm::load(&attn.pp("k_norm"), hd, eps)?,
            post_norm: RmsNorm::load(&vb.pp("post_attention_layernorm"), h, eps)?,
            gate: Linear::load(&mlp.pp("gate_proj"), h, c.intermediate_size, false)?,
            up: Linear::load(&mlp.pp("up_proj"), h, c.intermediate_size, false)?,
            down: Linear::load(&mlp.pp("down_proj"), c.intermediate_size, h, false)?,
        })
    }

    fn forward(&self, xs: &Tensor, s: &Shared) -> Tensor {
        let (b, n, _) = xs.size3().expect("3-d hidden states");
        let h = self.input_norm.forward(xs);
        let heads = |t: Tensor, count: i64| t.view([b, n, count, s.head_dim]);
        let q = self
            .q_norm
            .forward(&heads(self.q.forward(&h), s.heads))
            .transpose(1, 2);
        let k = self
            .k_norm
            .forward(&heads(self.k.forward(&h), s.kv_heads))
            .transpose(1, 2);
        let v = heads(self.v.forward(&h), s.kv_heads).transpose(1, 2);
        let q = &q * &s.cos + rotate_half(&q) * &s.sin;
        let k = &k * &s.cos + rotate_half(&k) * &s.sin;
        // Each key/value head repeated for its group of query heads, as
        // transformers does when a mask is given.
        let repeat = |t: Tensor| {
            let groups = s.heads / s.kv_heads;
            if groups == 1 {
                return t;
            }
            t.unsqueeze(2)
                .expand([b, s.kv_heads, groups, n, s.head_dim], false)
                .reshape([b, s.heads, n, s.head_dim])
        };
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &repeat(k),
            &repeat(v),
            Some(&s.mask),
            0.0,
            false,
            Some(1.0 / (s.head_dim as f64).sqrt()),
            false,
        )
        .transpose(1, 2)
        .reshape([b, n, -1]);
        let xs = xs + self.o.forward(&a);
        let h = self.post_norm.forward(&xs);
        let h = self.gate.forward(&h).silu() * self.up.forward(&h);
        &xs + self.down.forward(&h)
    }
}

/// The Qwen3 encoder, loaded from a `text_encoder/` folder.
pub struct Qwen3Encoder {
    config: Qwen3Config,
    rope_theta: f64,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    modules: ModuleIndex,
    device: tch::Device,
    _storage: Storage,
}

impl Qwen3Encoder {
    /// From a `Qwen3ForCausalLM` file (`model.` names; `lm_head` unused) or
    /// a bare `Qwen3Model` one.
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        let config: Qwen3Config = read_json(config_path)?;
        config.validate(config_path)?;
        let rope_theta = config.rope_theta(config_path)?;
        let prefix = if weights.contains("model.embed_tokens.weight") {
            "model"
        } else {
            ""
        };
        let vb = Vb::root(weights, prefix);
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(&vb.pp("layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        let embed = vb
            .pp("embed_tokens")
            .get("weight", &[config.vocab_size, config.hidden_size])?;
        let norm = RmsNorm::load(&vb.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        Ok(Qwen3Encoder {
            modules: weights.module_index(),
            rope_theta,
            embed,
            layers,
            norm,
            device: weights.placement().device,
            _storage: weights.storage(),
            config,
        })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// Its LoRA-capable layers.
    pub fn modules(&self) -> &ModuleIndex {
        &self.modules
    }

    /// The hidden states numbered `states` (0: the embeddings, k: after
    /// layer k, `num_hidden_layers`: after the final norm) for token `ids`
    /// (batch, seq) whose `mask` (batch, seq; 1 a token, 0 padding) says
    /// which keys attention sees; each (batch, seq, hidden) in the weights'
    /// precision, in the order asked.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        states: &[usize],
    ) -> Result<Vec<Tensor>> {
        let ids = crate::layers::token_ids(ids, self.config.vocab_size, i64::MAX)?;
        let size = ids.size();
        let seq = size[1];
        if mask.size() != size {
            return Err(ModelError::Input(format!(
                "attention mask shape {:?}, the ids' is {size:?}",
                mask.size()
            )));
        }
        let layers = self.layers.len();
        if let Some(&s) = states.iter().find(|&&s| s > layers) {
            return Err(ModelError::Input(format!(
                "hidden state {s} asked of a {layers}-layer encoder (0..={layers})"
            )));
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let ids = ids.to_device(self.device);
            let mut xs = Tensor::embedding(&self.embed, &ids, -1, false, false);
            let shared = self.shared(&mask.to_device(self.device), seq, xs.kind());
            let mut out: Vec<Option<Tensor>> = states.iter().map(|_| None).collect();
            let mut keep = |k: usize, t: &Tensor| {
                for (slot, &s) in out.iter_mut().zip(states) {
                    if s == k {
                        *slot = Some(t.shallow_clone());
                    }
                }
            };
            keep(0, &xs);
            let last = states.iter().copied().max().unwrap_or(0);
            for (i, layer) in self.layers.iter().enumerate().take(last.min(layers)) {
                xs = layer.forward(&xs, &shared);
                if i + 1 < layers {
                    keep(i + 1, &xs);
                }
            }
            if last == layers {
                keep(layers, &self.norm.forward(&xs));
            }
            Ok(out
                .into_iter()
                .map(|t| t.expect("every state kept"))
                .collect())
        })
    }

    /// Rotary tables and the attention mask of one forward.
    fn shared(&self, mask: &Tensor, seq: i64, kind: Kind) -> Shared {
        let hd = self.config.head_dim();
        let opts = (Kind::Float, self.device);
        // transformers' default rotary frequencies, in float32.
        let exponent = Tensor::arange_start_step(0, hd, 2, opts) / hd as f64;
        let inv_freq = Tensor::pow_scalar(self.rope_theta, &exponent).reciprocal();
        let positions = Tensor::arange(seq, opts).unsqueeze(1);
        let freqs = positions * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1).view([1, 1, seq, hd]);
        // A query sees the keys at or before it that are not padding.
        let causal = Tensor::ones([seq, seq], (Kind::Bool, self.device)).tril(0);
        let keys = mask.ne(0).view([-1, 1, 1, seq]);
        let seen = causal.view([1, 1, seq, seq]).logical_and(&keys);
        Shared {
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: hd,
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
            mask: seen,
        }
    }
}

/// FLUX.2 Klein's prompt embeddings: the hidden states `states` (9, 18 and
/// 27 by default) side by side on the channels, (batch, seq, states ×
/// hidden), every position kept.
pub fn stacked(hidden: &[Tensor]) -> Tensor {
    Tensor::cat(hidden, 2)
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `hidden_states` creates all of its intermediate tensors per call.
unsafe impl Sync for Qwen3Encoder {}

//! The CLIP text transformer (transformers' `CLIPTextModel`, and
//! `CLIPTextModelWithProjection` when the weights hold a `text_projection`):
//! token and position embeddings, pre-norm encoder layers with causal
//! self-attention, a final layer norm; SDXL also reads the pooled output at
//! the end-of-text token, projected.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::config::{read_json, Activation, ClipConfig};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{attention, LayerNorm, Linear};
use crate::weights::{Vb, Weights};

/// One pre-norm transformer layer of CLIP's encoders (text and vision).
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(vb: &Vb, c: &ClipConfig) -> Result<Self> {
        Self::load_dims(vb, c.hidden_size, c.intermediate_size, c.layer_norm_eps)
    }

    /// A layer of width `h`, MLP width `i`.
    pub(crate) fn load_dims(vb: &Vb, h: i64, i: i64, eps: f64) -> Result<Self> {
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), h, eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), h, eps)?,
            fc1: Linear::load(&mlp.pp("fc1"), h, i, true)?,
            fc2: Linear::load(&mlp.pp("fc2"), i, h, true)?,
        })
    }

    fn forward(&self, xs: &Tensor, heads: i64, act: Activation) -> Tensor {
        self.forward_masked(xs, heads, act, true)
    }

    /// With causal self-attention (the text encoder) or not (the vision one).
    pub(crate) fn forward_masked(
        &self,
        xs: &Tensor,
        heads: i64,
        act: Activation,
        causal: bool,
    ) -> Tensor {
        let h = self.layer_norm1.forward(xs);
        let (q, k, v) = (
            self.q_proj.forward(&h),
            self.k_proj.forward(&h),
            self.v_proj.forward(&h),
        );
        let h = self
            .out_proj
            .forward(&attention(&q, &k, &v, heads, causal, false));
        let xs = xs + h;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs));
        let h = match act {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        xs + self.fc2.forward(&h)
    }
}

/// CLIP's text transformer, loaded from `text_encoder/`.
pub struct ClipTextModel {
    config: ClipConfig,
    activation: Activation,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// CLIPTextModelWithProjection's projection of the pooled output.
    text_projection: Option<Linear>,
    placement: Placement,
    /// Its LoRA-capable layers.
    modules: crate::modules::ModuleIndex,
    _storage: crate::weights::Storage,
}

/// What the SDXL family takes from a text encoder.
#[derive(Debug)]
pub struct XlOutput {
    /// `hidden_states[-(clip_skip + 2)]`, without the final layer norm
    /// (batch, seq, hidden).
    pub hidden: Tensor,
    /// The final hidden state at each sequence's end-of-text token,
    /// through `text_projection` where the model has one (batch, width).
    pub pooled: Tensor,
}

impl ClipTextModel {
    /// Its LoRA-capable layers (canonical paths).
    pub fn modules(&self) -> &crate::modules::ModuleIndex {
        &self.modules
    }

    /// Build from `config.json` and load from a safetensors file; the
    /// published files carry a `text_model.` prefix that transformers 5 no
    /// longer writes, so both are accepted.
    pub fn load(config_path: &Path, weights: &Weights) -> Result<Self> {
        Self::load_as(
            config_path,
            weights,
            weights.contains("text_projection.weight"),
        )
    }

    /// [`ClipTextModel::load`], reading `text_projection` only where the
    /// pipeline's network has one (`with_projection`: SDXL's second
    /// encoder, CLIPTextModelWithProjection). A CLIPTextModel never reads it,
    /// as transformers' does not: SD 2.x single files carry OpenCLIP's
    /// projection (1024 × 1024) that their own configs contradict.
    pub fn load_as(config_path: &Path, weights: &Weights, with_projection: bool) -> Result<Self> {
        let config: ClipConfig = read_json(config_path)?;
        config.validate(config_path)?;
        let activation = config.activation(config_path)?;
        let prefix = if weights.contains("text_model.embeddings.token_embedding.weight") {
            "text_model"
        } else {
            ""
        };
        let vb = Vb::root(weights, prefix);
        let emb = vb.pp("embeddings");
        let h = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&vb.pp("encoder.layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        // Before the projection: LoRA files name only the transformer's layers.
        let modules = weights.module_index();
        Ok(ClipTextModel {
            modules,
            token_embedding: emb
                .pp("token_embedding")
                .get("weight", &[config.vocab_size, h])?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", &[config.max_position_embeddings, h])?,
            layers,
            final_layer_norm: LayerNorm::load(
                &vb.pp("final_layer_norm"),
                h,
                config.layer_norm_eps,
            )?,
            // At the root, beside `text_model.` where that prefix is used.
            text_projection: with_projection
                .then(|| {
                    let width = config.projection_dim.unwrap_or(h);
                    Linear::load(&Vb::root(weights, "text_projection"), h, width, false)
                })
                .transpose()?,
            activation,
            placement: weights.placement(),
            _storage: weights.storage(),
            config,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// Whether this is a CLIPTextModelWithProjection (SDXL's second encoder).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Token ids (batch, seq) → hidden states (batch, seq, hidden).
    ///
    /// `clip_skip = 0` is the last hidden state after the final layer norm;
    /// `clip_skip = k` is the hidden state k layers before the last, passed
    /// through the final layer norm, as diffusers computes it.
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.forward_fixed(ids, clip_skip, &[])
    }

    /// [`ClipTextModel::forward`] with some token embeddings replaced
    /// (textual inversion: each fix's vector in place of the token
    /// embedding at its row and position, before the position embeddings
    /// are added, as A1111's `EmbeddingsWithFixes` and diffusers' added
    /// tokens do).
    pub fn forward_fixed(&self, ids: &Tensor, clip_skip: usize, fixes: &[Fix]) -> Result<Tensor> {
        let ids = self.check_ids(ids, clip_skip)?;
        self.check_fixes(&ids, fixes)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let mut xs = self.embed(&ids, fixes);
            let heads = self.config.num_attention_heads;
            for layer in &self.layers[..self.layers.len() - clip_skip] {
                xs = layer.forward(&xs, heads, self.activation);
            }
            Ok(self.final_layer_norm.forward(&xs))
        })
    }

    /// The SDXL family's reading: the hidden state `clip_skip + 1` layers
    /// before the last with no final layer norm (`hidden_states[-(k + 2)]`),
    /// and the pooled output of the whole model, projected.
    pub fn forward_xl(&self, ids: &Tensor, clip_skip: usize) -> Result<XlOutput> {
        self.forward_xl_fixed(ids, clip_skip, &[])
    }

    /// [`ClipTextModel::forward_xl`] with fixes, as [`ClipTextModel::forward_fixed`].
    pub fn forward_xl_fixed(
        &self,
        ids: &Tensor,
        clip_skip: usize,
        fixes: &[Fix],
    ) -> Result<XlOutput> {
        if clip_skip + 1 >= self.layers.len() {
            return Err(ModelError::Input(format!(
                "clip_skip {clip_skip} must be below {} for this {}-layer text encoder \
                 (SDXL reads the layer before the one clip_skip names)",
                self.layers.len().saturating_sub(1),
                self.layers.len()
            )));
        }
        let ids = self.check_ids(ids, 0)?;
        self.check_fixes(&ids, fixes)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let mut xs = self.embed(&ids, fixes);
            let heads = self.config.num_attention_heads;
            let keep = self.layers.len() - 1 - clip_skip;
            let mut hidden = None;
            for (i, layer) in self.layers.iter().enumerate() {
                if i == keep {
                    hidden = Some(xs.shallow_clone());
                }
                xs = layer.forward(&xs, heads, self.activation);
            }
            let last = self.final_layer_norm.forward(&xs);
            let ids = ids.to_device(last.device());
            // transformers: with eos_token_id 2 (legacy configs) the largest
            // id marks the end of the text; else the first eos_token_id. A
            // ranked fix counts as a token added past the vocabulary (as
            // diffusers adds textual-inversion tokens), in rank order.
            let eos = if self.config.eos_token_id == 2 {
                let ids = ids.copy();
                for f in fixes {
                    if let Some(rank) = f.rank {
                        let _ = ids
                            .get(f.row)
                            .get(f.position)
                            .fill_(self.config.vocab_size + rank);
                    }
                }
                ids.argmax(-1, false)
            } else {
                ids.eq(self.config.eos_token_id)
                    .to_kind(Kind::Int)
                    .argmax(-1, false)
            };
            let rows = Tensor::arange(ids.size()[0], (Kind::Int64, last.device()));
            let pooled = last.index(&[Some(rows), Some(eos)]);
            let pooled = match &self.text_projection {
                Some(p) => p.forward(&pooled),
                None => pooled,
            };
            Ok(XlOutput {
                hidden: hidden.unwrap_or(xs),
                pooled,
            })
        })
    }

    /// The ids as int64 after checking their shape and range, and that
    /// `skip` layers can be skipped.
    fn check_ids(&self, ids: &Tensor, skip: usize) -> Result<Tensor> {
        if skip >= self.layers.len() {
            return Err(ModelError::Input(format!(
                "clip_skip {skip} must be below the text encoder's {} layers",
                self.layers.len()
            )));
        }
        crate::layers::token_ids(
            ids,
            self.config.vocab_size,
            self.config.max_position_embeddings,
        )
    }

    /// Each fix within the ids' rows and positions, a vector of the
    /// embedding's width.
    fn check_fixes(&self, ids: &Tensor, fixes: &[Fix]) -> Result<()> {
        let (rows, len) = (ids.size()[0], ids.size()[1]);
        let width = self.token_embedding.size()[1];
        for f in fixes {
            if !(0..rows).contains(&f.row) || !(0..len).contains(&f.position) {
                return Err(ModelError::Input(format!(
                    "an embedding fix at ({}, {}) outside the ids {rows}×{len}",
                    f.row, f.position
                )));
            }
            if f.vector.size() != [width] {
                return Err(ModelError::Input(format!(
                    "an embedding vector of shape {:?} for a text encoder of width {width}",
                    f.vector.size()
                )));
            }
        }
        Ok(())
    }

    /// Token plus position embeddings, the fixes' vectors in place of
    /// their tokens'.
    fn embed(&self, ids: &Tensor, fixes: &[Fix]) -> Tensor {
        let ids = ids.to_device(self.placement.device);
        let positions = self.position_embedding.narrow(0, 0, ids.size()[1]);
        let tokens = Tensor::embedding(&self.token_embedding, &ids, -1, false, false);
        for f in fixes {
            let v = f.vector.to_kind(tokens.kind()).to_device(tokens.device());
            tokens.get(f.row).get(f.position).copy_(&v);
        }
        tokens + positions
    }
}

/// A token embedding replaced by a vector (textual inversion): the
/// `vector` (width of the token embeddings) at (`row`, `position`).
pub struct Fix {
    pub row: i64,
    pub position: i64,
    pub vector: Tensor,
    /// Where the token would rank among tokens added past the vocabulary
    /// (diffusers' added textual-inversion tokens), for the pooled
    /// output's legacy end-of-text search; None: the stand-in token's own
    /// id counts (A1111).
    pub rank: Option<i64>,
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for ClipTextModel {}

//! The CLIP vision transformer as IP-Adapters read pictures
//! (transformers' `CLIPVisionModelWithProjection`): patches of the image
//! embedded by a convolution, a class token and learned positions before
//! them, a pre-norm, CLIP's encoder layers (no causal mask), the class
//! token's output normed and projected: `image_embeds`.
//!
//! Loaded from an `image_encoder/` folder (`config.json`,
//! `model.safetensors`, and `preprocessor_config.json` for how pictures
//! are prepared: the side, the mean and deviation per channel).

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use crate::clip::EncoderLayer;
use crate::config::{config_err, read_json, Activation};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::{Conv2dNoBias, LayerNorm, Linear};
use crate::weights::{Vb, Weights};

/// `config.json` of a CLIP vision model.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    #[serde(default = "d_three")]
    pub num_channels: i64,
    pub projection_dim: i64,
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

fn d_three() -> i64 {
    3
}
fn d_eps() -> f64 {
    1e-5
}

/// How pictures are prepared for it (`preprocessor_config.json`; CLIP's
/// when absent): the shorter side resized to `size` (bicubic), the centre
/// `size`² cut out, values / 255, then (x − mean) / std per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub size: i64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// OpenAI CLIP's normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The vision encoder.
pub struct ClipVisionModel {
    config: VisionConfig,
    act: Activation,
    patch: Conv2dNoBias,
    class_embedding: Tensor,
    positions: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
    preprocessing: Preprocessing,
    placement: Placement,
    _storage: crate::weights::Storage,
}

impl ClipVisionModel {
    /// The encoder in `dir` (an `image_encoder/` folder).
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let c: VisionConfig = read_json(&config_path)?;
        let act = match c.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(config_err(
                    &config_path,
                    format!("hidden_act `{other}` is not supported"),
                ))
            }
        };
        if c.num_attention_heads <= 0
            || c.hidden_size % c.num_attention_heads != 0
            || c.patch_size <= 0
            || c.image_size % c.patch_size != 0
        {
            return Err(config_err(
                &config_path,
                "heads, patch and image sizes do not divide".into(),
            ));
        }
        let file = ["model.safetensors", "model.fp16.safetensors"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| ModelError::MissingFile {
                path: dir.join("model.safetensors"),
            })?;
        let w = Weights::open(&file, placement)?;
        let vb = Vb::root(&w, "vision_model");
        let (h, patches) = (c.hidden_size, (c.image_size / c.patch_size).pow(2));
        let emb = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                EncoderLayer::load_dims(
                    &vb.pp("encoder.layers").pp(i),
                    h,
                    c.intermediate_size,
                    c.layer_norm_eps,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionModel {
            act,
            patch: Conv2dNoBias::load(&emb.pp("patch_embedding"), c.num_channels, h, c.patch_size)?,
            class_embedding: emb.get("class_embedding", &[h])?,
            positions: emb.get("position_embedding.weight", &[patches + 1, h])?,
            pre_norm: LayerNorm::load(&vb.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers,
            post_norm: LayerNorm::load(&vb.pp("post_layernorm"), h, c.layer_norm_eps)?,
            projection: Linear::load(
                &Vb::root(&w, "visual_projection"),
                h,
                c.projection_dim,
                false,
            )?,
            preprocessing: preprocessing(&dir.join("preprocessor_config.json"), c.image_size)?,
            placement,
            _storage: w.storage(),
            config: c,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    pub fn preprocessing(&self) -> &Preprocessing {
        &self.preprocessing
    }

    /// `image_embeds` (n, projection_dim) of prepared pictures (n, 3,
    /// size, size), fp32 on the host.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = pixels.size();
        let side = self.config.image_size;
        if s.len() != 4 || s[0] < 1 || s[1] != self.config.num_channels || s[2..] != [side, side] {
            return Err(ModelError::Input(format!(
                "pictures {s:?}: expected (n, {}, {side}, {side})",
                self.config.num_channels
            )));
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let x = pixels.to_device(device).to_kind(kind);
            let n = s[0];
            let h = self.config.hidden_size;
            // (n, h, g, g) → (n, g², h), the class token first.
            let patches = self.patch.forward(&x).flatten(2, -1).transpose(1, 2);
            let class = self
                .class_embedding
                .view([1, 1, h])
                .expand([n, 1, h], false);
            let mut xs = Tensor::cat(&[class, patches], 1) + self.positions.unsqueeze(0);
            xs = self.pre_norm.forward(&xs);
            for layer in &self.layers {
                xs = layer.forward_masked(&xs, self.config.num_attention_heads, self.act, false);
            }
            let pooled = self.post_norm.forward(&xs.select(1, 0));
            Ok(self
                .projection
                .forward(&pooled)
                .to_kind(tch::Kind::Float)
                .to_device(tch::Device::Cpu))
        })
    }
}

/// `preprocessor_config.json`'s size, mean and std (CLIP's, at the model's
/// image size, when the file is absent).
fn preprocessing(path: &Path, image_size: i64) -> Result<Preprocessing> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        size: Option<serde_json::Value>,
        #[serde(default)]
        crop_size: Option<serde_json::Value>,
        #[serde(default)]
        image_mean: Option<[f32; 3]>,
        #[serde(default)]
        image_std: Option<[f32; 3]>,
    }
    if !path.is_file() {
        return Ok(Preprocessing {
            size: image_size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        });
    }
    let f: File = read_json(path)?;
    let side = |v: &Option<serde_json::Value>| -> Option<i64> {
        match v.as_ref()? {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::Object(o) => o
                .get("shortest_edge")
                .or_else(|| o.get("height"))
                .and_then(serde_json::Value::as_i64),
            _ => None,
        }
    };
    let (size, crop) = (side(&f.size), side(&f.crop_size));
    let size = size.or(crop).unwrap_or(image_size);
    if crop.is_some_and(|c| c != size) || size != image_size {
        return Err(config_err(
            path,
            format!(
                "resize to {size} and crop {crop:?}: only the model's own {image_size}² crop of \
                 a picture resized to it is served"
            ),
        ));
    }
    Ok(Preprocessing {
        size,
        mean: f.image_mean.unwrap_or(CLIP_MEAN),
        std: f.image_std.unwrap_or(CLIP_STD),
    })
}

// SAFETY: weights written once at load and only read afterwards.
unsafe impl Sync for ClipVisionModel {}

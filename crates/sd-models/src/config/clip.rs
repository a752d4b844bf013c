//! `text_encoder/config.json`: transformers' CLIP text model config.

use super::*;

/// `text_encoder/config.json` (transformers' CLIPTextModel).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
    /// The end-of-text token the pooled output is read at; 2 (transformers'
    /// default, and what SD's and SDXL's configs say) means "the largest
    /// id", the legacy rule, as transformers reads it.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    /// The width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<i64>,
}

fn d_eos() -> i64 {
    2
}

/// The activations CLIP text encoders use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl ClipConfig {
    pub fn activation(&self, path: &Path) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(unsupported(
                path,
                format!("hidden_act `{other}` is not supported"),
            )),
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(config_err(
                path,
                format!(
                    "hidden_size {} does not split into {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        self.activation(path).map(|_| ())
    }
}

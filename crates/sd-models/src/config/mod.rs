//! The networks' `config.json` files, as diffusers and transformers write them.
//! Every size comes from here; defaults are the library defaults for keys
//! that older files omit.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{ModelError, Result};

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A value given once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(i64),
    Many(Vec<i64>),
}

impl PerBlock {
    pub fn expand(&self, blocks: usize, key: &str, path: &Path) -> Result<Vec<i64>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Many(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Many(v) => Err(config_err(
                path,
                format!("`{key}` has {} entries for {blocks} blocks", v.len()),
            )),
        }
    }
}

pub(crate) fn config_err(path: &Path, message: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message,
    }
}

fn unsupported(path: &Path, message: String) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        message,
    }
}

fn d_true() -> bool {
    true
}
fn d_one() -> PerBlock {
    PerBlock::One(1)
}
fn d_groups() -> i64 {
    32
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_four() -> i64 {
    4
}
fn d_three() -> i64 {
    3
}
fn d_unit() -> f64 {
    1.0
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_act_silu() -> String {
    "silu".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_sample64() -> i64 {
    64
}

/// `unet/config.json` (UNet2DConditionModel).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_four")]
    pub in_channels: i64,
    #[serde(default = "d_four")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_sample64")]
    pub sample_size: i64,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_unit")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act_silu")]
    pub act_fn: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_three")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub downsample_padding: Option<i64>,
    /// SDXL (`addition_embed_type: "text_time"`): the sinusoidal width of
    /// each size/crop time id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// SDXL: the pooled text embedding and the time ids' embeddings,
    /// concatenated, go through `add_embedding` from this width.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: serde_json::Value,
}

/// What the loader builds for one UNet block, all per-block values resolved.
#[derive(Debug, Clone)]
pub struct UNetBlock {
    pub cross_attention: bool,
    pub layers: i64,
    pub heads: i64,
    pub transformer_depth: i64,
    pub cross_attention_dim: i64,
}

/// The per-block values of a `UNetConfig`, each expanded to one entry per
/// block (in down-block order).
struct PerBlockValues {
    layers: Vec<i64>,
    heads: Vec<i64>,
    depth: Vec<i64>,
    cross: Vec<i64>,
}

impl PerBlockValues {
    /// The resolved block at index `i` (down-block order), with `layers` resnets.
    fn block(&self, i: usize, cross_attention: bool, layers: i64) -> UNetBlock {
        UNetBlock {
            cross_attention,
            layers,
            heads: self.heads[i],
            transformer_depth: self.depth[i],
            cross_attention_dim: self.cross[i],
        }
    }
}

/// Whether a block type is the cross-attention variant (`cross`) or the plain
/// one (`plain`); anything else is unsupported.
fn has_cross_attention(
    block_type: &str,
    cross: &str,
    plain: &str,
    which: &str,
    path: &Path,
) -> Result<bool> {
    if block_type == cross {
        Ok(true)
    } else if block_type == plain {
        Ok(false)
    } else {
        Err(unsupported(
            path,
            format!("{which} block type `{block_type}` is not supported"),
        ))
    }
}

impl UNetConfig {
    /// Check what this implementation supports (SD 1.x/2.x-style UNets) and
    /// resolve per-block values. Returns (down blocks, up blocks), both in
    /// execution order.
    pub fn blocks(&self, path: &Path) -> Result<(Vec<UNetBlock>, Vec<UNetBlock>)> {
        self.check_block_counts(path)?;
        self.check_supported(path)?;
        let values = self.per_block_values(path)?;
        let down = self.down_blocks(&values, path)?;
        let up = self.up_blocks(&values, path)?;
        Ok((down, up))
    }

    /// One down and one up block type per `block_out_channels` entry, each
    /// width a positive multiple of the group-norm groups.
    fn check_block_counts(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_err(path, "`block_out_channels` is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(config_err(
                path,
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        if self
            .block_out_channels
            .iter()
            .any(|&c| c <= 0 || c % self.norm_num_groups != 0)
        {
            return Err(config_err(
                path,
                format!(
                    "`block_out_channels` {:?} must be positive multiples of norm_num_groups {}",
                    self.block_out_channels, self.norm_num_groups
                ),
            ));
        }
        Ok(())
    }

    /// Refuse the UNet options that SD 1.x/2.x do not use (and this
    /// implementation does not build), naming the first one found.
    fn check_supported(&self, path: &Path) -> Result<()> {
        let only_cross_attention_off = matches!(
            self.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        );
        let checks = [
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
            ),
            ("act_fn", self.act_fn == "silu"),
            ("class_embed_type", self.class_embed_type.is_none()),
            (
                "addition_embed_type",
                matches!(
                    self.addition_embed_type.as_deref(),
                    None | Some("text_time")
                ),
            ),
            ("encoder_hid_dim", self.encoder_hid_dim.is_none()),
            ("time_embedding_dim", self.time_embedding_dim.is_none()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_none(),
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.is_null(),
            ),
            ("dual_cross_attention", !self.dual_cross_attention),
            ("center_input_sample", !self.center_input_sample),
            ("only_cross_attention", only_cross_attention_off),
            (
                "mid_block_type",
                matches!(
                    self.mid_block_type.as_deref(),
                    Some("UNetMidBlock2DCrossAttn")
                ),
            ),
            (
                "conv_in_kernel/conv_out_kernel",
                self.conv_in_kernel == 3 && self.conv_out_kernel == 3,
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((key, _)) => Err(unsupported(
                path,
                format!(
                    "UNet option `{key}` is not supported (SD 1.x/2.x and SDXL-family UNets only)"
                ),
            )),
            None => self.check_added_conditioning(path),
        }
    }

    /// SDXL's added conditioning, where the config asks for it: its widths
    /// present and positive.
    fn check_added_conditioning(&self, path: &Path) -> Result<()> {
        if self.addition_embed_type.is_some() && self.text_time().is_none() {
            return Err(config_err(
                path,
                "addition_embed_type `text_time` needs positive addition_time_embed_dim and \
                 projection_class_embeddings_input_dim"
                    .into(),
            ));
        }
        if self.time_cond_proj_dim.is_some_and(|d| d <= 0) {
            return Err(config_err(
                path,
                "time_cond_proj_dim must be positive".into(),
            ));
        }
        Ok(())
    }

    /// SDXL's `text_time` conditioning: (the width of each time id's
    /// embedding, the width `add_embedding` takes), when configured.
    pub fn text_time(&self) -> Option<(i64, i64)> {
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(t), Some(p)) if t > 0 && p > 0 => Some((t, p)),
            _ => None,
        }
    }

    fn per_block_values(&self, path: &Path) -> Result<PerBlockValues> {
        let n = self.block_out_channels.len();
        let layers = self.layers_per_block.expand(n, "layers_per_block", path)?;
        // diffusers' historical naming: `attention_head_dim` holds the number
        // of heads unless `num_attention_heads` is given.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, "attention_head_dim", path)?;
        let depth =
            self.transformer_layers_per_block
                .expand(n, "transformer_layers_per_block", path)?;
        let cross = self
            .cross_attention_dim
            .expand(n, "cross_attention_dim", path)?;
        Ok(PerBlockValues {
            layers,
            heads,
            depth,
            cross,
        })
    }

    fn down_blocks(&self, values: &PerBlockValues, path: &Path) -> Result<Vec<UNetBlock>> {
        let mut down = Vec::with_capacity(self.down_block_types.len());
        for (i, t) in self.down_block_types.iter().enumerate() {
            let cross_attention =
                has_cross_attention(t, "CrossAttnDownBlock2D", "DownBlock2D", "down", path)?;
            let (ch, heads) = (self.block_out_channels[i], values.heads[i]);
            if cross_attention && (heads <= 0 || ch % heads != 0) {
                return Err(config_err(
                    path,
                    format!("block {i}: {ch} channels do not split into {heads} heads"),
                ));
            }
            down.push(values.block(i, cross_attention, values.layers[i]));
        }
        Ok(down)
    }

    /// Up blocks mirror the down blocks (the last down block's values come
    /// first) and take one resnet more than their down block: the skips are
    /// conv_in's, every down resnet's and every downsampler's, one more per
    /// block than it has resnets.
    fn up_blocks(&self, values: &PerBlockValues, path: &Path) -> Result<Vec<UNetBlock>> {
        let n = self.up_block_types.len();
        let mut up = Vec::with_capacity(n);
        for (i, t) in self.up_block_types.iter().enumerate() {
            let cross_attention =
                has_cross_attention(t, "CrossAttnUpBlock2D", "UpBlock2D", "up", path)?;
            let r = n - 1 - i;
            up.push(values.block(r, cross_attention, values.layers[r] + 1));
        }
        Ok(up)
    }

    /// The conditioning width the UNet expects (the text encoder's hidden size).
    pub fn context_dim(&self) -> i64 {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v.first().copied().unwrap_or(0),
        }
    }
}

mod clip;
mod vae;

pub use clip::{Activation, ClipConfig};
pub use vae::VaeConfig;

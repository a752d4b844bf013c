//! `vae/config.json`: AutoencoderKL's config, and what this VAE honours.

use super::*;

/// `vae/config.json` (AutoencoderKL).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one_i")]
    pub layers_per_block: i64,
    #[serde(default = "d_four")]
    pub latent_channels: i64,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_act_silu")]
    pub act_fn: String,
    /// SDXL pipelines run this VAE in fp32 when the rest runs in fp16
    /// (diffusers' default: true; the fp16-fix VAE says false).
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    /// FLUX.2's `AutoencoderKLFlux2`: latents 2×2-patchified and normalised
    /// per channel by the running statistics of a batch norm (`bn.*`),
    /// with this epsilon, in place of `scaling_factor`/`shift_factor`.
    #[serde(default)]
    pub batch_norm_eps: Option<f64>,
    /// Training only (the running statistics' update rate): read, unused.
    #[serde(default)]
    pub batch_norm_momentum: Option<f64>,
    /// FLUX.2's patch of latents: (2, 2).
    #[serde(default)]
    pub patch_size: Option<Vec<i64>>,
    /// A decoder with other widths than the encoder: not served (null or
    /// equal to `block_out_channels`).
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<i64>>,
    /// Every key not above: diffusers' `_`-prefixed metadata, options left
    /// null, and options this VAE does not honour ([`VaeConfig::read`]
    /// refuses those by name).
    #[serde(flatten)]
    unread: std::collections::BTreeMap<String, serde_json::Value>,
}

fn d_one_i() -> i64 {
    1
}

impl VaeConfig {
    /// `path` read and checked: every key with a value is one this VAE
    /// honours (`latents_mean`, say, is refused by name).
    pub fn read(path: &Path) -> Result<Self> {
        let c: VaeConfig = read_json(path)?;
        if let Some(key) = c
            .unread
            .iter()
            .find(|(k, v)| !v.is_null() && !k.starts_with('_'))
            .map(|(k, _)| k)
        {
            return Err(unsupported(
                path,
                format!("`{key}` is not supported by this VAE (it would be ignored)"),
            ));
        }
        c.validate(path)?;
        Ok(c)
    }

    /// Pixels per latent along each side: 2^(blocks - 1).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// How the VAE's latents map to the denoiser's, in diffusers' order:
    /// encode `(sample - shift) * scale`, decode `latents / scale + shift`
    /// (`scaling_factor`, `shift_factor`; no shift for SD and SDXL).
    pub fn normalization(&self) -> (f64, f64) {
        if self.batch_norm_eps.is_some() {
            // FLUX.2: the batch norm's statistics normalise, per channel.
            return (1.0, 0.0);
        }
        (self.scaling_factor, self.shift_factor.unwrap_or(0.0))
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_err(path, "`block_out_channels` is empty".into()));
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
        if let Some(d) = &self.decoder_block_out_channels {
            if *d != self.block_out_channels {
                return Err(unsupported(
                    path,
                    format!(
                        "`decoder_block_out_channels` {d:?} other than block_out_channels {:?}",
                        self.block_out_channels
                    ),
                ));
            }
        }
        match (&self.patch_size, self.batch_norm_eps) {
            (None, None) => {}
            (Some(p), Some(eps)) if p[..] == [2, 2] && eps > 0.0 => {}
            (p, eps) => {
                return Err(unsupported(
                    path,
                    format!(
                        "patch_size {p:?} with batch_norm_eps {eps:?}: FLUX.2's VAE patches 2×2 \
                         and normalises with a positive epsilon"
                    ),
                ))
            }
        }
        if self
            .down_block_types
            .iter()
            .any(|t| t != "DownEncoderBlock2D")
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
            || self.act_fn != "silu"
        {
            return Err(unsupported(
                path,
                "only DownEncoderBlock2D/UpDecoderBlock2D VAEs with silu are supported".into(),
            ));
        }
        Ok(())
    }
}

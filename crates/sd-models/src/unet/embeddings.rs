//! The UNet's conditioning embedding: the timestep's sinusoids (with LCM's
//! guidance embedding through `cond_proj`) and, for the SDXL family, the
//! pooled text embedding and the time ids through `add_embedding`.

use tch::{Kind, Tensor};

use super::{Added, Encoder};
use crate::config::UNetConfig;
use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::layers::Linear;

/// SDXL's `add_embedding`: the pooled text embedding and the sinusoidal
/// embeddings of the time ids, concatenated, through two linear layers.
pub(super) struct AddEmbedding {
    /// Sinusoidal width of each time id (`addition_time_embed_dim`).
    pub(super) time_dim: i64,
    /// What `linear_1` takes (`projection_class_embeddings_input_dim`).
    pub(super) input_dim: i64,
    pub(super) linear_1: Linear,
    pub(super) linear_2: Linear,
}

impl Encoder {
    /// Sinusoidal embedding of one (possibly fractional) timestep per item, in fp32.
    fn timestep_embedding(&self, timesteps: &Tensor) -> Tensor {
        sinusoidal(timesteps, self.config.block_out_channels[0], &self.config)
    }

    /// The embedding every resnet is conditioned on: the timesteps' (with
    /// the guidance embedding for LCM UNets) plus, for SDXL, the added
    /// conditioning's. `added` is checked.
    pub(crate) fn embedding(&self, timesteps: &Tensor, added: &Added, b: i64) -> Tensor {
        let Placement { device, kind } = self.placement;
        let mut t_emb = self.timestep_embedding(timesteps).to_kind(kind);
        if let (Some(proj), Some(cond)) = (&self.time_cond_proj, added.timestep_cond) {
            t_emb += proj.forward(&cond.to_device(device).to_kind(kind));
        }
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb).silu());
        let (Some(add), Some(text), Some(ids)) =
            (&self.add_embedding, added.text_embeds, added.time_ids)
        else {
            return emb;
        };
        // diffusers: the time ids' embeddings in fp32, concatenated with the
        // text embeddings (promoted), then cast to the model's dtype.
        let ids = ids.to_device(device).to_kind(Kind::Float).flatten(0, -1);
        let time_embeds = sinusoidal(&ids, add.time_dim, &self.config).reshape([b, -1]);
        let text = text.to_device(device).to_kind(Kind::Float);
        let add_embeds = Tensor::cat(&[text, time_embeds], -1).to_kind(kind);
        emb + add
            .linear_2
            .forward(&add.linear_1.forward(&add_embeds).silu())
    }

    /// `added` as this UNet needs it for a batch of `b`.
    pub(crate) fn check_added(&self, added: &Added, b: i64) -> Result<()> {
        let rows = |t: &Tensor, name: &str, width: Option<i64>| -> Result<i64> {
            let s = t.size();
            match s[..] {
                [n, w]
                    if n == b
                        && w >= 1
                        && width.is_none_or(|x| x == w)
                        && t.is_floating_point() =>
                {
                    Ok(w)
                }
                _ => Err(ModelError::Input(format!(
                    "{name} {s:?}: expected a float ({b}, {}) tensor",
                    width.map_or("n".to_string(), |w| w.to_string())
                ))),
            }
        };
        match (&self.add_embedding, added.text_embeds, added.time_ids) {
            (Some(add), Some(text), Some(ids)) => {
                let (d, n) = (
                    rows(text, "text_embeds", None)?,
                    rows(ids, "time_ids", None)?,
                );
                if d + n * add.time_dim != add.input_dim {
                    return Err(ModelError::Input(format!(
                        "text_embeds width {d} and {n} time ids × {} make {}, but this UNet's \
                         add_embedding takes {}",
                        add.time_dim,
                        d + n * add.time_dim,
                        add.input_dim
                    )));
                }
            }
            (Some(_), _, _) => {
                return Err(ModelError::Input(
                    "this UNet (SDXL family) needs text_embeds and time_ids".into(),
                ))
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(ModelError::Input(
                    "this UNet takes no text_embeds or time_ids (not an SDXL-family UNet)".into(),
                ))
            }
        }
        match (self.config.time_cond_proj_dim, added.timestep_cond) {
            (Some(d), Some(c)) => rows(c, "timestep_cond", Some(d)).map(|_| ()),
            (None, Some(_)) => Err(ModelError::Input(
                "this UNet takes no timestep_cond (not an LCM UNet)".into(),
            )),
            (_, None) => Ok(()),
        }
    }
}

/// diffusers' `get_timestep_embedding`: `dim` sinusoids of each value, in
/// fp32, cos first when the config flips them.
fn sinusoidal(timesteps: &Tensor, dim: i64, c: &UNetConfig) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()))
        / (half as f64 - c.freq_shift);
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (emb.sin(), emb.cos());
    let emb = if c.flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

//! FLUX.1's ControlNet (diffusers' `FluxControlNetModel`, the InstantX and
//! Shakker-Labs layout): a shallower copy of the transformer — its
//! embedders and its first double- and single-stream blocks — whose image
//! tokens also see the control image's VAE latents (packed as the
//! latents are, through `controlnet_x_embedder`), and which gives, through
//! one linear "zero" projection per block, a sample per block the
//! transformer adds to its image tokens ([`FluxResiduals`]). A union
//! ControlNet (`num_mode`) also reads a control type, as one more text
//! token at the front.
//!
//! The control image's embedding (`controlnet_x_embedder` of its packed
//! latents) depends on the image alone, so a caller computes it once per
//! generation ([`FluxControlNet::embed`]) and passes it to every step.
//! Scaling (a request's weight, its window) is the caller's.
//!
//! XLabs-style ControlNets (a pixel-space `input_hint_block`, their
//! samples repeated over the blocks) are refused by name.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::{config_err, read_json};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::flux::{
    blocks, check_inputs, pack, per_row_timesteps, rope, DoubleBlock, Embedders, FluxConfig,
    SingleBlock,
};
use crate::layers::Linear;
use crate::weights::{Storage, Vb};

/// What a FLUX ControlNet adds to a transformer forward: one sample per
/// ControlNet block (B, image tokens, dim), for the double-stream blocks
/// and for the single-stream ones. The transformer adds sample
/// `i / ⌈blocks / samples⌉` after its block `i`, as diffusers does.
#[derive(Debug)]
pub struct FluxResiduals {
    pub double: Vec<Tensor>,
    pub single: Vec<Tensor>,
}

impl FluxResiduals {
    /// The sample added after double-stream block `i` of `n`.
    pub fn double_sample(&self, i: usize, n: usize) -> Option<&Tensor> {
        interval_sample(&self.double, i, n)
    }

    /// The sample added after single-stream block `i` of `n`.
    pub fn single_sample(&self, i: usize, n: usize) -> Option<&Tensor> {
        interval_sample(&self.single, i, n)
    }

    /// Every sample is (`rows`, `tokens`, `dim`).
    pub fn check(&self, rows: i64, tokens: i64, dim: i64) -> Result<()> {
        for t in self.double.iter().chain(&self.single) {
            if t.size() != [rows, tokens, dim] {
                return Err(ModelError::Input(format!(
                    "ControlNet sample {:?} does not fit ({rows}, {tokens} image tokens, {dim})",
                    t.size()
                )));
            }
        }
        Ok(())
    }
}

/// diffusers' `controlnet_block_samples[i // ceil(n / len)]` (none when
/// there are no samples).
fn interval_sample(samples: &[Tensor], i: usize, n: usize) -> Option<&Tensor> {
    if samples.is_empty() {
        return None;
    }
    let interval = n.div_ceil(samples.len()).max(1);
    samples.get(i / interval)
}

/// What a FLUX ControlNet's `config.json` adds to the transformer's.
#[derive(Debug, Deserialize)]
struct Extra {
    #[serde(default)]
    num_mode: Option<i64>,
    #[serde(default)]
    conditioning_embedding_channels: Option<i64>,
}

/// A loaded FLUX ControlNet.
pub struct FluxControlNet {
    config: FluxConfig,
    embedders: Embedders,
    controlnet_x_embedder: Linear,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    controlnet_blocks: Vec<Linear>,
    controlnet_single_blocks: Vec<Linear>,
    /// A union ControlNet's control types (num_mode, dim).
    modes: Option<Tensor>,
    placement: Placement,
    parameters: u64,
    _storage: Storage,
}

impl FluxControlNet {
    /// The ControlNet in the diffusers folder `dir`.
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Unsupported {
                path: dir.to_path_buf(),
                message: "a FLUX ControlNet is a diffusers folder (config.json and \
                          diffusion_pytorch_model.safetensors)"
                    .into(),
            });
        }
        let config_path = dir.join("config.json");
        let config: FluxConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let extra: Extra = read_json(&config_path)?;
        if extra.conditioning_embedding_channels.is_some() {
            return Err(config_err(
                &config_path,
                "an XLabs-style FLUX ControlNet (a pixel-space input_hint_block, \
                 conditioning_embedding_channels) is not served: InstantX-style ones, \
                 which take the control image's latents, are"
                    .into(),
            ));
        }
        if let Some(n) = extra.num_mode {
            if n < 1 {
                return Err(config_err(&config_path, format!("num_mode {n} < 1")));
            }
        }
        let w = crate::unet::controlnet::folder_weights(dir, placement)?;
        let vb = Vb::root(&w, "");
        let (dim, ic) = (config.inner_dim(), config.in_channels);
        let (double, single) = blocks(&vb, &config)?;
        let zero = |prefix: &str, n: usize| {
            (0..n)
                .map(|i| Linear::load(&vb.pp(prefix).pp(i), dim, dim, true))
                .collect::<Result<Vec<_>>>()
        };
        Ok(FluxControlNet {
            embedders: Embedders::load(&vb, &config)?,
            controlnet_x_embedder: Linear::load(&vb.pp("controlnet_x_embedder"), ic, dim, true)?,
            controlnet_blocks: zero("controlnet_blocks", double.len())?,
            controlnet_single_blocks: zero("controlnet_single_blocks", single.len())?,
            double,
            single,
            modes: match extra.num_mode {
                Some(n) => Some(vb.pp("controlnet_mode_embedder").get("weight", &[n, dim])?),
                None => None,
            },
            placement,
            parameters: w.parameter_count(),
            _storage: w.storage(),
            config,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Parameters in its weights.
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// Bytes its weights take in memory.
    pub fn bytes(&self) -> u64 {
        self.parameters * self.placement.kind.elt_size_in_bytes() as u64
    }

    /// Control types of a union ControlNet (None: not a union).
    pub fn union_modes(&self) -> Option<i64> {
        self.modes.as_ref().map(|m| m.size()[0])
    }

    /// Whether it takes a guidance value (a guidance-distilled copy).
    pub fn takes_guidance(&self) -> bool {
        self.config.guidance_embeds
    }

    /// The control image's latents `latents` (B, C, h, w) — the VAE's
    /// sample, normalised as the transformer's latents are — embedded:
    /// (B, h/2 · w/2, dim), on the device in the model's precision, to
    /// pass to every step.
    pub fn embed(&self, latents: &Tensor) -> Result<Tensor> {
        let s = latents.size();
        let c = self.config.latent_channels();
        if s.len() != 4
            || s[0] < 1
            || s[1] != c
            || s[2] < 2
            || s[3] < 2
            || s[2] % 2 != 0
            || s[3] % 2 != 0
            || !latents.is_floating_point()
        {
            return Err(ModelError::Input(format!(
                "control latents {s:?}: expected a float (batch, {c}, h, w) tensor with even sides"
            )));
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.placement;
            let x = pack(&latents.to_device(device).to_kind(kind));
            Ok(self.controlnet_x_embedder.forward(&x))
        })
    }

    /// The samples for `latents` (B, C, h, w) at `timesteps` (σ·1000) under
    /// the T5 `context` and `pooled` embedding (and the guidance, when it
    /// takes one), seeing the embedded control `hint` (1 or B rows of the
    /// image tokens) and, for a union ControlNet, each row's control type
    /// `modes` (B,); unscaled.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: Option<&Tensor>,
        guidance: Option<&Tensor>,
        hint: &Tensor,
        modes: Option<&Tensor>,
    ) -> Result<FluxResiduals> {
        let c = &self.config;
        let ((b, _, h, w), pooled) = check_inputs(c, latents, context, pooled)?;
        let tokens = (h / 2) * (w / 2);
        let hs = hint.size();
        if hs.len() != 3 || !(hs[0] == 1 || hs[0] == b) || hs[1] != tokens || hs[2] != c.inner_dim()
        {
            return Err(ModelError::Input(format!(
                "control embedding {hs:?} does not fit latents {:?} (a control image of another \
                 size?)",
                latents.size()
            )));
        }
        let guidance = self.embedders.time.check_guidance(guidance)?;
        per_row_timesteps(timesteps, b)?;
        let modes = self.check_modes(modes, b)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device: dev, kind } = self.placement;
            let x = pack(&latents.to_device(dev).to_kind(kind));
            let e = &self.embedders;
            let mut img = e.x.forward(&x) + hint.to_device(dev).to_kind(kind);
            let temb = e.time.forward(timesteps, guidance, pooled, b, (dev, kind));
            let mut txt = e.context.forward(&context.to_device(dev).to_kind(kind));
            if let (Some(table), Some(m)) = (&self.modes, &modes) {
                // The control type, one more text token at the front.
                let token = table.index_select(0, &m.to_device(dev)).unsqueeze(1);
                txt = Tensor::cat(&[token.to_kind(kind), txt], 1);
            }
            let n_txt = txt.size()[1];
            let rope = rope(c, n_txt, h / 2, w / 2, dev);
            let hd = c.attention_head_dim;
            let mut double = Vec::with_capacity(self.double.len());
            for (block, out) in self.double.iter().zip(&self.controlnet_blocks) {
                let (i, t) = block.forward(&img, &txt, &temb, &rope, hd);
                img = i;
                txt = t;
                double.push(out.forward(&img));
            }
            let mut joined = Tensor::cat(&[&txt, &img], 1);
            let mut single = Vec::with_capacity(self.single.len());
            for (block, out) in self.single.iter().zip(&self.controlnet_single_blocks) {
                joined = block.forward(&joined, &temb, &rope, hd);
                single.push(out.forward(&joined.narrow(1, n_txt, tokens)));
            }
            Ok(FluxResiduals { double, single })
        })
    }

    /// A union ControlNet needs each row's control type, within its
    /// `num_mode`; another ControlNet takes none.
    fn check_modes(&self, modes: Option<&Tensor>, b: i64) -> Result<Option<Tensor>> {
        match (&self.modes, modes) {
            (None, _) => Ok(None),
            (Some(_), None) => Err(ModelError::Input(
                "a union ControlNet needs a control type (union_mode)".into(),
            )),
            (Some(table), Some(m)) => {
                let n = table.size()[0];
                let m = m.to_kind(Kind::Int64).reshape([-1]);
                let rows = m.size()[0];
                if rows != 1 && rows != b {
                    return Err(ModelError::Input(format!(
                        "{rows} control types for {b} rows"
                    )));
                }
                let values: Vec<i64> = Vec::try_from(&m).unwrap_or_default();
                if let Some(bad) = values.iter().find(|v| !(0..n).contains(*v)) {
                    return Err(ModelError::Input(format!(
                        "control type {bad}: this union ControlNet has types 0..{n}"
                    )));
                }
                Ok(Some(m.expand([b], false)))
            }
        }
    }

    /// A forward of `rows` rows of zeros at a latent side of `side` (its
    /// control embedded anew): what one ControlNet adds to a step, for the
    /// cost model.
    pub fn probe(&self, rows: i64, side: i64, tokens: i64) -> Result<FluxResiduals> {
        let f = (Kind::Float, tch::Device::Cpu);
        let c = &self.config;
        let side = (side + 1) / 2 * 2;
        let latents = Tensor::zeros([rows, c.latent_channels(), side, side], f);
        let hint = self.embed(&latents.narrow(0, 0, 1))?;
        let guidance = Tensor::from_slice(&vec![3.5f32; rows as usize]);
        let modes = Tensor::zeros([rows], (Kind::Int64, tch::Device::Cpu));
        self.forward(
            &latents,
            &Tensor::from_slice(&vec![500.0f32; rows as usize]),
            &Tensor::zeros([rows, tokens, c.joint_attention_dim], f),
            Some(&Tensor::zeros([rows, c.pooled_projection_dim], f)),
            c.guidance_embeds.then_some(&guidance),
            &hint,
            self.modes.is_some().then_some(&modes),
        )
    }
}

// SAFETY: the weights are written once, at load, and only read afterwards;
// libtorch allows concurrent reads of a tensor from several threads, and
// `forward` creates all of its intermediate tensors per call.
unsafe impl Sync for FluxControlNet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_diffusers_interval_rule() {
        let t = |v: f64| Tensor::from(v);
        let r = FluxResiduals {
            double: vec![t(0.0), t(1.0)],
            single: vec![t(10.0)],
        };
        // 5 double blocks over 2 samples: ceil(5/2) = 3 blocks each.
        let picked: Vec<f64> = (0..5)
            .map(|i| r.double_sample(i, 5).map_or(-1.0, |s| s.double_value(&[])))
            .collect();
        assert_eq!(picked, [0.0, 0.0, 0.0, 1.0, 1.0]);
        assert!((0..4).all(|i| r.single_sample(i, 4).is_some()));
        let none = FluxResiduals {
            double: vec![],
            single: vec![],
        };
        assert!(none.double_sample(0, 3).is_none());
    }
}

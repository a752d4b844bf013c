//! diffusers' `ControlNetModel`: a trainable copy of a UNet's encoding half
//! (the conditioning embedding, `conv_in`, the down blocks, the mid block)
//! that also sees a hint image — pose, edges, depth — through a small
//! convolutional embedding added after `conv_in`, and gives, through one
//! 1×1 "zero" convolution per skip connection and one after the mid block,
//! the [`Residuals`] a UNet adds to its own.
//!
//! The hint's embedding depends on the image alone, so a caller computes
//! it once per generation ([`ControlNet::embed`]) and passes it to every
//! step's [`ControlNet::forward`]. Scaling (the request's weight, a window,
//! A1111's soft injection) is the caller's: the residuals come back as the
//! network makes them.
//!
//! Two layouts load: a diffusers folder (`config.json` and
//! `diffusion_pytorch_model[.fp16].safetensors`) and one `.safetensors`
//! file as ControlNet 1.0/1.1 and the SDXL ControlNets were published
//! (`control_model.input_hint_block.*`, `control_model.zero_convs.*`,
//! `control_model.middle_block_out.*` beside the UNet's own LDM names),
//! whose architecture is the served UNet's (the file has no config; the
//! hint embedding's widths are read from its tensors). Pickles are refused.

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::{Added, Encoder, Residuals};
use crate::config::{config_err, UNetConfig};
use crate::device::Placement;
use crate::error::{guarded, ModelError, Result};
use crate::layers::Conv2d;
use crate::weights::{Vb, Weights};

/// A loaded ControlNet.
pub struct ControlNet {
    enc: Encoder,
    hint: HintEmbedding,
    /// One 1×1 convolution per skip connection, in the down path's order.
    zero_convs: Vec<Conv2d>,
    mid_out: Conv2d,
    /// Residuals averaged over the image (`global_pool_conditions`, the
    /// "shuffle" ControlNets).
    global_pool: bool,
    /// The hint is taken as BGR (`controlnet_conditioning_channel_order`).
    bgr: bool,
    parameters: u64,
    _storage: crate::weights::Storage,
}

/// The hint image's embedding: `conv_in`, pairs of convolutions (the second
/// of each halving the size), `conv_out` to the UNet's first width; SiLU
/// after each but the last.
struct HintEmbedding {
    channels: i64,
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

/// What a ControlNet's `config.json` adds to a UNet's.
#[derive(Debug, Deserialize)]
struct Extra {
    #[serde(default = "d_hint_channels")]
    conditioning_embedding_out_channels: Vec<i64>,
    #[serde(default = "d_three")]
    conditioning_channels: i64,
    #[serde(default)]
    global_pool_conditions: bool,
    #[serde(default = "d_rgb")]
    controlnet_conditioning_channel_order: String,
}

fn d_hint_channels() -> Vec<i64> {
    vec![16, 32, 96, 256]
}
fn d_three() -> i64 {
    3
}
fn d_rgb() -> String {
    "rgb".into()
}

/// Extensions of pickled checkpoints, refused by name.
const PICKLES: [&str; 4] = ["pth", "ckpt", "bin", "pt"];

/// The original layout's prefix.
const ORIGINAL: &str = "control_model.";

impl ControlNet {
    /// The ControlNet at `path` (a diffusers folder or one `.safetensors`
    /// file in the original layout), for a UNet configured as `base`.
    pub fn load(path: &Path, base: &UNetConfig, placement: Placement) -> Result<Self> {
        if path.is_dir() {
            return Self::load_folder(path, placement);
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if PICKLES.contains(&ext) {
            return Err(ModelError::Pickle {
                path: path.to_path_buf(),
            });
        }
        let w = Weights::open(path, placement)?;
        let keys: Vec<String> = w.stored().map(|(k, _)| k.to_string()).collect();
        let original = if keys.iter().any(|k| k.starts_with(ORIGINAL)) {
            Some(ORIGINAL)
        } else if keys.iter().any(|k| k.starts_with("input_hint_block.")) {
            Some("")
        } else {
            None
        };
        if let Some(prefix) = original {
            let layers = match base.layers_per_block {
                crate::config::PerBlock::One(n) => n,
                crate::config::PerBlock::Many(ref v) => v.first().copied().unwrap_or(2),
            };
            let aliases = crate::single_file::controlnet::aliases(&keys, prefix, layers as usize);
            let w = w.with_aliases(aliases);
            let (config, extra) = file_config(&w, base)?;
            Self::build(config, extra, path, &w)
        } else if keys
            .iter()
            .any(|k| k.starts_with("controlnet_cond_embedding."))
        {
            // diffusers' names in one file: the served UNet's architecture.
            let (config, extra) = file_config(&w, base)?;
            Self::build(config, extra, path, &w)
        } else {
            Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                message: "not a ControlNet: no `control_model.*` or `input_hint_block.*` \
                          (original layout) or `controlnet_cond_embedding.*` (diffusers) tensors"
                    .into(),
            })
        }
    }

    fn load_folder(dir: &Path, placement: Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: config_path.clone(),
                }
            } else {
                ModelError::Io {
                    path: config_path.clone(),
                    source,
                }
            }
        })?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_err(&config_path, e.to_string()))?;
        // A ControlNet has no up path: the UNet config's check wants one
        // up block per down block, mirrored.
        if let Some(obj) = value.as_object_mut() {
            if !obj.contains_key("up_block_types") {
                let ups: Vec<serde_json::Value> = obj
                    .get("down_block_types")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .rev()
                            .map(|t| {
                                let t = t.as_str().unwrap_or_default();
                                serde_json::Value::from(
                                    t.replace("CrossAttnDown", "CrossAttnUp")
                                        .replace("DownBlock2D", "UpBlock2D"),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                obj.insert("up_block_types".into(), ups.into());
            }
        }
        let config: UNetConfig = serde_json::from_value(value.clone())
            .map_err(|e| config_err(&config_path, e.to_string()))?;
        let extra: Extra =
            serde_json::from_value(value).map_err(|e| config_err(&config_path, e.to_string()))?;
        let w = folder_weights(dir, placement)?;
        Self::build(config, extra, &config_path, &w)
    }

    fn build(config: UNetConfig, extra: Extra, config_path: &Path, w: &Weights) -> Result<Self> {
        if !matches!(
            extra.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return Err(config_err(
                config_path,
                format!(
                    "controlnet_conditioning_channel_order `{}`: rgb or bgr",
                    extra.controlnet_conditioning_channel_order
                ),
            ));
        }
        let hint = HintEmbedding::load(
            &Vb::root(w, "controlnet_cond_embedding"),
            extra.conditioning_channels,
            &extra.conditioning_embedding_out_channels,
            config.block_out_channels[0],
            config_path,
        )?;
        let (zero_convs, mid_out) = zero_convs(w, &config, config_path)?;
        let enc = Encoder::load(config, config_path, w)?;
        Ok(ControlNet {
            enc,
            hint,
            zero_convs,
            mid_out,
            global_pool: extra.global_pool_conditions,
            bgr: extra.controlnet_conditioning_channel_order == "bgr",
            parameters: w.parameter_count(),
            _storage: w.storage(),
        })
    }

    /// Parameters in its weights.
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// Bytes its weights take in memory.
    pub fn bytes(&self) -> u64 {
        self.parameters * self.enc.placement().kind.elt_size_in_bytes() as u64
    }

    /// Channels of the latents it takes.
    pub fn in_channels(&self) -> i64 {
        self.enc.config().in_channels
    }

    /// Pixels per latent along a side of the hint it embeds.
    pub fn hint_scale(&self) -> i64 {
        1 << self.hint.blocks.len().div_euclid(2)
    }

    /// Width of the text embeddings it attends to.
    pub fn context_dim(&self) -> i64 {
        self.enc.config().context_dim()
    }

    /// Whether it takes SDXL's pooled embedding and time ids.
    pub fn takes_text_time(&self) -> bool {
        self.enc.config().text_time().is_some()
    }

    /// The hint image `image` (B, 3, H, W), RGB values in 0..=1, H and W
    /// multiples of [`ControlNet::hint_scale`]: its embedding (B, the
    /// UNet's first width, H/scale, W/scale), on the device in the model's
    /// precision, to pass to every step.
    pub fn embed(&self, image: &Tensor) -> Result<Tensor> {
        let s = image.size();
        let scale = self.hint_scale();
        if s.len() != 4
            || s[0] < 1
            || s[1] != self.hint.channels
            || s[2] < scale
            || s[3] < scale
            || s[2] % scale != 0
            || s[3] % scale != 0
            || !image.is_floating_point()
        {
            return Err(ModelError::Input(format!(
                "hint image {s:?}: expected a float (batch, {}, h, w) tensor, h and w multiples \
                 of {scale}",
                self.hint.channels
            )));
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.enc.placement();
            let mut x = image.to_device(device).to_kind(kind);
            if self.bgr {
                x = x.flip([1]);
            }
            Ok(self.hint.forward(&x))
        })
    }

    /// The residuals for `sample` (B, in_channels, h, w) at `timesteps`
    /// under `context` (and, SDXL, `added`'s pooled embedding and time
    /// ids), seeing the embedded hint `hint` (1 or B rows, at the latents'
    /// size), unscaled.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Added,
        hint: &Tensor,
    ) -> Result<Residuals> {
        let (s, hs) = (sample.size(), hint.size());
        let c = self.enc.config();
        if s.len() != 4 || s[1] != c.in_channels {
            return Err(ModelError::Input(format!(
                "latents {s:?}: this ControlNet takes (batch, {}, h, w)",
                c.in_channels
            )));
        }
        if hs.len() != 4
            || !(hs[0] == 1 || hs[0] == s[0])
            || hs[1] != c.block_out_channels[0]
            || hs[2..] != s[2..]
        {
            return Err(ModelError::Input(format!(
                "hint embedding {hs:?} does not fit latents {s:?} (a hint image of another size?)"
            )));
        }
        let ctx = context.size();
        if ctx.len() != 3 || ctx[0] != s[0] || ctx[2] != c.context_dim() {
            return Err(ModelError::Input(format!(
                "text embeddings {ctx:?}: this ControlNet takes ({}, tokens, {})",
                s[0],
                c.context_dim()
            )));
        }
        let b = s[0];
        self.enc.check_added(&added, b)?;
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let Placement { device, kind } = self.enc.placement();
            let sample = sample.to_device(device).to_kind(kind);
            let context = context.to_device(device).to_kind(kind);
            let hint = hint.to_device(device).to_kind(kind);
            let timesteps = timesteps.to_device(device).expand([b], false);
            let emb = self.enc.embedding(&timesteps, &added, b);
            let (mid, skips) = self.enc.run(&sample, &emb, &context, Some(&hint));
            if skips.len() != self.zero_convs.len() {
                return Err(ModelError::Torch(format!(
                    "{} skip connections for {} zero convolutions",
                    skips.len(),
                    self.zero_convs.len()
                )));
            }
            let pool = |t: Tensor| {
                if self.global_pool {
                    t.mean_dim([2i64, 3].as_slice(), true, None)
                } else {
                    t
                }
            };
            let down = skips
                .iter()
                .zip(&self.zero_convs)
                .map(|(x, conv)| pool(conv.forward(x)))
                .collect();
            Ok(Residuals {
                down,
                mid: pool(self.mid_out.forward(&mid)),
            })
        })
    }

    /// A forward of `rows` rows of zeros at a latent side of `side` (its
    /// hint embedded anew): what one ControlNet adds to a step, for the
    /// cost model.
    pub fn probe(&self, rows: i64, side: i64, tokens: i64) -> Result<Residuals> {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let c = self.enc.config();
        let scale = self.hint_scale();
        let hint = self.embed(&Tensor::zeros(
            [1, self.hint.channels, side * scale, side * scale],
            f,
        ))?;
        let (text, ids) = match c.text_time() {
            Some((time_dim, input_dim)) => (
                Some(Tensor::zeros([rows, input_dim - 6 * time_dim], f)),
                Some(Tensor::zeros([rows, 6], f)),
            ),
            None => (None, None),
        };
        self.forward(
            &Tensor::zeros([rows, c.in_channels, side, side], f),
            &Tensor::from_slice(&vec![500.0f32; rows as usize]),
            &Tensor::zeros([rows, tokens, c.context_dim()], f),
            Added {
                text_embeds: text.as_ref(),
                time_ids: ids.as_ref(),
                timestep_cond: None,
                control: None,
            },
            &hint,
        )
    }
}

impl HintEmbedding {
    fn load(vb: &Vb, channels: i64, widths: &[i64], out: i64, config_path: &Path) -> Result<Self> {
        let Some(&first) = widths.first() else {
            return Err(config_err(
                config_path,
                "`conditioning_embedding_out_channels` is empty".into(),
            ));
        };
        let conv_in = Conv2d::load(&vb.pp("conv_in"), channels, first, 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            blocks.push(Conv2d::load(
                &vb.pp("blocks").pp(2 * i),
                pair[0],
                pair[0],
                3,
                1,
                1,
            )?);
            blocks.push(Conv2d::load(
                &vb.pp("blocks").pp(2 * i + 1),
                pair[0],
                pair[1],
                3,
                2,
                1,
            )?);
        }
        let last = widths[widths.len() - 1];
        let conv_out = Conv2d::load(&vb.pp("conv_out"), last, out, 3, 1, 1)?;
        Ok(HintEmbedding {
            channels,
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.conv_in.forward(x).silu();
        for block in &self.blocks {
            x = block.forward(&x).silu();
        }
        self.conv_out.forward(&x)
    }
}

/// The 1×1 convolutions after each skip connection (`controlnet_down_blocks`)
/// and after the mid block (`controlnet_mid_block`), at the widths the down
/// path makes.
fn zero_convs(w: &Weights, c: &UNetConfig, config_path: &Path) -> Result<(Vec<Conv2d>, Conv2d)> {
    let (down_specs, _) = c.blocks(config_path)?;
    let ch = &c.block_out_channels;
    let mut widths = vec![ch[0]];
    for (i, spec) in down_specs.iter().enumerate() {
        widths.extend(std::iter::repeat_n(ch[i], spec.layers as usize));
        if i + 1 < ch.len() {
            widths.push(ch[i]);
        }
    }
    let vb = Vb::root(w, "");
    let convs = widths
        .iter()
        .enumerate()
        .map(|(i, &c)| Conv2d::load(&vb.pp("controlnet_down_blocks").pp(i), c, c, 1, 1, 0))
        .collect::<Result<Vec<_>>>()?;
    let last = ch[ch.len() - 1];
    let mid = Conv2d::load(&vb.pp("controlnet_mid_block"), last, last, 1, 1, 0)?;
    Ok((convs, mid))
}

/// A single file's configuration: the served UNet's architecture, with the
/// input channels and the hint embedding's widths read from the tensors.
fn file_config(w: &Weights, base: &UNetConfig) -> Result<(UNetConfig, Extra)> {
    let shape = |name: &str| -> Result<Vec<i64>> {
        w.shape_of(name)
            .map(<[i64]>::to_vec)
            .ok_or_else(|| ModelError::MissingTensor {
                path: w.path().to_path_buf(),
                name: name.to_string(),
            })
    };
    let mut config = base.clone();
    config.in_channels = shape("conv_in.weight")?[1];
    let first = shape("controlnet_cond_embedding.conv_in.weight")?;
    let mut widths = vec![first[0]];
    let mut i = 1;
    while w.contains(&format!("controlnet_cond_embedding.blocks.{i}.weight")) {
        widths.push(shape(&format!("controlnet_cond_embedding.blocks.{i}.weight"))?[0]);
        i += 2;
    }
    let extra = Extra {
        conditioning_embedding_out_channels: widths,
        conditioning_channels: first[1],
        global_pool_conditions: false,
        controlnet_conditioning_channel_order: "rgb".into(),
    };
    Ok((config, extra))
}

// SAFETY: as for the UNet: weights written once at load, only read after;
// every forward makes its own intermediate tensors.
unsafe impl Sync for ControlNet {}

/// A diffusers folder's weights: `diffusion_pytorch_model.safetensors`, or
/// its `.fp16` variant (preferred for a half-precision placement);
/// pickles refused by name.
pub(crate) fn folder_weights(dir: &Path, placement: Placement) -> Result<Weights> {
    let stem = "diffusion_pytorch_model";
    let half = placement.kind != tch::Kind::Float;
    let (full, fp16) = (
        dir.join(format!("{stem}.safetensors")),
        dir.join(format!("{stem}.fp16.safetensors")),
    );
    let order = if half { [&fp16, &full] } else { [&full, &fp16] };
    let Some(file) = order.into_iter().find(|p| p.is_file()) else {
        for ext in PICKLES {
            let p = dir.join(format!("{stem}.{ext}"));
            if p.is_file() {
                return Err(ModelError::Pickle { path: p });
            }
        }
        return Err(ModelError::MissingFile { path: full });
    };
    Weights::open(file, placement)
}

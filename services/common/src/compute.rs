//! Model work shared by the services and the in-process benchmark pipeline:
//! guided UNet calls (several merged into one forward) and diffusers'
//! image postprocessing.

use std::sync::Arc;

use sd_models::lora::{self, Applied, Plan, Span};
use sd_models::UNet;
use sd_proto::v1::RgbImage;
use tch::{Kind, Tensor};

use crate::ServiceError;

/// SDXL's added conditioning of one call: pooled text embeddings and the
/// size/crop time ids, for each half.
pub struct XlConditioning {
    /// (1 or B, pooled)
    pub cond_pooled: Tensor,
    /// (1 or B, pooled), present when the call is guided.
    pub uncond_pooled: Option<Tensor>,
    /// (B, n)
    pub time_ids: Tensor,
    /// (B, n) for the unconditional half.
    pub negative_time_ids: Tensor,
}

/// One Predict's tensors, checked.
pub struct Call {
    /// (B, C, h, w)
    pub latents: Tensor,
    /// (B,)
    pub timesteps: Tensor,
    /// (1 or B, tokens, dim)
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub guidance: f64,
    /// The SDXL family's added conditioning (for a UNet that takes it).
    pub xl: Option<XlConditioning>,
    /// LoRA adapters for this call's rows (empty: the base UNet).
    pub loras: Arc<[Applied]>,
}

impl Call {
    pub fn batch(&self) -> i64 {
        self.latents.size()[0]
    }

    /// UNet rows this call needs (twice its batch when guided).
    pub fn rows(&self) -> i64 {
        self.batch() * if self.uncond.is_some() { 2 } else { 1 }
    }

    /// Latent positions (height × width).
    pub fn positions(&self) -> u64 {
        let s = self.latents.size();
        (s[2] * s[3]).max(0) as u64
    }

    /// Calls merge when latents and text embeddings have the same shape past the batch.
    pub fn key(&self) -> (Vec<i64>, Vec<i64>) {
        (
            self.latents.size()[1..].to_vec(),
            self.cond.size()[1..].to_vec(),
        )
    }
}

/// diffusers' `get_guidance_scale_embedding` of `w` (the guidance scale
/// less one, as the LCM pipelines pass it): `dim` sinusoids, fp32.
pub fn guidance_embedding(w: f64, rows: i64, dim: i64) -> Tensor {
    // In float32 throughout, as torch computes it.
    let half = dim / 2;
    let scale = (10000f64.ln() as f32) / (half - 1).max(1) as f32;
    let w = (w as f32) * 1000.0;
    let freqs = (Tensor::arange(half, (Kind::Float, tch::Device::Cpu)) * f64::from(-scale)).exp();
    let emb = freqs * f64::from(w);
    let emb = Tensor::cat(&[emb.sin(), emb.cos()], 0);
    let emb = if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    };
    emb.unsqueeze(0).expand([rows, dim], false)
}

/// The UNet's inputs for several calls, in diffusers' order within each
/// call ([uncond, cond]).
#[derive(Default)]
struct Inputs {
    xs: Vec<Tensor>,
    ts: Vec<Tensor>,
    ctxs: Vec<Tensor>,
    text_embeds: Vec<Tensor>,
    time_ids: Vec<Tensor>,
    conds: Vec<Tensor>,
    /// Each half's rows and LoRA adapters, in order.
    loras: Vec<(i64, Arc<[Applied]>)>,
}

impl Inputs {
    /// One half of call `c` (its uncond rows, or its cond rows).
    fn add_half(&mut self, c: &Call, uncond_half: bool, time_cond_dim: Option<i64>) {
        let b = c.batch();
        let rows = |t: &Tensor| {
            let mut size = t.size();
            size[0] = b;
            t.expand(size, false)
        };
        self.xs.push(c.latents.shallow_clone());
        self.ts.push(c.timesteps.expand([b], false));
        self.loras.push((b, c.loras.clone()));
        let ctx = if uncond_half {
            c.uncond.as_ref()
        } else {
            Some(&c.cond)
        };
        if let Some(ctx) = ctx {
            self.ctxs.push(rows(ctx));
        }
        if let Some(xl) = &c.xl {
            let pooled = if uncond_half {
                xl.uncond_pooled.as_ref()
            } else {
                Some(&xl.cond_pooled)
            };
            if let Some(p) = pooled {
                self.text_embeds.push(rows(p));
            }
            let ids = if uncond_half {
                &xl.negative_time_ids
            } else {
                &xl.time_ids
            };
            self.time_ids.push(ids.shallow_clone());
        }
        if let Some(dim) = time_cond_dim {
            self.conds
                .push(guidance_embedding(c.guidance - 1.0, b, dim));
        }
    }

    fn forward(&self, unet: &UNet) -> sd_models::Result<Tensor> {
        let cat = |v: &[Tensor]| (!v.is_empty()).then(|| Tensor::cat(v, 0));
        let (text_embeds, time_ids, cond) = (
            cat(&self.text_embeds),
            cat(&self.time_ids),
            cat(&self.conds),
        );
        // Each half's rows get its own adapters (the base projection runs
        // once for all rows; see sd_models::lora).
        let mut spans = Vec::new();
        let mut start = 0;
        for (rows, set) in &self.loras {
            spans.push(Span {
                start,
                len: *rows,
                set: set.clone(),
            });
            start += rows;
        }
        lora::with_plan(Plan::rows(start, spans), || {
            unet.forward_with(
                &Tensor::cat(&self.xs, 0),
                &Tensor::cat(&self.ts, 0),
                &Tensor::cat(&self.ctxs, 0),
                sd_models::Added {
                    text_embeds: text_embeds.as_ref(),
                    time_ids: time_ids.as_ref(),
                    timestep_cond: cond.as_ref(),
                },
            )
        })
    }
}

/// Rows of one forward: their text's token count, the inputs, and whose
/// halves they are (call index, uncond half).
type Group = (i64, Inputs, Vec<(usize, bool)>);

/// Run several calls as one UNet forward — one per token count of their
/// texts — (classifier-free guidance per
/// call: uncond + g · (cond − uncond); an LCM UNet takes the guidance as an
/// embedding instead); outputs in call order, on the host.
/// On a GPU the forward runs asynchronously: copying the results back here
/// makes the caller's timing the forward's real time, and no gRPC I/O
/// thread later blocks on the device when it serialises a result.
pub fn forward_calls(unet: &UNet, calls: &[&Call]) -> sd_models::Result<Vec<Tensor>> {
    // Rows whose text conditionings have the same number of tokens go in
    // one forward; a call whose prompt and negative prompt differ in length
    // (AUTOMATIC1111's syntax) has its halves in two, as A1111 runs them.
    let mut groups: Vec<Group> = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        let halves: &[bool] = if c.uncond.is_some() {
            &[true, false]
        } else {
            &[false]
        };
        for &uncond_half in halves {
            let ctx = if uncond_half {
                c.uncond.as_ref()
            } else {
                Some(&c.cond)
            };
            let tokens = ctx.map_or(0, |t| t.size()[1]);
            let at = match groups.iter().position(|g| g.0 == tokens) {
                Some(at) => at,
                None => {
                    groups.push((tokens, Inputs::default(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[at].1.add_half(c, uncond_half, unet.time_cond_dim());
            groups[at].2.push((i, uncond_half));
        }
    }
    // Each call's (uncond, cond) outputs.
    let mut halves: Vec<(Option<Tensor>, Option<Tensor>)> =
        calls.iter().map(|_| (None, None)).collect();
    for (_, inputs, members) in &groups {
        let out = inputs.forward(unet)?;
        let mut offset = 0;
        for &(i, uncond_half) in members {
            let b = calls[i].batch();
            let part = out.narrow(0, offset, b);
            offset += b;
            if uncond_half {
                halves[i].0 = Some(part);
            } else {
                halves[i].1 = Some(part);
            }
        }
    }
    calls
        .iter()
        .zip(halves)
        .map(|(c, (u, cond))| {
            let cond = cond.ok_or_else(|| {
                sd_models::ModelError::Input("a call's conditioned rows were not computed".into())
            })?;
            let guided = match u {
                Some(u) => &u + (&cond - &u) * c.guidance,
                None => cond,
            };
            Ok(guided.f_to_device(tch::Device::Cpu)?)
        })
        .collect()
}

/// diffusers' postprocess: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded.
pub fn to_rgb8(pixels: &Tensor) -> Result<Vec<RgbImage>, ServiceError> {
    let (b, _, h, w) = pixels.size4()?;
    let rgb = (pixels.to_kind(Kind::Float) / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .to_device(tch::Device::Cpu)
        .permute([0, 2, 3, 1])
        .multiply_scalar(255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous();
    let per = (h * w * 3) as usize;
    let total = per * b as usize;
    let mut bytes = vec![0u8; total];
    rgb.f_copy_data_u8(&mut bytes, total)?;
    Ok(bytes
        .chunks_exact(per)
        .map(|c| RgbImage {
            width: w as u32,
            height: h as u32,
            rgb: c.to_vec().into(),
        })
        .collect())
}

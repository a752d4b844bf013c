//! Model work shared by the services and the in-process benchmark pipeline:
//! guided calls of the denoising network (several merged into one forward)
//! and diffusers' image postprocessing.

use std::sync::Arc;

use sd_models::flux2::References;
use sd_models::ip_adapter::{self, IpRows};
use sd_models::lora::{self, Applied, Plan, Span};
use sd_models::{Conditioning, Denoiser, GuidanceInput};
use sd_proto::v1::RgbImage;
use tch::{Kind, Tensor};

use crate::control::{self, Control, ControlInputs, RowControls};
use crate::ServiceError;

/// One half of a guided call (its conditional or unconditional rows): what
/// those rows are conditioned on, for any family.
pub struct Half {
    /// (1 or B, tokens, dim)
    pub context: Tensor,
    /// The pooled text embedding, (1 or B, pooled): SDXL.
    pub pooled: Option<Tensor>,
    /// The family's vector per latent, (B, n): SDXL's time ids.
    pub time_ids: Option<Tensor>,
}

impl Half {
    /// Text embeddings alone.
    pub fn text(context: Tensor) -> Self {
        Half {
            context,
            pooled: None,
            time_ids: None,
        }
    }
}

/// One Predict's tensors, checked.
pub struct Call {
    /// (B, C, h, w)
    pub latents: Tensor,
    /// (B,)
    pub timesteps: Tensor,
    pub cond: Half,
    /// Present when guided (classifier-free: a second row per latent).
    pub uncond: Option<Half>,
    pub guidance: f64,
    /// What a guidance-distilled network takes as its input (FLUX.1-dev);
    /// None: an LCM UNet's embedding comes from `guidance`.
    pub embedded_guidance: Option<f64>,
    /// Image conditioning taken beside the latents (an inpainting
    /// network's mask and masked-image latents), (B, extra, h, w).
    pub image: Option<Tensor>,
    /// LoRA adapters for this call's rows (empty: the base network).
    pub loras: Arc<[Applied]>,
    /// FLUX.2 Klein's reference images, attended to by every row.
    pub references: Option<ReferenceTokens>,
    /// ControlNets on this call's rows (SD and SDXL UNets, FLUX.1).
    pub controls: Vec<Control>,
    /// IP-Adapters on this call's rows (SD and SDXL UNets).
    pub ip: Vec<crate::ip::IpControl>,
}

/// Reference images' tokens for a call: (1, n, channels) and their
/// positions (n, 4). Clones share the tensors' storage.
pub struct ReferenceTokens {
    pub tokens: Tensor,
    pub ids: Tensor,
}

impl Clone for ReferenceTokens {
    fn clone(&self) -> Self {
        ReferenceTokens {
            tokens: self.tokens.shallow_clone(),
            ids: self.ids.shallow_clone(),
        }
    }
}

impl ReferenceTokens {
    /// Tokens per row.
    pub fn len(&self) -> i64 {
        self.ids.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether two calls' references sit at the same positions (then their
    /// rows share one forward).
    fn same_layout(&self, other: &ReferenceTokens) -> bool {
        self.ids.size() == other.ids.size() && self.ids.equal(&other.ids)
    }
}

impl Call {
    pub fn batch(&self) -> i64 {
        self.latents.size()[0]
    }

    /// Network rows this call needs (twice its batch when guided).
    pub fn rows(&self) -> i64 {
        self.batch() * if self.uncond.is_some() { 2 } else { 1 }
    }

    /// Latent positions (height × width) and the reference tokens every
    /// row attends to beside them: what a forward's cost grows with.
    pub fn positions(&self) -> u64 {
        let s = self.latents.size();
        let refs = self.references.as_ref().map_or(0, ReferenceTokens::len);
        (s[2] * s[3] + refs).max(0) as u64
    }

    /// Rows' worth of ControlNet work on this call, in UNet rows: each
    /// control's measured cost ratio times the rows it runs on (what a
    /// forward's time is shared with, for the cost model).
    pub fn control_rows(&self) -> f64 {
        self.controls
            .iter()
            .map(|c| {
                // A FLUX ControlNet's unconditional rows copy the
                // conditional rows' samples: it runs on those alone.
                let uncond = self.uncond.is_some()
                    && c.uncond_scale != 0.0
                    && !(c.net.item.takes_latents() && c.scale == c.uncond_scale);
                let halves = f64::from(u8::from(c.scale != 0.0)) + f64::from(u8::from(uncond));
                c.net.cost_ratio.unwrap_or(0.0) * halves * self.batch() as f64
            })
            .sum()
    }

    /// Calls merge when latents and text embeddings have the same shape
    /// past the batch, and as many reference tokens.
    pub fn key(&self) -> (Vec<i64>, Vec<i64>, i64) {
        (
            self.latents.size()[1..].to_vec(),
            self.cond.context.size()[1..].to_vec(),
            self.references.as_ref().map_or(0, ReferenceTokens::len),
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

/// The network's inputs for several calls, in diffusers' order within each
/// call ([uncond, cond]).
#[derive(Default)]
struct Inputs {
    xs: Vec<Tensor>,
    ts: Vec<Tensor>,
    ctxs: Vec<Tensor>,
    pooled: Vec<Tensor>,
    time_ids: Vec<Tensor>,
    guidance: Vec<Tensor>,
    images: Vec<Tensor>,
    /// Reference tokens per row, and their positions (the same for all).
    references: Vec<Tensor>,
    reference_ids: Option<Tensor>,
    /// Each half's rows and LoRA adapters, in order.
    loras: Vec<(i64, Arc<[Applied]>)>,
    /// Each half's rows and the ControlNets on them.
    controls: Vec<RowControls>,
    /// FLUX ControlNets' view: each half's first row, its call's
    /// conditional text and pooled embedding; each row's guidance value.
    cond: Vec<(i64, Tensor, Tensor)>,
    control_guidance: Vec<f32>,
    /// Rows attending to image prompts.
    ip: Vec<(i64, i64, crate::ip::IpControl, bool)>,
    /// Rows so far.
    rows: i64,
}

impl Inputs {
    /// One half of call `c` (number `call` of the forward's calls: its
    /// uncond rows, or its cond rows).
    fn add_half(
        &mut self,
        (call, c): (usize, &Call),
        uncond_half: bool,
        input: Option<GuidanceInput>,
    ) {
        let b = c.batch();
        let rows = |t: &Tensor| {
            let mut size = t.size();
            size[0] = b;
            t.expand(size, false)
        };
        self.xs.push(c.latents.shallow_clone());
        self.ts.push(c.timesteps.expand([b], false));
        self.loras.push((b, c.loras.clone()));
        self.controls.push(RowControls {
            start: self.rows,
            rows: b,
            controls: c
                .controls
                .iter()
                .map(|k| {
                    let s = if uncond_half { k.uncond_scale } else { k.scale };
                    (k.clone(), s)
                })
                .filter(|(_, s)| *s != 0.0)
                .collect(),
            depth: control::merged_depth(&c.controls),
            call,
            uncond: uncond_half,
        });
        for k in &c.ip {
            if k.scale != 0.0 {
                self.ip.push((self.rows, b, k.clone(), uncond_half));
            }
        }
        // What a FLUX ControlNet sees of the call (only its calls).
        let flux_controlled = c.controls.iter().any(|k| k.net.item.takes_latents());
        if let (true, Some(p)) = (flux_controlled, &c.cond.pooled) {
            self.cond.push((self.rows, rows(&c.cond.context), rows(p)));
        }
        let g = c.embedded_guidance.unwrap_or(c.guidance) as f32;
        self.control_guidance
            .extend(std::iter::repeat_n(g, b as usize));
        self.rows += b;
        let half = if uncond_half {
            c.uncond.as_ref()
        } else {
            Some(&c.cond)
        };
        if let Some(h) = half {
            self.ctxs.push(rows(&h.context));
            if let Some(p) = &h.pooled {
                self.pooled.push(rows(p));
            }
            if let Some(ids) = &h.time_ids {
                self.time_ids.push(ids.shallow_clone());
            }
        }
        if let Some(image) = &c.image {
            self.images.push(image.shallow_clone());
        }
        if let Some(r) = &c.references {
            self.references.push(rows(&r.tokens));
            self.reference_ids
                .get_or_insert_with(|| r.ids.shallow_clone());
        }
        match input {
            Some(GuidanceInput::Embedding(dim)) => {
                self.guidance
                    .push(guidance_embedding(c.guidance - 1.0, b, dim))
            }
            Some(GuidanceInput::Value) => {
                let g = c.embedded_guidance.unwrap_or(c.guidance) as f32;
                self.guidance.push(Tensor::from_slice(&vec![g; b as usize]));
            }
            None => {}
        }
    }

    fn forward(&self, net: &Denoiser) -> sd_models::Result<Tensor> {
        let cat = |v: &[Tensor]| (!v.is_empty()).then(|| Tensor::cat(v, 0));
        let (pooled, time_ids, guidance, image) = (
            cat(&self.pooled),
            cat(&self.time_ids),
            cat(&self.guidance),
            cat(&self.images),
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
        let context = Tensor::cat(&self.ctxs, 0);
        let (xs, ts) = (Tensor::cat(&self.xs, 0), Tensor::cat(&self.ts, 0));
        // The ControlNets first, outside the LoRA plan: adapters are the
        // denoiser's, not theirs.
        let control_guidance =
            (!self.cond.is_empty()).then(|| Tensor::from_slice(&self.control_guidance));
        let control = control::residuals(
            &self.controls,
            &ControlInputs {
                latents: &xs,
                timesteps: &ts,
                context: &context,
                pooled: pooled.as_ref(),
                time_ids: time_ids.as_ref(),
                flux: net
                    .flux_blocks()
                    .zip(control_guidance.as_ref())
                    .map(|(blocks, guidance)| control::FluxInputs {
                        cond: &self.cond,
                        guidance,
                        blocks,
                    }),
            },
        )?;
        let reference_tokens = cat(&self.references);
        let references = reference_tokens
            .as_ref()
            .zip(self.reference_ids.as_ref())
            .map(|(tokens, ids)| References { tokens, ids });
        let ip = self
            .ip
            .iter()
            .map(|(start, len, k, uncond)| IpRows {
                start: *start,
                len: *len,
                adapter: k.adapter.item.clone(),
                tokens: if *uncond {
                    k.uncond.shallow_clone()
                } else {
                    k.cond.shallow_clone()
                },
                scale: k.scale,
            })
            .collect();
        // Image prompts and LoRA adapters are the UNet's alone: planned
        // around its forward, after the ControlNets ran.
        ip_adapter::with_plan(ip, || {
            lora::with_plan(Plan::rows(start, spans), || {
                net.forward(
                    &xs,
                    &ts,
                    Conditioning {
                        context: &context,
                        pooled: pooled.as_ref(),
                        time_ids: time_ids.as_ref(),
                        guidance: guidance.as_ref(),
                        image: image.as_ref(),
                        control: control.as_ref(),
                        references,
                    },
                )
            })
        })
    }
}

/// Rows of one forward: their text's token count, the call whose
/// reference layout they share (if any), the inputs, and whose halves they
/// are (call index, uncond half).
type Group = (i64, Option<usize>, Inputs, Vec<(usize, bool)>);

/// Run several calls as one forward of the network — one per token count
/// of their texts — (classifier-free guidance per call: uncond + g ·
/// (cond − uncond); a network with embedded guidance takes it as an input
/// instead); outputs in call order, on the host.
/// On a GPU the forward runs asynchronously: copying the results back here
/// makes the caller's timing the forward's real time, and no gRPC I/O
/// thread later blocks on the device when it serialises a result.
pub fn forward_calls(net: &Denoiser, calls: &[&Call]) -> sd_models::Result<Vec<Tensor>> {
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
            let half = if uncond_half {
                c.uncond.as_ref()
            } else {
                Some(&c.cond)
            };
            let tokens = half.map_or(0, |h| h.context.size()[1]);
            // Rows with references share a forward only with rows whose
            // references sit at the same positions.
            let layout = c.references.as_ref().map(|_| i);
            let fits = |g: &Group| {
                g.0 == tokens
                    && match (g.1, &c.references) {
                        (None, None) => true,
                        (Some(j), Some(r)) => calls[j]
                            .references
                            .as_ref()
                            .is_some_and(|o| o.same_layout(r)),
                        _ => false,
                    }
            };
            let at = match groups.iter().position(fits) {
                Some(at) => at,
                None => {
                    groups.push((tokens, layout, Inputs::default(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[at]
                .2
                .add_half((i, c), uncond_half, net.guidance_input());
            groups[at].3.push((i, uncond_half));
        }
    }
    // Each call's (uncond, cond) outputs.
    let mut halves: Vec<(Option<Tensor>, Option<Tensor>)> =
        calls.iter().map(|_| (None, None)).collect();
    for (_, _, inputs, members) in &groups {
        let out = inputs.forward(net)?;
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

//! Hires fix's second pass (see `crate::hires`): the first pass's latents
//! enlarged — in latent space, or decoded, resized and encoded again —
//! then noised with a fresh generator of the same seed to the start of
//! the second pass's schedule and denoised at the larger size.

use std::time::Instant;

use sd_runtime::deadline::Deadline;
use sd_sampling::TorchGenerator;
use tokio::sync::mpsc;

use super::denoise::{Denoising, Previews};
use super::latents::{LatentShape, Start};
use super::{Event, Generator, Stop};
use crate::error::{Error, Result};
use crate::hires::{crop_latents, upscale_latents, HiresPlan, Upscaler};
use crate::plan::InitImage;

/// What the second pass shares with the first.
pub(super) struct Pass<'a> {
    pub lora_key: &'a str,
    pub events: Option<&'a mpsc::Sender<Event>>,
    pub stop: Option<Stop>,
    pub deadline: &'a Deadline,
    pub started: Instant,
    pub replay: Option<super::Replay>,
}

impl Generator {
    /// The second pass over the first pass's `latents` (of `shape`): the
    /// final latents and their shape.
    pub(super) async fn hires_pass(
        &self,
        hires: HiresPlan,
        latents: Vec<f32>,
        shape: LatentShape,
        pass: Pass<'_>,
    ) -> Result<(Vec<f32>, LatentShape)> {
        let second = *hires.second;
        let big = LatentShape::of(&second, &self.facts);
        let dims = (shape.images, shape.channels, shape.height, shape.width);
        let (lh, lw) = hires.latent_size;
        let enlarged = match hires.upscaler {
            Upscaler::Latent { mode, antialias } => {
                upscale_latents(&latents, dims, (lh, lw), mode, antialias)
            }
            Upscaler::Image { nearest } => {
                self.enlarge_images(latents, shape, (lh, lw), nearest, pass.deadline)
                    .await?
            }
        };
        let upscaled = crop_latents(
            &enlarged,
            (shape.images, shape.channels, lh, lw),
            (big.height, big.width),
        );
        let mut text = self
            .condition(&second, pass.lora_key, pass.deadline)
            .await?;
        self.add_references(&second.references, &mut text, pass.deadline)
            .await?;
        // The ControlNets steer this pass too, their hints made at its size
        // and their windows over its own steps (A1111's counter restarts).
        super::add_controls(&second.controls, None, &mut text);
        self.add_ip_adapters(&second.ip_adapters, &mut text, pass.deadline)
            .await?;
        // A1111: fresh generators from the same seed, at the larger shape.
        let mut rng = TorchGenerator::new(second.seed);
        let noise = rng.randn(big.len());
        let start = Start {
            first: hires.first,
            latents: second.schedule.add_noise(&upscaled, &noise, hires.first),
            inpaint: None,
        };
        let steps = Denoising {
            generator: self,
            text,
            rng,
            shape: big,
            events: pass.events,
            deadline: pass.deadline,
            previews: Previews::of(&second),
            started: pass.started,
            stop: pass.stop,
            loras: second.loras.clone(),
            controls: second.controls.clone(),
            ip_adapters: second.ip_adapters.clone(),
            replay: pass.replay,
        };
        Ok((steps.run(second.schedule, start).await?, big))
    }

    /// The first pass decoded, each image resized to `(lh, lw)` latents'
    /// pixels (Pillow's Lanczos, after nearest-neighbour enlarging for
    /// `nearest`) and encoded again (the latent distribution's mean:
    /// A1111 samples it from an unseeded generator).
    async fn enlarge_images(
        &self,
        latents: Vec<f32>,
        shape: LatentShape,
        (lh, lw): (usize, usize),
        nearest: bool,
        deadline: &Deadline,
    ) -> Result<Vec<f32>> {
        let pixels = self
            .decode(shape.tensor(latents), shape.images as u32, deadline)
            .await?;
        let s = self.facts.layout.scale_factor;
        let (w, h) = (lw as u32 * s, lh as u32 * s);
        let one = LatentShape {
            images: 1,
            height: lh,
            width: lw,
            ..shape
        };
        let crate::facts::Normalization { scale, shift } = self.facts.normalization;
        let mut out = Vec::with_capacity(shape.images * one.per_image());
        for p in pixels {
            let img = image::RgbImage::from_raw(p.width, p.height, p.rgb)
                .ok_or_else(|| Error::Internal("a decoded image of the wrong size".into()))?;
            let img = if nearest {
                image::imageops::resize(&img, w, h, image::imageops::FilterType::Nearest)
            } else {
                crate::resample::resize_lanczos(&img, w, h)
            };
            let init = InitImage {
                pixels: crate::images::normalized(&img)?,
            };
            let (mean, _std) = self.encode_init_image(&init, &one, deadline).await?;
            out.extend(mean.data.iter().map(|m| scale * (m - shift)));
        }
        Ok(out)
    }
}

//! Where the steps start: seeded noise scaled for the scheduler
//! (text-to-image), or the init image's latents noised to the timestep
//! `strength` leaves (image-to-image), drawn from the generator in
//! diffusers' order so a seed gives diffusers' image.

use std::time::Instant;

use sd_proto::v1::{Dtype, EncodeImageRequest, MaskedContent};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Phase;
use sd_sampling::{Scheduler, TorchGenerator};
use tracing::Instrument;

use super::Generator;
use crate::error::{Error, Result, Stage};
use crate::facts::ModelFacts;
use crate::plan::{InitImage, Plan};

/// The latents of one generation: (images, channels, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    pub images: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentShape {
    pub fn of(plan: &Plan, facts: &ModelFacts) -> Self {
        let f = facts.layout.scale_factor;
        LatentShape {
            images: plan.num_images as usize,
            channels: facts.layout.latent_channels,
            height: (plan.height / f) as usize,
            width: (plan.width / f) as usize,
        }
    }

    pub fn dims(&self) -> Vec<i64> {
        [self.images, self.channels, self.height, self.width]
            .iter()
            .map(|&d| d as i64)
            .collect()
    }

    /// Values per image.
    pub fn per_image(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Values in all.
    pub fn len(&self) -> usize {
        self.images * self.per_image()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `data` as a tensor of this shape.
    pub fn tensor(&self, data: Vec<f32>) -> HostTensor {
        HostTensor {
            shape: self.dims(),
            data,
        }
    }
}

/// The latents the steps start from, and the index of the first timestep.
pub(super) struct Start {
    pub first: usize,
    pub latents: Vec<f32>,
    /// Inpainting: what the steps blend, and a 9-channel network's inputs.
    pub inpaint: Option<Inpainting>,
}

/// How the steps keep the unmasked part of the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blend {
    /// An inpainting network is given the mask; nothing is blended
    /// (diffusers with a 9-channel UNet).
    Nothing,
    /// diffusers with an ordinary network: after each step the picture,
    /// re-noised to the next timestep, replaces the kept part.
    AfterStep,
    /// AUTOMATIC1111: each step's denoised prediction is the picture where
    /// the mask keeps, and the final latents are too.
    Denoised,
}

/// One inpainting generation's state for the steps (all of the latents'
/// length: images × channels × h × w).
pub(super) struct Inpainting {
    pub blend: Blend,
    /// The picture's latents, for each image.
    pub image: Vec<f32>,
    /// The noise the start was drawn with (diffusers re-noises with it).
    pub noise: Vec<f32>,
    /// 1 where the mask repaints, 0 where it keeps.
    pub repaint: Vec<f32>,
    /// A 9-channel network's `mask` and `masked_image_latents`, sent once.
    pub conditioning: Option<(HostTensor, HostTensor)>,
}

impl Inpainting {
    /// diffusers' blend after the step at index `i` of `timesteps` timesteps.
    pub fn after_step(
        &self,
        scheduler: &dyn Scheduler,
        latents: &mut [f32],
        i: usize,
        timesteps: usize,
    ) {
        if self.blend != Blend::AfterStep {
            return;
        }
        let proper = if i + 1 < timesteps {
            scheduler.add_noise(&self.image, &self.noise, i + 1)
        } else {
            self.image.clone()
        };
        for ((l, p), m) in latents.iter_mut().zip(&proper).zip(&self.repaint) {
            *l = (1.0 - m) * p + m * *l;
        }
    }

    /// AUTOMATIC1111's blend of the prediction at index `i` for `latents`.
    pub fn prediction(
        &self,
        scheduler: &dyn Scheduler,
        output: Vec<f32>,
        latents: &[f32],
        i: usize,
    ) -> Vec<f32> {
        if self.blend != Blend::Denoised {
            return output;
        }
        let keep: Vec<f32> = self.repaint.iter().map(|m| 1.0 - m).collect();
        sd_sampling::blend_denoised(scheduler, &output, latents, i, &self.image, &keep)
    }

    /// AUTOMATIC1111's last blend: the picture's latents where the mask keeps.
    pub fn finish(&self, latents: &mut [f32]) {
        if self.blend != Blend::Denoised {
            return;
        }
        for ((l, p), m) in latents.iter_mut().zip(&self.image).zip(&self.repaint) {
            *l = (1.0 - m) * p + m * *l;
        }
    }
}

impl Generator {
    pub(super) async fn initial_latents(
        &self,
        plan: &Plan,
        shape: &LatentShape,
        rng: &mut TorchGenerator,
        deadline: &Deadline,
    ) -> Result<Start> {
        let scheduler = &*plan.schedule;
        match &plan.init {
            None => {
                let sigma = scheduler.init_noise_sigma();
                let latents = rng.randn(shape.len()).into_iter().map(|v| v * sigma);
                Ok(Start {
                    first: 0,
                    latents: latents.collect(),
                    inpaint: None,
                })
            }
            Some(init) if plan.inpaint.is_some() => {
                self.inpaint_latents(plan, init, shape, rng, deadline).await
            }
            Some(init) => {
                let first = scheduler.start_index(plan.steps, plan.strength);
                let (mean, std) = self.encode_init_image(init, shape, deadline).await?;
                let image = InitLatents {
                    mean: &mean,
                    std: &std,
                    normalization: self.facts.normalization,
                };
                let latents = noised(scheduler, image, shape, rng, first);
                Ok(Start {
                    first,
                    latents,
                    inpaint: None,
                })
            }
        }
    }

    /// diffusers' inpainting start (StableDiffusion(XL)InpaintPipeline,
    /// FluxInpaintPipeline), in their order of draws from the generator:
    /// the picture's latents (unless a 9-channel network starts from pure
    /// noise), the noise, the masked picture's latents (drawn even where an
    /// ordinary network does not use them, as diffusers encodes them
    /// anyway). At strength 1 an SD-family start is pure noise; FLUX's is
    /// the picture noised to σ = 1, which is the same. AUTOMATIC1111's
    /// options on top: latent fills of the masked part and a noise
    /// multiplier.
    async fn inpaint_latents(
        &self,
        plan: &Plan,
        init: &InitImage,
        shape: &LatentShape,
        rng: &mut TorchGenerator,
        deadline: &Deadline,
    ) -> Result<Start> {
        let Some(inpaint) = &plan.inpaint else {
            return Err(Error::Internal("inpaint_latents without a mask".into()));
        };
        let scheduler = &*plan.schedule;
        let nine = self.facts.layout.image_channels() > 0;
        let first = scheduler.start_index(plan.steps, plan.strength);
        let pure_noise = plan.strength >= 1.0 && !plan.flow && !inpaint.blend_denoised;
        let normalization = self.facts.normalization;
        let f = self.facts.layout.scale_factor;
        let picture = if !nine || !pure_noise {
            let (mean, std) = self.encode_init_image(init, shape, deadline).await?;
            sample(&mean, &std, normalization, rng)
        } else {
            vec![0.0; shape.per_image()]
        };
        let mut image: Vec<f32> = picture.iter().copied().cycle().take(shape.len()).collect();
        let plane = shape.height * shape.width;
        let per_latent =
            |m: &[f32]| -> Vec<f32> { (0..shape.len()).map(|i| m[i % plane]).collect() };
        let repaint = per_latent(&if inpaint.blend_denoised {
            inpaint.mask.latent_a1111(f)
        } else {
            inpaint.mask.latent_nearest(f)
        });
        let noise: Vec<f32> = rng
            .randn(shape.len())
            .into_iter()
            .map(|v| v * inpaint.noise_multiplier)
            .collect();
        match inpaint.masked_content {
            MaskedContent::Original => {}
            MaskedContent::LatentNoise => {
                let fresh = rng.randn(shape.len());
                for ((v, m), n) in image.iter_mut().zip(&repaint).zip(fresh) {
                    *v = (1.0 - m) * *v + m * n;
                }
            }
            MaskedContent::LatentNothing => {
                for (v, m) in image.iter_mut().zip(&repaint) {
                    *v *= 1.0 - m;
                }
            }
        }
        let latents = if pure_noise {
            let sigma = scheduler.init_noise_sigma();
            noise.iter().map(|v| v * sigma).collect()
        } else {
            scheduler.add_noise(&image, &noise, first)
        };
        let masked = InitImage {
            pixels: inpaint.mask.masked_image(&init.pixels),
        };
        let conditioning = if nine {
            let (mean, std) = self.encode_init_image(&masked, shape, deadline).await?;
            let latents = sample(&mean, &std, normalization, rng);
            let (h, w) = (shape.height as i64, shape.width as i64);
            let mask = HostTensor {
                shape: vec![1, 1, h, w],
                data: inpaint.mask.latent_nearest(f),
            };
            let masked = HostTensor {
                shape: vec![1, shape.channels as i64, h, w],
                data: latents,
            };
            Some((mask, masked))
        } else {
            // diffusers encodes the masked picture whatever the network:
            // its draw moves the generator on.
            rng.randn(shape.per_image());
            None
        };
        let blend = if inpaint.blend_denoised {
            Blend::Denoised
        } else if nine {
            Blend::Nothing
        } else {
            Blend::AfterStep
        };
        Ok(Start {
            first,
            latents,
            inpaint: Some(Inpainting {
                blend,
                image,
                noise,
                repaint,
                conditioning,
            }),
        })
    }

    /// The init image's latent distribution (mean, std), from the VAE encoder.
    pub(super) async fn encode_init_image(
        &self,
        init: &InitImage,
        shape: &LatentShape,
        deadline: &Deadline,
    ) -> Result<(HostTensor, HostTensor)> {
        let request = EncodeImageRequest {
            pixels: Some(init.pixels.to_wire(Dtype::Float32)),
        };
        let started = Instant::now();
        let span = tracing::info_span!("vae_encode", replica = tracing::field::Empty);
        let dist = self
            .stages
            .encode_image(request, deadline)
            .instrument(span)
            .await?;
        self.metrics.step(Phase::EncodeImage, started.elapsed());
        let part = |t: Option<sd_proto::v1::Tensor>, name: &str| {
            let t = t.ok_or_else(|| Error::bad_reply(Stage::Autoencoder, format!("no {name}")))?;
            let t = HostTensor::from_wire(&t)
                .map_err(|e| Error::bad_reply(Stage::Autoencoder, format!("{name}: {e}")))?;
            if t.numel() != shape.per_image() {
                return Err(Error::bad_reply(
                    Stage::Autoencoder,
                    format!(
                        "{name} of {} values for latents of {}",
                        t.numel(),
                        shape.per_image()
                    ),
                ));
            }
            Ok(t)
        };
        Ok((part(dist.mean, "mean")?, part(dist.std, "std")?))
    }
}

impl Generator {
    /// FLUX.2 Klein's reference images as the transformer takes them: each
    /// encoded (the distribution's mean, in the denoiser's space: the
    /// pipeline's `sample_mode="argmax"`), packed as tokens with their
    /// positions; sent once per generation as session tensors.
    pub(super) async fn add_references(
        &self,
        references: &[crate::reference::Reference],
        text: &mut super::text::Text,
        deadline: &Deadline,
    ) -> Result<()> {
        if references.is_empty() {
            return Ok(());
        }
        let sf = self.facts.layout.scale_factor.max(1) as usize;
        let crate::facts::Normalization { scale, shift } = self.facts.normalization;
        let mut latents = Vec::with_capacity(references.len());
        for r in references {
            let (h, w) = (r.height as usize / sf, r.width as usize / sf);
            let shape = LatentShape {
                images: 1,
                channels: self.facts.layout.latent_channels,
                height: h,
                width: w,
            };
            let init = InitImage {
                pixels: r.pixels.clone(),
            };
            let (mean, _std) = self.encode_init_image(&init, &shape, deadline).await?;
            let data = mean.data.iter().map(|m| scale * (m - shift)).collect();
            latents.push(shape.tensor(data));
        }
        let (tokens, ids) = crate::reference::pack(&latents)?;
        text.add_session_tensor("reference_tokens", tokens.to_wire(self.wire));
        text.add_session_tensor("reference_ids", ids.to_wire(Dtype::Float32));
        Ok(())
    }
}

/// diffusers' prepare_latents for image-to-image: one sample of the init
/// image's distribution, normalised as the autoencoder says (`(sample -
/// shift) * scale`), repeated for each image, noised to timestep index
/// `first`.
struct InitLatents<'a> {
    mean: &'a HostTensor,
    std: &'a HostTensor,
    normalization: crate::facts::Normalization,
}

fn noised(
    scheduler: &dyn Scheduler,
    image: InitLatents<'_>,
    shape: &LatentShape,
    rng: &mut TorchGenerator,
    first: usize,
) -> Vec<f32> {
    let one = sample(image.mean, image.std, image.normalization, rng);
    let init: Vec<f32> = one.iter().copied().cycle().take(shape.len()).collect();
    let noise = rng.randn(shape.len());
    scheduler.add_noise(&init, &noise, first)
}

/// One sample of a latent distribution (mean, std), drawn from `rng` as
/// diffusers' `latent_dist.sample(generator)`, normalised as the
/// autoencoder says (`(sample − shift) · scale`).
pub(super) fn sample(
    mean: &HostTensor,
    std: &HostTensor,
    normalization: crate::facts::Normalization,
    rng: &mut TorchGenerator,
) -> Vec<f32> {
    let draw = rng.randn(mean.data.len());
    let crate::facts::Normalization { scale, shift } = normalization;
    mean.data
        .iter()
        .zip(&std.data)
        .zip(draw)
        .map(|((m, s), d)| scale * ((m + s * d) - shift))
        .collect()
}

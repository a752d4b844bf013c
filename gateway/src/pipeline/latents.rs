//! Where the steps start: seeded noise scaled for the scheduler
//! (text-to-image), or the init image's latents noised to the timestep
//! `strength` leaves (image-to-image), drawn from the generator in
//! diffusers' order so a seed gives diffusers' image.

use std::time::Instant;

use sd_proto::v1::{Dtype, EncodeImageRequest};
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
                })
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
                Ok(Start { first, latents })
            }
        }
    }

    /// The init image's latent distribution (mean, std), from the VAE encoder.
    async fn encode_init_image(
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
    let per_image = shape.per_image();
    let sample = rng.randn(per_image);
    let (mean, std) = (&image.mean.data, &image.std.data);
    let crate::facts::Normalization { scale, shift } = image.normalization;
    let one: Vec<f32> = (0..per_image)
        .map(|i| scale * ((mean[i] + std[i] * sample[i]) - shift))
        .collect();
    let init: Vec<f32> = one.iter().copied().cycle().take(shape.len()).collect();
    let noise = rng.randn(shape.len());
    scheduler.add_noise(&init, &noise, first)
}

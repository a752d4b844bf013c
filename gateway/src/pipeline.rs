//! One generation, as diffusers' StableDiffusion(Img2Img)Pipeline runs it,
//! with the networks behind gRPC: encode the prompts, draw the initial
//! latents from the seeded generator, one Predict per timestep with the
//! scheduler between them, one Decode at the end.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use sd_proto::v1::{
    DecodeRequest, Dtype, Embedding, EncodeImageRequest, EncodeTextRequest, GenerateResponse,
    GeneratedImage, ImageFormat, PredictRequest, PreviewMode, Tensor as WireTensor,
};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::{Metrics, Stage};
use sd_sampling::schedulers::{build, SchedulerOptions};
use sd_sampling::TorchGenerator;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::backends::ModelFacts;
use crate::images;
use crate::plan::Plan;
use crate::prompt_cache::{CachedEmbedding, PromptCache, PromptKey};
use crate::stages::{Stages, StepSession};

/// What a streaming client hears while its images form.
#[derive(Debug)]
pub enum Event {
    Progress {
        step: u32,
        total: u32,
        timestep: f32,
        elapsed: f64,
    },
    Preview {
        step: u32,
        images: Vec<GeneratedImage>,
    },
}

/// Runs generations against the model services.
#[derive(Clone)]
pub struct Generator {
    pub stages: Arc<dyn Stages>,
    pub facts: Arc<ModelFacts>,
    pub cache: Arc<Mutex<PromptCache>>,
    pub metrics: Arc<Metrics>,
    /// Element type of the latents and predictions sent to and from the
    /// denoiser each step (float16 halves the bytes per step).
    pub wire: Dtype,
}

fn wire_err(field: &str) -> impl Fn(sd_proto::WireError) -> Status + '_ {
    move |e| Status::internal(format!("{field} from a model service: {e}"))
}

/// A text conditioning for Predict: sent in full the first time.
struct Conditioning {
    embedding: CachedEmbedding,
    sent: bool,
}

/// What guides every step: the prompt, the negative prompt (when guided)
/// and the guidance scale.
struct Text {
    cond: Conditioning,
    uncond: Option<Conditioning>,
    guidance: f32,
}

impl Conditioning {
    fn message(&self) -> Embedding {
        Embedding {
            id: self.embedding.id.clone(),
            tensor: (!self.sent).then(|| self.embedding.tensor.clone()),
        }
    }
}

fn is_embedding_miss(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.metadata().contains_key("sd-embedding-miss")
}

impl Generator {
    /// Embeddings for each (prompt, clip_skip), from the cache or one Encode call.
    async fn embeddings(
        &self,
        wanted: &[(&str, u32)],
        deadline: &Deadline,
    ) -> Result<Vec<CachedEmbedding>, Status> {
        let keys: Vec<PromptKey> = wanted
            .iter()
            .map(|(p, skip)| PromptKey {
                model: self.facts.text_model_id.clone(),
                clip_skip: *skip,
                prompt: p.to_string(),
            })
            .collect();
        let mut found: Vec<Option<CachedEmbedding>> = {
            let mut cache = self
                .cache
                .lock()
                .map_err(|_| Status::internal("prompt cache poisoned"))?;
            keys.iter().map(|k| cache.get(k)).collect()
        };
        for f in &found {
            self.metrics.cache_lookup("prompt", f.is_some());
        }
        // Encode the misses, grouped by clip_skip (one call per group).
        let mut skips: Vec<u32> = keys
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(k, _)| k.clip_skip)
            .collect();
        skips.sort_unstable();
        skips.dedup();
        for skip in skips {
            let idx: Vec<usize> = (0..keys.len())
                .filter(|&i| found[i].is_none() && keys[i].clip_skip == skip)
                .collect();
            let prompts: Vec<String> = idx.iter().map(|&i| keys[i].prompt.clone()).collect();
            let msg = EncodeTextRequest {
                prompts,
                clip_skip: skip,
                dtype: Dtype::Float32 as i32,
            };
            let resp = self
                .stages
                .encode_text(msg, deadline)
                .instrument(tracing::info_span!(
                    "text_encode",
                    clip_skip = skip,
                    replica = tracing::field::Empty
                ))
                .await?;
            if resp.prompts.len() != idx.len() {
                return Err(Status::internal(
                    "text encoder returned the wrong number of embeddings",
                ));
            }
            for (&i, enc) in idx.iter().zip(resp.prompts) {
                let mut tensor = enc
                    .embeddings
                    .ok_or_else(|| Status::internal("text encoder sent no embeddings"))?;
                sd_proto::wire::validate(&tensor).map_err(wire_err("embeddings"))?;
                tensor.shape.insert(0, 1);
                let e = CachedEmbedding {
                    id: keys[i].embedding_id(),
                    tensor,
                };
                if let Ok(mut cache) = self.cache.lock() {
                    cache.insert(keys[i].clone(), e.clone());
                }
                found[i] = Some(e);
            }
        }
        found
            .into_iter()
            .map(|f| f.ok_or_else(|| Status::internal("prompt embedding missing")))
            .collect()
    }

    /// One step, resending the embeddings if the denoiser lost them.
    async fn predict(
        &self,
        steps: &mut (dyn StepSession + '_),
        latents: WireTensor,
        timestep: f32,
        text: &mut Text,
        steps_after: u32,
    ) -> Result<HostTensor, Status> {
        let Text {
            cond,
            uncond,
            guidance,
        } = text;
        let guidance = *guidance;
        for attempt in 0..2 {
            let req = PredictRequest {
                latents: Some(latents.clone()),
                timesteps: vec![timestep],
                cond: Some(cond.message()),
                uncond: uncond.as_ref().map(Conditioning::message),
                guidance_scale: guidance,
                output_dtype: self.wire as i32,
                session_id: 0,
                steps_after,
                trace_context: Default::default(),
            };
            let result = steps.step(req).await;
            match result {
                Ok(r) => {
                    cond.sent = true;
                    if let Some(u) = uncond.as_mut() {
                        u.sent = true;
                    }
                    let out = r
                        .output
                        .ok_or_else(|| Status::internal("denoiser sent no output"))?;
                    return HostTensor::from_wire(&out).map_err(wire_err("prediction"));
                }
                Err(s) if attempt == 0 && is_embedding_miss(&s) => {
                    tracing::debug!("denoiser lost an embedding; resending");
                    cond.sent = false;
                    if let Some(u) = uncond.as_mut() {
                        u.sent = false;
                    }
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::internal("denoiser kept losing the embeddings"))
    }

    async fn decode(
        &self,
        latents: &HostTensor,
        deadline: &Deadline,
    ) -> Result<Vec<(Vec<u8>, u32, u32)>, Status> {
        let msg = DecodeRequest {
            latents: Some(latents.to_wire(Dtype::Float32)),
        };
        let resp = self
            .stages
            .decode(msg, deadline)
            .instrument(tracing::info_span!(
                "decode",
                replica = tracing::field::Empty
            ))
            .await?;
        Ok(resp
            .images
            .into_iter()
            .map(|i| (i.rgb.to_vec(), i.width, i.height))
            .collect())
    }

    async fn preview(
        &self,
        plan: &Plan,
        latents: &HostTensor,
        shape: &[i64],
        deadline: &Deadline,
    ) -> Result<Vec<GeneratedImage>, Status> {
        let (c, h, w) = (shape[1] as usize, shape[2] as usize, shape[3] as usize);
        match plan.preview_mode {
            PreviewMode::Latent => (0..plan.num_images as usize)
                .map(|i| {
                    let per = c * h * w;
                    let data =
                        images::latent_preview(&latents.data[i * per..(i + 1) * per], c, h, w)?;
                    Ok(GeneratedImage {
                        data: data.into(),
                        format: ImageFormat::Png as i32,
                        width: w as u32,
                        height: h as u32,
                    })
                })
                .collect(),
            PreviewMode::Full => {
                let mut out = Vec::new();
                for (rgb, w, h) in self.decode(latents, deadline).await? {
                    let small = w as u64 * h as u64 <= images::INLINE_PIXELS;
                    let data =
                        images::off_thread(small, move || images::encode_png(&rgb, w, h, &[]))
                            .await?;
                    out.push(GeneratedImage {
                        data: data.into(),
                        format: ImageFormat::Png as i32,
                        width: w,
                        height: h,
                    });
                }
                Ok(out)
            }
        }
    }

    /// Run `plan`; progress and previews go to `events` when given. A
    /// closed `events` (the client went away) stops the loop.
    pub async fn run(
        &self,
        plan: Plan,
        events: Option<mpsc::Sender<Event>>,
        deadline: Deadline,
    ) -> Result<GenerateResponse, Status> {
        let deadline = &deadline;
        let start = Instant::now();
        let facts = &self.facts;
        let guided = plan.guidance > 1.0;
        // diffusers applies clip_skip to the prompt, not to the negative prompt.
        let mut wanted = vec![(plan.prompt.as_str(), plan.clip_skip)];
        if guided {
            wanted.push((plan.negative_prompt.as_str(), 0));
        }
        let text_start = Instant::now();
        let mut embeds = self.embeddings(&wanted, deadline).await?.into_iter();
        self.metrics.step(Stage::Text, text_start.elapsed());
        let mut text = Text {
            cond: Conditioning {
                embedding: embeds
                    .next()
                    .ok_or_else(|| Status::internal("no prompt embedding"))?,
                sent: false,
            },
            uncond: embeds.next().map(|embedding| Conditioning {
                embedding,
                sent: false,
            }),
            guidance: plan.guidance,
        };

        let mut scheduler = build(
            plan.scheduler,
            &facts.scheduler_config,
            plan.steps as usize,
            SchedulerOptions {
                karras: plan.karras,
                eta: plan.eta,
            },
        )
        .map_err(|e| Status::invalid_argument(format!("scheduler: {e}")))?;
        let f = facts.scale_factor;
        let shape = vec![
            plan.num_images as i64,
            facts.latent_channels as i64,
            (plan.height / f) as i64,
            (plan.width / f) as i64,
        ];
        let per_image: usize = shape[1..].iter().product::<i64>() as usize;
        let n = per_image * plan.num_images as usize;
        let mut rng = TorchGenerator::new(plan.seed);
        let timesteps = scheduler.timesteps().to_vec();

        let (first, mut latents) = match &plan.init {
            None => {
                let sigma = scheduler.init_noise_sigma();
                (
                    0,
                    rng.randn(n)
                        .into_iter()
                        .map(|v| v * sigma)
                        .collect::<Vec<f32>>(),
                )
            }
            Some(init) => {
                // diffusers' get_timesteps: skip the first (1 - strength) of the schedule.
                let steps = plan.steps as usize;
                let init_steps = ((steps as f32 * plan.strength) as usize).min(steps);
                let t_start = (steps - init_steps) * scheduler.order();
                let msg = EncodeImageRequest {
                    pixels: Some(init.pixels.to_wire(Dtype::Float32)),
                };
                let encode_start = Instant::now();
                let dist = self
                    .stages
                    .encode_image(msg, deadline)
                    .instrument(tracing::info_span!(
                        "vae_encode",
                        replica = tracing::field::Empty
                    ))
                    .await?;
                self.metrics
                    .step(Stage::EncodeImage, encode_start.elapsed());
                let mean =
                    HostTensor::from_wire(&dist.mean.ok_or_else(|| Status::internal("no mean"))?)
                        .map_err(wire_err("mean"))?;
                let std =
                    HostTensor::from_wire(&dist.std.ok_or_else(|| Status::internal("no std"))?)
                        .map_err(wire_err("std"))?;
                if mean.numel() != per_image || std.numel() != per_image {
                    return Err(Status::internal(format!(
                        "autoencoder latents {:?} do not match the expected {:?}",
                        mean.shape,
                        &shape[1..]
                    )));
                }
                let sample = rng.randn(per_image);
                let sf = facts.scaling_factor;
                let one: Vec<f32> = (0..per_image)
                    .map(|i| sf * (mean.data[i] + std.data[i] * sample[i]))
                    .collect();
                let init_latents: Vec<f32> = one.iter().copied().cycle().take(n).collect();
                let noise = rng.randn(n);
                (t_start, scheduler.add_noise(&init_latents, &noise, t_start))
            }
        };

        let total = (timesteps.len() - first) as u32;
        let mut steps = self.stages.steps(deadline);
        for (k, i) in (first..timesteps.len()).enumerate() {
            let t = timesteps[i] as f32;
            let input = HostTensor {
                shape: shape.clone(),
                data: scheduler.scale_model_input(&latents, i),
            };
            let step_start = Instant::now();
            let span = tracing::info_span!(
                "denoise_step",
                step = k + 1,
                timestep = t,
                batch = plan.num_images,
                guided,
                replica = tracing::field::Empty
            );
            let out = self
                .predict(
                    &mut *steps,
                    input.to_wire(self.wire),
                    t,
                    &mut text,
                    total - k as u32 - 1,
                )
                .instrument(span)
                .await?;
            self.metrics.step(Stage::Denoise, step_start.elapsed());
            if out.numel() != n {
                return Err(Status::internal(format!(
                    "denoiser output {:?} does not match {shape:?}",
                    out.shape
                )));
            }
            latents = scheduler.step(&out.data, i, &latents, &mut |m| rng.randn(m));
            let step = k as u32 + 1;
            if let Some(tx) = &events {
                let progress = Event::Progress {
                    step,
                    total,
                    timestep: t,
                    elapsed: start.elapsed().as_secs_f64(),
                };
                tx.send(progress)
                    .await
                    .map_err(|_| Status::cancelled("client went away"))?;
                if plan.preview_every > 0 && step.is_multiple_of(plan.preview_every) && step < total
                {
                    let current = HostTensor {
                        shape: shape.clone(),
                        data: latents.clone(),
                    };
                    let images = self.preview(&plan, &current, &shape, deadline).await?;
                    tx.send(Event::Preview { step, images })
                        .await
                        .map_err(|_| Status::cancelled("client went away"))?;
                }
            }
        }

        let params = plan.parameters();
        let decode_start = Instant::now();
        let decoded = self
            .decode(
                &HostTensor {
                    shape: shape.clone(),
                    data: latents,
                },
                deadline,
            )
            .await?;
        self.metrics.step(Stage::Decode, decode_start.elapsed());
        let output_start = Instant::now();
        let mut images = Vec::with_capacity(decoded.len());
        for (rgb, w, h) in decoded {
            let (format, params) = (plan.format, params.clone());
            let data =
                images::off_thread(w as u64 * h as u64 <= images::INLINE_PIXELS, move || {
                    images::encode(&rgb, w, h, format, &params)
                })
                .await?;
            images.push(GeneratedImage {
                data: data.into(),
                format: format as i32,
                width: w,
                height: h,
            });
        }
        self.metrics
            .step(Stage::ImageEncode, output_start.elapsed());
        self.metrics.step(Stage::Generation, start.elapsed());
        tracing::info!(
            seed = plan.seed,
            steps = plan.steps,
            images = images.len(),
            seconds = start.elapsed().as_secs_f64(),
            "generation done"
        );
        Ok(GenerateResponse {
            images,
            parameters: Some(params),
        })
    }
}

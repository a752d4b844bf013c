//! One generation, as diffusers' StableDiffusion(Img2Img)Pipeline runs it,
//! with the networks behind [`Stages`]: condition on the text → the initial
//! latents (noise, or the init image noised to the start step) → the steps,
//! the scheduler between UNet predictions → decode → encode the images.

mod denoise;
mod hires;
mod latents;
mod output;
#[cfg(test)]
mod tests;
mod text;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use sd_proto::v1::{Dtype, GenerateResponse, GeneratedImage, ListLorasRequest};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::{Metrics, Phase};
use sd_sampling::TorchGenerator;
use tokio::sync::mpsc;

use crate::error::{Error, Result, Stage};
use crate::facts::ModelFacts;
use crate::plan::Plan;
use crate::prompt_cache::PromptCache;
use crate::stages::Stages;

pub use latents::LatentShape;

/// What a streaming client hears while its images form: after each step
/// its progress, then (every `preview_every` steps, not after the last)
/// a preview.
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

/// Asks a running generation to stop after the step in progress and return
/// the image its latents make so far (AUTOMATIC1111's "interrupt"), unlike
/// a client going away, which abandons it. Cheap to clone; all clones
/// share one flag.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs generations against the model stages.
/// An async job's record of its steps, for resuming it elsewhere: the
/// denoiser's predictions (as the scheduler takes them), in order. A run
/// given predictions replays them instead of calling the denoiser — the
/// scheduler steps through them as it did, drawing the same noise, so its
/// whole state (multistep histories, the generator's position) and the
/// latents come back exactly — and sends each new prediction to `sink`.
/// Both passes of hires fix share one record.
#[derive(Clone, Default)]
pub struct Replay(Arc<Mutex<ReplayState>>);

#[derive(Default)]
struct ReplayState {
    stored: std::collections::VecDeque<Vec<f32>>,
    replayed: usize,
    sink: Option<mpsc::UnboundedSender<Vec<f32>>>,
}

impl Replay {
    pub fn new(stored: Vec<Vec<f32>>, sink: Option<mpsc::UnboundedSender<Vec<f32>>>) -> Self {
        Replay(Arc::new(Mutex::new(ReplayState {
            stored: stored.into(),
            replayed: 0,
            sink,
        })))
    }

    /// The next stored prediction, if it fits latents of `len` values (a
    /// record that does not fit is dropped whole: the rest is computed).
    fn next(&self, len: usize) -> Option<Vec<f32>> {
        let mut s = self.0.lock().ok()?;
        let p = s.stored.pop_front()?;
        if p.len() != len {
            tracing::warn!(
                got = p.len(),
                want = len,
                "a stored prediction does not fit: computing from here"
            );
            s.stored.clear();
            // The record no longer matches this run: keep nothing more.
            s.sink = None;
            return None;
        }
        s.replayed += 1;
        Some(p)
    }

    /// Record a prediction the denoiser made.
    fn record(&self, p: &[f32]) {
        if let Ok(s) = self.0.lock() {
            if let Some(sink) = &s.sink {
                let _ = sink.send(p.to_vec());
            }
        }
    }

    /// Predictions replayed so far.
    pub fn replayed(&self) -> usize {
        self.0.lock().map_or(0, |s| s.replayed)
    }
}

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

impl Generator {
    /// Embeddings by name as A1111's "TI hashes" list them: `NAME: HASH`,
    /// the file's SHA-256's first 12 hex digits.
    fn ti_hashes(&self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .map(|n| {
                let hash = self
                    .facts
                    .textual_inversions
                    .iter()
                    .find(|t| &t.name == n)
                    .map_or("", |t| &t.sha256[..t.sha256.len().min(12)]);
                format!("{}: {hash}", n.replace([':', ','], ""))
            })
            .collect()
    }

    /// Before any work: every ControlNet exists and fits the UNet (the
    /// denoiser loads it, and measures it against the UNet when new: its
    /// cost ratio is remembered for the admission of later requests).
    pub(crate) async fn check_controls(
        &self,
        controls: &[crate::control::ControlPlan],
        deadline: &Deadline,
    ) -> Result<()> {
        if controls.is_empty() {
            return Ok(());
        }
        let check = sd_proto::v1::ListControlNetsRequest {
            check: controls.iter().map(|c| c.unit.name.clone()).collect(),
            ..Default::default()
        };
        let listed = self.stages.list_controlnets(check, deadline).await?;
        for c in &listed.controlnets {
            self.facts.cost.set_control_ratio(&c.name, c.cost_ratio);
        }
        for (i, (c, info)) in controls.iter().zip(&listed.controlnets).enumerate() {
            let field = crate::control::field_name("controlnets", i, "union_mode");
            match (info.union_modes, c.unit.union_mode) {
                (0, None) => {}
                (0, Some(m)) => {
                    return Err(Error::invalid(
                        field,
                        format!("{m} given, but ControlNet `{}` is not a union", info.name),
                    ))
                }
                (n, None) => {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "ControlNet `{}` is a union of {n} control types: name one (0..{n})",
                            info.name
                        ),
                    ))
                }
                (n, Some(m)) if m >= n => {
                    return Err(Error::invalid(
                        field,
                        format!("{m}: ControlNet `{}` has control types 0..{n}", info.name),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// FLUX ControlNets see each control image's VAE latents: each encoded
    /// and sampled from the request's generator — one sample per image —,
    /// in unit order, before the start's noise (diffusers'
    /// FluxControlNetPipeline's draws), normalised as the latents are. None
    /// for a UNet's (which see the image).
    async fn encode_controls(
        &self,
        controls: &[crate::control::ControlPlan],
        shape: &LatentShape,
        rng: &mut TorchGenerator,
        deadline: &Deadline,
    ) -> Result<Option<Vec<HostTensor>>> {
        if controls.is_empty() || !self.facts.profile.controlnet_takes_latents() {
            return Ok(None);
        }
        let one = LatentShape {
            images: 1,
            ..*shape
        };
        let mut out = Vec::with_capacity(controls.len());
        for c in controls {
            // The image processor's [-1, 1].
            let pixels = HostTensor {
                shape: c.hint.shape.clone(),
                data: c.hint.data.iter().map(|v| 2.0 * v - 1.0).collect(),
            };
            let init = crate::plan::InitImage { pixels };
            let (mean, std) = self.encode_init_image(&init, &one, deadline).await?;
            // diffusers repeats the control image for each image and
            // samples each row.
            let each = |t: HostTensor| shape.tensor(t.data.repeat(shape.images));
            let (mean, std) = (each(mean), each(std));
            let z = latents::sample(&mean, &std, self.facts.normalization, rng);
            out.push(shape.tensor(z));
        }
        Ok(Some(out))
    }

    /// Before any work: every IP-Adapter exists and fits the UNet.
    pub(crate) async fn check_ip_adapters(
        &self,
        units: &[crate::ip::IpPlan],
        deadline: &Deadline,
    ) -> Result<()> {
        if units.is_empty() {
            return Ok(());
        }
        let check = sd_proto::v1::ListIpAdaptersRequest {
            check: units.iter().map(|u| u.unit.name.clone()).collect(),
            ..Default::default()
        };
        self.stages.list_ip_adapters(check, deadline).await?;
        Ok(())
    }

    /// Each IP-Adapter's picture through the image encoder (or from the
    /// cache, keyed by the encoder and the prepared picture, as prompts
    /// are), its embeddings a session tensor.
    async fn add_ip_adapters(
        &self,
        units: &[crate::ip::IpPlan],
        text: &mut text::Text,
        deadline: &Deadline,
    ) -> Result<()> {
        let Some(encoder) = self.facts.image_encoder.as_ref() else {
            return Ok(());
        };
        for (i, u) in units.iter().enumerate() {
            let key = crate::prompt_cache::PromptKey {
                model: encoder.id.clone(),
                clip_skip: 0,
                syntax: -1,
                prompt: format!("image:{}", u.digest),
                max_sequence_length: 0,
                loras: String::new(),
            };
            let cached = self
                .cache
                .lock()
                .map_err(|_| Error::Internal("prompt cache poisoned".into()))?
                .get(&key);
            self.metrics.cache_lookup("image", cached.is_some());
            let embeds = match cached {
                Some(c) => c.tensor,
                None => {
                    let req = sd_proto::v1::EncodeImagesRequest {
                        pixels: Some(u.pixels.to_wire(Dtype::Float32)),
                    };
                    let out = self.stages.encode_images(req, deadline).await?;
                    let e = out.image_embeds.ok_or_else(|| {
                        Error::bad_reply(Stage::TextEncoder, "no image embeddings")
                    })?;
                    let host = HostTensor::from_wire(&e).map_err(|e| {
                        Error::bad_reply(Stage::TextEncoder, format!("image embeddings: {e}"))
                    })?;
                    // (1, D) → (1 row, 1 picture, D).
                    let dim = host.numel() as i64;
                    let t = HostTensor::new(vec![1, 1, dim], host.data)
                        .map_err(|e| Error::Internal(e.to_string()))?
                        .to_wire(Dtype::Float32);
                    if let Ok(mut cache) = self.cache.lock() {
                        cache.insert(
                            key,
                            crate::prompt_cache::CachedEmbedding {
                                id: String::new(),
                                tensor: t.clone(),
                                pooled: None,
                                textual_inversions: Vec::new(),
                            },
                        );
                    }
                    t
                }
            };
            text.add_session_tensor(crate::ip::EMBEDS_NAMES[i], embeds);
        }
        Ok(())
    }

    /// Run `plan`; progress and previews go to `events` when given. A
    /// closed `events` (the client went away) stops the loop, as does the
    /// deadline, between steps.
    pub async fn run(
        &self,
        plan: Plan,
        events: Option<mpsc::Sender<Event>>,
        deadline: Deadline,
    ) -> Result<GenerateResponse> {
        self.run_stoppable(plan, events, None, deadline).await
    }

    /// [`Generator::run`], stopping early (with the image so far) when
    /// `stop` is set.
    pub async fn run_stoppable(
        &self,
        mut plan: Plan,
        events: Option<mpsc::Sender<Event>>,
        stop: Option<Stop>,
        deadline: Deadline,
    ) -> Result<GenerateResponse> {
        let started = Instant::now();
        let mut parameters = plan.parameters();
        let hires = plan.hires.take();
        let shape = LatentShape::of(&plan, &self.facts);
        let mut rng = TorchGenerator::new(plan.seed);

        let mut lora_key = String::new();
        if !plan.loras.is_empty() {
            // Before any work: every adapter exists and fits the UNet (the
            // text encoder checks its part as it encodes). The files'
            // versions key the prompt cache.
            let check = ListLorasRequest {
                check: plan.loras.clone(),
                ..Default::default()
            };
            let listed = self.stages.list_loras(check, &deadline).await?;
            lora_key = text::canonical_loras(&plan.loras, &listed.loras);
        }
        self.check_controls(&plan.controls, &deadline).await?;
        self.check_ip_adapters(&plan.ip_adapters, &deadline).await?;
        let mut text = self.condition(&plan, &lora_key, &deadline).await?;
        parameters.textual_inversions = self.ti_hashes(&text.textual_inversions());
        let control_latents = self
            .encode_controls(&plan.controls, &shape, &mut rng, &deadline)
            .await?;
        let mut start = self
            .initial_latents(&plan, &shape, &mut rng, &deadline)
            .await?;
        if let Some((mask, masked)) = start.inpaint.as_mut().and_then(|i| i.conditioning.take()) {
            text.add_session_tensor("mask", mask.to_wire(Dtype::Float32));
            text.add_session_tensor("masked_image_latents", masked.to_wire(self.wire));
        }
        self.add_references(&plan.references, &mut text, &deadline)
            .await?;
        add_controls(&plan.controls, control_latents, &mut text);
        self.add_ip_adapters(&plan.ip_adapters, &mut text, &deadline)
            .await?;
        let steps = denoise::Denoising {
            generator: self,
            text,
            rng,
            shape,
            events: events.as_ref(),
            deadline: &deadline,
            previews: denoise::Previews::of(&plan),
            started,
            stop: stop.clone(),
            loras: plan.loras.clone(),
            controls: plan.controls.clone(),
            ip_adapters: plan.ip_adapters.clone(),
            replay: plan.replay.clone(),
        };
        let (format, num_images) = (plan.format, plan.num_images);
        let mut latents = steps.run(plan.schedule, start).await?;
        let mut shape = shape;
        // Stopped early (A1111's interrupt): the first pass is the result.
        if let Some(h) = hires.filter(|_| !stop.as_ref().is_some_and(Stop::stopped)) {
            let pass = hires::Pass {
                lora_key: &lora_key,
                events: events.as_ref(),
                stop,
                deadline: &deadline,
                started,
                replay: plan.replay.clone(),
            };
            (latents, shape) = self.hires_pass(h, latents, shape, pass).await?;
        }
        let decoded = self
            .decode(shape.tensor(latents), num_images, &deadline)
            .await?;
        let images = self.encode_images(decoded, format, &parameters).await?;

        self.metrics.step(Phase::Generation, started.elapsed());
        tracing::info!(
            seed = parameters.seed,
            steps = parameters.steps,
            images = images.len(),
            seconds = started.elapsed().as_secs_f64(),
            "generation done"
        );
        Ok(GenerateResponse {
            images,
            parameters: Some(parameters),
        })
    }
}

/// Each ControlNet unit's hint as its session tensor: the image (fp32: the
/// hint's k/255 values travel exactly), or FLUX's its latents.
fn add_controls(
    controls: &[crate::control::ControlPlan],
    latents: Option<Vec<HostTensor>>,
    text: &mut text::Text,
) {
    let hints: Vec<&HostTensor> = match &latents {
        Some(l) => l.iter().collect(),
        None => controls.iter().map(|c| &c.hint).collect(),
    };
    for (i, h) in hints.into_iter().enumerate() {
        text.add_session_tensor(crate::control::IMAGE_NAMES[i], h.to_wire(Dtype::Float32));
    }
}

//! The steps: one UNet prediction per timestep over one step session, the
//! scheduler between them; progress and previews to a streaming client.
//! Between steps the loop stops when the client went away or the deadline
//! passed (an error), or when asked to stop early (the latents so far are
//! the result).

use std::time::Instant;

use sd_proto::v1::{PredictRequest, PredictResponse, PreviewMode};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Phase;
use sd_sampling::{Scheduler, TorchGenerator};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::latents::{LatentShape, Start};
use super::text::Text;
use super::{Event, Generator};
use crate::error::{Error, Result, Stage};
use crate::plan::Plan;
use crate::stages::StepSession;

/// When a streaming client gets previews, and of what kind.
#[derive(Debug, Clone, Copy)]
pub(super) struct Previews {
    /// Every this many steps (0: never); never after the last step.
    pub every: u32,
    pub mode: PreviewMode,
}

impl Previews {
    pub fn of(plan: &Plan) -> Self {
        Previews {
            every: plan.preview_every,
            mode: plan.preview_mode,
        }
    }

    /// Whether a preview follows `step` of `total`.
    pub fn due(&self, step: u32, total: u32) -> bool {
        self.every > 0 && step.is_multiple_of(self.every) && step < total
    }
}

/// One generation's step loop and what it carries from step to step.
pub(super) struct Denoising<'a> {
    pub generator: &'a Generator,
    pub text: Text,
    pub rng: TorchGenerator,
    pub shape: LatentShape,
    pub events: Option<&'a mpsc::Sender<Event>>,
    pub deadline: &'a Deadline,
    pub previews: Previews,
    /// When the generation started (progress reports the time since).
    pub started: Instant,
    /// Asked to stop early: the latents so far are the result.
    pub stop: Option<super::Stop>,
    /// The LoRA adapters every step applies.
    pub loras: Vec<sd_proto::v1::LoraRef>,
    /// ControlNet units (their hints travel as session tensors).
    pub controls: Vec<crate::control::ControlPlan>,
    /// IP-Adapters (their image embeddings travel as session tensors).
    pub ip_adapters: Vec<crate::ip::IpPlan>,
    /// An async job's record: predictions to replay, new ones to keep.
    pub replay: Option<super::Replay>,
}

impl Denoising<'_> {
    /// Run the steps from `start` with `scheduler`; the final latents.
    pub async fn run(
        mut self,
        mut scheduler: Box<dyn Scheduler>,
        start: Start,
    ) -> Result<Vec<f32>> {
        let timesteps = scheduler.timesteps().to_vec();
        let total = (timesteps.len() - start.first) as u32;
        let mut session = self.generator.stages.steps(self.deadline);
        let mut latents = start.latents;
        let inpaint = start.inpaint;
        for (k, i) in (start.first..timesteps.len()).enumerate() {
            let step = k as u32 + 1;
            if self.stop.as_ref().is_some_and(super::Stop::stopped) {
                tracing::info!(step, total, "stopped early on request");
                break;
            }
            if self.deadline.remaining().is_err() {
                return Err(Error::DeadlinePassed {
                    when: format!("before step {step} of {total}"),
                });
            }
            let t = timesteps[i] as f32;
            let input = self.shape.tensor(scheduler.scale_model_input(&latents, i));
            let span = tracing::info_span!(
                "denoise_step",
                step,
                timestep = t,
                batch = self.shape.images,
                guided = self.text.guided(),
                replica = tracing::field::Empty
            );
            let started = Instant::now();
            let prediction = match self.replay.as_ref().and_then(|r| r.next(latents.len())) {
                Some(p) => p,
                None => {
                    let refs = (
                        crate::control::refs(
                            &self.controls,
                            k,
                            total as usize,
                            self.generator.facts.profile.controlnet_takes_latents(),
                        ),
                        crate::ip::refs(&self.ip_adapters, k, total as usize),
                    );
                    let p = self
                        .predict(&mut *session, input, t, total - step, refs)
                        .instrument(span)
                        .await?;
                    if let Some(r) = &self.replay {
                        r.record(&p);
                    }
                    self.generator
                        .metrics
                        .step(Phase::Denoise, started.elapsed());
                    p
                }
            };
            let prediction = match &inpaint {
                Some(p) => p.prediction(&*scheduler, prediction, &latents, i),
                None => prediction,
            };
            latents = scheduler.step(&prediction, i, &latents, &mut |n| self.rng.randn(n));
            if let Some(p) = &inpaint {
                p.after_step(&*scheduler, &mut latents, i, timesteps.len());
            }
            self.report(step, total, t, &latents).await?;
        }
        if let Some(p) = &inpaint {
            p.finish(&mut latents);
        }
        Ok(latents)
    }

    /// One prediction, resending the embeddings once if the denoiser lost them.
    async fn predict(
        &mut self,
        session: &mut (dyn StepSession + '_),
        input: HostTensor,
        timestep: f32,
        steps_after: u32,
        (controls, ip_adapters): (
            Vec<sd_proto::v1::ControlRef>,
            Vec<sd_proto::v1::IpAdapterRef>,
        ),
    ) -> Result<Vec<f32>> {
        let latents = input.to_wire(self.generator.wire);
        for attempt in 0..2 {
            let (cond, uncond) = self.text.messages();
            let request = PredictRequest {
                latents: Some(latents.clone()),
                timesteps: vec![timestep],
                cond: Some(cond),
                uncond,
                guidance_scale: self.text.guidance,
                embedded_guidance: self.text.embedded_guidance,
                output_dtype: self.generator.wire as i32,
                session_id: 0,
                steps_after,
                trace_context: Default::default(),
                time_ids: None,
                negative_time_ids: None,
                loras: self.loras.clone(),
                session_tensors: self.text.session_tensors(),
                controls: controls.clone(),
                ip_adapters: ip_adapters.clone(),
            };
            match session.step(request).await {
                Ok(response) => {
                    self.text.mark_sent();
                    return self.prediction(response);
                }
                Err(e) if e.is_embedding_miss() && attempt == 0 => {
                    tracing::debug!("denoiser lost an embedding; resending");
                    self.text.resend();
                }
                Err(e) if e.is_embedding_miss() => break,
                Err(e) => return Err(e),
            }
        }
        Err(Error::bad_reply(
            Stage::Denoiser,
            "an embedding miss for embeddings it was just sent",
        ))
    }

    /// The prediction in a Predict response, checked against the latents.
    fn prediction(&self, response: PredictResponse) -> Result<Vec<f32>> {
        let output = response
            .output
            .ok_or_else(|| Error::bad_reply(Stage::Denoiser, "no output"))?;
        let output = HostTensor::from_wire(&output)
            .map_err(|e| Error::bad_reply(Stage::Denoiser, format!("a prediction: {e}")))?;
        if output.numel() != self.shape.len() {
            return Err(Error::bad_reply(
                Stage::Denoiser,
                format!(
                    "a prediction of {} values for latents {:?}",
                    output.numel(),
                    self.shape.dims()
                ),
            ));
        }
        Ok(output.data)
    }

    /// Tell a streaming client about `step`: its progress, then a preview
    /// when one is due. A client that went away stops the generation.
    async fn report(&self, step: u32, total: u32, timestep: f32, latents: &[f32]) -> Result<()> {
        let Some(events) = self.events else {
            return Ok(());
        };
        let progress = Event::Progress {
            step,
            total,
            timestep,
            elapsed: self.started.elapsed().as_secs_f64(),
        };
        events.send(progress).await.map_err(|_| Error::ClientGone)?;
        if self.previews.due(step, total) {
            let current = self.shape.tensor(latents.to_vec());
            let images = self
                .generator
                .preview(self.previews.mode, current, self.deadline)
                .await?;
            events
                .send(Event::Preview { step, images })
                .await
                .map_err(|_| Error::ClientGone)?;
        }
        Ok(())
    }
}

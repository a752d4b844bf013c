//! The step loop against fake stages: no gRPC, no libtorch, milliseconds.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_proto::v1::{
    DecodeRequest, DecodeResponse, Dtype, EncodeImageRequest, EncodeImageResponse,
    EncodeTextRequest, EncodeTextResponse, EncodedPrompt, GenerateRequest, PredictRequest,
    PredictResponse, PreviewMode, RgbImage,
};
use sd_proto::wire::HostTensor;
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Metrics;
use sd_sampling::schedulers::{build, SchedulerOptions};
use sd_sampling::{Prediction, SchedulerConfig, SchedulerKind};
use tokio::sync::{mpsc, Semaphore};

use super::{img2img_start, Event, Generator};
use crate::error::{Error, Result, Stage};
use crate::facts::ModelFacts;
use crate::limits::Limits;
use crate::plan::Plan;
use crate::prompt_cache::PromptCache;
use crate::stages::{Stages, StepSession};

const TOKENS: i64 = 3;
const HIDDEN: i64 = 2;

/// What the fake stages were asked.
#[derive(Default)]
struct Log {
    text: Vec<EncodeTextRequest>,
    predicts: Vec<PredictRequest>,
    decodes: usize,
    image_encodes: usize,
}

/// Model stages that answer at once with well-formed zeros, and record.
#[derive(Default)]
struct Fake {
    log: Mutex<Log>,
    /// Each step takes this long.
    step_delay: Duration,
    /// The session forgets its embeddings before this step (1-based).
    forget_before: Option<usize>,
    /// Every call is an embedding miss, tensors sent or not (a broken denoiser).
    always_miss: bool,
    /// Steps from this one (1-based) wait for a permit.
    gate: Option<(usize, Arc<Semaphore>)>,
}

impl Fake {
    fn predicts(&self) -> Vec<PredictRequest> {
        self.log.lock().unwrap().predicts.clone()
    }
}

fn zeros(shape: Vec<i64>) -> sd_proto::v1::Tensor {
    let n = shape.iter().product::<i64>() as usize;
    HostTensor::new(shape, vec![0.0; n])
        .unwrap()
        .to_wire(Dtype::Float32)
}

#[tonic::async_trait]
impl Stages for Fake {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        _: &Deadline,
    ) -> Result<EncodeTextResponse> {
        let prompts = req
            .prompts
            .iter()
            .map(|_| EncodedPrompt {
                embeddings: Some(zeros(vec![TOKENS, HIDDEN])),
                ..Default::default()
            })
            .collect();
        self.log.lock().unwrap().text.push(req);
        Ok(EncodeTextResponse { prompts })
    }

    fn steps<'a>(&'a self, _: &'a Deadline) -> Box<dyn StepSession + 'a> {
        Box::new(FakeSession {
            fake: self,
            held: HashSet::new(),
        })
    }

    async fn decode(&self, req: DecodeRequest, _: &Deadline) -> Result<DecodeResponse> {
        self.log.lock().unwrap().decodes += 1;
        let shape = req.latents.unwrap().shape;
        let (n, h, w) = (shape[0], shape[2] as u32 * 8, shape[3] as u32 * 8);
        let images = (0..n)
            .map(|_| RgbImage {
                width: w,
                height: h,
                rgb: vec![128u8; (w * h * 3) as usize].into(),
            })
            .collect();
        Ok(DecodeResponse { images })
    }

    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        _: &Deadline,
    ) -> Result<EncodeImageResponse> {
        self.log.lock().unwrap().image_encodes += 1;
        let shape = req.pixels.unwrap().shape;
        let latent = vec![1, 4, shape[2] / 8, shape[3] / 8];
        Ok(EncodeImageResponse {
            mean: Some(zeros(latent.clone())),
            std: Some(zeros(latent)),
        })
    }
}

/// A step session that keeps embeddings by id, as a denoiser stream does.
struct FakeSession<'a> {
    fake: &'a Fake,
    held: HashSet<String>,
}

#[tonic::async_trait]
impl StepSession for FakeSession<'_> {
    async fn step(&mut self, req: PredictRequest) -> Result<PredictResponse> {
        let step = {
            let mut log = self.fake.log.lock().unwrap();
            log.predicts.push(req.clone());
            log.predicts.len()
        };
        if let Some((from, gate)) = &self.fake.gate {
            if step >= *from {
                gate.acquire().await.unwrap().forget();
            }
        }
        tokio::time::sleep(self.fake.step_delay).await;
        if self.fake.forget_before == Some(step) {
            self.held.clear();
        }
        let embeddings = [req.cond.as_ref(), req.uncond.as_ref()];
        for e in embeddings.into_iter().flatten() {
            if e.tensor.is_some() && !self.fake.always_miss {
                self.held.insert(e.id.clone());
            } else if self.fake.always_miss || !self.held.contains(&e.id) {
                return Err(Error::Stage {
                    stage: Stage::Denoiser,
                    status: sd_proto::status::embedding_miss("cond", &e.id),
                });
            }
        }
        let shape = req.latents.unwrap().shape;
        Ok(PredictResponse {
            output: Some(zeros(shape)),
        })
    }
}

fn facts() -> ModelFacts {
    ModelFacts {
        id: "fake@1".into(),
        name: "fake".into(),
        latent_channels: 4,
        scale_factor: 8,
        sample_size: 4,
        scaling_factor: 0.18215,
        max_decode_pixels: 0,
        cost: Default::default(),
        scheduler_config: SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "steps_offset": 1}"#,
        )
        .unwrap(),
        default_scheduler: SchedulerKind::Ddim,
        prediction: Prediction::Epsilon,
        text_layers: 2,
        text_model_id: "fake@1".into(),
        family: Default::default(),
    }
}

fn generator(fake: Arc<Fake>) -> Generator {
    Generator {
        stages: fake,
        facts: Arc::new(facts()),
        cache: Arc::new(Mutex::new(PromptCache::new(1 << 20))),
        metrics: Metrics::new("test"),
        wire: Dtype::Float32,
    }
}

fn plan(req: GenerateRequest) -> Plan {
    Plan::new(req, &facts(), &Limits::default()).unwrap()
}

fn request(steps: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a cat".into(),
        steps,
        seed: Some(1),
        ..Default::default()
    }
}

/// A small PNG for image-to-image.
fn png(w: u32, h: u32) -> Vec<u8> {
    let rgb = vec![200u8; (w * h * 3) as usize];
    crate::images::encode_png(&rgb, w, h, &[]).unwrap()
}

fn timesteps(kind: SchedulerKind, steps: u32) -> Vec<f32> {
    let s = build(
        kind,
        &facts().scheduler_config,
        steps as usize,
        SchedulerOptions::default(),
    )
    .unwrap();
    s.timesteps().iter().map(|&t| t as f32).collect()
}

#[tokio::test]
async fn text_to_image_runs_every_timestep_with_the_embeddings_sent_once() {
    let fake = Arc::new(Fake::default());
    let r = generator(fake.clone())
        .run(plan(request(6)), None, Deadline::none())
        .await
        .unwrap();
    assert_eq!(r.images.len(), 1);
    let predicts = fake.predicts();
    let ts: Vec<f32> = predicts.iter().map(|p| p.timesteps[0]).collect();
    assert_eq!(ts, timesteps(SchedulerKind::Ddim, 6));
    // Guided (7.5 by default): prompt and negative prompt, one Encode call.
    assert_eq!(fake.log.lock().unwrap().text.len(), 1);
    assert!(predicts[0].cond.as_ref().unwrap().tensor.is_some());
    assert!(predicts[0].uncond.as_ref().unwrap().tensor.is_some());
    for p in &predicts[1..] {
        assert!(
            p.cond.as_ref().unwrap().tensor.is_none(),
            "sent by id after the first step"
        );
    }
    let after: Vec<u32> = predicts.iter().map(|p| p.steps_after).collect();
    assert_eq!(after, vec![5, 4, 3, 2, 1, 0]);
    assert_eq!(fake.log.lock().unwrap().decodes, 1);
}

#[tokio::test]
async fn image_to_image_starts_where_strength_says() {
    for (kind, steps, strength) in [
        (SchedulerKind::Ddim, 10, 0.5),
        (SchedulerKind::Ddim, 10, 0.75),
        (SchedulerKind::Heun, 8, 0.5),
    ] {
        let fake = Arc::new(Fake::default());
        let req = GenerateRequest {
            init_image: png(32, 32).into(),
            strength: Some(strength),
            scheduler: kind.name().into(),
            ..request(steps)
        };
        generator(fake.clone())
            .run(plan(req), None, Deadline::none())
            .await
            .unwrap();
        let all = timesteps(kind, steps);
        let order = if kind == SchedulerKind::Heun { 2 } else { 1 };
        let first = img2img_start(steps, strength, order);
        // diffusers: int(steps × strength) steps run, the first ones skipped.
        assert_eq!(
            first,
            (steps - (steps as f32 * strength) as u32) as usize * order
        );
        let ts: Vec<f32> = fake.predicts().iter().map(|p| p.timesteps[0]).collect();
        assert_eq!(ts, all[first..].to_vec(), "{kind} {steps} {strength}");
        assert_eq!(fake.log.lock().unwrap().image_encodes, 1);
    }
}

/// Events of a streamed generation, in order, as (kind, step).
async fn streamed(fake: Arc<Fake>, req: GenerateRequest) -> Vec<(&'static str, u32)> {
    let (tx, mut rx) = mpsc::channel(64);
    generator(fake)
        .run(plan(req), Some(tx), Deadline::none())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(match e {
            Event::Progress { step, total, .. } => {
                assert_eq!(total, 5);
                ("progress", step)
            }
            Event::Preview { step, images } => {
                assert_eq!(images.len(), 2);
                ("preview", step)
            }
        });
    }
    out
}

#[tokio::test]
async fn progress_then_previews_in_order_at_their_cadence() {
    let req = |mode: PreviewMode| GenerateRequest {
        preview_every: 2,
        preview_mode: mode as i32,
        num_images: 2,
        ..request(5)
    };
    let want = vec![
        ("progress", 1),
        ("progress", 2),
        ("preview", 2),
        ("progress", 3),
        ("progress", 4),
        ("preview", 4),
        ("progress", 5),
    ];
    // Latent previews: no decode but the final one.
    let fake = Arc::new(Fake::default());
    assert_eq!(streamed(fake.clone(), req(PreviewMode::Latent)).await, want);
    assert_eq!(fake.log.lock().unwrap().decodes, 1);
    // Full previews: decoded by the autoencoder, never after the last step.
    let fake = Arc::new(Fake::default());
    assert_eq!(streamed(fake.clone(), req(PreviewMode::Full)).await, want);
    assert_eq!(fake.log.lock().unwrap().decodes, 3);
    // No previews asked: progress only.
    let fake = Arc::new(Fake::default());
    let events = streamed(fake, request(5)).await;
    assert!(events.iter().all(|(k, _)| *k == "progress"));
    assert_eq!(events.len(), 5);
}

#[tokio::test]
async fn an_embedding_miss_resends_the_tensors_once() {
    let fake = Arc::new(Fake {
        forget_before: Some(3),
        ..Default::default()
    });
    generator(fake.clone())
        .run(plan(request(4)), None, Deadline::none())
        .await
        .unwrap();
    let sent: Vec<bool> = fake
        .predicts()
        .iter()
        .map(|p| p.cond.as_ref().unwrap().tensor.is_some())
        .collect();
    // Step 1 sends them; 2 by id; 3 by id is a miss, then resent; 4 by id.
    assert_eq!(sent, vec![true, false, false, true, false]);
    let uncond_resent = fake.predicts()[3].uncond.as_ref().unwrap().tensor.is_some();
    assert!(uncond_resent);
}

/// `e` is the denoiser's bad reply, answered to the client as INTERNAL.
fn assert_denoiser_fault(e: Error) {
    assert!(
        matches!(
            e,
            Error::BadReply {
                stage: Stage::Denoiser,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
}

#[tokio::test]
async fn a_denoiser_that_keeps_missing_is_an_error_not_a_loop() {
    let fake = Arc::new(Fake {
        always_miss: true,
        ..Default::default()
    });
    let e = generator(fake.clone())
        .run(plan(request(4)), None, Deadline::none())
        .await
        .unwrap_err();
    // The tensors went with the first call and were resent once: a miss
    // after that is the denoiser's fault (INTERNAL), not a reason to resend
    // forever nor a FAILED_PRECONDITION for the client to puzzle over.
    assert_eq!(fake.predicts().len(), 2);
    assert_denoiser_fault(e);
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_generation_within_a_step() {
    let gate = Arc::new(Semaphore::new(0));
    let fake = Arc::new(Fake {
        gate: Some((3, gate.clone())),
        ..Default::default()
    });
    let (tx, mut rx) = mpsc::channel(64);
    let run = tokio::spawn({
        let g = generator(fake.clone());
        async move { g.run(plan(request(10)), Some(tx), Deadline::none()).await }
    });
    // Two steps reported; then the client goes away while step 3 runs.
    for want in 1..=2 {
        match rx.recv().await.unwrap() {
            Event::Progress { step, .. } => assert_eq!(step, want),
            other => panic!("{other:?}"),
        }
    }
    drop(rx);
    gate.add_permits(100);
    let e = run.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::ClientGone), "{e}");
    assert_eq!(fake.predicts().len(), 3, "step 3 finished, no step 4");
    assert_eq!(fake.log.lock().unwrap().decodes, 0);
}

#[tokio::test]
async fn the_deadline_is_checked_before_every_step() {
    let fake = Arc::new(Fake {
        step_delay: Duration::from_millis(40),
        ..Default::default()
    });
    let e = generator(fake.clone())
        .run(
            plan(request(20)),
            None,
            Deadline::after(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    match &e {
        Error::DeadlinePassed { when } => assert!(when.starts_with("before step"), "{when}"),
        other => panic!("{other}"),
    }
    let n = fake.predicts().len();
    assert!((1..20).contains(&n), "{n} steps ran");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::DeadlineExceeded);
}

#[tokio::test]
async fn a_malformed_prediction_is_the_denoisers_fault_not_the_clients() {
    struct Short;
    #[tonic::async_trait]
    impl StepSession for Short {
        async fn step(&mut self, _: PredictRequest) -> Result<PredictResponse> {
            Ok(PredictResponse {
                output: Some(zeros(vec![1, 4, 1, 1])),
            })
        }
    }
    struct ShortStages(Fake);
    #[tonic::async_trait]
    impl Stages for ShortStages {
        async fn encode_text(
            &self,
            r: EncodeTextRequest,
            d: &Deadline,
        ) -> Result<EncodeTextResponse> {
            self.0.encode_text(r, d).await
        }
        fn steps<'a>(&'a self, _: &'a Deadline) -> Box<dyn StepSession + 'a> {
            Box::new(Short)
        }
        async fn decode(&self, r: DecodeRequest, d: &Deadline) -> Result<DecodeResponse> {
            self.0.decode(r, d).await
        }
        async fn encode_image(
            &self,
            r: EncodeImageRequest,
            d: &Deadline,
        ) -> Result<EncodeImageResponse> {
            self.0.encode_image(r, d).await
        }
    }
    let mut g = generator(Arc::new(Fake::default()));
    g.stages = Arc::new(ShortStages(Fake::default()));
    let e = g
        .run(plan(request(2)), None, Deadline::none())
        .await
        .unwrap_err();
    assert_denoiser_fault(e);
}

#[test]
fn unseeded_plans_draw_different_seeds() {
    let seeds: HashSet<u64> = (0..8)
        .map(|_| {
            plan(GenerateRequest {
                seed: None,
                ..request(2)
            })
            .seed
        })
        .collect();
    assert!(seeds.len() > 1, "eight unseeded requests all got {seeds:?}");
}

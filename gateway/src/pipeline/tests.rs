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
use sd_sampling::{SchedulerConfig, SchedulerKind};
use tokio::sync::{mpsc, Semaphore};

use super::{Event, Generator};
use crate::error::{Error, Result, Stage};
use crate::facts::ModelFacts;
use crate::limits::Limits;
use crate::plan::Plan;
use crate::prompt_cache::PromptCache;
use crate::stages::{Stages, StepSession};
use sd_sampling::img2img_start;

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
        sample_size: 4,
        scheduler_config: SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "steps_offset": 1}"#,
        )
        .unwrap(),
        default_scheduler: SchedulerKind::Ddim,
        text_layers: 2,
        text_model_id: "fake@1".into(),
        ..ModelFacts::sd15_example()
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

/// A network of a second kind through the same seam: a fake "flow" family
/// whose denoiser publishes 16 latent channels packed into 2×2 patches (so
/// image sides are multiples of 16), guidance as an input of the network
/// (no negative branch), and a VAE whose latents are shifted as well as
/// scaled. The step loop, the plan's checks and the stages are the same;
/// only the published facts differ.
fn flow_facts() -> ModelFacts {
    ModelFacts {
        id: "flow@1".into(),
        name: "flow".into(),
        layout: crate::facts::Layout {
            latent_channels: 16,
            in_channels: 16,
            scale_factor: 8,
            size_multiple: 16,
            packed: true,
        },
        normalization: crate::facts::Normalization {
            scale: 0.3611,
            shift: 0.1159,
        },
        profile: crate::facts::Profile {
            guidance_embedded: true,
            default_guidance: 3.5,
            default_steps: 4,
            ..Default::default()
        },
        scheduler_config: SchedulerConfig::from_json(
            r#"{"_class_name": "EulerDiscreteScheduler"}"#,
        )
        .unwrap(),
        default_scheduler: SchedulerKind::Euler,
        ..facts()
    }
}

/// Stages for the flow family: 16-channel latents everywhere; the VAE's
/// encoder answers a distribution of one value, `mean`, with no spread.
struct FlowFake {
    log: Mutex<Log>,
    decoded_shapes: Mutex<Vec<Vec<i64>>>,
    mean: f32,
}

#[tonic::async_trait]
impl Stages for FlowFake {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        d: &Deadline,
    ) -> Result<EncodeTextResponse> {
        let r = Fake::default().encode_text(req.clone(), d).await;
        self.log.lock().unwrap().text.push(req);
        r
    }

    fn steps<'a>(&'a self, _: &'a Deadline) -> Box<dyn StepSession + 'a> {
        Box::new(FlowSession(self))
    }

    async fn decode(&self, req: DecodeRequest, d: &Deadline) -> Result<DecodeResponse> {
        let shape = req.latents.as_ref().unwrap().shape.clone();
        self.decoded_shapes.lock().unwrap().push(shape);
        Fake::default().decode(req, d).await
    }

    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        _: &Deadline,
    ) -> Result<EncodeImageResponse> {
        let shape = req.pixels.unwrap().shape;
        let latent = vec![1, 16, shape[2] / 8, shape[3] / 8];
        let n = latent.iter().product::<i64>() as usize;
        let mean = HostTensor::new(latent.clone(), vec![self.mean; n]).unwrap();
        Ok(EncodeImageResponse {
            mean: Some(mean.to_wire(Dtype::Float32)),
            std: Some(zeros(latent)),
        })
    }
}

struct FlowSession<'a>(&'a FlowFake);

#[tonic::async_trait]
impl StepSession for FlowSession<'_> {
    async fn step(&mut self, req: PredictRequest) -> Result<PredictResponse> {
        self.0.log.lock().unwrap().predicts.push(req.clone());
        let shape = req.latents.unwrap().shape;
        Ok(PredictResponse {
            output: Some(zeros(shape)),
        })
    }
}

fn flow_generator(fake: Arc<FlowFake>) -> Generator {
    Generator {
        facts: Arc::new(flow_facts()),
        ..generator(Arc::new(Fake::default()))
    }
    .with_stages(fake)
}

impl Generator {
    fn with_stages(self, stages: Arc<dyn Stages>) -> Self {
        Generator { stages, ..self }
    }
}

#[tokio::test]
async fn a_flow_family_runs_through_the_same_seam() {
    let fake = Arc::new(FlowFake {
        log: Mutex::default(),
        decoded_shapes: Mutex::default(),
        mean: 0.0,
    });
    let facts = flow_facts();
    let plan = Plan::new(
        GenerateRequest {
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            width: 48,
            height: 32,
            seed: Some(3),
            ..Default::default()
        },
        &facts,
        &Limits::default(),
    )
    .unwrap();
    let r = flow_generator(fake.clone())
        .run(plan, None, Deadline::none())
        .await
        .unwrap();
    assert_eq!(r.images.len(), 1);
    let log = fake.log.lock().unwrap();
    // The model's own 4 steps; guidance 3.5 as an input, never a second
    // (negative) row, so no negative prompt was encoded.
    assert_eq!(log.predicts.len(), 4);
    for p in &log.predicts {
        assert!(p.uncond.is_none(), "no unconditional branch");
        assert_eq!(p.guidance_scale, 3.5);
        assert_eq!(p.latents.as_ref().unwrap().shape, vec![1, 16, 4, 6]);
    }
    assert_eq!(log.text.len(), 1);
    assert_eq!(log.text[0].prompts, vec!["a cat".to_string()]);
    assert_eq!(
        *fake.decoded_shapes.lock().unwrap(),
        vec![vec![1, 16, 4, 6]]
    );
    drop(log);

    // Sides are multiples of the published size multiple (16), not of the
    // VAE's scale (8).
    let e = Plan::new(
        GenerateRequest {
            prompt: "a cat".into(),
            width: 40,
            ..Default::default()
        },
        &facts,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, .. } if *field == "width"),
        "{e:?}"
    );
    assert!(format!("{e}").contains("multiple of 16"), "{e}");
}

#[tokio::test]
async fn image_to_image_latents_are_normalised_as_the_autoencoder_says() {
    // The init image's latents (all `mean`) become (mean - shift) * scale
    // before noising: at strength 1 with zero predictions, Euler's first
    // model input is (init + σ_max · noise) / sqrt(σ_max² + 1); the same
    // run with the init at zero tells the noise's part apart.
    let first_input = |mean: f32| async move {
        let fake = Arc::new(FlowFake {
            log: Mutex::default(),
            decoded_shapes: Mutex::default(),
            mean,
        });
        let plan = Plan::new(
            GenerateRequest {
                prompt: "a cat".into(),
                init_image: png(32, 32).into(),
                strength: Some(1.0),
                steps: 2,
                seed: Some(5),
                ..Default::default()
            },
            &flow_facts(),
            &Limits::default(),
        )
        .unwrap();
        flow_generator(fake.clone())
            .run(plan, None, Deadline::none())
            .await
            .unwrap();
        let p = fake.log.lock().unwrap().predicts[0].clone();
        HostTensor::from_wire(p.latents.as_ref().unwrap())
            .unwrap()
            .data
    };
    let n = flow_facts().normalization;
    let euler = build(
        SchedulerKind::Euler,
        &flow_facts().scheduler_config,
        2,
        SchedulerOptions::default(),
    )
    .unwrap();
    let k = euler.scale_model_input(&[1.0], 0)[0];
    // The init at exactly the shift normalises to zero: the first input is
    // the noise alone, σ · noise / sqrt(σ² + 1), with the noise the seed's
    // draws after the init image's sample (diffusers' order; the sample is
    // drawn even with no spread).
    let zero = first_input(n.shift).await;
    let mut rng = sd_sampling::TorchGenerator::new(5);
    let _sample = rng.randn(16 * 4 * 4);
    let noise = rng.randn(16 * 4 * 4);
    let sigma = zero[0] / k / noise[0];
    for (z, e) in zero.iter().zip(&noise) {
        assert!((z / k - sigma * e).abs() < 1e-4, "{z} is not noise alone");
    }
    // And an init of 2.0 adds (2.0 - shift) · scale everywhere.
    let two = first_input(2.0).await;
    let want = (2.0 - n.shift) * n.scale;
    for (a, b) in two.iter().zip(&zero) {
        let init = (a - b) / k;
        assert!((init - want).abs() < 1e-3, "init {init}, want {want}");
    }
}

#[test]
fn reference_images_are_refused_by_field_on_a_model_that_takes_none() {
    let req = GenerateRequest {
        reference_images: vec![png(64, 64).into()],
        ..request(2)
    };
    let e = Plan::new(req, &facts(), &Limits::default()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, message }
            if *field == "reference_images" && message.contains("FLUX.2 Klein")),
        "{e:?}"
    );
}

#[test]
fn a_reference_too_wide_to_be_the_images_size_is_refused_naming_it() {
    use sd_proto::v1::denoiser_info::FamilyParams;
    let mut klein = facts();
    klein.profile.params = FamilyParams::Klein(sd_proto::v1::KleinParams {
        text_layers: vec![9, 18, 27],
        max_sequence_length: 512,
        distilled: true,
    });
    klein.scheduler_config = SchedulerConfig::from_json(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": true}"#,
    )
    .unwrap();
    klein.default_scheduler = SchedulerKind::FlowEuler;
    let wide = GenerateRequest {
        reference_images: vec![png(2400, 400).into()],
        ..request(2)
    };
    let e = Plan::new(wide.clone(), &klein, &Limits::default()).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, message }
            if *field == "reference_images" && message.contains("2400×400")),
        "{e:?}"
    );
    // With a size of its own the reference is fine.
    let sized = GenerateRequest {
        width: 64,
        height: 64,
        ..wide
    };
    let plan = Plan::new(sized, &klein, &Limits::default()).unwrap();
    assert_eq!(
        (plan.width, plan.height, plan.references.len()),
        (64, 64, 1)
    );
}

//! The step loop's stages run in this process, on the same model crates the
//! services use, without gRPC: the baseline the stack is measured against.
//! SD 1.x/2.x and the SDXL family (both text encoders, pooled embeddings
//! and size/crop time ids, the VAE's `force_upcast`), as the services run
//! them.

use std::collections::HashMap;
use std::sync::Mutex;

use sd_gateway::error::{Error, Stage};
use sd_gateway::facts::{Layout, ModelFacts, Normalization, Profile as GatewayProfile};
use sd_gateway::stages::{Stages, StepSession};
use sd_models::config::VaeConfig;
use sd_models::{Component, Denoiser, ModelDir, Placement, Vae};
use sd_proto::v1::{
    DecodeRequest, DecodeResponse, Dtype, Embedding, EncodeImageRequest, EncodeImageResponse,
    EncodeTextRequest, EncodeTextResponse, EncodedPrompt, PredictRequest, PredictResponse,
    SessionTensor,
};
use sd_runtime::deadline::Deadline;
use sd_sampling::{SchedulerConfig, SchedulerKind};
use sd_service::compute::{forward_calls, to_rgb8};
use sd_service::family::{vae_placement, Profile};
use sd_service::step::{Bounds, Cond, Resolver, Step};
use sd_service::text::TextEncoders;
use sd_service::{from_wire, to_wire, ServiceError};
use tch::Tensor;

pub struct InProcess {
    text: TextEncoders,
    net: Denoiser,
    vae: Vae,
    /// What a step may carry, as the denoiser service checks it.
    bounds: Bounds,
    /// Embeddings by id: hidden states and, for SDXL, the pooled one.
    embeddings: Mutex<HashMap<String, Cond>>,
    /// Session tensors by id, as a denoiser stream holds them.
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl InProcess {
    pub fn load(dir: &ModelDir, p: Placement) -> anyhow::Result<(Self, ModelFacts)> {
        let net = Denoiser::load(dir, p)?;
        let vae_config = VaeConfig::read(&dir.config_path(Component::Vae))?;
        let layout = net.layout(&vae_config);
        let profile = Profile::of(dir, &net)?;
        let scheduler_config =
            SchedulerConfig::from_json(&std::fs::read_to_string(dir.scheduler_config_path())?)?;
        let me = InProcess {
            text: TextEncoders::load(dir, p, None)?,
            vae: dir.load_vae(vae_placement(p, dir.family(), vae_config.force_upcast))?,
            // The benchmark's own requests: bounds wide enough for any.
            bounds: Bounds::of(
                &net,
                &layout,
                &profile.params,
                64,
                4096 * layout.vae_scale_factor,
                scheduler_config.num_train_timesteps() as f32,
            ),
            net,
            embeddings: Mutex::new(HashMap::new()),
            tensors: Mutex::new(HashMap::new()),
        };
        let (scale, shift) = vae_config.normalization();
        let facts = ModelFacts {
            // No wire in process: nothing is sent.
            compute_dtype: Dtype::Float32,
            id: format!("in-process:{}", dir.root().display()),
            name: dir
                .root()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            layout: Layout {
                latent_channels: layout.latent_channels as usize,
                in_channels: layout.in_channels as usize,
                scale_factor: layout.vae_scale_factor as u32,
                size_multiple: layout.size_multiple as u32,
                packed: layout.packed,
            },
            sample_size: layout.native_side as u32,
            normalization: Normalization {
                scale: scale as f32,
                shift: shift as f32,
            },
            max_decode_pixels: 0,
            cost: Default::default(),
            textual_inversions: Vec::new(),
            default_scheduler: scheduler_config
                .class_name()
                .and_then(SchedulerKind::from_diffusers_class)
                .unwrap_or(SchedulerKind::Pndm),
            prediction: scheduler_config.prediction()?,
            scheduler_config,
            text_layers: me.text.shape().2.max(0) as u32,
            text_model_id: format!("in-process:{}", dir.root().display()),
            profile: GatewayProfile {
                params: profile.params,
                time_cond_dim: me.net.time_cond_dim().max(0) as u32,
                guidance_embedded: me.net.guidance_input().is_some(),
                default_guidance: profile.default_guidance,
                default_steps: profile.default_steps,
                example_prompts: profile.example_prompts,
            },
            image_encoder: None,
        };
        Ok((me, facts))
    }

    /// Mean milliseconds of one forward of the network over `rows`
    /// latents of `side`².
    pub fn unet_forward_ms(&self, rows: i64, side: i64) -> anyhow::Result<f64> {
        let _guard = tch::no_grad_guard();
        // Reading a value back waits for the device (CUDA runs async).
        let wait = |y: Tensor| y.sum(tch::Kind::Float).double_value(&[]);
        wait(self.net.probe(rows, side, self.net.typical_tokens())?);
        let n = 5;
        let start = std::time::Instant::now();
        let mut y = None;
        for _ in 0..n {
            y = Some(self.net.probe(rows, side, self.net.typical_tokens())?);
        }
        if let Some(y) = y {
            wait(y);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / n as f64)
    }

    /// One step, on this thread, decoded and checked as the denoiser
    /// service decodes it.
    fn predict(&self, req: PredictRequest) -> Result<PredictResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let Step {
                call,
                out_dtype,
                controls,
                ip,
            } = Step::decode(&req, &self.bounds, &mut Held(self))?;
            if !ip.is_empty() {
                return Err(ServiceError::invalid(
                    "ip_adapters",
                    "the in-process benchmark pipeline serves no IP-Adapters",
                ));
            }
            if !controls.is_empty() {
                return Err(ServiceError::invalid(
                    "controls",
                    "the in-process benchmark pipeline serves no ControlNets",
                ));
            }
            let out = forward_calls(&self.net, &[&call])?.remove(0);
            Ok(PredictResponse {
                output: Some(to_wire(&out, out_dtype)?),
            })
        })
    }
}

/// Embeddings kept by id, as a denoiser keeps them.
struct Held<'a>(&'a InProcess);

impl Resolver for Held<'_> {
    fn embedding(&mut self, e: &Embedding, field: &str, batch: i64) -> Result<Cond, ServiceError> {
        let mut cache = self
            .0
            .embeddings
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        if e.tensor.is_none() {
            return cache
                .get(&e.id)
                .cloned()
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                });
        }
        let c = self.0.bounds.sent(e, field, batch)?;
        cache.insert(e.id.clone(), c.clone());
        Ok(c)
    }

    fn tensor(&mut self, t: &SessionTensor, field: &str) -> Result<Tensor, ServiceError> {
        if t.tensor.is_some() {
            return from_wire(t.tensor.as_ref(), field);
        }
        let held = self
            .0
            .tensors
            .lock()
            .map_err(|_| ServiceError::Internal("session tensors poisoned"))?;
        held.get(&t.id)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| ServiceError::EmbeddingMiss {
                field: field.to_string(),
                id: t.id.clone(),
            })
    }

    fn keep(&mut self, id: &str, t: &Tensor, _: &str) -> Result<(), ServiceError> {
        self.0
            .tensors
            .lock()
            .map_err(|_| ServiceError::Internal("session tensors poisoned"))?
            .insert(id.to_string(), t.shallow_clone());
        Ok(())
    }
}

/// A stage's answer as the step loop takes it: the status a service would
/// answer with, arriving as it would.
fn staged<T>(stage: Stage, r: Result<T, ServiceError>) -> Result<T, Error> {
    r.map_err(|e| Error::from_stage(stage, e.into()))
}

#[tonic::async_trait]
impl Stages for InProcess {
    async fn encode_text(
        &self,
        req: EncodeTextRequest,
        _: &Deadline,
    ) -> Result<EncodeTextResponse, Error> {
        staged(Stage::TextEncoder, self.encode_text_here(req))
    }

    fn steps<'a>(&'a self, _: &'a Deadline) -> Box<dyn StepSession + 'a> {
        Box::new(LocalSteps(self))
    }

    async fn decode(&self, req: DecodeRequest, _: &Deadline) -> Result<DecodeResponse, Error> {
        staged(Stage::Autoencoder, self.decode_here(req))
    }

    async fn encode_image(
        &self,
        req: EncodeImageRequest,
        _: &Deadline,
    ) -> Result<EncodeImageResponse, Error> {
        staged(Stage::Autoencoder, self.encode_image_here(req))
    }
}

impl InProcess {
    fn encode_text_here(&self, req: EncodeTextRequest) -> Result<EncodeTextResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let refs: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
            let length = match req.max_sequence_length {
                0 => self.text.shape().1 as usize,
                n => n as usize,
            };
            let (_, hidden, pooled) = self.text.encode(&refs, req.clip_skip as usize, length)?;
            let prompts = (0..refs.len())
                .map(|i| {
                    Ok(EncodedPrompt {
                        token_ids: Vec::new(),
                        embeddings: Some(to_wire(&hidden.get(i as i64), Dtype::Float32)?),
                        pooled: pooled
                            .as_ref()
                            .map(|p| to_wire(&p.get(i as i64), Dtype::Float32))
                            .transpose()?,
                        textual_inversions: Vec::new(),
                    })
                })
                .collect::<Result<Vec<_>, ServiceError>>()?;
            Ok(EncodeTextResponse { prompts })
        })
    }

    fn decode_here(&self, req: DecodeRequest) -> Result<DecodeResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let latents = from_wire(req.latents.as_ref(), "latents")?;
            let (scale, shift) = self.vae.config().normalization();
            // As the autoencoder service: FLUX.2's batch norm undone and its
            // 2×2 patches unfolded (nothing for other VAEs).
            let z = self.vae.from_denoiser(&(latents / scale + shift))?;
            let pixels = self.vae.decode(&z)?;
            Ok(DecodeResponse {
                images: to_rgb8(&pixels)?,
            })
        })
    }

    fn encode_image_here(
        &self,
        req: EncodeImageRequest,
    ) -> Result<EncodeImageResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let pixels = from_wire(req.pixels.as_ref(), "pixels")?;
            let d = self.vae.encode(&pixels)?;
            let mean = self.vae.to_denoiser(&d.mean)?;
            let std = self.vae.std_to_denoiser(&d.std)?;
            Ok(EncodeImageResponse {
                mean: Some(to_wire(&mean, Dtype::Float32)?),
                std: Some(to_wire(&std, Dtype::Float32)?),
            })
        })
    }
}

/// A generation's steps, run in process.
struct LocalSteps<'a>(&'a InProcess);

#[tonic::async_trait]
impl StepSession for LocalSteps<'_> {
    async fn step(&mut self, req: PredictRequest) -> Result<PredictResponse, Error> {
        staged(Stage::Denoiser, self.0.predict(req))
    }
}

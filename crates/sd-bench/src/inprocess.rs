//! The step loop's stages run in this process, on the same model crates the
//! services use, without gRPC: the baseline the stack is measured against.
//! SD 1.x/2.x and the SDXL family (both text encoders, pooled embeddings
//! and size/crop time ids, the VAE's `force_upcast`), as the services run
//! them.

use std::collections::HashMap;
use std::sync::Mutex;

use sd_gateway::error::{Error, Stage};
use sd_gateway::facts::{Family as GatewayFamily, ModelFacts};
use sd_gateway::stages::{Stages, StepSession};
use sd_models::{Component, ModelDir, Placement, UNet, Vae};
use sd_proto::v1::{
    DecodeRequest, DecodeResponse, Dtype, Embedding, EncodeImageRequest, EncodeImageResponse,
    EncodeTextRequest, EncodeTextResponse, EncodedPrompt, PredictRequest, PredictResponse,
};
use sd_runtime::deadline::Deadline;
use sd_sampling::{SchedulerConfig, SchedulerKind};
use sd_service::compute::{forward_calls, to_rgb8, Call, XlConditioning};
use sd_service::family::{vae_placement, Family};
use sd_service::text::TextEncoders;
use sd_service::{from_wire, to_wire, ServiceError};
use tch::Tensor;

pub struct InProcess {
    text: TextEncoders,
    unet: UNet,
    vae: Vae,
    family: Family,
    /// Embeddings by id: hidden states and, for SDXL, the pooled one.
    embeddings: Mutex<HashMap<String, (Tensor, Option<Tensor>)>>,
}

impl InProcess {
    pub fn load(dir: &ModelDir, p: Placement) -> anyhow::Result<(Self, ModelFacts)> {
        let unet = dir.load_unet(p)?;
        let vae_config: sd_models::config::VaeConfig =
            sd_models::config::read_json(&dir.config_path(Component::Vae))?;
        let me = InProcess {
            text: TextEncoders::load(dir, p, None)?,
            family: Family::of(dir, &unet)?,
            unet,
            vae: dir.load_vae(vae_placement(p, dir.is_xl()?, vae_config.force_upcast))?,
            embeddings: Mutex::new(HashMap::new()),
        };
        let scheduler_config =
            SchedulerConfig::from_json(&std::fs::read_to_string(dir.scheduler_config_path())?)?;
        let c = me.unet.config();
        let facts = ModelFacts {
            id: format!("in-process:{}", dir.root().display()),
            name: dir
                .root()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            latent_channels: c.in_channels as usize,
            scale_factor: me.vae.scale_factor() as u32,
            sample_size: c.sample_size as u32,
            scaling_factor: me.vae.config().scaling_factor as f32,
            max_decode_pixels: 0,
            cost: Default::default(),
            default_scheduler: scheduler_config
                .class_name()
                .and_then(SchedulerKind::from_diffusers_class)
                .unwrap_or(SchedulerKind::Pndm),
            prediction: scheduler_config.prediction()?,
            scheduler_config,
            text_layers: me.text.shape().2.max(0) as u32,
            text_model_id: format!("in-process:{}", dir.root().display()),
            family: GatewayFamily {
                pooled_dim: me.family.pooled_dim as u32,
                time_ids_len: me.family.time_ids_len as u32,
                time_cond_dim: c.time_cond_proj_dim.unwrap_or(0).max(0) as u32,
                force_zeros_for_empty_prompt: me.family.force_zeros,
                requires_aesthetics_score: me.family.requires_aesthetics,
                default_guidance: me.family.default_guidance,
                default_steps: me.family.default_steps,
            },
        };
        Ok((me, facts))
    }

    /// Mean milliseconds of one UNet forward over `rows` latents of `side`².
    pub fn unet_forward_ms(&self, rows: i64, side: i64) -> anyhow::Result<f64> {
        let _guard = tch::no_grad_guard();
        let c = self.unet.config();
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let x = Tensor::randn([rows, c.in_channels, side, side], f);
        let t = Tensor::full([rows], 500.0, f);
        let ctx = Tensor::randn([rows, 77, c.context_dim()], f);
        // Reading a value back waits for the device (CUDA runs async).
        let wait = |y: Tensor| y.sum(tch::Kind::Float).double_value(&[]);
        wait(self.unet.forward_probe(&x, &t, &ctx)?);
        let n = 5;
        let start = std::time::Instant::now();
        let mut y = None;
        for _ in 0..n {
            y = Some(self.unet.forward_probe(&x, &t, &ctx)?);
        }
        if let Some(y) = y {
            wait(y);
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / n as f64)
    }

    /// One step, on this thread.
    fn predict(&self, req: PredictRequest) -> Result<PredictResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let latents = from_wire(req.latents.as_ref(), "latents")?;
            let batch = latents.size()[0];
            let guided = req.uncond.is_some() && req.guidance_scale > 1.0;
            let (cond, cond_pooled) = self.embedding(req.cond.as_ref(), "cond")?;
            let uncond = if guided {
                Some(self.embedding(req.uncond.as_ref(), "uncond")?)
            } else {
                None
            };
            let xl = match cond_pooled {
                Some(cond_pooled) if self.family.pooled_dim > 0 => {
                    let time_ids = from_wire(req.time_ids.as_ref(), "time_ids")?;
                    let negative_time_ids = match &req.negative_time_ids {
                        Some(t) => from_wire(Some(t), "negative_time_ids")?,
                        None => time_ids.shallow_clone(),
                    };
                    Some(XlConditioning {
                        cond_pooled,
                        uncond_pooled: uncond
                            .as_ref()
                            .and_then(|(_, p)| p.as_ref().map(Tensor::shallow_clone)),
                        time_ids,
                        negative_time_ids,
                    })
                }
                _ => None,
            };
            let call = Call {
                timesteps: Tensor::from_slice(&req.timesteps).expand([batch], false),
                latents,
                cond,
                uncond: uncond.map(|(hidden, _)| hidden),
                guidance: req.guidance_scale as f64,
                xl,
                loras: Default::default(),
            };
            let out = forward_calls(&self.unet, &[&call])?.remove(0);
            let dtype = Dtype::try_from(req.output_dtype).unwrap_or(Dtype::Float32);
            Ok(PredictResponse {
                output: Some(to_wire(&out, dtype)?),
            })
        })
    }

    fn embedding(
        &self,
        e: Option<&Embedding>,
        field: &str,
    ) -> Result<(Tensor, Option<Tensor>), ServiceError> {
        let e = e.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
        let mut cache = self
            .embeddings
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        let copy = |(h, p): &(Tensor, Option<Tensor>)| {
            (h.shallow_clone(), p.as_ref().map(Tensor::shallow_clone))
        };
        match &e.tensor {
            Some(t) => {
                let hidden = from_wire(Some(t), field)?;
                let pooled = e
                    .pooled
                    .as_ref()
                    .map(|p| from_wire(Some(p), field))
                    .transpose()?;
                let entry = (hidden, pooled);
                let out = copy(&entry);
                cache.insert(e.id.clone(), entry);
                Ok(out)
            }
            None => cache
                .get(&e.id)
                .map(copy)
                .ok_or_else(|| ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                }),
        }
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
            let (_, hidden, pooled) = self.text.encode(&refs, req.clip_skip as usize)?;
            let prompts = (0..refs.len())
                .map(|i| {
                    Ok(EncodedPrompt {
                        token_ids: Vec::new(),
                        embeddings: Some(to_wire(&hidden.get(i as i64), Dtype::Float32)?),
                        pooled: pooled
                            .as_ref()
                            .map(|p| to_wire(&p.get(i as i64), Dtype::Float32))
                            .transpose()?,
                    })
                })
                .collect::<Result<Vec<_>, ServiceError>>()?;
            Ok(EncodeTextResponse { prompts })
        })
    }

    fn decode_here(&self, req: DecodeRequest) -> Result<DecodeResponse, ServiceError> {
        tokio::task::block_in_place(|| {
            let latents = from_wire(req.latents.as_ref(), "latents")?;
            let sf = self.vae.config().scaling_factor;
            let pixels = self.vae.decode(&(latents / sf))?;
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
            Ok(EncodeImageResponse {
                mean: Some(to_wire(&d.mean, Dtype::Float32)?),
                std: Some(to_wire(&d.std, Dtype::Float32)?),
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

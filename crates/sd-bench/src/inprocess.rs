//! The step loop's stages run in this process, on the same model crates the
//! services use, without gRPC: the baseline the stack is measured against.

use std::collections::HashMap;
use std::sync::Mutex;

use sd_gateway::error::{Error, Stage};
use sd_gateway::facts::ModelFacts;
use sd_gateway::stages::{Stages, StepSession};
use sd_models::{ClipTextModel, ClipTokenizer, ModelDir, Placement, UNet, Vae};
use sd_proto::v1::{
    DecodeRequest, DecodeResponse, Dtype, Embedding, EncodeImageRequest, EncodeImageResponse,
    EncodeTextRequest, EncodeTextResponse, EncodedPrompt, PredictRequest, PredictResponse,
};
use sd_runtime::deadline::Deadline;
use sd_sampling::{SchedulerConfig, SchedulerKind};
use sd_service::compute::{forward_calls, to_rgb8, Call};
use sd_service::{from_wire, to_wire, ServiceError};
use tch::Tensor;

pub struct InProcess {
    tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    unet: UNet,
    vae: Vae,
    embeddings: Mutex<HashMap<String, Tensor>>,
}

impl InProcess {
    pub fn load(dir: &ModelDir, p: Placement) -> anyhow::Result<(Self, ModelFacts)> {
        let me = InProcess {
            tokenizer: dir.load_tokenizer()?,
            clip: dir.load_text_encoder(p)?,
            unet: dir.load_unet(p)?,
            vae: dir.load_vae(p)?,
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
            text_layers: me.clip.config().num_hidden_layers as u32,
            text_model_id: format!("in-process:{}", dir.root().display()),
            family: Default::default(),
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
            let guided = req.uncond.is_some() && req.guidance_scale > 1.0;
            let call = Call {
                timesteps: Tensor::from_slice(&req.timesteps).expand([latents.size()[0]], false),
                latents,
                cond: self.embedding(req.cond.as_ref(), "cond")?,
                uncond: if guided {
                    Some(self.embedding(req.uncond.as_ref(), "uncond")?)
                } else {
                    None
                },
                guidance: req.guidance_scale as f64,
                // The in-process pipeline runs SD 1.x/2.x models.
                xl: None,
            };
            let out = forward_calls(&self.unet, &[&call])?.remove(0);
            let dtype = Dtype::try_from(req.output_dtype).unwrap_or(Dtype::Float32);
            Ok(PredictResponse {
                output: Some(to_wire(&out, dtype)?),
            })
        })
    }

    fn embedding(&self, e: Option<&Embedding>, field: &str) -> Result<Tensor, ServiceError> {
        let e = e.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
        let mut cache = self
            .embeddings
            .lock()
            .map_err(|_| ServiceError::Internal("embedding cache poisoned"))?;
        match &e.tensor {
            Some(t) => {
                let t = from_wire(Some(t), field)?;
                cache.insert(e.id.clone(), t.shallow_clone());
                Ok(t)
            }
            None => cache.get(&e.id).map(Tensor::shallow_clone).ok_or_else(|| {
                ServiceError::EmbeddingMiss {
                    field: field.to_string(),
                    id: e.id.clone(),
                }
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
            let ids = self.tokenizer.encode_batch(&refs)?;
            let hidden = self.clip.forward(&ids, req.clip_skip as usize)?;
            let prompts = (0..refs.len())
                .map(|i| {
                    Ok(EncodedPrompt {
                        token_ids: Vec::new(),
                        embeddings: Some(to_wire(&hidden.get(i as i64), Dtype::Float32)?),
                        pooled: None,
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

//! sd-text-encoder: the CLIP tokenizer and text transformer as a gRPC service
//! (both of them for SDXL-family models).

use std::sync::Arc;

use clap::Parser;
use sd_models::clip_vision::ClipVisionModel;
use sd_models::lora::{self, Plan};
use sd_proto::v1::text_encoder_server::{TextEncoder, TextEncoderServer};
use sd_proto::v1::{
    Dtype, EncodeImagesRequest, EncodeImagesResponse, EncodeTextRequest, EncodeTextResponse,
    EncodedPrompt, ImageEncoderInfo, PromptSyntax, TextEncoderInfo, TextEncoderInfoRequest,
};
use sd_runtime::lifecycle::Lifecycle;
use sd_runtime::metrics::{Metrics, Phase};
use sd_runtime::tls::ServerTlsArgs;
use sd_runtime::ServerArgs;
use sd_service::lora::{LoraArgs, LoraStore};
use sd_service::text::TextEncoders;
use sd_service::{handle, to_wire, ModelArgs, ServiceError, Worker};
use tonic::{Request, Response, Status};

/// Serve a model's CLIP text encoder over gRPC (sd.v1.TextEncoder).
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Most prompts one Encode call may carry.
    #[arg(long, env = "SD_MAX_PROMPTS", default_value_t = 64)]
    max_prompts: usize,
    #[command(flatten)]
    lora: LoraArgs,
    /// Textual-inversion embeddings: `NAME.safetensors` files (A1111's and
    /// diffusers' layouts, SDXL's clip_l/clip_g); a prompt word NAME is
    /// replaced by the file's vectors. Read at start.
    #[arg(long, env = "SD_EMBEDDINGS_DIR")]
    embeddings_dir: Option<std::path::PathBuf>,
    /// IP-Adapters' folder: its `image_encoder/` (a CLIP vision model, as
    /// published beside the adapters) reads requests' pictures.
    #[arg(long, env = "SD_IP_ADAPTER_DIR")]
    ip_adapter_dir: Option<std::path::PathBuf>,
    /// Most pictures one EncodeImages call may carry.
    #[arg(long, env = "SD_MAX_PICTURES", default_value_t = 16)]
    max_pictures: i64,
}

struct Service {
    model: Arc<TextEncoders>,
    worker: Worker,
    info: TextEncoderInfo,
    max_prompts: usize,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    /// LoRA adapters (--lora-dir), fitted to the text encoder(s).
    loras: Arc<LoraStore>,
    /// The IP-Adapters' image encoder (--ip-adapter-dir).
    vision: Option<Arc<ClipVisionModel>>,
    max_pictures: i64,
}

#[tonic::async_trait]
impl TextEncoder for Service {
    async fn encode(
        &self,
        request: Request<EncodeTextRequest>,
    ) -> Result<Response<EncodeTextResponse>, Status> {
        handle(&self.lifecycle, &self.metrics, "Encode", request, |req| {
            self.encode_inner(req)
        })
        .await
    }

    async fn info(
        &self,
        _: Request<TextEncoderInfoRequest>,
    ) -> Result<Response<TextEncoderInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn encode_images(
        &self,
        request: Request<EncodeImagesRequest>,
    ) -> Result<Response<EncodeImagesResponse>, Status> {
        handle(
            &self.lifecycle,
            &self.metrics,
            "EncodeImages",
            request,
            |req| self.encode_images_inner(req),
        )
        .await
    }
}

impl Service {
    /// Pictures (n, 3, size, size) through the image encoder.
    async fn encode_images_inner(
        &self,
        req: EncodeImagesRequest,
    ) -> Result<EncodeImagesResponse, ServiceError> {
        let Some(vision) = self.vision.clone() else {
            return Err(ServiceError::invalid(
                "pixels",
                "this text encoder has no image encoder (started without --ip-adapter-dir)",
            ));
        };
        let pixels = sd_service::from_wire(req.pixels.as_ref(), "pixels")?;
        let (s, side) = (pixels.size(), vision.config().image_size);
        if s.len() != 4 || !(1..=self.max_pictures).contains(&s[0]) || s[1..] != [3, side, side] {
            return Err(ServiceError::invalid(
                "pixels",
                format_args!(
                    "shape {s:?}, expected (1..={}, 3, {side}, {side})",
                    self.max_pictures
                ),
            ));
        }
        sd_service::finite(&pixels, "pixels")?;
        let embeds = self
            .worker
            .run(Phase::TextForward, move || Ok(vision.forward(&pixels)?))
            .await?;
        Ok(EncodeImagesResponse {
            image_embeds: Some(to_wire(&embeds, Dtype::Float32)?),
        })
    }

    async fn encode_inner(
        &self,
        req: EncodeTextRequest,
    ) -> Result<EncodeTextResponse, ServiceError> {
        if req.prompts.is_empty() || req.prompts.len() > self.max_prompts {
            return Err(ServiceError::invalid(
                "prompts",
                format_args!(
                    "{} given, 1..={} allowed",
                    req.prompts.len(),
                    self.max_prompts
                ),
            ));
        }
        if req.clip_skip >= self.info.num_layers {
            return Err(ServiceError::invalid(
                "clip_skip",
                format_args!(
                    "{} given, 0..{} allowed",
                    req.clip_skip, self.info.num_layers
                ),
            ));
        }
        let dtype = Dtype::try_from(req.dtype).map_err(|_| {
            ServiceError::invalid("dtype", format_args!("unknown value {}", req.dtype))
        })?;
        let syntax = PromptSyntax::try_from(req.syntax).map_err(|_| {
            ServiceError::invalid("syntax", format_args!("unknown value {}", req.syntax))
        })?;
        sd_service::lora::check(&req.loras)?;
        let length = match (self.model.takes_length(), req.max_sequence_length) {
            (false, 0) => 0,
            (false, _) => {
                return Err(ServiceError::invalid(
                    "max_sequence_length",
                    "applies to FLUX models (T5, Qwen3) only",
                ))
            }
            (true, 0) => self.info.max_tokens as usize,
            (true, n) if n <= self.info.max_tokens => n as usize,
            (true, n) => {
                return Err(ServiceError::invalid(
                    "max_sequence_length",
                    format_args!("{n} given, 1..={} allowed", self.info.max_tokens),
                ))
            }
        };
        let model = self.model.clone();
        let prompts = req.prompts;
        let clip_skip = req.clip_skip as usize;
        let (store, refs) = (self.loras.clone(), req.loras);
        let out = self
            .worker
            .run(Phase::TextForward, move || {
                // Every forward of this call (prompt and negative prompt,
                // each A1111 chunk) runs with the request's adapters.
                let set = store.resolve(&refs)?;
                lora::with_plan(Plan::all(set), || {
                    encode(&model, &prompts, (clip_skip, length), syntax, dtype)
                })
            })
            .await?;
        Ok(EncodeTextResponse { prompts: out })
    }
}

/// The prompts read as `syntax` says.
/// `(clip_skip, length)`: `length` is FLUX's T5 tokens per prompt.
fn encode(
    model: &TextEncoders,
    prompts: &[String],
    (clip_skip, length): (usize, usize),
    syntax: PromptSyntax,
    dtype: Dtype,
) -> Result<Vec<EncodedPrompt>, ServiceError> {
    match syntax {
        PromptSyntax::Plain => encode_plain(model, prompts, (clip_skip, length), dtype),
        PromptSyntax::A1111 => prompts
            .iter()
            .map(|p| {
                let (ids, hidden, pooled) = model.encode_a1111(p, clip_skip, length)?;
                let mut e = encoded(
                    ids,
                    &hidden.get(0),
                    pooled.as_ref().map(|p| p.get(0)),
                    dtype,
                )?;
                e.textual_inversions = model.inversions_in(p, true)?;
                Ok(e)
            })
            .collect(),
    }
}

/// Prompts as diffusers reads them, in one batch.
fn encode_plain(
    model: &TextEncoders,
    prompts: &[String],
    (clip_skip, length): (usize, usize),
    dtype: Dtype,
) -> Result<Vec<EncodedPrompt>, ServiceError> {
    if model.per_prompt_length() {
        // Each prompt its own length (Z-Image's unpadded tokens).
        return prompts
            .iter()
            .map(|p| {
                let (ids, hidden, _) = model.encode(&[p.as_str()], clip_skip, length)?;
                encoded(
                    Vec::<i64>::try_from(ids.flatten(0, -1))?,
                    &hidden.get(0),
                    None,
                    dtype,
                )
            })
            .collect();
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let (ids, hidden, pooled) = model.encode(&refs, clip_skip, length)?;
    let ids: Vec<i64> = Vec::<i64>::try_from(ids.flatten(0, -1))?;
    let per = ids.len() / prompts.len().max(1);
    (0..prompts.len())
        .map(|i| {
            let mut e = encoded(
                ids[i * per..(i + 1) * per].to_vec(),
                &hidden.get(i as i64),
                pooled.as_ref().map(|p| p.get(i as i64)),
                dtype,
            )?;
            e.textual_inversions = model.inversions_in(&prompts[i], false)?;
            Ok(e)
        })
        .collect()
}

fn encoded(
    token_ids: Vec<i64>,
    hidden: &tch::Tensor,
    pooled: Option<tch::Tensor>,
    dtype: Dtype,
) -> Result<EncodedPrompt, ServiceError> {
    Ok(EncodedPrompt {
        token_ids,
        embeddings: Some(to_wire(hidden, dtype)?),
        pooled: pooled.map(|p| to_wire(&p, dtype)).transpose()?,
        textual_inversions: Vec::new(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (server, tls) = (args.server.clone(), args.tls.clone());
    sd_service::serve_model(
        sd_proto::Stage::TextEncoder,
        &server,
        &tls,
        move |metrics, lifecycle| load(args, metrics, lifecycle),
    )
}

/// Load the tokenizer and text encoder; warm up.
fn load(
    args: Args,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) -> anyhow::Result<TextEncoderServer<Service>> {
    let max = args.server.max_message_bytes();
    let placement = args.model.placement()?;
    let threads = args
        .model
        .apply_threads(sd_service::machine::Role::TextEncoder, &metrics);
    let dir = args.model.model_dir()?;
    let mut model = TextEncoders::load(&dir, placement, Some(&metrics))?;
    let textual_inversions = match &args.embeddings_dir {
        Some(d) => model.load_embeddings(d)?,
        None => Vec::new(),
    };
    let loras = Arc::new(LoraStore::new(
        &args.lora,
        model.modules(),
        dir.unet_layers_per_block()?,
        placement,
        metrics.clone(),
    )?);
    // Warm up: one forward before reporting SERVING.
    let _warm = model.encode(&[""], 0, 16)?;
    let (hidden, tokens, layers, pooled) = model.shape();
    let components = model.components();
    // The embeddings are part of what a prompt encodes to: they key the
    // gateway's prompt cache with the weights.
    let mut model_id = sd_service::model_id(&dir, components);
    let loaded: Vec<&str> = textual_inversions
        .iter()
        .filter(|t| t.skipped.is_empty())
        .map(|t| t.sha256.as_str())
        .collect();
    if !loaded.is_empty() {
        let joined = loaded.join(",");
        let h = &sd_service::ti::digest(joined.as_bytes())[..12];
        model_id = format!("{model_id}+ti:{h}");
    }
    let (vision, image_encoder) = match &args.ip_adapter_dir {
        Some(d) => {
            let (v, info) = image_encoder(d, placement)?;
            (Some(Arc::new(v)), Some(info))
        }
        None => (None, None),
    };
    let info = TextEncoderInfo {
        image_encoder,
        model_id,
        hidden_size: hidden as u32,
        max_tokens: tokens as u32,
        num_layers: layers.max(0) as u32,
        pooled_size: pooled as u32,
        family: sd_proto::v1::ModelFamily::from(dir.family()) as i32,
        textual_inversions,
    };
    let service = Service {
        model: Arc::new(model),
        worker: Worker::new(threads.workers, args.model.max_queue, metrics.clone()),
        info,
        max_prompts: args.max_prompts,
        lifecycle,
        metrics,
        loras,
        vision,
        max_pictures: args.max_pictures,
    };
    Ok(TextEncoderServer::new(service)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}

/// The IP-Adapters' image encoder in `dir/image_encoder`, warmed up, and
/// what the gateway needs to prepare pictures for it.
fn image_encoder(
    dir: &std::path::Path,
    placement: sd_models::Placement,
) -> anyhow::Result<(ClipVisionModel, ImageEncoderInfo)> {
    let folder = dir.join("image_encoder");
    anyhow::ensure!(
        folder.is_dir(),
        "--ip-adapter-dir {}: no image_encoder/ folder (the CLIP vision model the adapters \
         read pictures with)",
        dir.display()
    );
    let v = ClipVisionModel::load(&folder, placement)?;
    let p = v.preprocessing().clone();
    let (side, embed_dim) = (v.config().image_size, v.config().projection_dim);
    let _warm = v.forward(&tch::Tensor::zeros(
        [1, 3, side, side],
        (tch::Kind::Float, tch::Device::Cpu),
    ))?;
    // Its identity: the config and the weights' sizes and times.
    let mut stamp = std::fs::read(folder.join("config.json")).unwrap_or_default();
    for e in std::fs::read_dir(&folder)?.flatten() {
        if let Ok(m) = e.metadata() {
            stamp.extend(
                format!(
                    "{}:{}:{:?};",
                    e.file_name().to_string_lossy(),
                    m.len(),
                    m.modified().ok()
                )
                .bytes(),
            );
        }
    }
    let id = sd_service::ti::digest(&stamp)[..16].to_string();
    Ok((
        v,
        ImageEncoderInfo {
            size: side as u32,
            mean: p.mean.to_vec(),
            std: p.std.to_vec(),
            embed_dim: embed_dim as u32,
            id,
        },
    ))
}

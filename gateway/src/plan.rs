//! A `GenerateRequest`, checked and with its defaults resolved, before any
//! model work: every field outside its range is INVALID_ARGUMENT naming the
//! field and what is allowed.

use sd_proto::v1::{GenerateRequest, GenerationParameters, ImageFormat, PreviewMode};
use sd_proto::wire::HostTensor;
use sd_sampling::SchedulerKind;
use tonic::Status;

use crate::backends::ModelFacts;
use crate::images;

/// Bounds on what one request may ask for.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Smallest image side in pixels.
    #[arg(long, env = "SD_MIN_SIDE", default_value_t = 8)]
    pub min_side: u32,
    /// Largest image side in pixels.
    #[arg(long, env = "SD_MAX_SIDE", default_value_t = 2048)]
    pub max_side: u32,
    /// Most denoising steps per request.
    #[arg(long, env = "SD_MAX_STEPS", default_value_t = 150)]
    pub max_steps: u32,
    /// Most images per request.
    #[arg(long, env = "SD_MAX_IMAGES", default_value_t = 8)]
    pub max_images: u32,
    /// Longest prompt (and negative prompt) in bytes.
    #[arg(long, env = "SD_MAX_PROMPT_BYTES", default_value_t = 4096)]
    pub max_prompt_bytes: usize,
    /// Largest init image in bytes.
    #[arg(long, env = "SD_MAX_INIT_IMAGE_BYTES", default_value_t = 16 << 20)]
    pub max_init_image_bytes: usize,
    /// Most work per request: images × steps × megapixels.
    #[arg(long, env = "SD_MAX_COST", default_value_t = 8.0 * 150.0 * 1.05)]
    pub max_cost: f64,
}

impl Default for Limits {
    /// The flags' defaults (one source for the numbers; `SD_*` variables
    /// apply here as on the command line).
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let matches =
            Limits::augment_args(clap::Command::new("limits")).get_matches_from(["limits"]);
        Limits::from_arg_matches(&matches).expect("the limits' defaults parse")
    }
}

/// The initial image of an image-to-image request, ready for the VAE.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// (1, 3, H, W) in [-1, 1].
    pub pixels: HostTensor,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub eta: f32,
    pub seed: u64,
    pub num_images: u32,
    pub clip_skip: u32,
    pub init: Option<InitImage>,
    pub strength: f32,
    pub format: ImageFormat,
    pub preview_every: u32,
    pub preview_mode: PreviewMode,
    pub model_id: String,
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// A seed for requests that bring none (32 bits, as most SD tools show them).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xffff_ffff
}

impl Plan {
    pub fn new(req: GenerateRequest, facts: &ModelFacts, limits: &Limits) -> Result<Plan, Status> {
        if !req.model.is_empty() && req.model != facts.id && req.model != facts.name {
            return Err(Status::not_found(format!(
                "model: `{}` is not served here (this gateway serves `{}`)",
                req.model, facts.name
            )));
        }
        for (field, text) in [
            ("prompt", &req.prompt),
            ("negative_prompt", &req.negative_prompt),
        ] {
            if text.len() > limits.max_prompt_bytes {
                return Err(invalid(
                    field,
                    format!(
                        "{} bytes, at most {} allowed",
                        text.len(),
                        limits.max_prompt_bytes
                    ),
                ));
            }
        }
        let f = facts.scale_factor;
        let steps = if req.steps == 0 { 50 } else { req.steps };
        if steps > limits.max_steps {
            return Err(invalid(
                "steps",
                format!("{steps} given, 1..={} allowed", limits.max_steps),
            ));
        }
        let guidance = req.guidance_scale.unwrap_or(7.5);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(invalid(
                "guidance_scale",
                format!("{guidance} given, a finite value in 0..=100 allowed"),
            ));
        }
        let scheduler = if req.scheduler.is_empty() {
            facts.default_scheduler
        } else {
            req.scheduler.parse().map_err(|e| invalid("scheduler", e))?
        };
        if req.karras && !scheduler.supports_karras() {
            return Err(invalid(
                "karras",
                format!(
                    "not available for {scheduler}; use one of euler, lms, heun, dpmpp-2m, unipc"
                ),
            ));
        }
        if !req.eta.is_finite() || !(0.0..=1.0).contains(&req.eta) {
            return Err(invalid("eta", format!("{} given, 0..=1 allowed", req.eta)));
        }
        if req.eta > 0.0 && !scheduler.supports_eta() {
            return Err(invalid(
                "eta",
                format!("applies to ddim only, not {scheduler}"),
            ));
        }
        let num_images = if req.num_images == 0 {
            1
        } else {
            req.num_images
        };
        if num_images > limits.max_images {
            return Err(invalid(
                "num_images",
                format!("{num_images} given, 1..={} allowed", limits.max_images),
            ));
        }
        if req.clip_skip >= facts.text_layers {
            return Err(invalid(
                "clip_skip",
                format!("{} given, 0..{} allowed", req.clip_skip, facts.text_layers),
            ));
        }
        let format = ImageFormat::try_from(req.format)
            .map_err(|_| invalid("format", format!("unknown value {}", req.format)))?;
        let preview_mode = PreviewMode::try_from(req.preview_mode).map_err(|_| {
            invalid(
                "preview_mode",
                format!("unknown value {}", req.preview_mode),
            )
        })?;

        let check_side = |field: &str, v: u32| -> Result<u32, Status> {
            if v < limits.min_side || v > limits.max_side || !v.is_multiple_of(f) {
                return Err(invalid(
                    field,
                    format!(
                        "{v} given, a multiple of {f} in {}..={} allowed",
                        limits.min_side.max(f),
                        limits.max_side
                    ),
                ));
            }
            Ok(v)
        };
        let default_side = facts.sample_size * f;
        let (mut width, mut height) = (req.width, req.height);
        let (init, strength) = if req.init_image.is_empty() {
            if req.strength.is_some() {
                return Err(invalid(
                    "strength",
                    "applies to image-to-image only (set init_image)",
                ));
            }
            (None, 0.0)
        } else {
            let strength = req.strength.unwrap_or(0.8);
            if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
                return Err(invalid(
                    "strength",
                    format!("{strength} given, (0, 1] allowed"),
                ));
            }
            if ((steps as f32 * strength) as u32) < 1 {
                return Err(invalid(
                    "strength",
                    format!("{strength} × {steps} steps leaves no step to run"),
                ));
            }
            let target = (width != 0 || height != 0).then_some((width, height));
            let (pixels, w, h) = images::decode_init_image(&req.init_image, limits, f, target)?;
            width = w;
            height = h;
            (Some(InitImage { pixels }), strength)
        };
        let width = check_side("width", if width == 0 { default_side } else { width })?;
        let height = check_side("height", if height == 0 { default_side } else { height })?;
        let cost = num_images as f64 * steps as f64 * (width as f64 * height as f64 / 1e6);
        if cost > limits.max_cost {
            return Err(invalid(
                "num_images",
                format!(
                    "{num_images} images × {steps} steps × {width}×{height} is {cost:.0} image-step-megapixels, at most {:.0} allowed",
                    limits.max_cost
                ),
            ));
        }
        Ok(Plan {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            width,
            height,
            steps,
            guidance,
            scheduler,
            karras: req.karras,
            eta: req.eta,
            seed: req.seed.unwrap_or_else(random_seed),
            num_images,
            clip_skip: req.clip_skip,
            init,
            strength,
            format,
            preview_every: req.preview_every,
            preview_mode,
            model_id: facts.id.clone(),
        })
    }

    pub fn parameters(&self) -> GenerationParameters {
        GenerationParameters {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance,
            scheduler: self.scheduler.name().to_string(),
            karras: self.karras,
            eta: self.eta,
            seed: self.seed,
            num_images: self.num_images,
            clip_skip: self.clip_skip,
            strength: self.strength,
            model: self.model_id.clone(),
        }
    }
}

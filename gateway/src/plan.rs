//! A `GenerateRequest`, checked and with its defaults resolved, before any
//! model work: every field outside its range is INVALID_ARGUMENT naming the
//! field and what is allowed, and the scheduler is built here, so a bad
//! combination is refused before the text encoder runs.

use sd_proto::status::quote;
use sd_proto::v1::{
    GenerateRequest, GenerationParameters, ImageFormat, LoraRef, MaskedContent, PreviewMode,
    PromptSyntax,
};
use sd_proto::wire::HostTensor;
use sd_sampling::schedulers::{build, SchedulerOptions};
use sd_sampling::{Scheduler, SchedulerError, SchedulerKind};

use crate::error::{Error, Result};
use crate::facts::ModelFacts;
use crate::images;
use crate::limits::Limits;

/// diffusers' defaults where a request leaves a field unset.
/// Steps when neither the request nor the model says.
pub const DEFAULT_STEPS: u32 = 50;
const DEFAULT_STRENGTH: f32 = 0.8;
/// … and with a mask (diffusers' inpainting pipelines: the masked part
/// from pure noise).
const DEFAULT_INPAINT_STRENGTH: f32 = 1.0;

/// The initial image of an image-to-image request, ready for the VAE.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// (1, 3, H, W) in [-1, 1].
    pub pixels: HostTensor,
}

/// Inpainting: the mask over the init image and how it is applied.
#[derive(Debug, Clone)]
pub struct Inpaint {
    pub mask: crate::mask::Mask,
    /// What the masked part starts from (A1111's latent fills).
    pub masked_content: MaskedContent,
    /// AUTOMATIC1111's blend of the denoised prediction each step (else
    /// diffusers' blend of the re-noised picture after each step).
    pub blend_denoised: bool,
    /// A1111's `initial_noise_multiplier` (1: none).
    pub noise_multiplier: f32,
}

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
    /// Inpainting (with `init`): the mask and how it is applied.
    pub inpaint: Option<Inpaint>,
    pub format: ImageFormat,
    pub preview_every: u32,
    pub preview_mode: PreviewMode,
    pub model_id: String,
    /// The scheduler, built for this request's steps and options.
    pub schedule: Box<dyn Scheduler>,
    /// UNet seconds this request is predicted to take on the model's
    /// denoiser (None when it published no cost).
    pub predicted_seconds: Option<f64>,
    /// … and one of its UNet forwards.
    pub predicted_step_seconds: Option<f64>,
    /// SDXL family: each latent's time ids (size and crop conditioning).
    pub time_ids: Option<crate::micro::TimeIds>,
    /// An LCM UNet: the guidance goes in as an embedding; no negative
    /// branch. FLUX.1-dev: the distilled guidance goes in as a value.
    pub guidance_embedded: bool,
    /// FLUX family: the real classifier-free guidance scale (1: off).
    pub true_cfg: f32,
    /// FLUX family: T5 tokens per prompt (0 for other families).
    pub max_sequence_length: u32,
    /// The family's rule for classifier-free guidance.
    pub guidance_rule: GuidanceRule,
    /// The model is a flow-matching one (FLUX): guidance as FLUX reads it.
    pub flow: bool,
    /// How the prompts are read (plain, or AUTOMATIC1111's syntax).
    pub prompt_syntax: PromptSyntax,
    /// LoRA adapters (the request's, and the prompt's A1111 tags).
    pub loras: Vec<LoraRef>,
    /// Hires fix: the second pass.
    pub hires: Option<crate::hires::HiresPlan>,
    /// FLUX.2 Klein: the reference images, prepared.
    pub references: Vec<crate::reference::Reference>,
    /// ControlNet units, their hints made at this pass's size.
    pub controls: Vec<crate::control::ControlPlan>,
    /// IP-Adapters, their pictures prepared for the image encoder.
    pub ip_adapters: Vec<crate::ip::IpPlan>,
    /// An async job's step record (predictions to replay, and where new
    /// ones go); none for other generations.
    pub replay: Option<crate::pipeline::Replay>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("steps", &self.steps)
            .field("scheduler", &self.scheduler)
            .field("seed", &self.seed)
            .field("num_images", &self.num_images)
            .field("img2img", &self.init.is_some())
            .field("inpaint", &self.inpaint.is_some())
            .field("references", &self.references.len())
            .finish_non_exhaustive()
    }
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

/// Each family's rule for classifier-free guidance, as its pipeline has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceRule {
    /// SD, SDXL: `guidance_scale` above 1, unless the network embeds it.
    Sd,
    /// FLUX.1: `true_cfg_scale` above 1 with a negative prompt.
    Flux,
    /// FLUX.2 Klein: `guidance_scale` above 1 against an empty prompt,
    /// unless the model is step-distilled.
    Klein { distilled: bool },
    /// Z-Image: `guidance_scale` above 0, as `pos + g·(pos − neg)` (the
    /// negative prompt, "" when none).
    ZImage,
}

impl GuidanceRule {
    fn of(facts: &ModelFacts) -> Self {
        match (facts.profile.klein(), facts.profile.flux()) {
            (Some(k), _) => GuidanceRule::Klein {
                distilled: k.distilled,
            },
            (None, Some(_)) => GuidanceRule::Flux,
            (None, None) if facts.profile.zimage().is_some() => GuidanceRule::ZImage,
            (None, None) => GuidanceRule::Sd,
        }
    }
}

/// What decides whether classifier-free guidance runs.
struct Guidance {
    rule: GuidanceRule,
    guidance: f32,
    guidance_embedded: bool,
    true_cfg: f32,
    negative: bool,
}

impl Guidance {
    fn guided(&self) -> bool {
        match self.rule {
            GuidanceRule::Sd => self.guidance > 1.0 && !self.guidance_embedded,
            GuidanceRule::Flux => self.true_cfg > 1.0 && self.negative,
            GuidanceRule::Klein { distilled } => self.guidance > 1.0 && !distilled,
            GuidanceRule::ZImage => self.guidance > 0.0,
        }
    }
}

/// The scheduler a request asked for, checked against the model's config.
struct Sampler {
    kind: SchedulerKind,
    karras: bool,
    eta: f32,
    schedule: Box<dyn Scheduler>,
}

/// Where the generation starts: noise at a size, or an init image.
struct Source {
    width: u32,
    height: u32,
    init: Option<InitImage>,
    strength: f32,
    inpaint: Option<Inpaint>,
}

impl Plan {
    pub fn new(mut req: GenerateRequest, facts: &ModelFacts, limits: &Limits) -> Result<Plan> {
        let hires = req.hires.take().map(|h| (h, req.clone()));
        let mut plan = Plan::first_pass(req, facts, limits)?;
        if let Some((h, req)) = hires {
            if !plan.controls.is_empty() && facts.profile.controlnet_takes_latents() {
                return Err(Error::invalid(
                    "hires",
                    "a hires pass with FLUX ControlNets is not served (their control latents \
                     are drawn before the first pass's noise)",
                ));
            }
            let hires = crate::hires::plan(&h, &req, &plan, facts, limits)?;
            // Admitted at the cost of both passes.
            plan.predicted_seconds = plan
                .predicted_seconds
                .zip(hires.second.predicted_seconds)
                .map(|(a, b)| a + b);
            plan.hires = Some(hires);
        }
        Ok(plan)
    }

    fn first_pass(mut req: GenerateRequest, facts: &ModelFacts, limits: &Limits) -> Result<Plan> {
        check_model(&req.model, facts)?;
        check_network_inputs(facts, !req.mask.is_empty())?;
        let loras = loras(&mut req)?;
        let prompt_syntax = check_prompts(&req, limits)?;
        let steps = steps(req.steps, facts.profile.default_steps, limits)?;
        let guidance = guidance(req.guidance_scale, facts.profile.default_guidance)?;
        let guidance_embedded = facts.profile.guidance_embedded;
        let (true_cfg, max_sequence_length) = flux_fields(&req, facts)?;
        let flow = facts.profile.is_flow();
        let guidance_rule = GuidanceRule::of(facts);
        check_family_prompts(&req, guidance_rule, flow, prompt_syntax)?;
        let num_images = num_images(req.num_images, limits)?;
        check_clip_skip(req.clip_skip, facts)?;
        let format = ImageFormat::try_from(req.format)
            .map_err(|_| Error::invalid("format", format!("unknown value {}", req.format)))?;
        let preview_mode = PreviewMode::try_from(req.preview_mode).map_err(|_| {
            Error::invalid(
                "preview_mode",
                format!("unknown value {}", req.preview_mode),
            )
        })?;
        let references = references(&mut req, facts, limits)?;
        let source = Source::new(&req, facts, limits)?;
        let sampler = Sampler::new(&req, facts, steps, image_seq_len(facts, &source))?;
        if source.init.is_some() {
            check_strength_steps(source.strength, steps, sampler.schedule.as_ref())?;
        }
        let guided = Guidance {
            rule: guidance_rule,
            guidance,
            guidance_embedded,
            true_cfg,
            negative: !req.negative_prompt.is_empty(),
        }
        .guided();
        let predicted = predict_seconds(
            facts,
            &source,
            num_images,
            guided,
            sampler.schedule.as_ref(),
            steps,
            reference_positions(facts, &references),
        );
        let controls = crate::control::plan(
            &req.controlnets,
            facts,
            limits,
            (source.width, source.height),
        )?;
        let ip_adapters = crate::ip::plan(&req.ip_adapters, facts, limits)?;
        let steps_run = sampler.schedule.timesteps().len();
        let factor = crate::control::cost_factor(&controls, &facts.cost, steps_run);
        let predicted = predicted.map(|(total, step)| (total * factor, step));
        let predicted_seconds = predicted.map(|p| p.0);
        check_seconds(predicted_seconds, num_images, steps, &source, limits)?;
        let time_ids = crate::micro::time_ids(
            req.conditioning.as_ref(),
            facts,
            (source.height, source.width),
            source.init.is_some(),
        )?;
        Ok(Plan {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            width: source.width,
            height: source.height,
            steps,
            guidance,
            scheduler: sampler.kind,
            karras: sampler.karras,
            eta: sampler.eta,
            seed: req.seed.unwrap_or_else(random_seed),
            num_images,
            clip_skip: req.clip_skip,
            init: source.init,
            strength: source.strength,
            inpaint: source.inpaint,
            format,
            preview_every: req.preview_every,
            preview_mode,
            model_id: facts.id.clone(),
            schedule: sampler.schedule,
            predicted_seconds,
            predicted_step_seconds: predicted.map(|p| p.1),
            time_ids,
            guidance_embedded,
            true_cfg,
            max_sequence_length,
            flow,
            guidance_rule,
            prompt_syntax,
            loras,
            hires: None,
            references,
            controls,
            ip_adapters,
            replay: None,
        })
    }

    /// Classifier-free guidance runs (a negative prompt and two rows per
    /// latent) when the scale is above 1, as in diffusers — except for an
    /// LCM UNet, which takes the scale as an embedding; FLUX runs it when
    /// `true_cfg_scale` is above 1 and there is a negative prompt.
    pub fn guided(&self) -> bool {
        Guidance {
            rule: self.guidance_rule,
            guidance: self.guidance,
            guidance_embedded: self.guidance_embedded,
            true_cfg: self.true_cfg,
            negative: !self.negative_prompt.is_empty(),
        }
        .guided()
    }

    /// The scale of classifier-free guidance (when guided).
    pub fn cfg_scale(&self) -> f32 {
        match self.guidance_rule {
            GuidanceRule::Flux => self.true_cfg,
            GuidanceRule::Sd | GuidanceRule::Klein { .. } => self.guidance,
            // pos + g·(pos − neg) is neg + (1 + g)·(pos − neg): the
            // denoiser's guidance at 1 + g.
            GuidanceRule::ZImage => 1.0 + self.guidance,
        }
    }

    /// What a guidance-distilled network takes as its input (FLUX.1-dev's
    /// distilled guidance); None for the others (an LCM UNet takes
    /// `guidance_scale` itself).
    pub fn embedded_guidance(&self) -> Option<f32> {
        (self.flow && self.guidance_embedded).then_some(self.guidance)
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
            loras: self.loras.clone(),
            // FLUX.1's alone (Klein and Z-Image guide with guidance_scale).
            true_cfg_scale: if self.guidance_rule == GuidanceRule::Flux {
                self.true_cfg
            } else {
                0.0
            },
            max_sequence_length: self.max_sequence_length,
            hires: self.hires.as_ref().map(|h| h.resolved.clone()),
            textual_inversions: Vec::new(),
            controlnets: self.controls.iter().map(|c| c.unit.clone()).collect(),
            ip_adapters: self.ip_adapters.iter().map(|c| c.unit.clone()).collect(),
        }
    }
}

/// The request's LoRA adapters and, with the A1111 syntax, the prompt's
/// `<lora:NAME:SCALE>` / `<lora:NAME:TE:UNET>` tags (taken out of the
/// prompt, as A1111 does),
/// checked: at most `sd_proto::lora::MAX_LORAS`, each named once, names that are file
/// names, finite scales within ±10. Whether each exists and fits the model
/// the denoiser and text encoder say, before any work.
fn loras(req: &mut GenerateRequest) -> Result<Vec<LoraRef>> {
    let mut loras = std::mem::take(&mut req.loras);
    if req.prompt_syntax == PromptSyntax::A1111 as i32 {
        let (prompt, tags) =
            sd_prompt::take_loras(&req.prompt).map_err(|e| Error::invalid("prompt", e))?;
        req.prompt = prompt;
        loras.extend(tags.into_iter().map(|t| LoraRef {
            name: t.name,
            scale: t.scale,
            unet_scale: t.unet,
        }));
        if req.negative_prompt.contains("<lora:") {
            return Err(Error::invalid(
                "negative_prompt",
                "<lora:…> tags apply from the prompt, not the negative prompt",
            ));
        }
    }
    check_loras(&loras)?;
    Ok(loras)
}

/// The checks of a LoRA list that need no file (`sd_proto::lora::check`),
/// the field and index in the message.
pub fn check_loras(loras: &[LoraRef]) -> Result<()> {
    sd_proto::lora::check(loras)
        .map_err(|e| Error::invalid("loras", format!("{}: {}", e.field, e.message)))
}

fn check_model(model: &str, facts: &ModelFacts) -> Result<()> {
    if model.is_empty() || model == facts.id || model == facts.name {
        Ok(())
    } else {
        Err(Error::unknown_model(model, &format!("`{}`", facts.name)))
    }
}

fn check_prompts(req: &GenerateRequest, limits: &Limits) -> Result<PromptSyntax> {
    let syntax = PromptSyntax::try_from(req.prompt_syntax).map_err(|_| {
        Error::invalid(
            "prompt_syntax",
            format!("unknown value {}", req.prompt_syntax),
        )
    })?;
    for (field, text) in [
        ("prompt", &req.prompt),
        ("negative_prompt", &req.negative_prompt),
    ] {
        if syntax == PromptSyntax::A1111 {
            if let Some(what) = sd_prompt::unsupported(text) {
                return Err(Error::invalid(field, what));
            }
        }
        if text.len() > limits.max_prompt_bytes {
            return Err(Error::invalid(
                field,
                format!(
                    "{} bytes, at most {} allowed",
                    text.len(),
                    limits.max_prompt_bytes
                ),
            ));
        }
    }
    Ok(syntax)
}

fn steps(requested: u32, model_default: u32, limits: &Limits) -> Result<u32> {
    let steps = if requested == 0 {
        if model_default > 0 {
            model_default
        } else {
            DEFAULT_STEPS
        }
    } else {
        requested
    };
    if steps > limits.max_steps {
        return Err(Error::invalid(
            "steps",
            format!("{steps} given, 1..={} allowed", limits.max_steps),
        ));
    }
    Ok(steps)
}

fn guidance(requested: Option<f32>, default: f32) -> Result<f32> {
    let guidance = requested.unwrap_or(default);
    if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
        return Err(Error::invalid(
            "guidance_scale",
            format!("{guidance} given, a finite value in 0..=100 allowed"),
        ));
    }
    Ok(guidance)
}

/// FLUX's fields, checked: (true_cfg_scale, max_sequence_length); other
/// families refuse them by name.
fn flux_fields(req: &GenerateRequest, facts: &ModelFacts) -> Result<(f32, u32)> {
    if let Some(klein) = facts.profile.klein() {
        if req.true_cfg_scale.is_some() {
            return Err(Error::invalid(
                "true_cfg_scale",
                "applies to FLUX.1 models; FLUX.2 Klein guides with guidance_scale",
            ));
        }
        return Ok((1.0, sequence_length(req, klein.max_sequence_length)?));
    }
    if let Some(z) = facts.profile.zimage() {
        if req.true_cfg_scale.is_some() {
            return Err(Error::invalid(
                "true_cfg_scale",
                "applies to FLUX.1 models; Z-Image guides with guidance_scale",
            ));
        }
        return Ok((1.0, sequence_length(req, z.max_sequence_length)?));
    }
    let Some(flux) = facts.profile.flux() else {
        if req.true_cfg_scale.is_some() {
            return Err(Error::invalid(
                "true_cfg_scale",
                "applies to FLUX models; use guidance_scale",
            ));
        }
        if req.max_sequence_length != 0 {
            return Err(Error::invalid(
                "max_sequence_length",
                "applies to FLUX models (T5 prompts); this model's prompts are 77 CLIP tokens",
            ));
        }
        return Ok((1.0, 0));
    };
    let cfg = req.true_cfg_scale.unwrap_or(1.0);
    if !cfg.is_finite() || !(0.0..=100.0).contains(&cfg) {
        return Err(Error::invalid(
            "true_cfg_scale",
            format!("{cfg} given, a finite value in 0..=100 allowed"),
        ));
    }
    Ok((cfg, sequence_length(req, flux.max_sequence_length)?))
}

/// The request's `max_sequence_length` within the model's (0: the model's).
fn sequence_length(req: &GenerateRequest, max: u32) -> Result<u32> {
    let max = max.max(1);
    match req.max_sequence_length {
        0 => Ok(max),
        n if n <= max => Ok(n),
        n => Err(Error::invalid(
            "max_sequence_length",
            format!("{n} given, 1..={max} allowed"),
        )),
    }
}

/// A FLUX prompt in A1111's syntax: T5 reads the text; attention weights
/// and BREAK are refused by field rather than silently read as words.
fn check_t5_prompts(req: &GenerateRequest) -> Result<()> {
    for (field, text) in [
        ("prompt", &req.prompt),
        ("negative_prompt", &req.negative_prompt),
    ] {
        sd_prompt::unweighted(text)
            .map_err(|e| Error::invalid(field, format!("FLUX (T5) prompt: {e}")))?;
    }
    Ok(())
}

/// The image's token count for a flow model (the resolution-dependent
/// shift): one token per `size_multiple` pixels a side (FLUX.1's 2×2
/// packed patches; FLUX.2's patchified latents).
fn image_seq_len(facts: &ModelFacts, source: &Source) -> Option<usize> {
    facts.profile.is_flow().then(|| {
        let side = facts.layout.size_multiple.max(1) as usize;
        (source.width as usize / side) * (source.height as usize / side)
    })
}

/// Image-to-image must leave at least one step to run at this strength.
fn check_strength_steps(strength: f32, steps: u32, schedule: &dyn Scheduler) -> Result<()> {
    let start = schedule.start_index(steps, strength);
    // `steps` steps of `order` timesteps: starting past the last leaves none.
    if start >= steps as usize * schedule.order() {
        return Err(Error::invalid(
            "strength",
            format!("{strength} × {steps} steps leaves no step to run"),
        ));
    }
    Ok(())
}

impl Sampler {
    fn new(
        req: &GenerateRequest,
        facts: &ModelFacts,
        steps: u32,
        image_seq_len: Option<usize>,
    ) -> Result<Sampler> {
        let flow = facts.profile.is_flow();
        let kind = if req.scheduler.is_empty() {
            facts.default_scheduler
        } else if flow && req.scheduler.trim().eq_ignore_ascii_case("euler") {
            // What users type for a flow model: its Euler.
            SchedulerKind::FlowEuler
        } else {
            req.scheduler.parse().map_err(|e| match e {
                // The client's input: quoted, not echoed.
                SchedulerError::Unknown(_) => Error::invalid(
                    "scheduler",
                    format!(
                        "unknown scheduler {} (one of: {})",
                        quote(&req.scheduler),
                        SchedulerKind::names()
                    ),
                ),
                other => Error::invalid("scheduler", other),
            })?
        };
        if kind.is_flow() != flow {
            return Err(Error::invalid(
                "scheduler",
                if flow {
                    format!(
                        "{kind} does not fit a flow-matching model ({}): use flow-euler \
                         (or euler), or leave it empty",
                        facts.profile.name()
                    )
                } else {
                    format!(
                        "{kind} is for flow-matching models (FLUX); this is {}",
                        facts.profile.name()
                    )
                },
            ));
        }
        if req.karras && !kind.supports_karras() {
            return Err(Error::invalid(
                "karras",
                format!(
                    "not available for {kind}; use one of {}",
                    SchedulerKind::ALL
                        .into_iter()
                        .filter(|k| k.supports_karras())
                        .map(SchedulerKind::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if !req.eta.is_finite() || !(0.0..=1.0).contains(&req.eta) {
            return Err(Error::invalid(
                "eta",
                format!("{} given, 0..=1 allowed", req.eta),
            ));
        }
        if req.eta > 0.0 && !kind.supports_eta() {
            return Err(Error::invalid(
                "eta",
                format!("applies to ddim only, not {kind}"),
            ));
        }
        let options = SchedulerOptions {
            karras: req.karras,
            eta: req.eta,
            image_seq_len,
            flow: if facts.profile.klein().is_some() {
                sd_sampling::schedulers::FlowSchedule::Flux2
            } else if facts.profile.zimage().is_some() {
                sd_sampling::schedulers::FlowSchedule::ZImage
            } else {
                sd_sampling::schedulers::FlowSchedule::Flux
            },
        };
        let config = match req.timestep_spacing.as_str() {
            "" => facts.scheduler_config.clone(),
            _ if flow => return Err(Error::invalid(
                "timestep_spacing",
                "flow-matching Euler spaces sigmas as the model's pipeline does; leave it empty",
            )),
            s @ ("leading" | "trailing" | "linspace") => {
                facts.scheduler_config.with_str("timestep_spacing", s)
            }
            other => {
                return Err(Error::invalid(
                    "timestep_spacing",
                    format!("{} given; leading, trailing or linspace", quote(other)),
                ))
            }
        };
        let schedule = build(kind, &config, steps as usize, options).map_err(|e| match e {
            SchedulerError::Steps(m) => Error::invalid("steps", m),
            other => Error::invalid("scheduler", other),
        })?;
        Ok(Sampler {
            kind,
            karras: req.karras,
            eta: req.eta,
            schedule,
        })
    }
}

fn num_images(requested: u32, limits: &Limits) -> Result<u32> {
    let n = if requested == 0 { 1 } else { requested };
    if n > limits.max_images {
        return Err(Error::invalid(
            "num_images",
            format!("{n} given, 1..={} allowed", limits.max_images),
        ));
    }
    Ok(n)
}

fn check_clip_skip(clip_skip: u32, facts: &ModelFacts) -> Result<()> {
    if clip_skip >= facts.text_layers {
        return Err(Error::invalid(
            "clip_skip",
            format!("{clip_skip} given, 0..{} allowed", facts.text_layers),
        ));
    }
    Ok(())
}

impl Source {
    fn new(req: &GenerateRequest, facts: &ModelFacts, limits: &Limits) -> Result<Source> {
        let f = facts.layout.size_multiple.max(1);
        let (mut width, mut height) = (req.width, req.height);
        let masked = !req.mask.is_empty();
        if req.inpaint.is_some() && !masked {
            return Err(Error::invalid(
                "inpaint",
                "applies to inpainting only (set mask)",
            ));
        }
        let (init, strength) = if req.init_image.is_empty() {
            if req.strength.is_some() {
                return Err(Error::invalid(
                    "strength",
                    "applies to image-to-image only (set init_image)",
                ));
            }
            if masked {
                return Err(Error::invalid(
                    "mask",
                    "marks what to repaint in init_image: set init_image too",
                ));
            }
            (None, 0.0)
        } else {
            let default = if masked {
                DEFAULT_INPAINT_STRENGTH
            } else {
                DEFAULT_STRENGTH
            };
            let strength = strength(req.strength.or(Some(default)))?;
            let target = (width != 0 || height != 0).then_some((width, height));
            let (pixels, w, h) = images::decode_init_image(&req.init_image, limits, f, target)?;
            (width, height) = (w, h);
            (Some(InitImage { pixels }), strength)
        };
        let or_default = |v: u32| if v == 0 { facts.default_side() } else { v };
        let width = check_side("width", or_default(width), f, limits)?;
        let height = check_side("height", or_default(height), f, limits)?;
        let inpaint = if masked {
            Some(inpaint(req, limits, width, height)?)
        } else {
            None
        };
        Ok(Source {
            width,
            height,
            init,
            strength,
            inpaint,
        })
    }
}

/// The request's mask at the image's size, and its options.
fn inpaint(req: &GenerateRequest, limits: &Limits, width: u32, height: u32) -> Result<Inpaint> {
    let mask = crate::mask::Mask::decode(&req.mask, limits, width, height)?;
    let options = req.inpaint.unwrap_or_default();
    let masked_content = MaskedContent::try_from(options.masked_content).map_err(|_| {
        Error::invalid(
            "inpaint.masked_content",
            format!("unknown value {}", options.masked_content),
        )
    })?;
    let multiplier = options.initial_noise_multiplier;
    if !multiplier.is_finite() || !(0.0..=2.0).contains(&multiplier) {
        return Err(Error::invalid(
            "inpaint.initial_noise_multiplier",
            format!("{multiplier} given, 0..=2 allowed (0: 1)"),
        ));
    }
    Ok(Inpaint {
        mask,
        masked_content,
        blend_denoised: options.blend_denoised,
        noise_multiplier: if multiplier == 0.0 { 1.0 } else { multiplier },
    })
}

/// A network that takes image conditioning beside the latents (an
/// inpainting UNet's mask and masked-image latents) runs only with a mask;
/// it must take one mask channel and the masked image's latents.
fn check_network_inputs(facts: &ModelFacts, masked: bool) -> Result<()> {
    let extra = facts.layout.image_channels();
    if extra == 0 {
        return Ok(());
    }
    if extra != 1 + facts.layout.latent_channels {
        return Err(Error::invalid(
            "model",
            format!(
                "{} takes {} input channels beside its {} latent ones; served inpainting \
                 networks take a mask and the masked image's latents ({})",
                facts.name,
                extra,
                facts.layout.latent_channels,
                1 + facts.layout.latent_channels
            ),
        ));
    }
    if !masked {
        return Err(Error::invalid(
            "mask",
            format!(
                "{} is an inpainting model ({} input channels: the latents, a mask and the \
                 masked image's latents): send init_image and mask",
                facts.name, facts.layout.in_channels
            ),
        ));
    }
    Ok(())
}

fn strength(requested: Option<f32>) -> Result<f32> {
    let strength = requested.unwrap_or(DEFAULT_STRENGTH);
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(Error::invalid(
            "strength",
            format!("{strength} given, (0, 1] allowed"),
        ));
    }
    Ok(strength)
}

fn check_side(field: &'static str, v: u32, f: u32, limits: &Limits) -> Result<u32> {
    if v < limits.min_side || v > limits.max_side || !v.is_multiple_of(f) {
        return Err(Error::invalid(
            field,
            format!(
                "{v} given, a multiple of {f} in {}..={} allowed",
                limits.min_side.max(f),
                limits.max_side
            ),
        ));
    }
    Ok(v)
}

/// Predicted UNet seconds of the whole request on the model's denoiser,
/// and of one of its steps (None when it published no cost): forwards ×
/// one forward of all its rows.
fn predict_seconds(
    facts: &ModelFacts,
    source: &Source,
    num_images: u32,
    guided: bool,
    schedule: &dyn Scheduler,
    steps: u32,
    reference_positions: u64,
) -> Option<(f64, f64)> {
    let cost = facts.cost.get()?;
    let sf = facts.layout.scale_factor.max(1);
    let positions =
        u64::from(source.width / sf) * u64::from(source.height / sf) + reference_positions;
    let rows = u64::from(num_images) * if guided { 2 } else { 1 };
    let start = if source.init.is_some() {
        schedule.start_index(steps, source.strength)
    } else {
        0
    };
    let forwards = schedule.timesteps().len().saturating_sub(start).max(1);
    let step = cost.seconds(positions, rows)?;
    Some((forwards as f64 * step, step))
}

/// The request's reference images (FLUX.2 Klein's alone), prepared as
/// its pipeline does; an unset width or height becomes the first one's
/// (an init image's own size wins: it is the picture being changed).
fn references(
    req: &mut GenerateRequest,
    facts: &ModelFacts,
    limits: &Limits,
) -> Result<Vec<crate::reference::Reference>> {
    if req.reference_images.is_empty() {
        return Ok(Vec::new());
    }
    if facts.profile.klein().is_none() {
        return Err(Error::invalid(
            "reference_images",
            "this model takes none: reference images are FLUX.2 Klein's (use init_image \
             for image-to-image)",
        ));
    }
    let refs = crate::reference::prepare(
        &req.reference_images,
        limits,
        facts.layout.size_multiple,
        "reference_images",
    )?;
    if let Some(first) = refs.first().filter(|_| req.init_image.is_empty()) {
        let (w, h) = (first.width, first.height);
        if (req.width == 0 && w > limits.max_side) || (req.height == 0 && h > limits.max_side) {
            // The client set no size: name what it did send.
            return Err(Error::invalid(
                "reference_images",
                format!(
                    "the first one's size, {w}×{h}, is the image's when width and height are \
                     unset, and exceeds the largest side ({}): set width and height",
                    limits.max_side
                ),
            ));
        }
        if req.width == 0 {
            req.width = w;
        }
        if req.height == 0 {
            req.height = h;
        }
    }
    Ok(refs)
}

/// Latent positions the references add to every forward.
fn reference_positions(facts: &ModelFacts, refs: &[crate::reference::Reference]) -> u64 {
    let sf = facts.layout.scale_factor.max(1);
    refs.iter()
        .map(|r| u64::from(r.width / sf) * u64::from(r.height / sf))
        .sum()
}

/// What a family's prompts cannot be: FLUX.2 Klein takes no negative
/// prompt; the flow models' T5/LLM prompts in A1111's syntax are checked.
fn check_family_prompts(
    req: &GenerateRequest,
    rule: GuidanceRule,
    flow: bool,
    syntax: PromptSyntax,
) -> Result<()> {
    if matches!(rule, GuidanceRule::Klein { .. }) && !req.negative_prompt.is_empty() {
        return Err(Error::invalid(
            "negative_prompt",
            "FLUX.2 Klein's pipeline guides against an empty prompt: a negative prompt \
             does not apply",
        ));
    }
    if flow && syntax == PromptSyntax::A1111 {
        check_t5_prompts(req)?;
    }
    Ok(())
}

/// Refuse a request predicted to take longer than `--max-request-seconds`,
/// naming what to lower: the images, the steps, or the size.
fn check_seconds(
    predicted: Option<f64>,
    num_images: u32,
    steps: u32,
    source: &Source,
    limits: &Limits,
) -> Result<()> {
    let Some(seconds) = predicted else {
        return Ok(());
    };
    let max = limits.max_request_seconds;
    if seconds <= max {
        return Ok(());
    }
    let (width, height) = (source.width, source.height);
    let field = if seconds / f64::from(num_images) <= max {
        "num_images"
    } else if seconds / f64::from(num_images) / f64::from(steps) <= max {
        "steps"
    } else {
        "width"
    };
    Err(Error::invalid(
        field,
        format!(
            "{num_images} images of {width}×{height} with {steps} steps are predicted to take {seconds:.0} s of UNet time on this model's denoiser, at most {max:.0} s allowed"
        ),
    ))
}

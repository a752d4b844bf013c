//! An A1111 request read: its fields as GenerateRequests (one per image),
//! its sampler by A1111's names, what it asks that this server refuses,
//! and the checkpoint it names.

use super::*;

/// A sampler by A1111 name (a " Karras" suffix picks the Karras schedule),
/// and a `scheduler` field: (our scheduler, karras, A1111's sampler name,
/// A1111's schedule label).
pub fn sampler(
    name: &str,
    schedule: Option<&str>,
) -> HttpResult<(&'static str, bool, &'static str, &'static str)> {
    let (base, suffix_karras) = match name.strip_suffix(" Karras") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let Some(&(a1111, _, ours, auto_karras)) = SAMPLERS
        .iter()
        .find(|(n, aliases, _, _)| *n == base || aliases.contains(&base))
    else {
        return Err(HttpError {
            status: StatusCode::NOT_FOUND,
            param: Some("sampler_name".into()),
            message: "Sampler not found".into(),
        });
    };
    let karras = match schedule.map(str::to_ascii_lowercase).as_deref() {
        _ if suffix_karras => true,
        None | Some("") | Some("automatic") => auto_karras,
        Some("karras") => true,
        Some(other) => {
            return Err(HttpError::invalid(
                "scheduler",
                format_args!("`{other}` is not supported: Automatic or Karras"),
            ))
        }
    };
    let label = if karras == auto_karras {
        "Automatic"
    } else {
        "Karras"
    };
    Ok((ours, karras, a1111, label))
}

/// Fields that change the result and that this server does not do:
/// refused when set to anything but their default.
pub(super) fn refuse_unsupported(f: &Fields) -> HttpResult<()> {
    let on = |name: &str| -> HttpResult<bool> { Ok(f.bool(name)?.unwrap_or(false)) };
    for name in ["restore_faces", "tiling"] {
        if on(name)? {
            return Err(HttpError::invalid(
                name,
                "not supported by this server: send false",
            ));
        }
    }
    if !f.strings("styles")?.is_empty() {
        return Err(HttpError::invalid(
            "styles",
            "not supported by this server: send []",
        ));
    }
    if f.f64("subseed_strength")?.unwrap_or(0.0) != 0.0 {
        return Err(HttpError::invalid(
            "subseed_strength",
            "variation seeds are not supported: send 0",
        ));
    }
    for name in ["seed_resize_from_h", "seed_resize_from_w"] {
        if f.i64(name)?.unwrap_or(-1) > 0 {
            return Err(HttpError::invalid(
                name,
                "not supported by this server: send -1",
            ));
        }
    }
    for name in ["s_churn", "s_tmin", "s_tmax"] {
        if f.f64(name)?.unwrap_or(0.0) != 0.0 {
            return Err(HttpError::invalid(
                name,
                "k-diffusion noise options are not supported: send 0",
            ));
        }
    }
    if f.f64("s_noise")?.unwrap_or(1.0) != 1.0 {
        return Err(HttpError::invalid(
            "s_noise",
            "k-diffusion noise options are not supported: send 1",
        ));
    }
    for name in ["script_name", "refiner_checkpoint", "infotext"] {
        if f.str(name)?.is_some_and(|s| !s.is_empty() && s != "None") {
            return Err(HttpError::invalid(name, "not supported by this server"));
        }
    }
    // The ControlNet extension's units are served (controlnet.rs); other
    // extensions are not.
    if let Some(other) = f
        .object("alwayson_scripts")?
        .and_then(|m| m.keys().find(|k| !k.eq_ignore_ascii_case("controlnet")))
    {
        return Err(HttpError::invalid(
            format!("alwayson_scripts.{other}"),
            "this extension is not served (ControlNet's is)",
        ));
    }
    if !f
        .get("script_args")
        .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty))
    {
        return Err(HttpError::invalid(
            "script_args",
            "scripts are not supported: send []",
        ));
    }
    Ok(())
}

/// One A1111 request, checked: what each of its images is asked.
pub(super) struct Asked {
    pub(super) base: GenerateRequest,
    pub(super) seed: u64,
    pub(super) batch_size: u32,
    pub(super) n_iter: u32,
    pub(super) sampler_name: &'static str,
    pub(super) send_images: bool,
    pub(super) init_images: Vec<Vec<u8>>,
    /// As asked (f64, so `info` echoes 0.6, not 0.6000000238).
    pub(super) denoising_strength: Option<f64>,
    pub(super) cfg_scale: f64,
    /// FLUX (Forge's field): the distilled guidance.
    pub(super) distilled_cfg_scale: Option<f64>,
    /// img2img: the init images as prepared (resized, masked, filled) and
    /// how each result gets the original back outside the mask.
    pub(super) prepared: Vec<super::inpaint::Prepared>,
    /// img2img with a mask: the mask (PNG) and A1111's inpainting options.
    pub(super) mask: Vec<u8>,
    pub(super) inpaint: Option<sd_proto::v1::InpaintOptions>,
    /// What A1111's infotext adds for this request ("Mask blur: 4", …).
    pub(super) infotext: Vec<(String, String)>,
    /// Each ControlNet's and IP-Adapter's place in
    /// `alwayson_scripts.controlnet.args`.
    pub(super) control_indices: super::controlnet::Indices,
}

pub(super) fn read_request(f: &Fields, img2img: bool) -> HttpResult<Asked> {
    refuse_unsupported(f)?;
    let name = f
        .str("sampler_name")?
        .filter(|s| !s.is_empty())
        .or(f.str("sampler_index")?.filter(|s| !s.is_empty()))
        .unwrap_or(DEFAULT_SAMPLER);
    let (scheduler, karras, sampler_name, _) = sampler(name, f.str("scheduler")?)?;
    let seed = match f.i64("seed")?.unwrap_or(-1) {
        -1 => random_seed(),
        s if s < 0 => return Err(HttpError::invalid("seed", "-1 (random) or a seed ≥ 0")),
        s => s as u64,
    };
    let init_images = if img2img {
        let images = f.strings("init_images")?;
        if images.is_empty() {
            return Err(HttpError::invalid(
                "init_images",
                "required: at least one base64 image",
            ));
        }
        images
            .iter()
            .map(|s| decode_base64("init_images", s))
            .collect::<HttpResult<_>>()?
    } else {
        Vec::new()
    };
    let cfg_scale = f.f64("cfg_scale")?.unwrap_or(7.0);
    let hires = if !img2img && f.bool("enable_hr")?.unwrap_or(false) {
        Some(hires(f)?)
    } else {
        None
    };
    let base = GenerateRequest {
        prompt: f.string_or("prompt", "")?,
        negative_prompt: f.string_or("negative_prompt", "")?,
        prompt_syntax: PromptSyntax::A1111 as i32,
        clip_skip: clip_stop(f)?.saturating_sub(1),
        width: f.int_in("width", 1, 16_384)?.unwrap_or(512) as u32,
        height: f.int_in("height", 1, 16_384)?.unwrap_or(512) as u32,
        steps: f.int_in("steps", 1, 10_000)?.unwrap_or(50) as u32,
        guidance_scale: Some(cfg_scale as f32),
        scheduler: scheduler.to_string(),
        karras,
        eta: if scheduler == "ddim" {
            f.f64("eta")?.unwrap_or(0.0) as f32
        } else {
            0.0
        },
        num_images: 1,
        hires,
        ..Default::default()
    };
    Ok(Asked {
        base,
        seed,
        batch_size: f.int_in("batch_size", 1, 64)?.unwrap_or(1) as u32,
        n_iter: f.int_in("n_iter", 1, 64)?.unwrap_or(1) as u32,
        sampler_name,
        send_images: f.bool("send_images")?.unwrap_or(true),
        init_images,
        denoising_strength: if img2img || f.bool("enable_hr")?.unwrap_or(false) {
            Some(f.f64("denoising_strength")?.unwrap_or(0.75))
        } else {
            None
        },
        cfg_scale,
        distilled_cfg_scale: None,
        prepared: Vec::new(),
        mask: Vec::new(),
        inpaint: None,
        infotext: Vec::new(),
        control_indices: Default::default(),
    })
}

/// txt2img's hires fix fields as a `Hires`: `hr_scale` (2.0) or
/// `hr_resize_x/y`, `hr_upscaler`, `hr_second_pass_steps`,
/// `denoising_strength` (0.75, the second pass's), `hr_prompt`,
/// `hr_negative_prompt`, `hr_sampler_name`; a refiner or another
/// checkpoint for the second pass is refused.
fn hires(f: &Fields) -> HttpResult<sd_proto::v1::Hires> {
    let rx = f.int_in("hr_resize_x", 0, 16_384)?.unwrap_or(0) as u32;
    let ry = f.int_in("hr_resize_y", 0, 16_384)?.unwrap_or(0) as u32;
    let scale = if rx == 0 && ry == 0 {
        f.f64("hr_scale")?.unwrap_or(2.0) as f32
    } else {
        0.0
    };
    let upscaler = f.str("hr_upscaler")?.unwrap_or("Latent").to_string();
    crate::hires::upscaler(&upscaler).map_err(|e| HttpError::from(e).renamed(super::RENAMES))?;
    let scheduler = match f.str("hr_sampler_name")?.filter(|s| !s.is_empty()) {
        Some(name) => sampler(name, None)
            .map_err(|e| e.renamed(&[("sampler_name", "hr_sampler_name")]))?
            .0
            .to_string(),
        None => String::new(),
    };
    if let Some(c) = f
        .str("hr_checkpoint_name")?
        .filter(|s| !s.is_empty() && *s != "Use same checkpoint")
    {
        return Err(HttpError::invalid(
            "hr_checkpoint_name",
            format_args!("`{c}`: the second pass runs on the same checkpoint here"),
        ));
    }
    Ok(sd_proto::v1::Hires {
        scale,
        width: rx,
        height: ry,
        upscaler,
        steps: f.int_in("hr_second_pass_steps", 0, 10_000)?.unwrap_or(0) as u32,
        strength: Some(f.f64("denoising_strength")?.unwrap_or(0.75) as f32),
        prompt: f.string_or("hr_prompt", "")?,
        negative_prompt: f.string_or("hr_negative_prompt", "")?,
        scheduler,
    })
}

/// `override_settings.CLIP_stop_at_last_layers` (1: the last layer).
/// A FLUX model on the A1111 routes, as Forge serves it: `distilled_cfg_scale`
/// (default 3.5) is the distilled guidance the transformer takes,
/// `cfg_scale` real classifier-free guidance with the negative prompt
/// (Forge's FLUX default 1: off); clip skip does not apply (FLUX reads
/// CLIP's pooled output).
pub(super) fn as_forge_flux(f: &Fields, asked: &mut Asked) -> HttpResult<()> {
    let distilled = f.f64("distilled_cfg_scale")?.unwrap_or(3.5);
    let cfg = f.f64("cfg_scale")?.unwrap_or(1.0);
    asked.base.guidance_scale = Some(distilled as f32);
    asked.base.true_cfg_scale = Some(cfg as f32);
    asked.base.clip_skip = 0;
    asked.cfg_scale = cfg;
    asked.distilled_cfg_scale = Some(distilled);
    Ok(())
}

/// FLUX.2 Klein and Z-Image on the A1111 routes: `cfg_scale` is the
/// pipeline's own guidance (no distilled value; the model's default when
/// absent, not A1111's 7), and no CLIP layer to stop at.
pub(super) fn as_qwen_family(f: &Fields, asked: &mut Asked, default: f32) -> HttpResult<()> {
    let cfg = f.f64("cfg_scale")?;
    asked.base.guidance_scale = cfg.map(|c| c as f32);
    asked.base.clip_skip = 0;
    asked.cfg_scale = cfg.unwrap_or(f64::from(default));
    Ok(())
}

pub(super) fn clip_stop(f: &Fields) -> HttpResult<u32> {
    let Some(o) = f.object("override_settings")? else {
        return Ok(1);
    };
    Ok(Fields(o)
        .int_in("CLIP_stop_at_last_layers", 1, 12)
        .map_err(|e| {
            e.renamed(&[(
                "CLIP_stop_at_last_layers",
                "override_settings.CLIP_stop_at_last_layers",
            )])
        })?
        .unwrap_or(1) as u32)
}

/// `override_settings.sd_model_checkpoint`, if given, must be this model.
/// The served model `override_settings.sd_model_checkpoint` names (its
/// name; empty when unsaid: the default model).
pub(super) fn checkpoint(http: &State, f: &Fields) -> HttpResult<String> {
    let Some(o) = f.object("override_settings")? else {
        return Ok(String::new());
    };
    let Some(c) = Fields(o).str("sd_model_checkpoint")? else {
        return Ok(String::new());
    };
    if let Some(g) = http.service.models().find(|g| names(&g.facts, c)) {
        return Ok(g.facts.name.clone());
    }
    let served: Vec<&str> = http
        .service
        .models()
        .map(|g| g.facts.name.as_str())
        .collect();
    Err(HttpError::invalid(
        "override_settings.sd_model_checkpoint",
        format_args!(
            "`{c}` is not served here (this server serves {})",
            served.join(", ")
        ),
    ))
}

/// Whether A1111's checkpoint `name` (a title, `name [hash]`, …) is `f`.
pub(super) fn names(f: &crate::facts::ModelFacts, name: &str) -> bool {
    name == f.name || name == f.id || name.starts_with(&format!("{} [", f.name))
}

pub(super) fn is_this_model(http: &State, name: &str) -> bool {
    names(&http.service.generator.facts, name)
}

/// The model as A1111 titles checkpoints.
pub(super) fn title(http: &State) -> String {
    http.service.generator.facts.name.clone()
}

/// A1111 draws random seeds below 2³² − 1.
pub(super) fn random_seed() -> u64 {
    crate::plan::random_seed() % 4_294_967_294
}

/// An A1111 request body as the GenerateRequests it makes (one per image),
/// or the error a client would get: for fuzzing and tests.
pub fn parse(body: &[u8], img2img: bool) -> HttpResult<Vec<GenerateRequest>> {
    let m = crate::http::json_object_from(body)?;
    let asked = read_request(&Fields(&m), img2img)?;
    let n = asked.batch_size * asked.n_iter;
    Ok((0..n)
        .map(|i| GenerateRequest {
            seed: Some(asked.seed + u64::from(i)),
            ..asked.base.clone()
        })
        .collect())
}

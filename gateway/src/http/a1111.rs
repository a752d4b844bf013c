//! An AUTOMATIC1111 `/sdapi/v1` subset with A1111's field names and answers:
//! `txt2img`, `img2img`, `progress`, `interrupt`, and the lists clients read
//! at start (`sd-models`, `samplers`, `schedulers`, `options`, `upscalers`,
//! `sd-vae`, `latent-upscale-modes`). Works with the PyPI `webuiapi`
//! client, SillyTavern, Open WebUI and LibreChat.
//!
//! Semantics as A1111 1.10 has them: `seed` -1 is random; image i of
//! `batch_size × n_iter` uses seed + i with a generator of its own (each
//! image is its own generation here, run together so the denoiser batches
//! them); samplers by A1111's names; unknown fields are ignored; fields we
//! do not support that would change the result (hires fix, face
//! restoration, tiling, styles, subseeds, scripts, …) are refused with 400
//! naming them when set to anything but their default — never dropped.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State as S};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use super::error::{HttpError, HttpResult};
use super::fields::Fields;
use super::jobs::Job;
use super::{decode_base64, encode_base64, State};
use crate::pipeline::Event;
use sd_proto::v1::{GenerateRequest, GenerateResponse, PromptSyntax};

/// A1111's sampler names, the diffusers scheduler each is here, and
/// whether its "Automatic" schedule is Karras (DPM++ 2M's, since A1111 1.9).
const SAMPLERS: [(&str, &[&str], &str, bool); 8] = [
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp-2m", true),
    (
        "Euler a",
        &["k_euler_a", "k_euler_ancestral"],
        "euler-a",
        false,
    ),
    ("Euler", &["k_euler"], "euler", false),
    ("LMS", &["k_lms"], "lms", false),
    ("Heun", &["k_heun"], "heun", false),
    ("DDIM", &["ddim"], "ddim", false),
    ("PLMS", &["plms"], "pndm", false),
    ("UniPC", &["unipc"], "unipc", false),
];

/// A1111's schedule types this server has: (name, label).
const SCHEDULES: [(&str, &str); 2] = [("automatic", "Automatic"), ("karras", "Karras")];

/// gRPC's field names as A1111's clients know them.
const RENAMES: &[(&str, &str)] = &[
    ("guidance_scale", "cfg_scale"),
    ("init_image", "init_images"),
    ("strength", "denoising_strength"),
    ("scheduler", "sampler_name"),
];

/// The sampler A1111's API uses when a request names none.
const DEFAULT_SAMPLER: &str = "Euler";

pub fn routes() -> Router<State> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/refresh-loras", post(refresh_loras))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/upscalers", get(empty_list))
        .route("/sdapi/v1/sd-vae", get(empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(empty_list))
        .route("/sdapi/v1/scripts", get(scripts))
}

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
fn refuse_unsupported(f: &Fields) -> HttpResult<()> {
    let on = |name: &str| -> HttpResult<bool> { Ok(f.bool(name)?.unwrap_or(false)) };
    for name in ["enable_hr", "restore_faces", "tiling"] {
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
    for name in ["script_name", "refiner_checkpoint", "infotext", "mask"] {
        if f.str(name)?.is_some_and(|s| !s.is_empty() && s != "None") {
            return Err(HttpError::invalid(name, "not supported by this server"));
        }
    }
    if f.object("alwayson_scripts")?.is_some_and(|m| !m.is_empty()) {
        return Err(HttpError::invalid(
            "alwayson_scripts",
            "extensions are not supported: send {}",
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
    if f.i64("resize_mode")?.unwrap_or(0) != 0 {
        return Err(HttpError::invalid(
            "resize_mode",
            "only 0 (just resize) is supported",
        ));
    }
    Ok(())
}

/// One A1111 request, checked: what each of its images is asked.
struct Asked {
    base: GenerateRequest,
    seed: u64,
    batch_size: u32,
    n_iter: u32,
    sampler_name: &'static str,
    schedule: &'static str,
    send_images: bool,
    init_images: Vec<Vec<u8>>,
    /// As asked (f64, so `info` echoes 0.6, not 0.6000000238).
    denoising_strength: Option<f64>,
    cfg_scale: f64,
}

fn read_request(f: &Fields, img2img: bool) -> HttpResult<Asked> {
    refuse_unsupported(f)?;
    let name = f
        .str("sampler_name")?
        .filter(|s| !s.is_empty())
        .or(f.str("sampler_index")?.filter(|s| !s.is_empty()))
        .unwrap_or(DEFAULT_SAMPLER);
    let (scheduler, karras, sampler_name, schedule) = sampler(name, f.str("scheduler")?)?;
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
        ..Default::default()
    };
    Ok(Asked {
        base,
        seed,
        batch_size: f.int_in("batch_size", 1, 64)?.unwrap_or(1) as u32,
        n_iter: f.int_in("n_iter", 1, 64)?.unwrap_or(1) as u32,
        sampler_name,
        schedule,
        send_images: f.bool("send_images")?.unwrap_or(true),
        init_images,
        denoising_strength: if img2img {
            Some(f.f64("denoising_strength")?.unwrap_or(0.75))
        } else {
            None
        },
        cfg_scale,
    })
}

/// `override_settings.CLIP_stop_at_last_layers` (1: the last layer).
fn clip_stop(f: &Fields) -> HttpResult<u32> {
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
fn checkpoint(http: &State, f: &Fields) -> HttpResult<String> {
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
fn names(f: &crate::facts::ModelFacts, name: &str) -> bool {
    name == f.name || name == f.id || name.starts_with(&format!("{} [", f.name))
}

fn is_this_model(http: &State, name: &str) -> bool {
    names(&http.service.generator.facts, name)
}

/// The model as A1111 titles checkpoints.
fn title(http: &State) -> String {
    http.service.generator.facts.name.clone()
}

/// A1111 draws random seeds below 2³² − 1.
fn random_seed() -> u64 {
    crate::plan::random_seed() % 4_294_967_294
}

/// An A1111 request body as the GenerateRequests it makes (one per image),
/// or the error a client would get: for fuzzing and tests.
pub fn parse(body: &[u8], img2img: bool) -> HttpResult<Vec<GenerateRequest>> {
    let m = super::json_object_from(body)?;
    let asked = read_request(&Fields(&m), img2img)?;
    let n = asked.batch_size * asked.n_iter;
    Ok((0..n)
        .map(|i| GenerateRequest {
            seed: Some(asked.seed + u64::from(i)),
            ..asked.base.clone()
        })
        .collect())
}

async fn txt2img(s: S<State>, headers: HeaderMap, body: Body) -> Response {
    generate(s, headers, body, false).await
}

async fn img2img(s: S<State>, headers: HeaderMap, body: Body) -> Response {
    generate(s, headers, body, true).await
}

async fn generate(S(http): S<State>, headers: HeaderMap, body: Body, img2img: bool) -> Response {
    let run = async {
        http.check_key(&headers)?;
        let body = http.json_object(body).await?;
        let model = checkpoint(&http, &Fields(&body))?;
        let mut asked = read_request(&Fields(&body), img2img)?;
        asked.base.model = model;
        if http
            .service
            .pick(&asked.base.model)?
            .facts
            .profile
            .sdxl()
            .is_some()
        {
            // A1111 reads SDXL's penultimate layers whatever
            // CLIP_stop_at_last_layers says (its sdxl_clip_l_skip is off).
            asked.base.clip_skip = 0;
        }
        let caller = http.caller(&headers);
        let running = http.jobs.start(caller, asked.n_iter);
        let mut images = Vec::new();
        for iteration in 0..asked.n_iter {
            running
                .job
                .iteration(iteration, asked.batch_size as usize, asked.base.steps);
            let batch = run_batch(&http, &headers, &asked, iteration, &running.job).await?;
            images.extend(batch);
            if running.job.stop.stopped() {
                break;
            }
        }
        Ok::<_, HttpError>(super::json(answer(&http, &body, &asked, &images)))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// One iteration: `batch_size` images at once, each its own generation
/// (seed + i), progress and previews into the job.
async fn run_batch(
    http: &State,
    headers: &HeaderMap,
    asked: &Asked,
    iteration: u32,
    job: &Arc<Job>,
) -> HttpResult<Vec<(u64, GenerateResponse)>> {
    let first = iteration * asked.batch_size;
    let runs = (0..asked.batch_size).map(|b| {
        let index = first + b;
        let seed = asked.seed + u64::from(index);
        let mut req = GenerateRequest {
            seed: Some(seed),
            preview_every: 5,
            ..asked.base.clone()
        };
        if !asked.init_images.is_empty() {
            req.init_image = asked.init_images[index as usize % asked.init_images.len()]
                .clone()
                .into();
            req.strength = asked.denoising_strength.map(|d| d as f32);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let watch = follow(job.clone(), b as usize, rx);
        async move {
            let out = http
                .generate("A1111", headers, req, Some(tx), Some(job.stop.clone()))
                .await
                .map_err(|e| e.renamed(RENAMES));
            let _ = watch.await;
            out.map(|r| (seed, r))
        }
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// Feed one generation's events into its job.
fn follow(
    job: Arc<Job>,
    index: usize,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                Event::Progress { step, total, .. } => job.step(index, step, total),
                Event::Preview { images, .. } => {
                    if let Some(i) = images.into_iter().next() {
                        job.preview(i.data);
                    }
                }
            }
        }
    })
}

/// A1111's answer: `{images, parameters, info}`, `info` a JSON string.
fn answer(
    http: &State,
    body: &Map<String, Value>,
    asked: &Asked,
    images: &[(u64, GenerateResponse)],
) -> Value {
    let b = &asked.base;
    let seeds: Vec<u64> = images.iter().map(|(s, _)| *s).collect();
    let model = title(http);
    let infotext = |seed: u64| {
        let mut t = b.prompt.clone();
        if !b.negative_prompt.is_empty() {
            t.push_str(&format!("\nNegative prompt: {}", b.negative_prompt));
        }
        t.push_str(&format!(
            "\nSteps: {}, Sampler: {}, Schedule type: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
            b.steps,
            asked.sampler_name,
            asked.schedule,
            asked.cfg_scale,
            b.width,
            b.height
        ));
        if b.clip_skip > 0 {
            t.push_str(&format!(", Clip skip: {}", b.clip_skip + 1));
        }
        if let Some(d) = asked.denoising_strength {
            t.push_str(&format!(", Denoising strength: {d}"));
        }
        t.push_str(&format!(", Version: sdserve {}", env!("CARGO_PKG_VERSION")));
        t
    };
    let n = seeds.len();
    let info = json!({
        "prompt": b.prompt,
        "all_prompts": vec![&b.prompt; n],
        "negative_prompt": b.negative_prompt,
        "all_negative_prompts": vec![&b.negative_prompt; n],
        "seed": asked.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": b.width,
        "height": b.height,
        "sampler_name": asked.sampler_name,
        "cfg_scale": asked.cfg_scale,
        "steps": b.steps,
        "batch_size": asked.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": asked.denoising_strength,
        "extra_generation_params": { "Schedule type": asked.schedule },
        "index_of_first_image": 0,
        "infotexts": seeds.iter().map(|s| infotext(*s)).collect::<Vec<_>>(),
        "styles": [],
        "job_timestamp": super::jobs::timestamp(std::time::SystemTime::now()),
        "clip_skip": b.clip_skip + 1,
        "is_using_inpainting_conditioning": false,
        "version": format!("sdserve {}", env!("CARGO_PKG_VERSION")),
    });
    let images: Vec<String> = if asked.send_images {
        images
            .iter()
            .flat_map(|(_, r)| r.images.iter().map(|i| encode_base64(&i.data)))
            .collect()
    } else {
        Vec::new()
    };
    let mut parameters = body.clone();
    parameters.remove("init_images");
    json!({ "images": images, "parameters": parameters, "info": info.to_string() })
}

#[derive(serde::Deserialize, Default)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(
    S(http): S<State>,
    headers: HeaderMap,
    Query(q): Query<ProgressQuery>,
) -> Response {
    if let Err(e) = http.check_key(&headers) {
        return e.into_response();
    }
    let skip = q.skip_current_image;
    let caller = http.caller(&headers);
    let Some(job) = http.jobs.current(&caller) else {
        return super::json(json!({
            "progress": 0.0, "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "stopping_generation": false,
                "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
                "sampling_step": 0, "sampling_steps": 0
            },
            "current_image": null, "textinfo": null, "current_task": null
        }));
    };
    let p = job.progress();
    let image = if skip {
        None
    } else {
        p.preview.as_deref().map(encode_base64)
    };
    super::json(json!({
        "progress": p.progress,
        "eta_relative": p.eta_relative,
        "state": {
            "skipped": false, "interrupted": p.interrupted, "stopping_generation": false,
            "job": format!("Batch {} out of {}", p.job_no + 1, p.job_count),
            "job_count": p.job_count, "job_timestamp": p.timestamp, "job_no": p.job_no,
            "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps
        },
        "current_image": image, "textinfo": null, "current_task": null
    }))
}

/// Stop the caller's running jobs after their current step; they answer
/// 200 with the images so far.
async fn interrupt(S(http): S<State>, headers: HeaderMap) -> Response {
    if let Err(e) = http.check_key(&headers) {
        return e.into_response();
    }
    let caller = http.caller(&headers);
    let n = http.jobs.interrupt(&caller);
    tracing::info!(jobs = n, "interrupt");
    super::json(json!({}))
}

async fn sd_models(S(http): S<State>, headers: HeaderMap) -> Response {
    if let Err(e) = http.check_key(&headers) {
        return e.into_response();
    }
    let list: Vec<Value> = http
        .service
        .models()
        .map(|g| {
            let f = &g.facts;
            json!({
                "title": f.name, "model_name": f.name, "hash": null, "sha256": null,
                "filename": f.id, "config": null
            })
        })
        .collect();
    super::json(Value::Array(list))
}

/// A1111's LoRA list (the Lora extension's): the adapters in the
/// services' LoRA folder, used in prompts as `<lora:NAME:MULTIPLIER>`;
/// `?model=NAME` (sdserve's) those of another model than the default.
async fn loras(
    S(http): S<State>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let run = async {
        http.check_key(&headers)?;
        let deadline = sd_runtime::deadline::Deadline::after(std::time::Duration::from_secs(30));
        let model = q.get("model").map_or("", String::as_str);
        let list = http
            .service
            .pick(model)?
            .stages
            .list_loras(Default::default(), &deadline)
            .await?;
        let items: Vec<Value> = list
            .loras
            .iter()
            .map(|l| {
                json!({
                    "name": l.name, "alias": l.name,
                    "path": format!("{}.safetensors", l.name), "metadata": {}
                })
            })
            .collect();
        Ok::<_, HttpError>(super::json(Value::Array(items)))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// The folder is read on every list and every request: nothing to refresh.
async fn refresh_loras(S(http): S<State>, headers: HeaderMap) -> Response {
    match http.check_key(&headers) {
        Ok(()) => super::json(json!(null)),
        Err(e) => e.into_response(),
    }
}

async fn samplers(S(http): S<State>, headers: HeaderMap) -> Response {
    if let Err(e) = http.check_key(&headers) {
        return e.into_response();
    }
    let list: Vec<Value> = SAMPLERS
        .iter()
        .map(|(name, aliases, _, auto_karras)| {
            let options = if *auto_karras {
                json!({"scheduler": "karras"})
            } else {
                json!({})
            };
            json!({ "name": name, "aliases": aliases, "options": options })
        })
        .collect();
    super::json(Value::Array(list))
}

async fn schedulers(S(http): S<State>, headers: HeaderMap) -> Response {
    if let Err(e) = http.check_key(&headers) {
        return e.into_response();
    }
    let list: Vec<Value> = SCHEDULES
        .iter()
        .map(|(name, label)| {
            json!({ "name": name, "label": label, "aliases": null, "default_rho": -1, "need_inner_model": false })
        })
        .collect();
    super::json(Value::Array(list))
}

/// The options this server has, with their (fixed) values.
fn options_json(http: &State) -> Value {
    json!({
        "sd_model_checkpoint": title(http),
        "sd_checkpoint_hash": null,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "eta_ddim": 0.0,
        "show_progress_every_n_steps": 5,
    })
}

async fn options(S(http): S<State>, headers: HeaderMap) -> Response {
    match http.check_key(&headers) {
        Ok(()) => super::json(options_json(&http)),
        Err(e) => e.into_response(),
    }
}

/// Setting an option to the value it has is accepted (clients set the
/// checkpoint before generating); changing one is refused, naming it.
async fn set_options(S(http): S<State>, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        http.check_key(&headers)?;
        let body = http.json_object(body).await?;
        let current = options_json(&http);
        for (k, v) in &body {
            let same = match (k.as_str(), v) {
                ("sd_model_checkpoint", Value::String(c)) => is_this_model(&http, c),
                _ => current.get(k) == Some(v),
            };
            if !same {
                return Err(HttpError::invalid(
                    k.as_str(),
                    format_args!(
                        "cannot be changed on this server (it is {})",
                        current.get(k).unwrap_or(&Value::Null)
                    ),
                ));
            }
        }
        Ok(super::json(Value::Null))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// No scripts or extensions here (webuiapi asks at start).
async fn scripts(S(http): S<State>, headers: HeaderMap) -> Response {
    match http.check_key(&headers) {
        Ok(()) => super::json(json!({ "txt2img": [], "img2img": [] })),
        Err(e) => e.into_response(),
    }
}

async fn empty_list(S(http): S<State>, headers: HeaderMap) -> Response {
    match http.check_key(&headers) {
        Ok(()) => super::json(json!([])),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_by_a1111_name() {
        assert_eq!(
            sampler("Euler a", None).unwrap(),
            ("euler-a", false, "Euler a", "Automatic")
        );
        assert_eq!(
            sampler("DPM++ 2M", None).unwrap(),
            ("dpmpp-2m", true, "DPM++ 2M", "Automatic")
        );
        assert!(sampler("DPM++ 2M", Some("Automatic")).unwrap().1);
        assert_eq!(
            sampler("DPM++ 2M Karras", None).unwrap(),
            ("dpmpp-2m", true, "DPM++ 2M", "Automatic")
        );
        assert_eq!(
            sampler("Euler", Some("Karras")).unwrap(),
            ("euler", true, "Euler", "Karras")
        );
        assert_eq!(sampler("PLMS", None).unwrap().0, "pndm");
        assert_eq!(sampler("k_lms", None).unwrap().0, "lms");
        let e = sampler("Restart", None).unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::NOT_FOUND, "Sampler not found")
        );
        let e = sampler("Euler", Some("Exponential")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("scheduler"));
    }

    #[test]
    fn a1111_requests_read_prompts_in_a1111_syntax() {
        let body = br#"{"prompt": "a (red:1.3) cube", "negative_prompt": "[blurry]",
                        "override_settings": {"CLIP_stop_at_last_layers": 2}, "batch_size": 2, "seed": 5}"#;
        let reqs = parse(body, false).unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].prompt, "a (red:1.3) cube");
        assert_eq!(reqs[0].prompt_syntax, PromptSyntax::A1111 as i32);
        assert_eq!(reqs[0].clip_skip, 1);
        assert_eq!((reqs[0].seed, reqs[1].seed), (Some(5), Some(6)));
        let e = parse(
            br#"{"override_settings": {"CLIP_stop_at_last_layers": 0}}"#,
            false,
        )
        .unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("override_settings.CLIP_stop_at_last_layers")
        );
    }

    #[test]
    fn fields_a_result_depends_on_are_refused_when_set() {
        let ok = json!({"enable_hr": false, "styles": [], "subseed_strength": 0, "s_noise": 1,
                        "seed_resize_from_h": -1, "alwayson_scripts": {}, "script_args": [],
                        "script_name": null, "resize_mode": 0, "unknown_field": 3});
        assert!(refuse_unsupported(&Fields(ok.as_object().unwrap())).is_ok());
        for (k, v) in [
            ("enable_hr", json!(true)),
            ("restore_faces", json!(true)),
            ("tiling", json!(true)),
            ("styles", json!(["cinematic"])),
            ("subseed_strength", json!(0.3)),
            ("seed_resize_from_w", json!(768)),
            ("s_churn", json!(0.5)),
            ("s_noise", json!(0.9)),
            ("script_name", json!("x/y/z plot")),
            ("alwayson_scripts", json!({"controlnet": {}})),
            ("resize_mode", json!(1)),
            ("mask", json!("aGk=")),
        ] {
            let m = json!({ k: v });
            let e = refuse_unsupported(&Fields(m.as_object().unwrap())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(k));
        }
    }
}

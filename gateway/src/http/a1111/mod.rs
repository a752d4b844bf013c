//! An AUTOMATIC1111 `/sdapi/v1` subset with A1111's field names and answers:
//! `txt2img`, `img2img`, `progress`, `interrupt`, and the lists clients read
//! at start (`sd-models`, `samplers`, `schedulers`, `options`, `upscalers`,
//! `sd-vae`, `latent-upscale-modes`). Works with the PyPI `webuiapi`
//! client, SillyTavern, Open WebUI and LibreChat.
//!
//! Semantics as A1111 1.10 has them: `seed` -1 is random; image i of
//! `batch_size × n_iter` uses seed + i with a generator of its own (each
//! image is its own generation here, run together so the denoiser batches
//! them); samplers by A1111's names; img2img's `mask` with A1111's
//! inpainting (`inpaint.rs`); unknown fields are ignored; fields we do not
//! support that would change the result (face restoration, tiling, styles,
//! subseeds, scripts, …) are refused with 400 naming them when set to
//! anything but their default — never dropped.

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

use crate::infotext::SAMPLERS;

/// A1111's schedule types this server has: (name, label).
const SCHEDULES: [(&str, &str); 2] = [("automatic", "Automatic"), ("karras", "Karras")];

/// gRPC's field names as A1111's clients know them.
const RENAMES: &[(&str, &str)] = &[
    ("guidance_scale", "cfg_scale"),
    ("init_image", "init_images"),
    ("strength", "denoising_strength"),
    ("scheduler", "sampler_name"),
    ("hires", "enable_hr"),
    ("hires.scale", "hr_scale"),
    ("hires.width", "hr_resize_x"),
    ("hires.height", "hr_resize_y"),
    ("hires.upscaler", "hr_upscaler"),
    ("hires.steps", "hr_second_pass_steps"),
    ("hires.strength", "denoising_strength"),
    ("hires.scheduler", "hr_sampler_name"),
    ("hires.prompt", "hr_prompt"),
    ("hires.negative_prompt", "hr_negative_prompt"),
];

/// The sampler A1111's API uses when a request names none.
const DEFAULT_SAMPLER: &str = "Euler";

mod catalogue;
pub mod controlnet;
mod inpaint;
mod picture;
mod request;

use catalogue::*;
use request::*;
pub use request::{parse, sampler};

pub fn routes() -> Router<State> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/refresh-loras", post(refresh_loras))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/upscalers", get(upscalers))
        .route("/sdapi/v1/sd-vae", get(empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(latent_upscale_modes))
        .route("/sdapi/v1/scripts", get(scripts))
}

async fn txt2img(s: S<State>, headers: HeaderMap, body: Body) -> Response {
    generate(s, headers, body, false).await
}

async fn img2img(s: S<State>, headers: HeaderMap, body: Body) -> Response {
    generate(s, headers, body, true).await
}

async fn generate(S(http): S<State>, headers: HeaderMap, body: Body, img2img: bool) -> Response {
    let run = async {
        let body = http.json_object(body).await?;
        let model = checkpoint(&http, &Fields(&body))?;
        let mut asked = read_request(&Fields(&body), img2img)?;
        asked.base.model = model;
        let profile = http.service.pick(&asked.base.model)?.facts.profile.clone();
        if profile.sdxl().is_some() {
            // A1111 reads SDXL's penultimate layers whatever
            // CLIP_stop_at_last_layers says (its sdxl_clip_l_skip is off).
            asked.base.clip_skip = 0;
        }
        if profile.flux().is_some() {
            request::as_forge_flux(&Fields(&body), &mut asked)?;
        } else if profile.is_flow() {
            request::as_qwen_family(&Fields(&body), &mut asked, profile.default_guidance)?;
        }
        if img2img {
            let size = (asked.base.width, asked.base.height);
            let p = inpaint::prepare(
                &Fields(&body),
                &asked.init_images,
                size,
                &http.service.limits,
            )?;
            asked.prepared = p.images;
            asked.mask = p.mask;
            asked.inpaint = p.options;
            asked.infotext = p.infotext;
        }
        let size = (asked.base.width, asked.base.height);
        let mut units = controlnet::units(&Fields(&body), size)?;
        controlnet::resolve(&http, &asked.base.model, &mut units).await?;
        asked.infotext.extend(controlnet::infotext(&units));
        let sources = controlnet::map_sources(&units);
        let (controls, ips, indices) = controlnet::split(units);
        (asked.base.controlnets, asked.base.ip_adapters) = (controls, ips);
        asked.control_indices = indices;
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
        // The ControlNet extension's detected maps follow the images.
        let last = images.last().and_then(|(_, r)| r.images.first());
        let high = last
            .map(|i| (i.width, i.height))
            .filter(|_| asked.base.hires.is_some());
        let maps = if asked.send_images {
            controlnet::maps(&sources, &http.service.limits, size, high)?
        } else {
            Vec::new()
        };
        Ok::<_, HttpError>(super::json(answer(&http, &body, &asked, &images, maps)))
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
        let prepared = (!asked.prepared.is_empty())
            .then(|| &asked.prepared[index as usize % asked.prepared.len()]);
        if let Some(p) = prepared {
            req.init_image = p.image.clone().into();
            req.strength = asked.denoising_strength.map(|d| d as f32);
            req.mask = asked.mask.clone().into();
            req.inpaint = asked.inpaint;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let watch = follow(job.clone(), b as usize, rx);
        async move {
            let out = http
                .generate("A1111", headers, req, Some(tx), Some(job.stop.clone()))
                .await
                .map_err(|e| controlnet::rename(e.renamed(RENAMES), &asked.control_indices));
            let _ = watch.await;
            let mut r = out?;
            if let Some(overlay) = prepared.and_then(|p| p.overlay.as_ref()) {
                let chunks = chunks(&r, &asked.infotext);
                for image in &mut r.images {
                    let (png, w, h) = overlay.apply(&image.data, &chunks)?;
                    (image.data, image.width, image.height) = (png.into(), w, h);
                }
            }
            Ok((seed, r))
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

/// A generation's infotext with what A1111 adds for the request (`key:
/// value` pairs, quoted as A1111 quotes values with `,`, `:` or newlines).
fn infotext(p: &sd_proto::v1::GenerationParameters, extra: &[(String, String)]) -> String {
    crate::infotext::write_with(p, extra)
}

/// A result's PNG text chunks with the request's infotext additions.
fn chunks(r: &GenerateResponse, extra: &[(String, String)]) -> Vec<(String, String)> {
    let Some(p) = &r.parameters else {
        return Vec::new();
    };
    let mut chunks = crate::images::text_chunks(p);
    if let Some(c) = chunks.iter_mut().find(|(k, _)| k == "parameters") {
        c.1 = infotext(p, extra);
    }
    chunks
}

/// A1111's answer: `{images, parameters, info}`, `info` a JSON string.
fn answer(
    http: &State,
    body: &Map<String, Value>,
    asked: &Asked,
    images: &[(u64, GenerateResponse)],
    maps: Vec<String>,
) -> Value {
    let b = &asked.base;
    let seeds: Vec<u64> = images.iter().map(|(s, _)| *s).collect();
    let model = title(http);
    // Each image's infotext as its PNG's `parameters` chunk has it.
    let infotexts: Vec<String> = images
        .iter()
        .map(|(_, r)| {
            r.parameters
                .as_ref()
                .map(|p| infotext(p, &asked.infotext))
                .unwrap_or_default()
        })
        .collect();
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
        "distilled_cfg_scale": asked.distilled_cfg_scale,
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
        "extra_generation_params": images
            .first()
            .and_then(|(_, r)| r.parameters.as_ref())
            .and_then(|p| crate::infotext::a1111_sampler(&p.scheduler, p.karras).1)
            .map_or_else(|| json!({}), |s| json!({ "Schedule type": s })),
        "index_of_first_image": 0,
        "infotexts": infotexts,
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
            .chain(maps)
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
    let caller = http.caller(&headers);
    let n = http.jobs.interrupt(&caller);
    tracing::info!(jobs = n, "interrupt");
    super::json(json!({}))
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
            ("restore_faces", json!(true)),
            ("tiling", json!(true)),
            ("styles", json!(["cinematic"])),
            ("subseed_strength", json!(0.3)),
            ("seed_resize_from_w", json!(768)),
            ("s_churn", json!(0.5)),
            ("s_noise", json!(0.9)),
            ("script_name", json!("x/y/z plot")),
        ] {
            let m = json!({ k: v });
            let e = refuse_unsupported(&Fields(m.as_object().unwrap())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(k));
        }
        // Extensions other than ControlNet, named.
        let m = json!({"alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {}}});
        let e = refuse_unsupported(&Fields(m.as_object().unwrap())).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("alwayson_scripts.ADetailer"));
        let m = json!({"alwayson_scripts": {"ControlNet": {"args": []}}});
        assert!(refuse_unsupported(&Fields(m.as_object().unwrap())).is_ok());
    }
}

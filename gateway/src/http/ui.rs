//! The web page (`GET /`, one file embedded in the binary, no build step)
//! and the stream it draws from: `POST /ui/generate` takes the page's JSON
//! and answers server-sent events — `progress` after each step, `preview`
//! (a latent preview, every `preview_every` steps), then `result` or
//! `error`. A client that goes away (the page's Cancel aborts its fetch)
//! stops the generation after the step in progress, as a gRPC
//! GenerateStream client that goes away does.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State as S;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::Stream;
use serde_json::json;
use tokio::sync::mpsc;

use super::error::HttpError;
use super::fields::Fields;
use super::jobs::Job;
use super::{decode_base64, encode_base64, State};
use crate::pipeline::Event;
use sd_proto::v1::{GenerateRequest, GenerationParameters, PreviewMode};

const PAGE: &str = include_str!("page.html");

/// The page, open to anyone (it asks for a key when the API wants one).
pub fn open_routes() -> Router<State> {
    Router::new().route("/", get(page))
}

/// The page's API, behind the API keys.
pub fn routes() -> Router<State> {
    Router::new()
        .route("/ui/generate", post(generate))
        .route("/ui/controls", get(controls))
}

async fn page() -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response();
    // Everything the page needs is in the page and this origin.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; \
             script-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    r
}

/// The page's request: the gRPC fields by their names, sizes as numbers,
/// the init image as base64 (or a `data:` URL).
fn request(f: &Fields) -> Result<GenerateRequest, HttpError> {
    let init = match f.str("init_image")? {
        Some(s) if !s.is_empty() => decode_base64("init_image", s)?,
        _ => Vec::new(),
    };
    let mask = match f.str("mask")? {
        Some(s) if !s.is_empty() => decode_base64("mask", s)?,
        _ => Vec::new(),
    };
    let reference_images = f
        .strings("reference_images")?
        .into_iter()
        .map(|s| decode_base64("reference_images", s).map(Into::into))
        .collect::<Result<Vec<_>, _>>()?;
    let hires = match f.object("hires")? {
        Some(h) => {
            let h = Fields(h);
            let rename = |e: HttpError| {
                let p = e.param.clone().unwrap_or_default();
                let m = e
                    .message
                    .strip_prefix(&format!("{p}: "))
                    .unwrap_or(&e.message);
                HttpError::invalid(format!("hires.{p}"), m)
            };
            Some(sd_proto::v1::Hires {
                scale: h.f64("scale").map_err(rename)?.unwrap_or(2.0) as f32,
                upscaler: h.string_or("upscaler", "").map_err(rename)?,
                steps: h.int_in("steps", 0, 10_000).map_err(rename)?.unwrap_or(0) as u32,
                strength: h.f64("strength").map_err(rename)?.map(|s| s as f32),
                ..Default::default()
            })
        }
        None => None,
    };
    Ok(GenerateRequest {
        prompt: f.string_or("prompt", "")?,
        negative_prompt: f.string_or("negative_prompt", "")?,
        width: f.int_in("width", 0, 16_384)?.unwrap_or(0) as u32,
        height: f.int_in("height", 0, 16_384)?.unwrap_or(0) as u32,
        steps: f.int_in("steps", 0, 10_000)?.unwrap_or(0) as u32,
        guidance_scale: f.f64("guidance_scale")?.map(|g| g as f32),
        scheduler: f.string_or("scheduler", "")?,
        seed: f.int_in("seed", 0, i64::MAX)?.map(|s| s as u64),
        strength: if init.is_empty() {
            None
        } else {
            f.f64("strength")?.map(|s| s as f32)
        },
        init_image: init.into(),
        mask: mask.into(),
        hires,
        model: f.string_or("model", "")?,
        preview_every: f.int_in("preview_every", 0, 1000)?.unwrap_or(1) as u32,
        preview_mode: PreviewMode::Latent as i32,
        num_images: 1,
        loras: f.loras("loras")?,
        controlnets: f.controlnets("controlnets")?,
        ip_adapters: f.ip_adapters("ip_adapters")?,
        true_cfg_scale: f.f64("true_cfg_scale")?.map(|g| g as f32),
        max_sequence_length: f.int_in("max_sequence_length", 0, 4096)?.unwrap_or(0) as u32,
        reference_images,
        ..Default::default()
    })
}

fn event(name: &str, data: serde_json::Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

fn parameters_json(p: &GenerationParameters) -> serde_json::Value {
    json!({
        "prompt": p.prompt, "negative_prompt": p.negative_prompt, "width": p.width,
        "height": p.height, "steps": p.steps, "guidance_scale": p.guidance_scale,
        "scheduler": p.scheduler, "seed": p.seed, "model": p.model,
        "true_cfg_scale": (p.true_cfg_scale > 0.0).then_some(p.true_cfg_scale),
        "max_sequence_length": (p.max_sequence_length > 0).then_some(p.max_sequence_length),
        "loras": p.loras.iter().map(|l| json!({
            "name": l.name, "scale": l.scale, "unet_scale": l.unet_scale,
        })).collect::<Vec<_>>(),
        "hires": p.hires.as_ref().map(|h| json!({
            "width": h.width, "height": h.height, "upscaler": h.upscaler, "steps": h.steps,
        })),
        "controlnets": p.controlnets.iter().map(|c| json!({
            "name": c.name, "weight": shortest(c.weight.unwrap_or(1.0)),
            "preprocessor": c.preprocessor, "union_mode": c.union_mode,
        })).collect::<Vec<_>>(),
        "ip_adapters": p.ip_adapters.iter().map(|a| json!({
            "name": a.name, "scale": shortest(a.scale.unwrap_or(1.0)),
        })).collect::<Vec<_>>(),
    })
}

/// A float32 as the number it was typed as (0.7, not 0.699999988).
fn shortest(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// What the page can steer with on a model (`GET /ui/controls?model=`):
/// the ControlNets and IP-Adapters its denoiser serves, by name (empty
/// lists where it serves none), and each union ControlNet's number of
/// control types.
async fn controls(
    S(http): S<State>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let model = q.get("model").map_or("", String::as_str);
    let deadline = sd_runtime::deadline::Deadline::after(std::time::Duration::from_secs(30));
    let stages = match http.service.pick(model) {
        Ok(g) => g.stages.clone(),
        Err(e) => return HttpError::from(e).into_response(),
    };
    let names = |v: Vec<String>| json!(v);
    let listed = stages
        .list_controlnets(Default::default(), &deadline)
        .await
        .map(|l| l.controlnets)
        .unwrap_or_default();
    let control_types: serde_json::Map<String, serde_json::Value> = listed
        .iter()
        .filter(|c| c.union_modes > 0)
        .map(|c| (c.name.clone(), json!(c.union_modes)))
        .collect();
    let controlnets = listed.into_iter().map(|c| c.name).collect();
    let ip_adapters = stages
        .list_ip_adapters(Default::default(), &deadline)
        .await
        .map(|l| l.ip_adapters.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    super::json(json!({
        "controlnets": names(controlnets),
        "control_types": control_types,
        "ip_adapters": names(ip_adapters),
    }))
}

async fn generate(S(http): S<State>, headers: HeaderMap, body: Body) -> Response {
    let prepared = async {
        let body = http.json_object(body).await?;
        request(&Fields(&body))
    };
    let req = match prepared.await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (sse_tx, sse_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let (events_tx, events_rx) = mpsc::channel::<Event>(16);
    // The page's generation is a job like an A1111 one: `/sdapi/v1/progress`
    // shows it and `/sdapi/v1/interrupt` stops it (with the image so far).
    let caller = http.caller(&headers);
    let running = http.jobs.start(caller, 1);
    running.job.iteration(0, 1, req.steps);
    // Events to the client while it listens; when it stops listening the
    // events channel closes and the step loop stops (ClientGone).
    let forward = tokio::spawn(forward_events(
        events_rx,
        sse_tx.clone(),
        running.job.clone(),
    ));
    tokio::spawn(async move {
        let stop = Some(running.job.stop.clone());
        let out = http
            .generate("UI", &headers, req, Some(events_tx), stop)
            .await;
        let _ = forward.await;
        drop(running);
        let last = match out {
            Ok(r) => event(
                "result",
                json!({
                    "images": r.images.iter().map(|i| encode_base64(&i.data)).collect::<Vec<_>>(),
                    "parameters": r.parameters.as_ref().map(parameters_json),
                }),
            ),
            Err(e) => event(
                "error",
                json!({ "status": e.status.as_u16(), "param": e.param, "message": e.message }),
            ),
        };
        let _ = sse_tx.send(last).await;
    });
    sse(sse_rx).into_response()
}

fn sse(
    rx: mpsc::Receiver<Result<SseEvent, Infallible>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn forward_events(
    mut events: mpsc::Receiver<Event>,
    sse: mpsc::Sender<Result<SseEvent, Infallible>>,
    job: std::sync::Arc<Job>,
) {
    while let Some(e) = events.recv().await {
        let msg = match e {
            Event::Progress {
                step,
                total,
                elapsed,
                ..
            } => {
                job.step(0, step, total);
                event(
                    "progress",
                    json!({ "step": step, "total": total, "elapsed": elapsed }),
                )
            }
            Event::Preview { step, images } => {
                if let Some(i) = images.first() {
                    job.preview(i.data.clone());
                }
                event(
                    "preview",
                    json!({
                        "step": step,
                        "image": images.first().map(|i| encode_base64(&i.data)),
                    }),
                )
            }
        };
        if sse.send(msg).await.is_err() {
            return; // the page went away: dropping `events` stops the loop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_what_its_users_and_tests_look_for() {
        for needle in [
            "<label for=\"prompt\">Prompt</label>",
            ">Generate</button>",
            ">Cancel</button>",
            "<progress",
            "Generated image",
            "name=\"viewport\"",
            "/ui/generate",
        ] {
            assert!(PAGE.contains(needle), "page.html lacks {needle}");
        }
    }

    #[test]
    fn page_requests_become_generate_requests() {
        let m = serde_json::json!({"prompt": "a cat", "width": 64, "height": 32, "steps": 4,
            "seed": 3, "scheduler": "euler", "init_image": "", "strength": 0.5})
        .as_object()
        .cloned()
        .unwrap();
        let r = request(&Fields(&m)).unwrap();
        assert_eq!((r.width, r.height, r.steps, r.seed), (64, 32, 4, Some(3)));
        assert_eq!(r.strength, None, "no init image: no strength");
        assert!(r.init_image.is_empty());
    }
}

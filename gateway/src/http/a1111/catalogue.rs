//! The lists A1111 clients read at start (models, LoRAs, samplers,
//! schedulers, options, scripts, upscalers), with their fixed values.

use super::*;

pub(super) async fn sd_models(S(http): S<State>) -> Response {
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
    crate::http::json(Value::Array(list))
}

/// A1111's LoRA list (the Lora extension's): the adapters in the
/// services' LoRA folder, used in prompts as `<lora:NAME:MULTIPLIER>`;
/// `?model=NAME` (sdserve's) those of another model than the default.
pub(super) async fn loras(
    S(http): S<State>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let run = async {
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
        Ok::<_, HttpError>(crate::http::json(Value::Array(items)))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// The folder is read on every list and every request: nothing to refresh.
pub(super) async fn refresh_loras() -> Response {
    crate::http::json(json!(null))
}

/// A1111's sampler list; for a FLUX model its one sampler, "Euler" (the
/// flow-matching Euler, as Forge lists it), since the others do not fit.
pub(super) async fn samplers(S(http): S<State>) -> Response {
    let flow = http.service.generator.facts.profile.is_flow();
    let list: Vec<Value> = SAMPLERS
        .iter()
        .filter(|(_, _, ours, _)| !flow || *ours == "euler")
        .map(|(name, aliases, _, auto_karras)| {
            let options = if *auto_karras {
                json!({"scheduler": "karras"})
            } else {
                json!({})
            };
            json!({ "name": name, "aliases": aliases, "options": options })
        })
        .collect();
    crate::http::json(Value::Array(list))
}

pub(super) async fn schedulers() -> Response {
    let list: Vec<Value> = SCHEDULES
        .iter()
        .map(|(name, label)| {
            json!({ "name": name, "label": label, "aliases": null, "default_rho": -1, "need_inner_model": false })
        })
        .collect();
    crate::http::json(Value::Array(list))
}

/// The options this server has, with their (fixed) values.
pub(super) fn options_json(http: &State) -> Value {
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

pub(super) async fn options(S(http): S<State>) -> Response {
    crate::http::json(options_json(&http))
}

/// Setting an option to the value it has is accepted (clients set the
/// checkpoint before generating); changing one is refused, naming it.
pub(super) async fn set_options(S(http): S<State>, body: Body) -> Response {
    let run = async {
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
        Ok(crate::http::json(Value::Null))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// No scripts or extensions here (webuiapi asks at start).
pub(super) async fn scripts() -> Response {
    crate::http::json(json!({ "txt2img": [], "img2img": [] }))
}

pub(super) async fn empty_list() -> Response {
    crate::http::json(json!([]))
}

/// `/sdapi/v1/upscalers`: the image upscalers hires fix takes (no models).
pub(super) async fn upscalers() -> Response {
    let list: Vec<Value> = ["None", "Lanczos", "Nearest"]
        .iter()
        .map(|n| json!({"name": n, "model_name": null, "model_path": null, "model_url": null, "scale": 4}))
        .collect();
    crate::http::json(json!(list))
}

/// `/sdapi/v1/latent-upscale-modes`: A1111's latent upscalers.
pub(super) async fn latent_upscale_modes() -> Response {
    let list: Vec<Value> = crate::hires::UPSCALERS
        .iter()
        .filter(|n| n.starts_with("Latent"))
        .map(|n| json!({ "name": n }))
        .collect();
    crate::http::json(json!(list))
}

/// `/sdapi/v1/embeddings`: the text encoder's textual-inversion embeddings,
/// `{loaded: {NAME: {step, sd_checkpoint, sd_checkpoint_name, shape,
/// vectors}}, skipped: {…}}` as A1111 answers it (safetensors carry no
/// training step or checkpoint: null).
pub(super) async fn embeddings(S(http): S<State>) -> Response {
    let (mut loaded, mut skipped) = (Map::new(), Map::new());
    for t in &http.service.generator.facts.textual_inversions {
        let entry = json!({
            "step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
            "shape": t.shape, "vectors": t.vectors,
        });
        if t.skipped.is_empty() {
            loaded.insert(t.name.clone(), entry);
        } else {
            skipped.insert(t.name.clone(), entry);
        }
    }
    crate::http::json(json!({ "loaded": loaded, "skipped": skipped }))
}

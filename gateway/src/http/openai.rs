//! The OpenAI Images API: `POST /v1/images/generations`, `POST
//! /v1/images/edits` (image-to-image), `GET /v1/models`, and the image URLs
//! `response_format: "url"` hands out. Works with the official `openai`
//! client pointed at `base_url=http://HOST:PORT/v1`.
//!
//! OpenAI's own model names (`dall-e-2`, `dall-e-3`, `gpt-image-1`) mean the
//! model this gateway serves, so clients that send their default work
//! unchanged; any other name must be the served model's id or name.
//! Extensions beyond OpenAI's fields: `negative_prompt`, `steps`, `seed`,
//! `guidance_scale`, `scheduler`, `prompt_syntax` (`plain` or `a1111`),
//! `loras` (`[{"name": …, "scale": …}]`, files in the services' LoRA
//! folder), `controlnets` (`[{"name", "image" (base64), "weight", "start",
//! "end", "mode", "preprocessor", …}]`, as gRPC's `ControlUnit`),
//! `ip_adapters` (`[{"name", "image" (base64), "scale", "start", "end"}]`),
//! and for edits `strength` (with a `mask`: inpainting, 1.0 by
//! default).

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State as S};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use super::error::{HttpError, HttpResult};
use super::fields::Fields;
use super::{encode_base64, parse_size, State};
use sd_proto::v1::{GenerateRequest, GenerateResponse, ImageFormat, PromptSyntax};

/// OpenAI's model names, taken to mean the served model.
const OPENAI_MODELS: [&str; 4] = ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini"];

/// The routes behind the API keys.
pub fn routes() -> Router<State> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
}

/// The routes open to anyone: an image's URL is its own capability (an
/// unguessable name, answered for an hour), as OpenAI's are.
pub fn open_routes() -> Router<State> {
    Router::new().route("/v1/images/files/{file}", get(file))
}

/// gRPC's field names as OpenAI's clients know them.
const RENAMES: &[(&str, &str)] = &[
    ("width", "size"),
    ("height", "size"),
    ("num_images", "n"),
    ("init_image", "image"),
    ("reference_images", "image"),
];

/// How the images come back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Delivery {
    B64,
    Url,
}

/// An OpenAI request's fields as a GenerateRequest, and how to answer.
fn request(f: &Fields, served: &str) -> HttpResult<(GenerateRequest, Delivery)> {
    let prompt = f.str("prompt")?.unwrap_or("");
    if prompt.trim().is_empty() {
        return Err(HttpError::invalid("prompt", "required: what to draw"));
    }
    let model = match f.str("model")? {
        None => String::new(),
        Some(m) if OPENAI_MODELS.contains(&m) => String::new(),
        Some(m) if m == served => String::new(),
        Some(m) => m.to_string(),
    };
    let (width, height) = match f.str("size")? {
        None | Some("auto") => (0, 0),
        Some(s) => parse_size("size", s)?,
    };
    let delivery = match f.str("response_format")? {
        None | Some("b64_json") => Delivery::B64,
        Some("url") => Delivery::Url,
        Some(other) => {
            return Err(HttpError::invalid(
                "response_format",
                format_args!("`{other}`: expected b64_json or url"),
            ))
        }
    };
    let format = match f.str("output_format")? {
        None | Some("png") => ImageFormat::Png,
        Some("jpeg") | Some("jpg") => ImageFormat::Jpeg,
        Some("webp") => ImageFormat::Webp,
        Some(other) => {
            return Err(HttpError::invalid(
                "output_format",
                format_args!("`{other}`: expected png, jpeg or webp"),
            ))
        }
    };
    let prompt_syntax = match f.str("prompt_syntax")? {
        None | Some("plain") => PromptSyntax::Plain,
        Some("a1111") => PromptSyntax::A1111,
        Some(other) => {
            return Err(HttpError::invalid(
                "prompt_syntax",
                format_args!("`{other}`: expected plain or a1111"),
            ))
        }
    };
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        prompt_syntax: prompt_syntax as i32,
        negative_prompt: f.string_or("negative_prompt", "")?,
        width,
        height,
        steps: f.int_in("steps", 1, 10_000)?.unwrap_or(0) as u32,
        guidance_scale: f.f64("guidance_scale")?.map(|g| g as f32),
        scheduler: f.string_or("scheduler", "")?,
        seed: f.int_in("seed", 0, i64::MAX)?.map(|s| s as u64),
        num_images: f.int_in("n", 1, 10)?.unwrap_or(1) as u32,
        strength: f.f64("strength")?.map(|s| s as f32),
        format: format as i32,
        model,
        loras: f.loras("loras")?,
        controlnets: f.controlnets("controlnets")?,
        ip_adapters: f.ip_adapters("ip_adapters")?,
        true_cfg_scale: f.f64("true_cfg_scale")?.map(|g| g as f32),
        max_sequence_length: f.int_in("max_sequence_length", 1, 4096)?.unwrap_or(0) as u32,
        ..Default::default()
    };
    Ok((req, delivery))
}

/// An async job's body (`POST /v1/jobs`): a generations body, or an edit's
/// as JSON — `image` a base64 picture or a list of them, `mask` base64 —
/// read as the two routes read theirs. Jobs answer with `b64_json`.
pub(crate) fn job_request(http: &State, body: &Map<String, Value>) -> HttpResult<GenerateRequest> {
    let served = http.service.generator.facts.name.clone();
    let (mut req, delivery) = request(&Fields(body), &served)?;
    if delivery == Delivery::Url {
        return Err(HttpError::invalid(
            "response_format",
            "a job's images come as b64_json from GET /v1/jobs/{id}",
        ));
    }
    // Previews on the job's event stream (`GET /v1/jobs/{id}/events`),
    // every this many steps (0, the default: none).
    req.preview_every = Fields(body).int_in("preview_every", 0, 1000)?.unwrap_or(0) as u32;
    let klein = match http.service.pick(&req.model) {
        Ok(g) => g.facts.profile.klein().is_some(),
        Err(e) => return Err(HttpError::not_found(e.to_string())),
    };
    let images: Vec<Vec<u8>> = match body.get("image") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![super::decode_base64("image", s)?],
        Some(Value::Array(items)) if items.len() <= MAX_EDIT_IMAGES => items
            .iter()
            .map(|v| match v {
                Value::String(s) => super::decode_base64("image", s),
                _ => Err(HttpError::invalid("image", "expected base64 strings")),
            })
            .collect::<HttpResult<_>>()?,
        Some(Value::Array(_)) => {
            return Err(HttpError::invalid(
                "image",
                format_args!("more than {MAX_EDIT_IMAGES} images"),
            ))
        }
        Some(_) => {
            return Err(HttpError::invalid(
                "image",
                "expected a base64 picture or a list of them",
            ))
        }
    };
    let mask = match body.get("mask") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(super::decode_base64("mask", s)?),
        Some(_) => return Err(HttpError::invalid("mask", "expected a base64 picture")),
    };
    if images.is_empty() {
        if mask.is_some() {
            return Err(HttpError::invalid(
                "mask",
                "a mask needs an `image` to repaint",
            ));
        }
        return Ok(req);
    }
    let form = Form {
        fields: Map::new(),
        images,
        mask,
    };
    let edit = edit_pictures(http, form, klein)?;
    req.init_image = edit.image.into();
    req.mask = edit.mask.into();
    req.reference_images = edit.references.into_iter().map(Into::into).collect();
    Ok(req)
}

/// gRPC's field names as a job's clients know them.
pub(crate) fn renamed(e: HttpError) -> HttpError {
    e.renamed(RENAMES)
}

/// An OpenAI generations body as a GenerateRequest, or the error a client
/// would get: for fuzzing and tests.
pub fn parse(body: &[u8]) -> HttpResult<GenerateRequest> {
    let m = super::json_object_from(body)?;
    request(&Fields(&m), "").map(|(r, _)| r)
}

async fn generations(S(http): S<State>, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let body = http.json_object(body).await?;
        answer(&http, &headers, &body, None).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// An edit's pictures: the image to change and its mask (either may be
/// empty), and FLUX.2 Klein's reference images.
#[derive(Default)]
struct Edit {
    image: Vec<u8>,
    mask: Vec<u8>,
    references: Vec<Vec<u8>>,
}

/// Generate for an OpenAI request (with its pictures for edits).
async fn answer(
    http: &State,
    headers: &HeaderMap,
    body: &Map<String, Value>,
    edit: Option<Form>,
) -> HttpResult<Response> {
    let served = http.service.generator.facts.name.clone();
    let (mut req, delivery) = request(&Fields(body), &served)?;
    // OpenAI answers an unknown model 404 (`model_not_found`), as its
    // clients expect; gRPC says INVALID_ARGUMENT.
    let klein = match http.service.pick(&req.model) {
        Ok(g) => g.facts.profile.klein().is_some(),
        Err(e) => return Err(HttpError::not_found(e.to_string())),
    };
    if let Some(form) = edit {
        let edit = edit_pictures(http, form, klein)?;
        req.init_image = edit.image.into();
        req.mask = edit.mask.into();
        req.reference_images = edit.references.into_iter().map(Into::into).collect();
    }
    let reply = http
        .generate("OpenAI", headers, req, None, None)
        .await
        .map_err(|e| e.renamed(RENAMES))?;
    Ok(super::json(images_json(http, headers, &reply, delivery)?))
}

/// `{created, data: [{b64_json} | {url}]}`.
fn images_json(
    http: &State,
    headers: &HeaderMap,
    reply: &GenerateResponse,
    delivery: Delivery,
) -> HttpResult<Value> {
    let mut data = Vec::new();
    let mut format = "png";
    for image in &reply.images {
        let (ext, mime) = match ImageFormat::try_from(image.format).unwrap_or(ImageFormat::Png) {
            ImageFormat::Png => ("png", "image/png"),
            ImageFormat::Jpeg => ("jpeg", "image/jpeg"),
            ImageFormat::Webp => ("webp", "image/webp"),
        };
        format = ext;
        data.push(match delivery {
            Delivery::B64 => json!({ "b64_json": encode_base64(&image.data) }),
            Delivery::Url => {
                let id = http
                    .store
                    .put(image.data.clone(), mime)
                    .ok_or_else(|| HttpError {
                        status: StatusCode::INSUFFICIENT_STORAGE,
                        param: Some("response_format".into()),
                        message: "response_format: the image is larger than the URL store \
                              (--http-url-store-mib); ask for b64_json"
                            .into(),
                    })?;
                json!({ "url": format!("{}/v1/images/files/{id}.{ext}", origin(headers)) })
            }
        });
    }
    let size = reply
        .images
        .first()
        .map(|i| format!("{}x{}", i.width, i.height));
    Ok(json!({
        "created": now_secs(),
        "data": data,
        "output_format": format,
        "size": size,
    }))
}

/// `http://host:port` as the client reached us (a TLS proxy in front says
/// so in `X-Forwarded-Proto`).
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|s| *s == "https" || *s == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `POST /v1/images/edits`: multipart with `image` (one file; on FLUX.2
/// Klein up to 16, its reference images), `mask` (optional), `prompt`,
/// `n`, `size`, `response_format`, and the extensions; inpainting with a
/// mask (strength 1.0 unless `strength` says), image-to-image without.
async fn edits(S(http): S<State>, headers: HeaderMap, req: Request) -> Response {
    let run = async {
        let form = read_form(&http, req).await?;
        let fields = form.fields.clone();
        answer(&http, &headers, &fields, Some(form)).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Most `image` files an edit takes (OpenAI's limit).
const MAX_EDIT_IMAGES: usize = crate::reference::MAX_REFERENCES;

/// What an edit's files mean for the model: on FLUX.2 Klein every `image`
/// is a reference image (as gpt-image-1 takes several), unless a `mask`
/// comes along — then the first is the picture the mask repaints and the
/// rest references; on other models one image, changed or repainted.
fn edit_pictures(http: &State, form: Form, klein: bool) -> HttpResult<Edit> {
    let mut images = form.images.into_iter();
    let Some(first) = images.next() else {
        return Err(HttpError::invalid("image", "required: the image to edit"));
    };
    if klein && form.mask.is_none() {
        return Ok(Edit {
            references: std::iter::once(first).chain(images).collect(),
            ..Edit::default()
        });
    }
    let rest: Vec<Vec<u8>> = images.collect();
    if !klein && !rest.is_empty() {
        return Err(HttpError::invalid(
            "image",
            format_args!(
                "{} images: this model edits one (several are FLUX.2 Klein's reference images)",
                rest.len() + 1
            ),
        ));
    }
    let mask = edit_mask(http, &first, form.mask.as_deref())?;
    Ok(Edit {
        image: first,
        mask,
        references: rest,
    })
}

/// An edit's mask in our convention (white repaints) as PNG bytes, from
/// OpenAI's: the `mask` file's transparency (alpha 0 repaints) or, with no
/// alpha in it, its luminance; with no `mask`, the image's own
/// transparency when it has some (as OpenAI's dall-e-2 edits take it);
/// none: the whole image is changed (image-to-image). A mask of another
/// size than the image is refused, as OpenAI refuses it.
fn edit_mask(http: &State, image: &[u8], mask: Option<&[u8]>) -> HttpResult<Vec<u8>> {
    use crate::mask::{alpha_as_mask, to_png};
    let limits = &http.service.limits;
    let picture =
        crate::images::decode_picture(image, limits).map_err(|e| HttpError::invalid("image", e))?;
    let Some(mask) = mask else {
        return match alpha_as_mask(&picture) {
            Some(gray) => to_png(&gray).map_err(|e| HttpError::invalid("image", e)),
            None => Ok(Vec::new()),
        };
    };
    let m =
        crate::images::decode_picture(mask, limits).map_err(|e| HttpError::invalid("mask", e))?;
    if (m.width(), m.height()) != (picture.width(), picture.height()) {
        return Err(HttpError::invalid(
            "mask",
            format_args!(
                "{}x{}: the mask must have the image's size, {}x{}",
                m.width(),
                m.height(),
                picture.width(),
                picture.height()
            ),
        ));
    }
    let gray = alpha_as_mask(&m).unwrap_or_else(|| {
        let rgb = m.to_rgb8();
        image::GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            image::Luma([crate::mask::luma(rgb.get_pixel(x, y).0)])
        })
    });
    to_png(&gray).map_err(|e| HttpError::invalid("mask", e))
}

/// An edit's multipart form: its text fields, its `image` files (`image`
/// or `image[]`, in order) and its `mask`.
struct Form {
    fields: Map<String, Value>,
    images: Vec<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

async fn read_form(http: &State, req: Request) -> HttpResult<Form> {
    let (parts, body) = req.into_parts();
    let bytes = http.body(body).await?;
    let req = Request::from_parts(parts, Body::from(bytes));
    let mut form = Multipart::from_request(req, &()).await.map_err(|e| {
        HttpError::invalid("body", format_args!("expected multipart/form-data: {e}"))
    })?;
    let (mut fields, mut images, mut mask) = (Map::new(), Vec::new(), None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| HttpError::invalid("body", format_args!("a malformed form: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some();
        let data = field
            .bytes()
            .await
            .map_err(|e| HttpError::invalid(&name, format_args!("could not be read: {e}")))?;
        match name.as_str() {
            "image" | "image[]" => {
                if images.len() == MAX_EDIT_IMAGES {
                    return Err(HttpError::invalid(
                        "image",
                        format_args!("more than {MAX_EDIT_IMAGES} images"),
                    ));
                }
                images.push(data.to_vec());
            }
            "mask" => {
                if mask.is_some() {
                    return Err(HttpError::invalid("mask", "one mask at a time"));
                }
                mask = Some(data.to_vec());
            }
            _ if is_file => {
                return Err(HttpError::invalid(&name, "a file where text was expected"));
            }
            _ => {
                let text = String::from_utf8(data.to_vec())
                    .map_err(|_| HttpError::invalid(&name, "not UTF-8 text"))?;
                fields.insert(name, Value::String(text));
            }
        }
    }
    Ok(Form {
        fields,
        images,
        mask,
    })
}

/// An image handed out by URL, while the store keeps it.
async fn file(S(http): S<State>, Path(file): Path<String>) -> Response {
    let id = file.split('.').next().unwrap_or("");
    match http.store.get(id) {
        Some((bytes, mime)) => ([(header::CONTENT_TYPE, mime)], bytes).into_response(),
        None => {
            HttpError::not_found("no such image (image URLs answer for an hour)").into_response()
        }
    }
}

fn model_json(f: &crate::facts::ModelFacts) -> Value {
    json!({
        "id": f.name,
        "object": "model",
        "created": 0,
        "owned_by": "sdserve",
        "sdserve": {
            "model_id": f.id,
            "family": f.profile.name(),
            "default_size": f.default_side(),
            "default_guidance": f.profile.default_guidance,
            "example_prompts": f.profile.example_prompts,
            "default_steps": if f.profile.default_steps > 0 {
                f.profile.default_steps
            } else {
                crate::plan::DEFAULT_STEPS
            },
        },
    })
}

async fn models(S(http): S<State>) -> Response {
    let data: Vec<Value> = http
        .service
        .models()
        .map(|g| model_json(&g.facts))
        .collect();
    super::json(json!({ "object": "list", "data": data }))
}

async fn model(S(http): S<State>, Path(id): Path<String>) -> Response {
    if OPENAI_MODELS.contains(&id.as_str()) {
        return super::json(model_json(&http.service.generator.facts));
    }
    match http.service.pick(&id) {
        Ok(g) if !id.is_empty() => super::json(model_json(&g.facts)),
        _ => {
            let served: Vec<&str> = http
                .service
                .models()
                .map(|g| g.facts.name.as_str())
                .collect();
            HttpError::not_found(format!(
                "model `{id}` is not served here (this gateway serves {})",
                served.join(", ")
            ))
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> HttpResult<(GenerateRequest, Delivery)> {
        let m = v.as_object().cloned().unwrap_or_default();
        request(&Fields(&m), "tiny")
    }

    #[test]
    fn openai_fields_become_a_generate_request() {
        let (r, d) = req(json!({
            "prompt": "a cat", "n": 2, "size": "64x32", "response_format": "url",
            "model": "dall-e-3", "quality": "hd", "style": "vivid", "user": "u1",
            "negative_prompt": "blurry", "steps": 4, "seed": 7, "guidance_scale": 6.5,
            "scheduler": "euler", "output_format": "webp"
        }))
        .unwrap();
        assert_eq!((r.width, r.height, r.num_images, r.steps), (64, 32, 2, 4));
        assert_eq!((r.seed, r.guidance_scale), (Some(7), Some(6.5)));
        assert_eq!(
            (r.negative_prompt.as_str(), r.scheduler.as_str()),
            ("blurry", "euler")
        );
        assert_eq!(r.model, "");
        assert_eq!(r.format, ImageFormat::Webp as i32);
        assert_eq!(d, Delivery::Url);
        let (r, d) = req(json!({"prompt": "x", "model": "other"})).unwrap();
        assert_eq!(
            (r.model.as_str(), r.num_images, d),
            ("other", 1, Delivery::B64)
        );
    }

    #[test]
    fn bad_openai_fields_are_named() {
        for (body, field) in [
            (json!({}), "prompt"),
            (json!({"prompt": "x", "n": 0}), "n"),
            (json!({"prompt": "x", "n": "two"}), "n"),
            (json!({"prompt": "x", "size": "big"}), "size"),
            (
                json!({"prompt": "x", "response_format": "gif"}),
                "response_format",
            ),
            (
                json!({"prompt": "x", "output_format": "gif"}),
                "output_format",
            ),
            (json!({"prompt": "x", "seed": -1}), "seed"),
            (json!({"prompt": 3}), "prompt"),
        ] {
            let e = req(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}");
        }
    }

    #[test]
    fn urls_name_the_host_the_client_used() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "gw:7860".parse().unwrap());
        assert_eq!(origin(&h), "http://gw:7860");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(origin(&h), "https://gw:7860");
    }
}

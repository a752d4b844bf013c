//! AUTOMATIC1111's ControlNet extension as API clients meet it (its API
//! version 3, sd-webui-controlnet 1.1.4xx): the units of
//! `alwayson_scripts.controlnet.args`, read as the extension reads them,
//! and its routes `/controlnet/model_list`, `/controlnet/module_list`,
//! `/controlnet/version`, `/controlnet/settings`.
//!
//! What differs from the extension, where it would change a result, is
//! refused by name (preprocessors that need networks, masks, hires-only
//! units) rather than ignored; the extension's own habit of logging a bad
//! unit and generating without it is not followed.

use axum::extract::{Query, State as S};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use sd_proto::v1::{
    ControlMode, ControlResize, ControlUnit, ControlWindowRule, ListControlNetsRequest,
    ListIpAdaptersRequest,
};
use serde_json::{json, Map, Value};

use super::super::error::{HttpError, HttpResult};
use super::super::fields::Fields;
use super::super::{decode_base64, State};

/// The extension's API version (`/controlnet/version`).
const API_VERSION: u32 = 3;

/// Preprocessors served here (`/controlnet/module_list`), with their sliders.
const MODULES: [&str; 7] = [
    "none",
    "ip-adapter-auto",
    "ip-adapter_clip_h",
    "canny",
    "ip-adapter_clip_sd15",
    "ip-adapter_clip_sdxl_plus_vith",
    "ip-adapter_clip_g",
];

pub fn routes() -> Router<State> {
    Router::new()
        .route("/controlnet/version", get(version))
        .route("/controlnet/model_list", get(model_list))
        .route("/controlnet/module_list", get(module_list))
        .route("/controlnet/settings", get(settings))
}

/// A unit as the request had it: where it sits in `args` and what it asks.
pub(in super::super) struct Unit {
    /// Its index in `args` (errors name it).
    pub index: usize,
    /// An `ip-adapter_*` module's unit: an image prompt (`unit`'s image,
    /// weight and window), not a ControlNet.
    pub ip: bool,
    pub unit: ControlUnit,
    /// The model as asked (matched against the served ones later).
    pub model: String,
    /// The infotext's description of it.
    pub text: Vec<(&'static str, String)>,
}

/// `alwayson_scripts.controlnet` (any case, as clients send "ControlNet"):
/// its enabled units, in order. `size`: the request's width and height
/// (pixel perfect needs them).
pub(in super::super) fn units(f: &Fields, size: (u32, u32)) -> HttpResult<Vec<Unit>> {
    let Some(scripts) = f.object("alwayson_scripts")? else {
        return Ok(Vec::new());
    };
    let Some((key, script)) = scripts
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("controlnet"))
    else {
        return Ok(Vec::new());
    };
    let base = format!("alwayson_scripts.{key}.args");
    let args = match script.get("args") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(HttpError::invalid(&base, "expected a list of units")),
    };
    let mut out = Vec::new();
    for (i, v) in args.iter().enumerate() {
        let field = format!("{base}[{i}]");
        let Some(o) = v.as_object() else {
            return Err(HttpError::invalid(&field, "expected a unit object"));
        };
        if let Some(u) = unit(o, &field, i, size)? {
            out.push(u);
        }
    }
    if out.len() > crate::control::MAX_UNITS {
        return Err(HttpError::invalid(
            &base,
            format_args!(
                "{} enabled units, at most {}",
                out.len(),
                crate::control::MAX_UNITS
            ),
        ));
    }
    Ok(out)
}

/// One unit (None when not enabled: version 3 enables none by default).
fn unit(
    o: &Map<String, Value>,
    field: &str,
    index: usize,
    (width, height): (u32, u32),
) -> HttpResult<Option<Unit>> {
    let f = Fields(o);
    let name = |n: &str| format!("{field}.{n}");
    let err = |n: &str, m: String| HttpError::invalid(name(n), m);
    if !f
        .bool("enabled")
        .map_err(|e| e.within(field))?
        .unwrap_or(false)
    {
        return Ok(None);
    }
    let text_or = |n: &str, default: &str| -> HttpResult<String> {
        let v = f.str(n).map_err(|e| e.within(field))?;
        Ok(v.unwrap_or(default).to_string())
    };
    let (module, model) = (text_or("module", "none")?, text_or("model", "None")?);
    if model.is_empty() || model == "None" {
        return Err(err(
            "model",
            "You have not selected any ControlNet Model (see /controlnet/model_list)".into(),
        ));
    }
    let weight = f.f64("weight").map_err(|e| e.within(field))?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&weight) {
        return Err(err("weight", format!("{weight} given, 0..=2 allowed")));
    }
    let image = image(&f, field)?;
    let resize = resize_mode(f.get("resize_mode"), &name("resize_mode"))?;
    let mode = control_mode(f.get("control_mode"), &name("control_mode"))?;
    match f.str("hr_option").map_err(|e| e.within(field))? {
        None | Some("Both") => {}
        Some(other) => {
            return Err(err(
                "hr_option",
                format!("`{other}`: only Both is served (the unit steers both passes)"),
            ))
        }
    }
    let number = |n: &str, default: f64| -> HttpResult<f64> {
        Ok(match f.f64(n).map_err(|e| e.within(field))? {
            None => default,
            Some(-1.0) => default,
            Some(v) => v,
        })
    };
    let start = number("guidance_start", 0.0)?;
    let end = number("guidance_end", 1.0)?;
    let (a, b) = (number("threshold_a", 100.0)?, number("threshold_b", 200.0)?);
    let asked_res = number("processor_res", 512.0)?;
    let pixel_perfect = f
        .bool("pixel_perfect")
        .map_err(|e| e.within(field))?
        .unwrap_or(false);
    let res = if pixel_perfect {
        pixel_perfect_res(&image, (width, height), resize)
            .ok_or_else(|| err("image", "not a PNG, JPEG or WebP image".into()))?
    } else {
        asked_res
    };
    let text = vec![
        ("Module", module.clone()),
        ("Model", model.clone()),
        // Python's float formatting, as the extension writes them.
        ("Weight", format!("{weight:?}")),
        ("Resize Mode", resize_label(resize).into()),
        ("Processor Res", format!("{}", asked_res as i64)),
        ("Threshold A", format!("{a:.1}")),
        ("Threshold B", format!("{b:.1}")),
        ("Guidance Start", format!("{start:?}")),
        ("Guidance End", format!("{end:?}")),
        (
            "Pixel Perfect",
            if pixel_perfect { "True" } else { "False" }.into(),
        ),
        ("Control Mode", mode_label(mode).into()),
    ];
    let ip = is_ip_adapter(&module)?.map_err(|why| err("module", why))?;
    Ok(Some(Unit {
        index,
        ip,
        model,
        text,
        unit: ControlUnit {
            name: String::new(),
            image: image.into(),
            weight: Some(weight as f32),
            start: Some(start as f32),
            end: Some(end as f32),
            mode: mode as i32,
            preprocessor: module,
            threshold_a: Some(a as f32),
            threshold_b: Some(b as f32),
            processor_res: res.max(0.0).round() as u32,
            resize_mode: resize as i32,
            window_rule: ControlWindowRule::A1111 as i32,
            union_mode: None,
        },
    }))
}

/// Whether `module` is one of the extension's IP-Adapter preprocessors
/// (the CLIP vision encoders plain adapters read pictures with); Err: one
/// whose adapter kind (face ID, PuLID, InstantID) is not served.
fn is_ip_adapter(module: &str) -> HttpResult<Result<bool, String>> {
    let m = module.to_ascii_lowercase();
    if !m.starts_with("ip-adapter") {
        return Ok(Ok(false));
    }
    const PLAIN: [&str; 6] = [
        "ip-adapter_clip_sd15",
        "ip-adapter_clip_h",
        "ip-adapter_clip_sdxl",
        "ip-adapter_clip_g",
        "ip-adapter_clip_sdxl_plus_vith",
        "ip-adapter-auto",
    ];
    Ok(if PLAIN.contains(&m.as_str()) {
        Ok(true)
    } else {
        Err(format!(
            "`{module}` is not served (the plain IP-Adapters' modules are: {})",
            PLAIN.join(", ")
        ))
    })
}

/// The unit's picture: `image` (or the legacy `input_image`) as base64, a
/// `{"image", "mask"}` object, or an `[image, mask]` pair; masks are the
/// inpainting preprocessors', which are not served.
fn image(f: &Fields, field: &str) -> HttpResult<Vec<u8>> {
    let (key, v) = match (f.get("image"), f.get("input_image")) {
        (Some(v), _) if !v.is_null() => ("image", v),
        (_, Some(v)) if !v.is_null() => ("input_image", v),
        _ => {
            return Err(HttpError::invalid(
                format!("{field}.image"),
                "No image selected: send the hint (or the picture to preprocess) as base64",
            ))
        }
    };
    let at = format!("{field}.{key}");
    let (picture, mask) = match v {
        Value::String(s) => (s.as_str(), None),
        Value::Object(o) => (
            o.get("image").and_then(Value::as_str).unwrap_or(""),
            o.get("mask").filter(|m| !m.is_null()),
        ),
        Value::Array(a) if a.len() == 2 => (a[0].as_str().unwrap_or(""), Some(&a[1])),
        _ => {
            return Err(HttpError::invalid(
                &at,
                "expected base64, {\"image\", \"mask\"} or [image, mask]",
            ))
        }
    };
    let has_mask = |m: Option<&Value>| m.is_some_and(|m| m.as_str().is_none_or(|s| !s.is_empty()));
    if has_mask(mask) || has_mask(f.get("mask").filter(|m| !m.is_null())) {
        return Err(HttpError::invalid(
            format!("{field}.mask"),
            "masks go with the inpainting preprocessors, which this server does not serve",
        ));
    }
    if picture.is_empty() {
        return Err(HttpError::invalid(&at, "empty: No image selected"));
    }
    decode_base64(&at, picture)
}

/// `resize_mode` by the extension's names (and the older integers).
fn resize_mode(v: Option<&Value>, field: &str) -> HttpResult<ControlResize> {
    Ok(match v {
        None | Some(Value::Null) => ControlResize::CropAndResize,
        Some(Value::String(s)) => match s.as_str() {
            "Just Resize" | "RESIZE" => ControlResize::JustResize,
            "Crop and Resize" | "Scale to Fit (Inner Fit)" | "INNER_FIT" => {
                ControlResize::CropAndResize
            }
            "Resize and Fill" | "Envelope (Outer Fit)" | "OUTER_FIT" => {
                ControlResize::ResizeAndFill
            }
            other => {
                return Err(HttpError::invalid(
                    field,
                    format_args!(
                        "`{other}`: expected Just Resize, Crop and Resize or Resize and Fill"
                    ),
                ))
            }
        },
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => ControlResize::JustResize,
            Some(1) => ControlResize::CropAndResize,
            Some(2) => ControlResize::ResizeAndFill,
            _ => return Err(HttpError::invalid(field, "expected 0, 1 or 2")),
        },
        Some(_) => return Err(HttpError::invalid(field, "expected a resize mode's name")),
    })
}

/// `control_mode` by the extension's names (and the older integers).
fn control_mode(v: Option<&Value>, field: &str) -> HttpResult<ControlMode> {
    Ok(match v {
        None | Some(Value::Null) => ControlMode::Balanced,
        Some(Value::String(s)) => match s.as_str() {
            "Balanced" => ControlMode::Balanced,
            "My prompt is more important" => ControlMode::Prompt,
            "ControlNet is more important" => ControlMode::Control,
            other => {
                return Err(HttpError::invalid(
                    field,
                    format_args!(
                        "`{other}`: expected Balanced, My prompt is more important or \
                         ControlNet is more important"
                    ),
                ))
            }
        },
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => ControlMode::Balanced,
            Some(1) => ControlMode::Prompt,
            Some(2) => ControlMode::Control,
            _ => return Err(HttpError::invalid(field, "expected 0, 1 or 2")),
        },
        Some(_) => return Err(HttpError::invalid(field, "expected a control mode's name")),
    })
}

fn resize_label(r: ControlResize) -> &'static str {
    match r {
        ControlResize::JustResize => "Just Resize",
        ControlResize::CropAndResize => "Crop and Resize",
        ControlResize::ResizeAndFill => "Resize and Fill",
    }
}

fn mode_label(m: ControlMode) -> &'static str {
    match m {
        ControlMode::Balanced => "Balanced",
        ControlMode::Prompt => "My prompt is more important",
        ControlMode::Control => "ControlNet is more important",
    }
}

/// The extension's pixel perfect: the preprocessor's resolution that maps
/// the picture onto the output as `resize` fits it.
fn pixel_perfect_res(image: &[u8], (w, h): (u32, u32), resize: ControlResize) -> Option<f64> {
    let (rw, rh) = image::ImageReader::new(std::io::Cursor::new(image))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()?;
    if rw == 0 || rh == 0 {
        return None;
    }
    let (k0, k1) = (f64::from(h) / f64::from(rh), f64::from(w) / f64::from(rw));
    let k = if resize == ControlResize::ResizeAndFill {
        k0.min(k1)
    } else {
        k0.max(k1)
    };
    Some((k * f64::from(rw.min(rh))).round_ties_even())
}

/// A model as the extension's list shows it: `name [short hash]`.
fn listed((name, hash): &Named) -> String {
    if hash.is_empty() {
        name.clone()
    } else {
        format!("{name} [{hash}]")
    }
}

/// What the served lists name: (name, short hash).
type Named = (String, String);

/// The ControlNets and the IP-Adapters served with `model` (empty: the
/// default model), as the extension's model list has them together.
async fn served(http: &State, model: &str) -> HttpResult<(Vec<Named>, Vec<Named>)> {
    let deadline = sd_runtime::deadline::Deadline::after(std::time::Duration::from_secs(30));
    let stages = &http.service.pick(model)?.stages;
    let controls = stages
        .list_controlnets(ListControlNetsRequest::default(), &deadline)
        .await?
        .controlnets
        .into_iter()
        .map(|c| (c.name, c.short_hash))
        .collect();
    let ips = stages
        .list_ip_adapters(ListIpAdaptersRequest::default(), &deadline)
        .await?
        .ip_adapters
        .into_iter()
        .map(|c| (c.name, c.short_hash))
        .collect();
    Ok((controls, ips))
}

/// Each unit's model matched as the extension matches it: `name [hash]`
/// exactly, the name without its hash (any case), or the shortest name
/// that contains it.
pub(in super::super) async fn resolve(
    http: &State,
    model: &str,
    units: &mut [Unit],
) -> HttpResult<()> {
    if units.is_empty() {
        return Ok(());
    }
    let (controls, ips) = served(http, model).await?;
    for u in units.iter_mut() {
        let served = if u.ip { &ips } else { &controls };
        let asked = u.model.trim();
        let Some(c) = matched(asked, served) else {
            let names: Vec<String> = served.iter().map(listed).collect();
            return Err(HttpError::invalid(
                format!("alwayson_scripts.controlnet.args[{}].model", u.index),
                format_args!(
                    "model not found: `{asked}` (served {}: {})",
                    if u.ip { "IP-Adapters" } else { "ControlNets" },
                    names.join(", ")
                ),
            ));
        };
        // (The infotext keeps the model as the client sent it, as the
        // extension writes it.)
        u.unit.name = c.0.clone();
    }
    Ok(())
}

/// `asked` among `served` as the extension matches it: `name [hash]`
/// exactly, the name without its hash (any case), or the shortest name
/// containing it.
fn matched<'a>(asked: &str, served: &'a [Named]) -> Option<&'a Named> {
    let bare = asked.split(" [").next().unwrap_or(asked).to_lowercase();
    let hash_ok = |c: &Named| !asked.contains(" [") || listed(c) == asked || c.1.is_empty();
    served
        .iter()
        .find(|c| listed(c) == asked)
        .or_else(|| {
            served
                .iter()
                .find(|c| c.0.to_lowercase() == bare && hash_ok(c))
        })
        .or_else(|| {
            served
                .iter()
                .filter(|c| c.0.to_lowercase().contains(&asked.to_lowercase()))
                .min_by_key(|c| c.0.len())
        })
}

/// The infotext's `ControlNet N` entries (N counts enabled units).
pub(in super::super) fn infotext(units: &[Unit]) -> Vec<(String, String)> {
    units
        .iter()
        .enumerate()
        .map(|(n, u)| {
            let body = u
                .text
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            // The writer quotes a value with commas, as A1111 does.
            (format!("ControlNet {n}"), body)
        })
        .collect()
}

/// A gateway error about `controlnets[i].F` or `ip_adapters[i].F` named
/// as the request's unit (`indices`: each list's units' places in `args`).
pub(in super::super) fn rename(mut e: HttpError, indices: &Indices) -> HttpError {
    let Some(p) = e.param.clone() else {
        return e;
    };
    for (list, places) in [("controlnets[", &indices.0), ("ip_adapters[", &indices.1)] {
        let Some((i, tail)) = p.strip_prefix(list).and_then(|r| r.split_once(']')) else {
            continue;
        };
        let Some(index) = i.parse::<usize>().ok().and_then(|i| places.get(i)) else {
            continue;
        };
        let tail = match tail {
            ".name" => ".model",
            ".start" => ".guidance_start",
            ".end" => ".guidance_end",
            ".preprocessor" => ".module",
            ".mode" => ".control_mode",
            ".scale" => ".weight",
            t => t,
        };
        e.param = Some(format!("alwayson_scripts.controlnet.args[{index}]{tail}"));
    }
    e
}

/// What a unit's detected map is made of: a ControlNet unit's hint, or an
/// IP-Adapter unit's picture (the extension shows its input).
pub(in super::super) enum MapSource {
    Hint(ControlUnit),
    Picture(Vec<u8>),
}

/// Each enabled unit's detected-map source, in order.
pub(in super::super) fn map_sources(units: &[Unit]) -> Vec<MapSource> {
    units
        .iter()
        .map(|u| {
            if u.ip {
                MapSource::Picture(u.unit.image.to_vec())
            } else {
                MapSource::Hint(u.unit.clone())
            }
        })
        .collect()
}

/// The detected maps the extension appends after the generated images:
/// one per enabled unit at the generation's size (`low`), and with hires
/// fix the final size's first (`high`); base64 PNGs.
pub(in super::super) fn maps(
    sources: &[MapSource],
    limits: &crate::limits::Limits,
    low: (u32, u32),
    high: Option<(u32, u32)>,
) -> HttpResult<Vec<String>> {
    let mut out = Vec::new();
    for s in sources {
        let sizes = high.into_iter().chain(std::iter::once(low));
        match s {
            MapSource::Hint(u) => {
                for size in sizes {
                    out.push(super::super::encode_base64(&crate::control::hint_png(
                        u, limits, size,
                    )?));
                }
            }
            MapSource::Picture(bytes) => {
                let png = crate::images::decode_picture(bytes, limits)
                    .ok()
                    .and_then(|img| {
                        let mut png = Vec::new();
                        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                            .ok()
                            .map(|()| png)
                    })
                    .unwrap_or_else(|| bytes.clone());
                for _ in sizes {
                    out.push(super::super::encode_base64(&png));
                }
            }
        }
    }
    Ok(out)
}

/// Each list's units' places in `args`: (ControlNets, IP-Adapters).
pub(in super::super) type Indices = (Vec<usize>, Vec<usize>);

/// The enabled units as the request's ControlNets and IP-Adapters, and
/// their places in `args`.
pub(in super::super) fn split(
    units: Vec<Unit>,
) -> (Vec<ControlUnit>, Vec<sd_proto::v1::IpAdapterUnit>, Indices) {
    let (mut controls, mut ips, mut at) = (Vec::new(), Vec::new(), (Vec::new(), Vec::new()));
    for u in units {
        if u.ip {
            at.1.push(u.index);
            ips.push(sd_proto::v1::IpAdapterUnit {
                name: u.unit.name,
                image: u.unit.image,
                scale: u.unit.weight,
                start: u.unit.start,
                end: u.unit.end,
                window_rule: u.unit.window_rule,
            });
        } else {
            at.0.push(u.index);
            controls.push(u.unit);
        }
    }
    (controls, ips, at)
}

async fn version() -> Response {
    super::super::json(json!({ "version": API_VERSION }))
}

async fn settings() -> Response {
    super::super::json(json!({ "control_net_unit_count": crate::control::MAX_UNITS }))
}

async fn model_list(S(http): S<State>) -> Response {
    match served(&http, "").await {
        Ok((controls, ips)) => {
            let mut names: Vec<String> = controls.iter().chain(&ips).map(listed).collect();
            names.sort();
            super::super::json(json!({ "model_list": names }))
        }
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

async fn module_list(Query(_q): Query<std::collections::HashMap<String, String>>) -> Response {
    let slider = |name: &str, value: f64, min: f64, max: f64, step: f64| json!({"name": name, "value": value, "min": min, "max": max, "step": step});
    super::super::json(json!({
        "module_list": MODULES,
        "module_detail": {
            "none": {"model_free": false, "sliders": []},
            "ip-adapter-auto": {"model_free": false, "sliders": []},
            "ip-adapter_clip_h": {"model_free": false, "sliders": []},
            "ip-adapter_clip_sd15": {"model_free": false, "sliders": []},
            "ip-adapter_clip_sdxl_plus_vith": {"model_free": false, "sliders": []},
            "ip-adapter_clip_g": {"model_free": false, "sliders": []},
            "canny": {"model_free": false, "sliders": [
                slider("Resolution", 512.0, 64.0, 2048.0, 8.0),
                slider("Low Threshold", 100.0, 1.0, 255.0, 1.0),
                slider("High Threshold", 200.0, 1.0, 255.0, 1.0),
            ]},
        }
    }))
}

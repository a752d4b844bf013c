//! The end-to-end parity cases the fixture scripts write: a case's
//! parameters as a GenerateRequest, the image comparison, and the run of a
//! model's cases against a stack.

use std::path::Path;

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, SizeConditioning};

/// One case as the fixture scripts list it: parameters and the reference
/// images diffusers made for them.
#[derive(serde::Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub params: serde_json::Value,
    pub files: Vec<String>,
}

/// Generate `cases` through the gateway at `url` — one at a time, or all
/// at once when `together` (the denoiser then batches their steps) — and
/// compare each image with its reference in `references`; init images are
/// read from `inputs`. The failures, each named `label/case`.
pub async fn check_cases(
    url: &str,
    cases: &[Case],
    inputs: &Path,
    references: &Path,
    label: &str,
    together: bool,
) -> Vec<String> {
    let client = GenerationClient::connect(url.to_string()).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut c = client.clone();
        let req = request(&case.params, inputs);
        if together {
            set.spawn(async move { (i, c.generate(req).await) });
        } else {
            results.push((i, c.generate(req).await));
        }
    }
    while let Some(done) = set.join_next().await {
        results.push(done.unwrap());
    }
    results.sort_by_key(|(i, _)| *i);
    let mut failures = Vec::new();
    for (i, result) in results {
        let case = &cases[i];
        let name = format!(
            "{label}/{}{}",
            case.name,
            if together { " (batched)" } else { "" }
        );
        let resp = match result {
            Ok(r) => r.into_inner(),
            Err(s) => {
                failures.push(format!("{name}: {:?} {}", s.code(), s.message()));
                continue;
            }
        };
        assert_eq!(resp.images.len(), case.files.len(), "{name}: image count");
        let params = resp.parameters.unwrap();
        assert_eq!(
            Some(params.seed),
            case.params["seed"].as_u64(),
            "{name}: seed"
        );
        for (img, file) in resp.images.iter().zip(&case.files) {
            if let Err(e) = compare(&format!("{name} {file}"), &img.data, &references.join(file)) {
                failures.push(e);
            }
        }
    }
    failures
}

/// The cases a fixture script listed in `dir/cases.json`.
pub fn load_cases(dir: &Path) -> Vec<Case> {
    #[derive(serde::Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }
    let path = dir.join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<Cases>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .cases
}

/// Every case in `e2e` (references and inputs there) through the stack at
/// `url`, one at a time, then all at once (the denoiser batches their
/// steps; results must not change); the test fails listing what differs.
pub fn check_all(url: &str, cases: &[Case], e2e: &Path, label: &str) {
    check_all_in(url, cases, e2e, e2e, label);
}

/// [`check_all`] with the inputs (init images, masks) in `inputs` and the
/// references in `references`.
pub fn check_all_in(url: &str, cases: &[Case], inputs: &Path, references: &Path, label: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = Vec::new();
    for together in [false, true] {
        failures.extend(rt.block_on(check_cases(url, cases, inputs, references, label, together)));
    }
    assert_all_match(&failures);
}

/// Every case of fixture `model`'s `e2e/` through `sdctl up` on it.
pub fn run_model(model: &str) {
    let dir = super::model(model);
    let e2e = dir.join("e2e");
    let stack = super::stack::Stack::start(&dir);
    check_all(&stack.url, &load_cases(&e2e), &e2e, model);
}

/// Fail the test listing every image that differs.
pub fn assert_all_match(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// SDXL's size conditioning from diffusers' (height, width) pairs —
/// `original`, `crop` (top, left), `target` — and the refiner's
/// `aesthetic` and `negative_aesthetic` scores; None when the case has none.
fn conditioning(p: &serde_json::Value) -> Option<SizeConditioning> {
    let pair = |k: &str| -> Option<(u32, u32)> {
        let v = p.get(k)?.as_array()?;
        Some((v.first()?.as_u64()? as u32, v.get(1)?.as_u64()? as u32))
    };
    let score = |k: &str| p.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let (original, crop, target) = (pair("original"), pair("crop"), pair("target"));
    let (aesthetic, negative_aesthetic) = (score("aesthetic"), score("negative_aesthetic"));
    if original.is_none() && aesthetic.is_none() {
        return None;
    }
    let (o, c, t) = (
        original.unwrap_or((0, 0)),
        crop.unwrap_or((0, 0)),
        target.unwrap_or((0, 0)),
    );
    Some(SizeConditioning {
        original_height: o.0,
        original_width: o.1,
        crop_top: c.0,
        crop_left: c.1,
        target_height: t.0,
        target_width: t.1,
        aesthetic_score: aesthetic,
        negative_aesthetic_score: negative_aesthetic,
        ..Default::default()
    })
}

pub fn request(p: &serde_json::Value, e2e: &std::path::Path) -> GenerateRequest {
    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let u = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    let f = |k: &str| p.get(k).and_then(|v| v.as_f64());
    GenerateRequest {
        prompt: s("prompt"),
        negative_prompt: s("negative_prompt"),
        width: u("width"),
        height: u("height"),
        steps: u("steps"),
        guidance_scale: f("guidance").map(|g| g as f32),
        scheduler: s("scheduler"),
        karras: p.get("karras").and_then(|v| v.as_bool()).unwrap_or(false),
        eta: f("eta").unwrap_or(0.0) as f32,
        seed: p.get("seed").and_then(|v| v.as_u64()),
        num_images: u("num_images"),
        clip_skip: u("clip_skip"),
        prompt_syntax: if s("prompt_syntax") == "a1111" {
            sd_proto::v1::PromptSyntax::A1111 as i32
        } else {
            sd_proto::v1::PromptSyntax::Plain as i32
        },
        init_image: match p.get("init_image").and_then(|v| v.as_str()) {
            Some(f) => std::fs::read(e2e.join(f)).expect("init image").into(),
            None => Default::default(),
        },
        strength: f("strength").map(|v| v as f32),
        mask: match p.get("mask").and_then(|v| v.as_str()) {
            Some(f) => std::fs::read(e2e.join(f)).expect("mask").into(),
            None => Default::default(),
        },
        model: s("model"),
        conditioning: conditioning(p),
        loras: p
            .get("loras")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|l| sd_proto::v1::LoraRef {
                        name: l["name"].as_str().unwrap_or_default().to_string(),
                        scale: l["scale"].as_f64().unwrap_or(1.0) as f32,
                        unet_scale: l["unet_scale"].as_f64().map(|u| u as f32),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        hires: p.get("hires").map(|h| {
            let u = |k: &str| h.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
            sd_proto::v1::Hires {
                scale: h.get("scale").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
                width: u("width"),
                height: u("height"),
                upscaler: h["upscaler"].as_str().unwrap_or_default().to_string(),
                steps: u("steps"),
                strength: h.get("strength").and_then(|v| v.as_f64()).map(|v| v as f32),
                ..Default::default()
            }
        }),
        true_cfg_scale: f("true_cfg_scale").map(|v| v as f32),
        max_sequence_length: u("max_sequence_length"),
        reference_images: p
            .get("references")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|f| {
                        let f = f.as_str().expect("a reference's file name");
                        std::fs::read(e2e.join(f)).expect("reference").into()
                    })
                    .collect()
            })
            .unwrap_or_default(),
        controlnets: p
            .get("controlnets")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|c| control_unit(c, e2e)).collect())
            .unwrap_or_default(),
        ip_adapters: p
            .get("ip_adapters")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|u| sd_proto::v1::IpAdapterUnit {
                        name: u["name"].as_str().unwrap_or_default().to_string(),
                        image: std::fs::read(e2e.join(u["image"].as_str().expect("a picture")))
                            .expect("IP-Adapter picture")
                            .into(),
                        scale: u.get("scale").and_then(|v| v.as_f64()).map(|v| v as f32),
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// A case's ControlNet unit: `{name, image, weight, start, end,
/// union_mode}` (the image a file among the inputs), diffusers' window
/// rule.
fn control_unit(c: &serde_json::Value, inputs: &Path) -> sd_proto::v1::ControlUnit {
    let f = |k: &str| c.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let image = c["image"].as_str().expect("a control image's file name");
    sd_proto::v1::ControlUnit {
        name: c["name"].as_str().unwrap_or_default().to_string(),
        image: std::fs::read(inputs.join(image))
            .expect("control image")
            .into(),
        weight: f("weight"),
        start: f("start"),
        end: f("end"),
        union_mode: c
            .get("union_mode")
            .and_then(serde_json::Value::as_u64)
            .map(|m| m as u32),
        ..Default::default()
    }
}

/// The bound: per channel at most 2/255 apart, and 99.9% of values
/// within 1/255 (rounding of values that land on a .5 boundary after float
/// differences of ~1e-6 between libtorch call orders).
pub fn compare(name: &str, got_png: &[u8], want_path: &std::path::Path) -> Result<(), String> {
    let got = image::load_from_memory(got_png)
        .map_err(|e| format!("{name}: {e}"))?
        .to_rgb8();
    let want = image::open(want_path)
        .map_err(|e| format!("{}: {e}", want_path.display()))?
        .to_rgb8();
    if got.dimensions() != want.dimensions() {
        return Err(format!(
            "{name}: size {:?} vs {:?}",
            got.dimensions(),
            want.dimensions()
        ));
    }
    let (mut max, mut within) = (0u8, 0usize);
    for (a, b) in got.as_raw().iter().zip(want.as_raw()) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        within += (d <= 1) as usize;
    }
    let frac = within as f64 / got.as_raw().len() as f64;
    if max > 2 || frac < 0.999 {
        return Err(format!(
            "{name}: max diff {max}/255, {:.3}% within 1/255",
            frac * 100.0
        ));
    }
    Ok(())
}

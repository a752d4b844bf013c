//! End to end: real processes on free ports (`sdctl up`), requests through
//! the gateway, PNGs compared with what diffusers generates for the same
//! parameters and seed (`tests/fixtures/make_e2e_reference.py`).

#![allow(clippy::unwrap_used)]

mod common;

use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::GenerateRequest;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    params: serde_json::Value,
    files: Vec<String>,
}

#[derive(Deserialize)]
struct Manifest {
    models: std::collections::HashMap<String, Vec<Case>>,
}

fn request(p: &serde_json::Value, e2e: &std::path::Path) -> GenerateRequest {
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
        init_image: match p.get("init_image").and_then(|v| v.as_str()) {
            Some(f) => std::fs::read(e2e.join(f)).expect("init image").into(),
            None => Default::default(),
        },
        strength: f("strength").map(|v| v as f32),
        ..Default::default()
    }
}

/// The bound: per channel at most 2/255 apart, and 99.9% of values
/// within 1/255 (rounding of values that land on a .5 boundary after float
/// differences of ~1e-6 between libtorch call orders).
fn compare(name: &str, got_png: &[u8], want_path: &std::path::Path) -> Result<(), String> {
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

fn run_model(model: &str) {
    let fixtures = common::fixtures();
    let e2e = fixtures.join("e2e");
    let manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(e2e.join("cases.json")).expect("run make fixtures"),
    )
    .unwrap();
    let cases = &manifest.models[model];
    let stack = Stack::start(&fixtures.join(model));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let failures: Vec<String> = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let mut failures = Vec::new();
        for case in cases {
            let resp = match client.generate(request(&case.params, &e2e)).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    failures.push(format!("{}: {:?} {}", case.name, s.code(), s.message()));
                    continue;
                }
            };
            assert_eq!(
                resp.images.len(),
                case.files.len(),
                "{}: image count",
                case.name
            );
            let params = resp.parameters.unwrap();
            assert_eq!(Some(params.seed), case.params["seed"].as_u64());
            for (img, file) in resp.images.iter().zip(&case.files) {
                if let Err(e) = compare(
                    &format!("{model}/{file}"),
                    &img.data,
                    &e2e.join(model).join(file),
                ) {
                    failures.push(e);
                }
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sd1_epsilon_model_matches_diffusers_images() {
    run_model("sd1-tiny");
}

#[test]
fn sd2_v_prediction_model_matches_diffusers_images() {
    run_model("sd2-tiny");
}

//! AUTOMATIC1111's prompt semantics through the running stack
//! (`prompt_syntax: A1111`), against a reference written from A1111's
//! source on the model's own tokenizer and text encoder, fed to diffusers'
//! UNet, scheduler and VAE (`tests/fixtures/make_a1111_reference.py`):
//! a plain prompt, weights with nesting and escapes, a 120-token prompt
//! with BREAK and a comma-rich tail (3 chunks), a long negative prompt with
//! a short prompt (different lengths: each half of the guidance on its
//! own), CLIP_stop_at_last_layers 2 — one at a time and all at once
//! (batched in the denoiser); and hires fix in three of A1111's latent
//! modes (a scale, second-pass steps, a size of another aspect ratio
//! cropped), against the reference written from its `sample_hr_pass`.

#![allow(clippy::unwrap_used)]

mod common;

use common::e2e::{assert_all_match, check_cases, request, Case};
use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::PromptSyntax;
use serde::Deserialize;

#[derive(Deserialize)]
struct Manifest {
    models: std::collections::HashMap<String, Vec<Case>>,
}

fn cases(model: &str) -> (std::path::PathBuf, Vec<Case>) {
    let dir = common::fixtures().join("a1111");
    let mut manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cases.json")).expect("run make fixtures"),
    )
    .unwrap();
    (dir, manifest.models.remove(model).unwrap())
}

/// The largest difference between two PNGs, in 1/255 steps.
fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    let a = image::load_from_memory(a).unwrap().to_rgb8();
    let b = image::load_from_memory(b).unwrap().to_rgb8();
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

fn run_model(model: &str) {
    let (dir, cases) = cases(model);
    let stack = Stack::start(&dir.join(model));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = rt.block_on(check_cases(&stack.url, &cases, &dir, &dir, model, false));
    failures.extend(rt.block_on(check_cases(&stack.url, &cases, &dir, &dir, model, true)));
    assert_all_match(&failures);
    rt.block_on(plain_and_weighted(&stack.url, &cases, &dir));
}

/// A plain prompt reads the same in both syntaxes; the weights are seen.
async fn plain_and_weighted(url: &str, cases: &[Case], dir: &std::path::Path) {
    let mut client = GenerationClient::connect(url.to_string()).await.unwrap();
    let client_for_images = client.clone();
    let image = |req| {
        let mut c = client_for_images.clone();
        async move {
            c.generate(req).await.unwrap().into_inner().images[0]
                .data
                .clone()
        }
    };
    let case = |name: &str| cases.iter().find(|c| c.name == name).unwrap();
    let a1111 = request(&case("plain").params, dir);
    let plain = sd_proto::v1::GenerateRequest {
        prompt_syntax: PromptSyntax::Plain as i32,
        ..a1111.clone()
    };
    assert_eq!(max_diff(&image(a1111).await, &image(plain).await), 0);
    // The weighted prompt with its weights taken out (escapes resolved) is
    // another picture: weights move pixels on this fixture.
    let weighted = request(&case("weights").params, dir);
    let unweighted = sd_proto::v1::GenerateRequest {
        prompt: "a red cube on a blue table, shiny metal, (literal) dim glow".into(),
        prompt_syntax: PromptSyntax::Plain as i32,
        ..weighted.clone()
    };
    let d = max_diff(&image(weighted).await, &image(unweighted).await);
    assert!(d > 20, "weights barely moved the image ({d}/255)");
    // Prompt editing, AND and LoRA tags in the negative prompt are refused,
    // naming the field.
    for (prompt, negative) in [
        ("a [cat:dog:0.5]", ""),
        ("a cat AND a dog", ""),
        ("x", "<lora:s:1>"),
    ] {
        let req = sd_proto::v1::GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: negative.into(),
            prompt_syntax: PromptSyntax::A1111 as i32,
            steps: 2,
            ..Default::default()
        };
        let s = client.generate(req).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{prompt}: {s:?}");
        let field = if negative.is_empty() {
            "prompt"
        } else {
            "negative_prompt"
        };
        assert!(s.message().starts_with(field), "{prompt}: {}", s.message());
    }
}

#[test]
fn sd1_a1111_prompts_match_the_a1111_reference() {
    run_model("sd1-a1111");
}

#[test]
fn sd2_a1111_prompts_match_the_a1111_reference() {
    run_model("sd2-a1111");
}

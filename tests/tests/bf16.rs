//! bf16 on the CPU: each network, and whole generations through the stack,
//! against diffusers' fp32 outputs on the same weights — within stated
//! tolerances, since bf16 keeps 8 bits of mantissa (a relative step of
//! 2^-8 ≈ 0.4% per rounding): a network within 3% of its output's range;
//! an image within 3 dB (PSNR against diffusers' fp32 image) of what
//! diffusers' own bf16 pipeline gives. The fp32 parity tests stay as they
//! are.

#![allow(clippy::unwrap_used)]

mod common;

use common::reference;
use common::stack::Stack;
use sd_models::{DeviceSpec, ModelDir, Placement, Precision};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::GenerateRequest;
use tch::Tensor;

/// The largest difference relative to the reference's largest magnitude.
fn relative(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_kind(tch::Kind::Float);
    let diff = (&got - want).abs().max().double_value(&[]);
    diff / want.abs().max().double_value(&[]).max(1e-12)
}

fn bf16() -> Placement {
    Placement::new(DeviceSpec::Cpu, Precision::Bf16).unwrap()
}

/// Each network in bf16 stays within this of diffusers' fp32 output,
/// relative to the output's largest magnitude (measured: 1.1–1.7% on the
/// tiny models, for the text encoder, UNet and VAE both ways).
const TOLERANCE: f64 = 0.03;

#[test]
fn each_network_in_bf16_stays_near_diffusers_fp32() {
    for model in ["sd1-tiny", "sd2-tiny"] {
        let r = reference(model);
        let d = ModelDir::open(common::model(model)).unwrap();
        let mut seen = Vec::new();
        let clip = d.load_text_encoder(bf16()).unwrap();
        let ids = d.load_tokenizer().unwrap();
        let prompts: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(d.root().join("reference_prompts.json")).unwrap(),
        )
        .unwrap();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = ids.encode_batch(&refs).unwrap();
        let text = clip.forward(&ids, 0).unwrap();
        seen.push(("text encoder", relative(&text, &r["text.embeds.skip0"])));
        let unet = d.load_unet(bf16()).unwrap();
        let out = unet
            .forward(&r["unet.latents"], &r["unet.timesteps"], &r["unet.context"])
            .unwrap();
        seen.push(("unet", relative(&out, &r["unet.out"])));
        let vae = d.load_vae(bf16()).unwrap();
        let decoded = vae.decode(&r["vae.latents"]).unwrap();
        seen.push(("vae decode", relative(&decoded, &r["vae.decoded"])));
        let mean = vae.encode(&r["vae.pixels"]).unwrap().mean;
        seen.push(("vae encode", relative(&mean, &r["vae.mean"])));
        eprintln!("{model} bf16 vs fp32, relative: {seen:?}");
        for (what, rel) in seen {
            assert!(rel <= TOLERANCE, "{model} {what}: {rel:.4} > {TOLERANCE}");
        }
    }
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    // Equal images: finite, as a mean squared error of 1e-12.
    let cap = 10.0 * (255.0f64.powi(2) / 1e-12).log10();
    sd_gateway::images::psnr(a, b).unwrap().min(cap)
}

/// How far (dB) a bf16 stack's image may fall below diffusers' own bf16
/// image in PSNR against diffusers' fp32 image, for the same request.
const PSNR_MARGIN: f64 = 3.0;

#[test]
fn a_bf16_stack_draws_diffusers_fp32_images_within_tolerance() {
    let fixtures = common::fixtures();
    let e2e = fixtures.join("e2e").join("sd1-tiny");
    let theirs = fixtures.join("bf16").join("sd1-tiny");
    let stack = Stack::start_with(&fixtures.join("sd1-tiny"), &["--precision", "bf16"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Text to image with guidance and a negative prompt (PNDM), and with
    // DDIM: two of the e2e cases, their parameters as diffusers ran them.
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("e2e").join("cases.json")).unwrap(),
    )
    .unwrap();
    let case = |name: &str| {
        manifest["models"]["sd1-tiny"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let psnrs: Vec<(String, f64, f64)> = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let mut out = Vec::new();
        for name in ["negative", "sched-ddim"] {
            let c = case(name);
            let p = &c["params"];
            let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
            let req = GenerateRequest {
                prompt: text("prompt"),
                negative_prompt: text("negative_prompt"),
                scheduler: text("scheduler"),
                steps: p["steps"].as_u64().unwrap() as u32,
                guidance_scale: p["guidance"].as_f64().map(|g| g as f32),
                seed: p["seed"].as_u64(),
                ..Default::default()
            };
            let got = client.generate(req).await.unwrap().into_inner();
            let got = image::load_from_memory(&got.images[0].data)
                .unwrap()
                .to_rgb8();
            let file = c["files"][0].as_str().unwrap().to_string();
            let want = image::open(e2e.join(&file)).unwrap().to_rgb8();
            let diffusers = image::open(theirs.join(&file))
                .expect("run make fixtures (tests/fixtures/make_bf16_reference.py)")
                .to_rgb8();
            out.push((file, psnr(&got, &want), psnr(&diffusers, &want)));
        }
        out
    });
    for (file, ours, theirs) in psnrs {
        eprintln!("{file}: PSNR vs diffusers fp32: stack bf16 {ours:.1} dB, diffusers bf16 {theirs:.1} dB");
        assert!(
            ours >= theirs - PSNR_MARGIN,
            "{file}: {ours:.1} dB, diffusers' own bf16 {theirs:.1} dB"
        );
    }
}

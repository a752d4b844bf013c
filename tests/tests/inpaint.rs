//! Inpainting through sdserve: a picture and a mask through the gRPC
//! stack equal to diffusers' inpainting pipelines on the tiny fixtures
//! (`make_inpaint_reference.py`), one at a time and batched — ordinary
//! networks (the kept part re-noised and blended after each step: SD,
//! SDXL, FLUX) and 9-channel inpainting UNets (the mask and the masked
//! picture's latents as input: SD, SDXL) — and bad masks refused naming
//! the field.

#![allow(clippy::unwrap_used)]

mod common;

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::GenerateRequest;

/// Every inpainting case of `model` through `sdctl up` on it.
fn run(model: &str) {
    let inputs = common::fixtures().join("inpaint");
    let references = inputs.join(model);
    let cases = common::e2e::load_cases(&references);
    // The references are inpaintings, not copies of the picture: the
    // masked part changed, the rest (nearly) kept.
    for case in cases.iter().filter(|c| c.params.get("mask").is_some()) {
        let init = image::open(inputs.join(case.params["init_image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let out = image::open(references.join(&case.files[0]))
            .unwrap()
            .to_rgb8();
        let diff: u64 = init
            .as_raw()
            .iter()
            .zip(out.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        assert!(
            diff > 1000,
            "{model}/{}: the reference is the picture",
            case.name
        );
    }
    let stack = common::stack::Stack::start(&common::model(model));
    common::e2e::check_all_in(&stack.url, &cases, &inputs, &references, model);
}

#[test]
fn sd_inpainting_matches_diffusers_on_an_ordinary_unet() {
    run("sd1-tiny");
}

#[test]
fn sd_inpainting_matches_diffusers_on_a_9_channel_unet() {
    run("sd1-inpaint-tiny");
}

/// An inpainting checkpoint as one LDM-layout file, served with --config,
/// paints what its diffusers directory paints.
#[test]
fn a_single_file_inpainting_checkpoint_matches_diffusers() {
    let inputs = common::fixtures().join("inpaint");
    let references = inputs.join("sd1-inpaint-tiny");
    let config = common::model("sd1-inpaint-tiny");
    let stack = common::stack::Stack::start_with(
        &inputs.join("sd1-inpaint.safetensors"),
        &["--config", config.to_str().unwrap()],
    );
    let cases = common::e2e::load_cases(&references);
    common::e2e::check_all_in(
        &stack.url,
        &cases,
        &inputs,
        &references,
        "sd1-inpaint.safetensors",
    );
}

/// A single file with a 9-channel UNet input is recognised as its
/// family's inpainting model and served with the shipped configs of it
/// (9 input channels, the inpainting pipeline's class; SD 2's epsilon).
#[test]
fn single_file_inpainting_checkpoints_get_inpainting_configs() {
    use sd_models::single_file::Standard;
    use sd_models::{Component, ModelDir, Placement, Weights};
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            Standard::Sd1Inpaint,
            "StableDiffusionInpaintPipeline",
        ),
        (
            "cond_stage_model.model.ln_final.weight",
            Standard::Sd2Inpaint,
            "StableDiffusionInpaintPipeline",
        ),
        (
            "conditioner.embedders.1.model.ln_final.weight",
            Standard::SdxlInpaint,
            "StableDiffusionXLInpaintPipeline",
        ),
    ];
    for (i, (text_key, want, class)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("inpaint-{i}.safetensors"));
        let f = (tch::Kind::Half, tch::Device::Cpu);
        tch::Tensor::write_safetensors(
            &[
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    tch::Tensor::zeros([320, 9, 3, 3], f),
                ),
                (text_key, tch::Tensor::zeros([4], f)),
            ],
            &path,
        )
        .unwrap();
        let w = Weights::open(&path, Placement::cpu()).unwrap();
        assert_eq!(Standard::infer(&w).unwrap(), want);
        let model = ModelDir::open(&path).unwrap();
        let unet = std::fs::read_to_string(model.config_path(Component::Unet)).unwrap();
        let unet: serde_json::Value = serde_json::from_str(&unet).unwrap();
        assert_eq!(unet["in_channels"], 9, "{want:?}");
        let index = std::fs::read_to_string(model.root().join("model_index.json")).unwrap();
        assert!(index.contains(class), "{want:?}: {index}");
        if want == Standard::Sd2Inpaint {
            let s = std::fs::read_to_string(model.scheduler_config_path()).unwrap();
            assert!(s.contains("\"epsilon\""), "{s}");
        }
    }
}

#[test]
fn sdxl_inpainting_matches_diffusers_on_both_kinds_of_unet() {
    run("sdxl-tiny");
    run("sdxl-inpaint-tiny");
}

#[test]
fn flux_inpainting_matches_diffusers() {
    run("flux-dev-tiny");
}

#[test]
fn bad_masks_are_refused_naming_the_field() {
    let inputs = common::fixtures().join("inpaint");
    let read = |f: &str| std::fs::read(inputs.join(f)).unwrap();
    let stack = common::stack::Stack::start(&common::model("sd1-inpaint-tiny"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let base = GenerateRequest {
            prompt: "a cat".into(),
            steps: 2,
            seed: Some(1),
            init_image: read("init-sd1.png").into(),
            mask: read("mask-sd1.png").into(),
            ..Default::default()
        };
        let black = {
            let mut png = Vec::new();
            image::GrayImage::new(64, 64)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            png
        };
        let cases: Vec<(GenerateRequest, &str, &str)> = vec![
            (
                GenerateRequest {
                    mask: Default::default(),
                    ..base.clone()
                },
                "mask",
                "inpainting model",
            ),
            (
                GenerateRequest {
                    init_image: Default::default(),
                    ..base.clone()
                },
                "mask",
                "init_image",
            ),
            (
                GenerateRequest {
                    mask: black.into(),
                    ..base.clone()
                },
                "mask",
                "all black",
            ),
            (
                GenerateRequest {
                    mask: b"not an image".to_vec().into(),
                    ..base.clone()
                },
                "mask",
                "not a PNG",
            ),
            (
                GenerateRequest {
                    inpaint: Some(sd_proto::v1::InpaintOptions {
                        initial_noise_multiplier: f32::NAN,
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                "inpaint.initial_noise_multiplier",
                "allowed",
            ),
        ];
        for (req, field, says) in cases {
            let e = client.generate(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
            assert!(
                e.message().contains(field) && e.message().contains(says),
                "{field}: {}",
                e.message()
            );
        }
        // The model still serves a good request.
        client.generate(base).await.unwrap();
    });
}

/// A smooth, colourful `side`² picture as PNG bytes.
fn picture(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = (x as f32 / side as f32, y as f32 / side as f32);
        image::Rgb([
            ((6.0 * u).sin() * 127.0 + 128.0) as u8,
            ((5.0 * v).cos() * 127.0 + 128.0) as u8,
            ((u * v).sqrt() * 255.0) as u8,
        ])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

#[test]
fn openai_and_webuiapi_clients_inpaint_outpaint_and_hires_fix() {
    let stack = common::stack::Stack::start(&common::model("sd1-tiny"));
    let dir = tempfile::tempdir().unwrap();
    let side = 64;
    let init = picture(side);
    let mut mask = Vec::new();
    image::GrayImage::from_fn(side, side, |x, y| {
        image::Luma([if (16..40).contains(&x) && (8..48).contains(&y) {
            255
        } else {
            0
        }])
    })
    .write_to(
        &mut std::io::Cursor::new(&mut mask),
        image::ImageFormat::Png,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        client
            .generate(GenerateRequest {
                prompt: "a red cube".into(),
                steps: 6,
                seed: Some(31),
                guidance_scale: Some(7.5),
                init_image: init.clone().into(),
                mask: mask.clone().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    });
    std::fs::write(dir.path().join("init.png"), &init).unwrap();
    std::fs::write(dir.path().join("mask.png"), &mask).unwrap();
    std::fs::write(dir.path().join("grpc.png"), &grpc.images[0].data).unwrap();
    common::run_client(
        "inpaint_clients.py",
        &[stack.http.as_ref(), dir.path().as_os_str()],
    );
}

/// The web page on sdserve's default model, in headless Chromium: its
/// example prompt, the mask brush and eraser, outpainting by enlarging the
/// canvas, the hires-fix toggle (tests/clients/web_page_inpaint.py).
#[test]
fn the_web_page_paints_masks_outpaints_and_toggles_hires_fix() {
    let stack = common::stack::Stack::start_default();
    common::run_client("web_page_inpaint.py", &[stack.http.as_ref()]);
}

/// grpcio stubs generated from our proto by a Python client: inpainting on
/// both kinds of UNet, textual inversion, ControlNets and IP-Adapters equal
/// to diffusers, hires fix, and bad masks and units named
/// (`tests/clients/grpc_clients.py`).
#[test]
fn grpcio_stubs_inpaint_use_embeddings_and_run_hires_fix() {
    let f = common::fixtures();
    let ti = f.join("ti").join("sd1").join("embeddings");
    let inpaint = common::model("sd1-inpaint-tiny");
    let nets = f.join("controlnet").join("sd1-tiny").join("nets");
    let ip = common::ip_adapter_dir("sd1-tiny");
    let stack = common::stack::Stack::start_with(
        &common::model("sd1-tiny"),
        &[
            "--model",
            inpaint.to_str().unwrap(),
            "--embeddings-dir",
            ti.to_str().unwrap(),
            "--controlnet-dir",
            nets.to_str().unwrap(),
            "--ip-adapter-dir",
            ip.path().to_str().unwrap(),
        ],
    );
    let target = stack.url.trim_start_matches("http://");
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out = common::run_client(
        "grpc_clients.py",
        &[
            target.as_ref(),
            common::fixtures().as_os_str(),
            proto.as_os_str(),
        ],
    );
    assert!(out.contains("bad masks refused"), "{out}");
    assert!(out.contains("a bad unit refused"), "{out}");
}

//! FLUX.2 Klein's networks on the tiny pipeline `make_klein_models.py`
//! writes, each equal to diffusers: the transformer (per-row timesteps,
//! two reference images' tokens at their own time coordinates, and the
//! guidance-embedding variant FLUX.2-dev uses) and the 32-channel-style
//! VAE as the pipeline drives it (latents patchified 2×2 and normalised by
//! the batch-norm statistics, both ways).

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_close, reference};
use sd_models::flux2::{reference_ids, References};
use sd_models::{Flux2Transformer, Placement, Vae, Weights};

const MODEL: &str = "klein-tiny";

fn transformer(folder: &str) -> Flux2Transformer {
    let dir = common::model(MODEL).join(folder);
    let w = Weights::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        Placement::cpu(),
    )
    .unwrap();
    Flux2Transformer::load(&dir.join("config.json"), &w).unwrap()
}

#[test]
fn the_flux2_transformer_matches_diffusers() {
    let r = reference(MODEL);
    let net = transformer("transformer");
    let timesteps = &r["flux2.sigmas"] * 1000.0;
    let out = net
        .forward(
            &r["flux2.latents"],
            &timesteps,
            &r["flux2.context"],
            None,
            None,
        )
        .unwrap();
    assert_close("FLUX.2 transformer", &out, &r["flux2.out"]);
    // Reference images: their tokens attend with the generated ones.
    let ids = reference_ids(&[(2, 2), (3, 4)], tch::Device::Cpu);
    assert!(ids.equal(&r["flux2.ref_ids"]), "{ids}");
    let refs = References {
        tokens: &r["flux2.ref_tokens"],
        ids: &ids,
    };
    let with_refs = net
        .forward(
            &r["flux2.latents"],
            &timesteps,
            &r["flux2.context"],
            None,
            Some(refs),
        )
        .unwrap();
    assert_close("FLUX.2 with references", &with_refs, &r["flux2.out_refs"]);
    assert!(
        common::max_abs_diff(&with_refs, &out) > 1e-3,
        "the references changed nothing"
    );
    // The guidance-distilled variant needs its guidance.
    let guided = transformer("transformer-guidance");
    let g = &r["flux2.guidance"];
    let out = guided
        .forward(
            &r["flux2.latents"],
            &timesteps,
            &r["flux2.context"],
            Some(g),
            None,
        )
        .unwrap();
    assert_close("FLUX.2 guided", &out, &r["flux2.out_guided"]);
    assert!(guided
        .forward(
            &r["flux2.latents"],
            &timesteps,
            &r["flux2.context"],
            None,
            None
        )
        .is_err());
    // Misfits are errors, not aborts.
    let short = r["flux2.context"].narrow(2, 0, 10);
    assert!(net
        .forward(&r["flux2.latents"], &timesteps, &short, None, None)
        .is_err());
    let bad = References {
        tokens: &r["flux2.ref_tokens"],
        ids: &ids.narrow(0, 0, 3),
    };
    assert!(net
        .forward(
            &r["flux2.latents"],
            &timesteps,
            &r["flux2.context"],
            None,
            Some(bad)
        )
        .is_err());
}

#[test]
fn the_flux2_vae_patchifies_and_normalises_as_the_pipeline_does() {
    let r = reference(MODEL);
    let dir = common::model(MODEL).join("vae");
    let w = Weights::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        Placement::cpu(),
    )
    .unwrap();
    let vae = Vae::load(&dir.join("config.json"), &w).unwrap();
    assert!(vae.patched());
    assert_eq!(vae.config().normalization(), (1.0, 0.0));
    let z = vae.from_denoiser(&r["vae.normalised"]).unwrap();
    assert_eq!(z.size(), [1, 4, 4, 6]);
    let decoded = vae.decode(&z).unwrap();
    assert_close("FLUX.2 VAE decode", &decoded, &r["vae.decoded"]);
    let mean = vae.encode(&r["vae.image"]).unwrap().mean;
    let encoded = vae.to_denoiser(&mean).unwrap();
    assert_close("FLUX.2 VAE encode", &encoded, &r["vae.encoded"]);
    // The two directions undo each other.
    let back = vae
        .to_denoiser(&vae.from_denoiser(&encoded).unwrap())
        .unwrap();
    assert_close("round trip", &back, &encoded);
}

/// Whole generations through `sdctl up` on the tiny Klein pipeline equal
/// `Flux2KleinPipeline`'s images, one at a time and batched: guided
/// against the empty prompt, unguided, non-square, two images, a shorter
/// prompt length.
#[test]
fn klein_generations_match_diffusers_images() {
    common::e2e::run_model(MODEL);
}

/// What the family refuses, by field: a negative prompt (Klein guides
/// against ""), FLUX.1's true CFG, a prompt longer than 512 tokens' worth.
#[test]
fn klein_refuses_what_its_pipeline_does_not_take() {
    use sd_proto::v1::generation_client::GenerationClient;
    use sd_proto::v1::GenerateRequest;
    let stack = common::stack::Stack::start(&common::model(MODEL));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let base = GenerateRequest {
            prompt: "x".into(),
            width: 64,
            height: 64,
            steps: 1,
            ..Default::default()
        };
        for (req, field) in [
            (
                GenerateRequest {
                    negative_prompt: "blurry".into(),
                    ..base.clone()
                },
                "negative_prompt",
            ),
            (
                GenerateRequest {
                    true_cfg_scale: Some(4.0),
                    ..base.clone()
                },
                "true_cfg_scale",
            ),
            (
                GenerateRequest {
                    max_sequence_length: 513,
                    ..base.clone()
                },
                "max_sequence_length",
            ),
            (
                GenerateRequest {
                    width: 72,
                    ..base.clone()
                },
                "width",
            ),
            // Below the pipeline's 64 pixels a side; more than 16.
            (
                GenerateRequest {
                    reference_images: vec![common::png(32, 96).into()],
                    ..base.clone()
                },
                "reference_images",
            ),
            (
                GenerateRequest {
                    reference_images: vec![common::png(64, 64).into(); 17],
                    ..base.clone()
                },
                "reference_images",
            ),
        ] {
            let e = client.generate(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
            assert!(e.message().starts_with(field), "{field}: {}", e.message());
        }
        let models = client
            .list_models(sd_proto::v1::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let m = &models.models[0];
        assert_eq!(m.family, "klein");
        assert_eq!((m.default_steps, m.default_guidance), (50, 4.0));
    });
}

/// The official `openai` client and `webuiapi` get diffusers' images from
/// this family (cfg_scale read as its own guidance on the A1111 routes).
#[test]
fn openai_and_webuiapi_clients_get_diffusers_images_from_klein() {
    common::families::clients(MODEL, "klein");
}

/// PEFT LoRAs for the transformer, as diffusers saves them: none, one, and
/// two at other scales, each equal to the pipeline's image with
/// load_lora_weights and set_adapters (one at a time and batched: mixed
/// LoRAs in one forward).
#[test]
fn peft_loras_match_diffusers_load_lora_weights() {
    common::families::loras(MODEL);
}

/// The web page fits this family in headless Chromium and generates.
#[test]
fn the_web_page_fits_a_klein_model_in_headless_chromium() {
    common::families::web_page(MODEL, "klein", "4");
}

/// A step-distilled Klein (`is_distilled`): guidance runs no CFG rows (the
/// pipeline ignores it), and it defaults to 4 steps; its images equal the
/// pipeline's, one at a time and batched.
#[test]
fn a_distilled_klein_ignores_guidance_as_its_pipeline_does() {
    common::e2e::run_model("klein-distilled-tiny");
    let stack = common::stack::Stack::start(&common::model("klein-distilled-tiny"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let models = rt.block_on(async {
        let mut client =
            sd_proto::v1::generation_client::GenerationClient::connect(stack.url.clone())
                .await
                .unwrap();
        client
            .list_models(sd_proto::v1::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(models.models[0].family, "klein-distilled");
    assert_eq!(models.models[0].default_steps, 4);
}

/// `sdctl generate --reference` (repeatable) edits from reference images:
/// the fixture's two-reference case, equal to the pipeline's images.
#[test]
fn sdctl_generates_from_reference_images() {
    let dir = common::model(MODEL);
    let e2e = dir.join("e2e");
    let case = common::e2e::load_cases(&e2e)
        .into_iter()
        .find(|c| c.name == "ref-two")
        .unwrap();
    let p = &case.params;
    let stack = common::stack::Stack::start(&dir);
    let out = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(common::stack::bin_dir().join("sdctl"));
    cmd.args(["generate", "--gateway", &stack.url, "--output"])
        .arg(out.path().join("edit.png"));
    for (flag, key) in [
        ("--prompt", "prompt"),
        ("--width", "width"),
        ("--height", "height"),
        ("--steps", "steps"),
        ("--seed", "seed"),
        ("--guidance", "guidance"),
        ("--num-images", "num_images"),
    ] {
        let v = &p[key];
        cmd.arg(flag)
            .arg(v.as_str().map_or_else(|| v.to_string(), str::to_string));
    }
    for r in p["references"].as_array().unwrap() {
        cmd.arg("--reference").arg(e2e.join(r.as_str().unwrap()));
    }
    let run = cmd.output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for (i, want) in case.files.iter().enumerate() {
        let got = std::fs::read(out.path().join(format!("edit-{i}.png"))).unwrap();
        common::e2e::compare(&format!("sdctl {want}"), &got, &e2e.join(want)).unwrap();
    }
}

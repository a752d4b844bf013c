//! Z-Image's transformer on the tiny pipeline `make_zimage_models.py`
//! writes, equal to diffusers' `ZImageTransformer2DModel` as the pipeline
//! calls it: two rows whose captions pad to different lengths (rows padded
//! and masked) at their own timesteps, on a grid whose image tokens need
//! padding too; and one row alone, equal to its row of the pair.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_close, reference};
use sd_models::{Placement, Weights, ZImageTransformer};

const MODEL: &str = "zimage-tiny";

fn transformer() -> ZImageTransformer {
    let dir = common::model(MODEL).join("transformer");
    let w = Weights::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        Placement::cpu(),
    )
    .unwrap();
    ZImageTransformer::load(&dir.join("config.json"), &w).unwrap()
}

#[test]
fn the_z_image_transformer_matches_diffusers() {
    let r = reference(MODEL);
    let net = transformer();
    let timesteps = &r["zimage.sigmas"] * 1000.0;
    let caps = [
        r["zimage.cap0"].shallow_clone(),
        r["zimage.cap1"].shallow_clone(),
    ];
    let out = net
        .forward(&r["zimage.latents"], &timesteps, &caps)
        .unwrap();
    assert_close("Z-Image pair", &out, &r["zimage.out.pair"]);
    let alone = net
        .forward(
            &r["zimage.latents"].narrow(0, 1, 1),
            &timesteps.narrow(0, 1, 1),
            &caps[1..],
        )
        .unwrap();
    assert_close("Z-Image alone", &alone, &r["zimage.out.alone"]);
    assert_close("the row alone as in the pair", &alone, &out.narrow(0, 1, 1));
    // Misfits are errors, not aborts.
    assert!(net
        .forward(&r["zimage.latents"], &timesteps, &caps[..1])
        .is_err());
    let wide = r["zimage.cap0"].narrow(1, 0, 8);
    assert!(net
        .forward(
            &r["zimage.latents"].narrow(0, 0, 1),
            &timesteps.narrow(0, 0, 1),
            &[wide]
        )
        .is_err());
    let odd = r["zimage.latents"].narrow(3, 0, 5);
    assert!(net.forward(&odd, &timesteps, &caps).is_err());
}

/// Whole generations through `sdctl up` on the tiny Z-Image pipeline equal
/// `ZImagePipeline`'s images, one at a time and batched: guided above 0
/// against "" and against a negative prompt (prompts of different lengths
/// in one forward), unguided at 0, non-square, two images.
#[test]
fn z_image_generations_match_diffusers_images() {
    common::e2e::run_model(MODEL);
}

/// The official `openai` client and `webuiapi` get diffusers' images from
/// this family (cfg_scale read as its own guidance on the A1111 routes).
#[test]
fn openai_and_webuiapi_clients_get_diffusers_images_from_zimage() {
    common::families::clients(MODEL, "zimage");
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
fn the_web_page_fits_a_zimage_model_in_headless_chromium() {
    common::families::web_page(MODEL, "zimage", "5");
}

//! Single-file checkpoints (the original CompVis/Stability layout, one
//! `.safetensors`): `sdctl up --model FILE --config DIR` serves them, and
//! the images equal diffusers' `from_single_file(FILE, config=DIR)` for the
//! same seed (`tests/fixtures/make_single_file.py` writes the files — SD 1.x
//! with EMA copies and training buffers, SD 2.x in fp16 with an OpenCLIP
//! text encoder, SDXL with both encoders, and the SD 1.5 architecture at
//! full size, served with no `--config` — and the reference images).
//! Files that are not what they claim fail at start, naming what is wrong.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::e2e::{assert_all_match, check_cases, Case};
use common::stack::Stack;
use sd_models::single_file::Standard;
use sd_models::{ModelDir, ModelError, Placement, Weights};

#[derive(serde::Deserialize)]
struct Entry {
    name: String,
    file: String,
    config: String,
    params: serde_json::Value,
    files: Vec<String>,
}

fn dir() -> PathBuf {
    common::fixtures().join("single-file")
}

fn entries() -> Vec<Entry> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        cases: Vec<Entry>,
    }
    let text = std::fs::read_to_string(dir().join("cases.json")).expect("run make fixtures");
    serde_json::from_str::<Manifest>(&text).unwrap().cases
}

/// Serve `file` (with `--config` when `with_config`), and check every case
/// written for it.
fn run(file: &str, with_config: bool) {
    let fixtures = common::fixtures();
    let all = entries();
    let mine: Vec<&Entry> = all.iter().filter(|e| e.file == file).collect();
    assert!(!mine.is_empty(), "no cases for {file}");
    let config = fixtures.join(&mine[0].config);
    let cases: Vec<Case> = mine
        .iter()
        .map(|e| Case {
            name: e.name.clone(),
            params: e.params.clone(),
            files: e.files.clone(),
        })
        .collect();
    let flags = ["--config", config.to_str().unwrap()];
    let stack = Stack::start_with(&dir().join(file), if with_config { &flags } else { &[] });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = rt.block_on(check_cases(&stack.url, &cases, &dir(), &dir(), file, false));
    failures.extend(rt.block_on(check_cases(&stack.url, &cases, &dir(), &dir(), file, true)));
    assert_all_match(&failures);
}

#[test]
fn an_sd1_file_with_ema_copies_matches_diffusers() {
    run("sd1-ema.safetensors", true);
}

#[test]
fn an_sd2_fp16_file_with_an_openclip_text_encoder_matches_diffusers() {
    run("sd2-fp16.safetensors", true);
}

/// Real SD 2.x files carry one more OpenCLIP block than the text encoder
/// uses: it is never read, and the picture is the file without it.
#[test]
fn an_sd2_file_with_an_unused_openclip_block_draws_the_same() {
    run("sd2-fp16-extra-block.safetensors", true);
}

/// The SDXL refiner (OpenCLIP alone, `conditioner.embedders.0.model`),
/// image to image with aesthetic scores, equals the refiner fixture's own
/// diffusers images (the same weights).
#[test]
fn an_sdxl_refiner_file_matches_diffusers() {
    run("sdxl-refiner.safetensors", true);
}

#[test]
fn an_sdxl_file_with_both_text_encoders_matches_diffusers() {
    run("sdxl.safetensors", true);
}

/// The SD 1.5 architecture at full size with no `--config`: recognised,
/// served with the configs sdserve ships (and its CLIP vocabulary derived
/// in Rust; diffusers got the same configs with a vocabulary built in
/// Python).
#[test]
fn the_sd15_architecture_is_served_with_no_config() {
    assert_eq!(family("sd15-architecture.safetensors"), Standard::Sd1);
    run("sd15-architecture.safetensors", false);
}

fn family(file: &str) -> Standard {
    Standard::infer(&Weights::open(&dir().join(file), Placement::cpu()).unwrap()).unwrap()
}

#[test]
fn the_family_is_recognised_from_the_keys() {
    // From the text encoders each family has.
    assert_eq!(family("sd1-ema.safetensors"), Standard::Sd1);
    assert_eq!(family("sd2-fp16.safetensors"), Standard::Sd2);
    assert_eq!(family("sdxl.safetensors"), Standard::SdxlBase);
    assert_eq!(family("sdxl-refiner.safetensors"), Standard::SdxlRefiner);
}

fn open_error(model: &Path, config: Option<&Path>) -> String {
    let e: ModelError = match ModelDir::open_with_config(model, config) {
        Ok(d) => match d.load_unet(Placement::cpu()) {
            Ok(_) => panic!("{} loaded", model.display()),
            Err(e) => e,
        },
        Err(e) => e,
    };
    e.to_string()
}

#[test]
fn files_that_do_not_fit_are_refused_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    // Without --config, the tiny SD 1.x file is served with SD 1.5's
    // configs, and the first tensor that does not fit is named.
    let msg = open_error(&dir().join("sd1-ema.safetensors"), None);
    assert!(
        msg.contains("model.diffusion_model.") && msg.contains("expected"),
        "{msg}"
    );
    // A pickle is refused by name, never opened.
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not opened").unwrap();
    assert!(open_error(&ckpt, None).contains("pickle"), "pickle");
    // A file with no UNet (a VAE, a LoRA): said so.
    let unet_less = tmp.path().join("vae-only.safetensors");
    let vae = common::model("sd1-tiny").join("vae/diffusion_pytorch_model.safetensors");
    std::fs::copy(vae, &unet_less).unwrap();
    let msg = open_error(&unet_less, None);
    assert!(msg.contains("model.diffusion_model"), "{msg}");
    // --config must be a model directory.
    let msg = open_error(&dir().join("sd1-ema.safetensors"), Some(tmp.path()));
    assert!(msg.contains("unet/config.json"), "{msg}");
    // --config with a model directory (which has its own configs) is refused.
    let msg = open_error(&common::model("sd1-tiny"), Some(&common::model("sd2-tiny")));
    assert!(msg.contains("--config"), "{msg}");
}

#[test]
fn each_network_reads_only_its_part_and_ema_copies_are_never_read() {
    let d = ModelDir::open_with_config(
        dir().join("sd1-ema.safetensors"),
        Some(&common::model("sd1-tiny")),
    )
    .unwrap();
    for c in [
        sd_models::Component::Unet,
        sd_models::Component::Vae,
        sd_models::Component::TextEncoder,
    ] {
        let w = d.open_weights(c, Placement::cpu()).unwrap();
        match c {
            sd_models::Component::Unet => {
                sd_models::UNet::load(&d.config_path(c), &w).unwrap();
            }
            sd_models::Component::Vae => {
                sd_models::Vae::load(&d.config_path(c), &w).unwrap();
            }
            _ => {
                sd_models::ClipTextModel::load(&d.config_path(c), &w).unwrap();
            }
        }
        let prefix = match c {
            sd_models::Component::Unet => "model.diffusion_model.",
            sd_models::Component::Vae => "first_stage_model.",
            _ => "cond_stage_model.transformer.",
        };
        // Everything of this network was read; nothing else was.
        let unused = w.unused();
        let left: Vec<&String> = unused
            .iter()
            .filter(|k| k.starts_with(prefix) && !k.ends_with("position_ids"))
            .collect();
        assert!(left.is_empty(), "{c:?}: unread {left:?}");
        assert!(
            unused.iter().any(|k| k.starts_with("model_ema.")),
            "the EMA copies are in the file and stay unread"
        );
    }
}

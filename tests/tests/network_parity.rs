//! The three networks, loaded through sdserve's loader, against the outputs
//! diffusers/transformers computed on the same weights and inputs (CPU fp32).

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_close, reference};
use sd_models::{Added, ClipTextModel, Component, ModelDir, Placement, UNet, Weights};
use tch::Tensor;

const MODELS: [&str; 2] = ["sd1-tiny", "sd2-tiny"];

fn dir(model: &str) -> ModelDir {
    ModelDir::open(common::model(model)).unwrap()
}

#[test]
fn text_encoder_matches_transformers_with_and_without_clip_skip() {
    for model in MODELS {
        let r = reference(model);
        let d = dir(model);
        let tok = d.load_tokenizer().unwrap();
        let prompts: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(d.root().join("reference_prompts.json")).unwrap(),
        )
        .unwrap();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = tok.encode_batch(&refs).unwrap();
        assert_eq!(ids, r["text.ids"], "{model}: token ids");
        let clip = d.load_text_encoder(Placement::cpu()).unwrap();
        for skip in 0..=2 {
            let got = clip.forward(&ids, skip).unwrap();
            assert_close(
                &format!("{model} text clip_skip={skip}"),
                &got,
                &r[&format!("text.embeds.skip{skip}")],
            );
        }
    }
}

#[test]
fn unet_matches_diffusers_for_per_item_timesteps() {
    for model in MODELS {
        let r = reference(model);
        let unet = dir(model).load_unet(Placement::cpu()).unwrap();
        // Batch 3 with timesteps 999, 500.5 and 1 (one fractional).
        let got = unet
            .forward(&r["unet.latents"], &r["unet.timesteps"], &r["unet.context"])
            .unwrap();
        assert_close(&format!("{model} unet batch=3"), &got, &r["unet.out"]);
        let one = r["unet.latents"].narrow(0, 0, 1);
        let ctx = r["unet.context"].narrow(0, 0, 1);
        let got = unet
            .forward(&one, &Tensor::from_slice(&[250i64]), &ctx)
            .unwrap();
        assert_close(
            &format!("{model} unet batch=1"),
            &got,
            &r["unet.out_single"],
        );
    }
}

#[test]
fn controlnet_residuals_are_added_as_diffusers_adds_them() {
    for model in MODELS {
        let r = reference(model);
        let unet = dir(model).load_unet(Placement::cpu()).unwrap();
        let down: Vec<Tensor> = (0..)
            .map_while(|i| r.get(&format!("unet.control.down.{i}")))
            .map(Tensor::shallow_clone)
            .collect();
        assert!(!down.is_empty(), "{model}: no residuals in the reference");
        let control = sd_models::Residuals {
            down,
            mid: r["unet.control.mid"].shallow_clone(),
        };
        let with = |c: Option<&sd_models::Residuals>| {
            unet.forward_with(
                &r["unet.latents"],
                &r["unet.timesteps"],
                &r["unet.context"],
                Added {
                    control: c,
                    ..Default::default()
                },
            )
        };
        let got = with(Some(&control)).unwrap();
        assert_close(
            &format!("{model} unet + control"),
            &got,
            &r["unet.control.out"],
        );
        // The residuals change the output (the reference asserts it too).
        assert!(common::max_abs_diff(&got, &r["unet.out"]) > 1e-2);
        // One residual short, or one of the wrong shape: refused, not a panic.
        let short = sd_models::Residuals {
            down: control.down[1..]
                .iter()
                .map(Tensor::shallow_clone)
                .collect(),
            mid: control.mid.shallow_clone(),
        };
        let e = with(Some(&short)).unwrap_err().to_string();
        assert!(e.contains("down residuals"), "{e}");
        let wrong = sd_models::Residuals {
            down: control.down.iter().map(Tensor::shallow_clone).collect(),
            mid: control.mid.narrow(3, 0, 1),
        };
        let e = with(Some(&wrong)).unwrap_err().to_string();
        assert!(e.contains("mid block"), "{e}");
    }
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    for model in MODELS {
        let r = reference(model);
        let vae = dir(model).load_vae(Placement::cpu()).unwrap();
        let dist = vae.encode(&r["vae.pixels"]).unwrap();
        assert_close(&format!("{model} vae mean"), &dist.mean, &r["vae.mean"]);
        assert_close(&format!("{model} vae std"), &dist.std, &r["vae.std"]);
        assert_close(
            &format!("{model} vae logvar"),
            &dist.logvar,
            &r["vae.logvar"],
        );
        let got = vae.decode(&r["vae.latents"]).unwrap();
        assert_close(&format!("{model} vae decode"), &got, &r["vae.decoded"]);
    }
}

#[test]
fn vae_scale_follows_its_block_count() {
    // sd1-tiny's VAE has 3 blocks (×4), sd2-tiny's 2 (×2); neither is 4 blocks
    // and neither matches its UNet's block count.
    assert_eq!(
        dir("sd1-tiny")
            .load_vae(Placement::cpu())
            .unwrap()
            .scale_factor(),
        4
    );
    assert_eq!(
        dir("sd2-tiny")
            .load_vae(Placement::cpu())
            .unwrap()
            .scale_factor(),
        2
    );
}

#[test]
fn every_tensor_in_the_files_is_used() {
    // A weight the loader silently ignores would be a layer it forgot.
    for model in [
        "sd1-tiny",
        "sd2-tiny",
        "sdxl-tiny",
        "flux-dev-tiny",
        "flux-schnell-tiny",
        "klein-tiny",
        "zimage-tiny",
    ] {
        let d = dir(model);
        let family = d.family();
        let components = match family {
            sd_models::Family::Sd => vec![Component::TextEncoder, Component::Unet, Component::Vae],
            sd_models::Family::Sdxl => vec![
                Component::TextEncoder,
                Component::TextEncoder2,
                Component::Unet,
                Component::Vae,
            ],
            sd_models::Family::Flux => vec![
                Component::TextEncoder,
                Component::TextEncoder2,
                Component::Transformer,
                Component::Vae,
            ],
            sd_models::Family::Klein | sd_models::Family::ZImage => {
                vec![
                    Component::TextEncoder,
                    Component::Transformer,
                    Component::Vae,
                ]
            }
        };
        for c in components {
            let w = d.open_weights(c, Placement::cpu()).unwrap();
            let path = d.config_path(c);
            match c {
                Component::TextEncoder2 if family == sd_models::Family::Flux => {
                    drop(sd_models::T5Encoder::load(&path, &w).unwrap())
                }
                Component::TextEncoder
                    if matches!(family, sd_models::Family::Klein | sd_models::Family::ZImage) =>
                {
                    drop(sd_models::Qwen3Encoder::load(&path, &w).unwrap())
                }
                Component::Transformer if family == sd_models::Family::Klein => {
                    drop(sd_models::Flux2Transformer::load(&path, &w).unwrap())
                }
                Component::Transformer if family == sd_models::Family::ZImage => {
                    drop(sd_models::ZImageTransformer::load(&path, &w).unwrap())
                }
                Component::TextEncoder | Component::TextEncoder2 => {
                    drop(sd_models::ClipTextModel::load(&path, &w).unwrap())
                }
                Component::Unet => drop(sd_models::UNet::load(&path, &w).unwrap()),
                Component::Transformer => {
                    drop(sd_models::FluxTransformer::load(&path, &w).unwrap())
                }
                Component::Vae => drop(sd_models::Vae::load(&path, &w).unwrap()),
            }
            let unused: Vec<String> = w
                .unused()
                .into_iter()
                // Position ids, a batch norm's training counter.
                .filter(|n| !n.ends_with("position_ids") && !n.ends_with("num_batches_tracked"))
                .collect();
            assert!(
                unused.is_empty(),
                "{model}/{}: unused tensors {unused:?}",
                c.dir()
            );
        }
    }
}

/// A UNet of the SDXL family (`make_xl_models.py`), every weight used, and
/// its reference outputs.
fn xl_unet(name: &str) -> (UNet, std::collections::HashMap<String, Tensor>) {
    let d = common::model(&format!("unets/{name}"));
    let w = Weights::open(
        &d.join("unet/diffusion_pytorch_model.safetensors"),
        Placement::cpu(),
    )
    .unwrap();
    let unet = UNet::load(&d.join("unet/config.json"), &w).unwrap();
    assert!(
        w.unused().is_empty(),
        "{name}: unused weights {:?}",
        w.unused()
    );
    (unet, reference(&format!("unets/{name}")))
}

#[test]
fn sdxl_family_unets_match_diffusers_with_their_added_conditioning_per_row() {
    for name in ["xl-unet", "lcm-unet"] {
        let (unet, r) = xl_unet(name);
        assert!(unet.takes_text_time());
        assert_eq!(unet.time_cond_dim().is_some(), name == "lcm-unet");
        // Batch 3: a timestep, a size/crop conditioning and (LCM) a guidance
        // embedding of its own per row.
        let added = Added {
            text_embeds: Some(&r["text_embeds"]),
            time_ids: Some(&r["time_ids"]),
            timestep_cond: r.get("timestep_cond"),
            control: None,
        };
        let got = unet
            .forward_with(&r["latents"], &r["timesteps"], &r["context"], added)
            .unwrap();
        assert_close(&format!("{name} batch=3"), &got, &r["out"]);
        let row = |t: &Tensor| t.narrow(0, 1, 1);
        let (text, ids) = (row(&r["text_embeds"]), row(&r["time_ids"]));
        let cond = r.get("timestep_cond").map(row);
        let one = Added {
            text_embeds: Some(&text),
            time_ids: Some(&ids),
            timestep_cond: cond.as_ref(),
            control: None,
        };
        let got = unet
            .forward_with(
                &row(&r["latents"]),
                &row(&r["timesteps"]),
                &row(&r["context"]),
                one,
            )
            .unwrap();
        assert_close(&format!("{name} row 1 alone"), &got, &r["out_row1"]);
    }
}

#[test]
fn added_conditioning_is_checked_against_the_unet() {
    let (xl, r) = xl_unet("xl-unet");
    let (latents, t, ctx) = (&r["latents"], &r["timesteps"], &r["context"]);
    let err = |res: sd_models::Result<Tensor>| res.unwrap_err().to_string();
    // SDXL without its conditioning, or with widths that do not add up.
    assert!(err(xl.forward(latents, t, ctx)).contains("text_embeds and time_ids"));
    let short = r["time_ids"].narrow(1, 0, 5);
    let e = err(xl.forward_with(
        latents,
        t,
        ctx,
        Added {
            text_embeds: Some(&r["text_embeds"]),
            time_ids: Some(&short),
            timestep_cond: None,
            control: None,
        },
    ));
    assert!(e.contains("add_embedding takes 80"), "{e}");
    let two_rows = r["text_embeds"].narrow(0, 0, 2);
    let e = err(xl.forward_with(
        latents,
        t,
        ctx,
        Added {
            text_embeds: Some(&two_rows),
            time_ids: Some(&r["time_ids"]),
            timestep_cond: None,
            control: None,
        },
    ));
    assert!(e.contains("text_embeds"), "{e}");
    // A guidance embedding for a UNet that has no use for it.
    let cond = Tensor::zeros([3, 16], (tch::Kind::Float, tch::Device::Cpu));
    let e = err(xl.forward_with(
        latents,
        t,
        ctx,
        Added {
            text_embeds: Some(&r["text_embeds"]),
            time_ids: Some(&r["time_ids"]),
            timestep_cond: Some(&cond),
            control: None,
        },
    ));
    assert!(e.contains("not an LCM UNet"), "{e}");
    // SD 1.x: no added conditioning.
    let sd1 = dir("sd1-tiny").load_unet(Placement::cpu()).unwrap();
    let r1 = reference("sd1-tiny");
    let e = err(sd1.forward_with(
        &r1["unet.latents"],
        &r1["unet.timesteps"],
        &r1["unet.context"],
        Added {
            text_embeds: Some(&r["text_embeds"]),
            time_ids: Some(&r["time_ids"]),
            timestep_cond: None,
            control: None,
        },
    ));
    assert!(e.contains("not an SDXL-family UNet"), "{e}");
}

#[test]
fn sdxl_text_encoders_give_penultimate_hidden_states_and_pooled_outputs() {
    let d = common::model("unets/xl-text");
    let r = reference("unets/xl-text");
    for (name, dir, projected) in [
        ("proj", "text_encoder_2", true),
        ("plain", "text_encoder", false),
    ] {
        let w = Weights::open(&d.join(dir).join("model.safetensors"), Placement::cpu()).unwrap();
        let clip = ClipTextModel::load(&d.join(dir).join("config.json"), &w).unwrap();
        assert!(w.unused().is_empty(), "{dir}: unused {:?}", w.unused());
        assert_eq!(clip.has_projection(), projected);
        for skip in [0usize, 1] {
            let out = clip.forward_xl(&r["ids"], skip).unwrap();
            assert_close(
                &format!("{dir} hidden, clip_skip {skip}"),
                &out.hidden,
                &r[&format!("{name}.hidden.skip{skip}")],
            );
            assert_close(
                &format!("{dir} pooled"),
                &out.pooled,
                &r[&format!("{name}.pooled")],
            );
        }
        // Too deep a skip for a 5-layer encoder is refused, named.
        let e = clip.forward_xl(&r["ids"], 4).unwrap_err().to_string();
        assert!(e.contains("clip_skip 4"), "{e}");
    }
}

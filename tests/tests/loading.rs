//! What the loader refuses, and how it says so: pickle checkpoints, missing
//! files and tensors, tensors of the wrong shape, unsupported configs; plus
//! the fp16 variant files and device checks.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use sd_models::{Component, DeviceSpec, ModelDir, ModelError, Placement, Precision};
use tch::Tensor;

/// A scratch copy of a fixture that a test may break.
fn scratch_copy(model: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(model);
    copy_dir(&common::model(model), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn err_text<T>(r: sd_models::Result<T>) -> (ModelError, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            (e, s)
        }
    }
}

#[test]
fn pickle_checkpoints_are_refused_by_name() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    let unet = dir.join("unet");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    // Not even a valid pickle: it must be refused without being opened.
    std::fs::write(unet.join("diffusion_pytorch_model.bin"), b"not read").unwrap();
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_unet(Placement::cpu()));
    assert!(matches!(e, ModelError::Pickle { .. }), "{e:?}");
    assert!(
        msg.contains("diffusion_pytorch_model.bin") && msg.contains("safetensors"),
        "{msg}"
    );
}

#[test]
fn a_missing_weights_file_is_named() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_vae(Placement::cpu()));
    assert!(matches!(e, ModelError::MissingFile { .. }), "{e:?}");
    assert!(
        msg.contains("vae/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_missing_tensor_names_file_and_tensor() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let victim = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    rewrite(&path, |t| t.retain(|(n, _)| n != victim));
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_unet(Placement::cpu()));
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    assert!(
        msg.contains(victim) && msg.contains("unet/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_names_both_shapes() {
    let (_tmp, dir) = scratch_copy("sd2-tiny");
    let path = dir.join("text_encoder/model.safetensors");
    let victim = "text_model.encoder.layers.1.mlp.fc1.weight";
    rewrite(&path, |t| {
        for (n, v) in t.iter_mut() {
            if n == victim {
                *v = Tensor::zeros([7, 48], (tch::Kind::Float, tch::Device::Cpu));
            }
        }
    });
    let (e, msg) = err_text(
        ModelDir::open(&dir)
            .unwrap()
            .load_text_encoder(Placement::cpu()),
    );
    assert!(matches!(e, ModelError::Shape { .. }), "{e:?}");
    assert!(
        msg.contains(victim) && msg.contains("[7, 48]") && msg.contains("[96, 48]"),
        "{msg}"
    );
}

#[test]
fn a_corrupt_safetensors_header_is_an_error_not_a_crash() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    let path = dir.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_vae(Placement::cpu()));
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
    assert!(
        msg.contains("vae/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    // Truncated data: offsets past the end of the file.
    std::fs::write(
        &path,
        &std::fs::read(common::model("sd1-tiny").join("vae/diffusion_pytorch_model.safetensors"))
            .unwrap()[..4096],
    )
    .unwrap();
    let (e, _) = err_text(ModelDir::open(&dir).unwrap().load_vae(Placement::cpu()));
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e:?}");
}

#[test]
fn unsupported_and_inconsistent_configs_are_named() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    let cfg = dir.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\""),
    )
    .unwrap();
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_unet(Placement::cpu()));
    assert!(matches!(e, ModelError::Unsupported { .. }), "{e:?}");
    assert!(
        msg.contains("SimpleCrossAttnDownBlock2D") && msg.contains("unet/config.json"),
        "{msg}"
    );

    std::fs::write(&cfg, "{ not json").unwrap();
    let (e, _) = err_text(ModelDir::open(&dir).unwrap().load_unet(Placement::cpu()));
    assert!(matches!(e, ModelError::Config { .. }), "{e:?}");
}

#[test]
fn a_vae_config_key_it_does_not_honour_is_refused_by_name() {
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    let cfg = dir.join("vae/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    // Null is what diffusers writes for options a VAE does not use.
    c["latents_mean"] = serde_json::Value::Null;
    c["shift_factor"] = 0.0625.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let vae = ModelDir::open(&dir)
        .unwrap()
        .load_vae(Placement::cpu())
        .unwrap();
    // The shift is honoured: it is part of the latent normalisation the
    // autoencoder publishes and applies.
    assert_eq!(vae.config().normalization(), (0.18215, 0.0625));
    c["latents_mean"] = serde_json::json!([0.1, 0.2, 0.3, 0.4]);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let (e, msg) = err_text(ModelDir::open(&dir).unwrap().load_vae(Placement::cpu()));
    assert!(matches!(e, ModelError::Unsupported { .. }), "{e:?}");
    assert!(
        msg.contains("`latents_mean`") && msg.contains("vae/config.json"),
        "{msg}"
    );
}

#[test]
fn fp16_variant_files_load_and_equal_the_rounded_weights() {
    // sd1-tiny-fp16 holds only diffusion_pytorch_model.fp16.safetensors.
    let fp16 = ModelDir::open(common::model("sd1-tiny-fp16")).unwrap();
    let path = fp16.weights_path(Component::Unet, false).unwrap();
    assert!(
        path.ends_with("unet/diffusion_pytorch_model.fp16.safetensors"),
        "{}",
        path.display()
    );
    let half = fp16.load_unet(Placement::cpu()).unwrap();

    // Its outputs equal the fp32 model's on weights rounded to fp16: build
    // that model by rounding the fp32 file, and compare exactly.
    let (_tmp, dir) = scratch_copy("sd1-tiny");
    rewrite(&dir.join("unet/diffusion_pytorch_model.safetensors"), |t| {
        for (_, v) in t.iter_mut() {
            *v = v.to_kind(tch::Kind::Half).to_kind(tch::Kind::Float);
        }
    });
    let rounded = ModelDir::open(&dir)
        .unwrap()
        .load_unet(Placement::cpu())
        .unwrap();
    let r = common::reference("sd1-tiny");
    let a = half
        .forward(&r["unet.latents"], &r["unet.timesteps"], &r["unet.context"])
        .unwrap();
    let b = rounded
        .forward(&r["unet.latents"], &r["unet.timesteps"], &r["unet.context"])
        .unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // And rounding the weights does change the output, so the test can tell.
    assert!(common::max_abs_diff(&a, &r["unet.out"]) > 0.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let d = ModelDir::open(common::model("sd1-tiny")).unwrap();
    let unet = d.load_unet(Placement::cpu()).unwrap();
    let f = (tch::Kind::Float, tch::Device::Cpu);
    let ctx = Tensor::zeros([1, 77, 32], f);
    let t = Tensor::from_slice(&[10.0f32]);
    for (latents, ctx, t) in [
        (
            Tensor::zeros([1, 3, 8, 8], f),
            ctx.shallow_clone(),
            t.shallow_clone(),
        ), // channels
        (
            Tensor::zeros([4, 8, 8], f),
            ctx.shallow_clone(),
            t.shallow_clone(),
        ), // rank
        (
            Tensor::zeros([1, 4, 8, 8], f),
            Tensor::zeros([1, 77, 31], f),
            t.shallow_clone(),
        ), // context width
        (
            Tensor::zeros([2, 4, 8, 8], f),
            Tensor::zeros([2, 77, 32], f),
            Tensor::from_slice(&[1.0f32, 2.0, 3.0]),
        ), // timesteps
    ] {
        assert!(matches!(
            unet.forward(&latents, &t, &ctx),
            Err(ModelError::Input(_))
        ));
    }
    let clip = d.load_text_encoder(Placement::cpu()).unwrap();
    let too_big = Tensor::from_slice(&[49408i64, 1]).view([1, 2]);
    assert!(matches!(
        clip.forward(&too_big, 0),
        Err(ModelError::Input(_))
    ));
    let ids = Tensor::from_slice(&[49406i64, 49407]).view([1, 2]);
    assert!(
        matches!(clip.forward(&ids, 5), Err(ModelError::Input(_))),
        "clip_skip >= layers"
    );
    let vae = d.load_vae(Placement::cpu()).unwrap();
    // Pixels must be a multiple of the VAE's scale (4 here).
    assert!(matches!(
        vae.encode(&Tensor::zeros([1, 3, 10, 8], f)),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        vae.decode(&Tensor::zeros([1, 3, 8, 8], f)),
        Err(ModelError::Input(_))
    ));
}

#[test]
fn devices_and_precisions_parse_and_fail_clearly() {
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
    assert!("tpu".parse::<DeviceSpec>().is_err());
    assert!("cuda:x".parse::<DeviceSpec>().is_err());
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert!(Placement::new(DeviceSpec::Cpu, Precision::F16).is_err());
    if tch::Cuda::device_count() == 0 {
        // On a machine without a GPU, asking for one is a clear error.
        let e = Placement::new(DeviceSpec::Cuda(0), Precision::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:0") || e.contains("CUDA"), "{e}");
    }
}

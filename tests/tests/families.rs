//! The model family, decided once: a pipeline class sdserve does not serve
//! is refused by name by every service and by `sdctl up`, in seconds; each
//! service publishes the family; an inpainting model (a 9-channel UNet)
//! loads and serves, its latent layout published apart from its network's
//! input channels, and its generations without a mask refused by name
//! (tests/tests/inpaint.rs paints with it).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::Cluster;
use common::stack::{bin_dir, Stack};
use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::denoiser_info::FamilyParams;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfoRequest, DenoiserInfoRequest, GenerateRequest, ListModelsRequest,
    TextEncoderInfoRequest,
};
use sd_proto::Family;

/// sd1-tiny's folders under a model_index.json naming `class`.
fn relabelled(class: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relabelled");
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::model("sd1-tiny");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "model_index.json" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.join(&name)).unwrap();
    }
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    index["_class_name"] = class.into();
    std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
    (tmp, dir)
}

/// Run `bin args…` to its end (at most 60 s): its exit success, stdout and
/// stderr, and how long it took.
fn run(bin: &Path, args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .env("SD_TORCH_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{} {args:?} still running after 60 s", bin.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed())
}

#[test]
fn an_unserved_pipeline_class_is_refused_by_name_everywhere_in_seconds() {
    // SD3 directories have a text_encoder_2 as SDXL does: once they (and
    // FLUX's, served now) were taken for SDXL and failed on CLIP's config.
    for class in ["HiDreamImagePipeline", "StableDiffusion3Pipeline"] {
        let (_tmp, dir) = relabelled(class);
        let d = dir.to_str().unwrap();
        let bins = bin_dir();
        let mut runs = Vec::new();
        for server in ["sd-text-encoder", "sd-denoiser", "sd-autoencoder"] {
            runs.push((
                server,
                run(
                    &bins.join(server),
                    &["--model", d, "--listen", "127.0.0.1:0"],
                ),
            ));
        }
        runs.push((
            "sdctl up",
            run(
                &bins.join("sdctl"),
                &["up", "--model", d, "--port", "0", "--http-port", "0"],
            ),
        ));
        for (who, (ok, text, took)) in runs {
            assert!(!ok, "{who} started on a {class} model");
            assert!(
                text.contains(&format!(
                    "{class} is not supported (served: StableDiffusionPipeline,"
                )),
                "{who}: {text}"
            );
            assert!(
                took < Duration::from_secs(20),
                "{who} took {took:?} to refuse"
            );
        }
    }
}

#[test]
fn every_service_publishes_the_family_and_the_model_crate_reads_it() {
    let f = common::fixtures();
    for (model, family) in [
        ("sd1-tiny", Family::Sd),
        ("sd2-tiny", Family::Sd),
        ("sdxl-tiny", Family::Sdxl),
        ("sdxl-refiner-tiny", Family::Sdxl),
        ("sd1-inpaint-tiny", Family::Sd),
        ("flux-dev-tiny", Family::Flux),
        ("flux-schnell-tiny", Family::Flux),
    ] {
        let dir = sd_models::ModelDir::open(f.join(model)).unwrap();
        assert_eq!(dir.family(), family, "{model}");
    }
    // Served: the three Infos agree, the SD family's parameters are SD's.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Cluster::start(&f.join("sd1-tiny"), Default::default()).await;
        let d = DenoiserClient::connect(c.denoisers[0].url())
            .await
            .unwrap()
            .info(DenoiserInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(Family::from_wire(d.family), Ok(Family::Sd));
        assert!(matches!(d.family_params, Some(FamilyParams::Sd(_))));
        let l = d.layout.unwrap();
        assert_eq!(
            (
                l.latent_channels,
                l.in_channels,
                l.vae_scale_factor,
                l.size_multiple,
                l.packed
            ),
            (4, 4, 4, 4, false)
        );
        let t = TextEncoderClient::connect(c.text.url())
            .await
            .unwrap()
            .info(TextEncoderInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(Family::from_wire(t.family), Ok(Family::Sd));
        let a = AutoencoderClient::connect(c.autoencoder.url())
            .await
            .unwrap()
            .info(AutoencoderInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(Family::from_wire(a.family), Ok(Family::Sd));
        let n = a.normalization.unwrap();
        assert_eq!((n.scale, n.shift), (a.scaling_factor, 0.0));
    });
}

#[test]
fn an_inpainting_unet_serves_and_its_generations_without_a_mask_are_refused_by_name() {
    let dir = common::fixtures().join("sd1-inpaint-tiny");
    let index = std::fs::read_to_string(dir.join("model_index.json")).unwrap();
    assert!(index.contains("StableDiffusionInpaintPipeline"), "{index}");
    let stack = Stack::start(&dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let listed = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.models[0].name, "sd1-inpaint-tiny");
        let e = c
            .generate(GenerateRequest {
                prompt: "a cat".into(),
                steps: 2,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("inpainting model") && e.message().contains("9 input channels"),
            "{}",
            e.message()
        );
    });
}

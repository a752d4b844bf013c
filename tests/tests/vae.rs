//! `--vae`: the autoencoder serves another VAE with the model (a VAE folder
//! as VAE-only repositories publish it), and refuses one that does not fit.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::procs::Proc;
use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::{AutoencoderInfoRequest, DecodeRequest};
use sd_proto::wire::HostTensor;

fn autoencoder(extra: &[&str]) -> Proc {
    let mut args = vec![
        "--model".to_string(),
        common::model("sd1-tiny").to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn("sd-autoencoder", &args, &[])
}

#[tokio::test]
async fn another_vae_is_served_with_the_model() {
    let alt = common::model("unets/vae-alt");
    let r = common::reference("unets/vae-alt");
    let p = autoencoder(&["--vae", &alt.to_string_lossy()]);
    p.wait_serving(Duration::from_secs(60)).await;
    let mut c = AutoencoderClient::connect(p.url()).await.unwrap();
    let info = c
        .info(AutoencoderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // Decode takes latents times the scaling factor.
    let z = &r["latents"] * f64::from(info.scaling_factor);
    let h = HostTensor::new(z.size(), Vec::<f32>::try_from(z.flatten(0, -1)).unwrap()).unwrap();
    let out = c
        .decode(DecodeRequest {
            latents: Some(h.to_wire(sd_proto::v1::Dtype::Float32)),
        })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<u8> = Vec::<u8>::try_from(
        ((&r["decoded"] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(tch::Kind::Uint8)
            .permute([0, 2, 3, 1])
            .flatten(0, -1),
    )
    .unwrap();
    let got = &out.images[0].rgb;
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert_eq!(got.len(), want.len());
    assert!(
        worst <= 1,
        "the --vae decode differs by {worst}/255 from diffusers'"
    );

    // Its identity is not the model's own VAE's.
    let own = autoencoder(&[]);
    own.wait_serving(Duration::from_secs(60)).await;
    let own_id = AutoencoderClient::connect(own.url())
        .await
        .unwrap()
        .info(AutoencoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_id;
    assert_ne!(info.model_id, own_id);
}

/// The autoencoder's exit status and stderr when started with `--vae dir`
/// (it fails at load, after printing where it listens).
fn refused(vae: &std::path::Path) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(common::stack::bin_dir().join("sd-autoencoder"))
        .arg("--model")
        .arg(common::model("sd1-tiny"))
        .arg("--vae")
        .arg(vae)
        .args(["--listen", "127.0.0.1:0"])
        .env("SD_TORCH_THREADS", "1")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_vae_that_does_not_fit_the_model_is_refused_at_start() {
    // sdxl-tiny's VAE has scale factor 2; sd1-tiny's has 4.
    let (status, stderr) = refused(&common::model("sdxl-tiny"));
    assert!(!status.success());
    assert!(
        stderr.contains("--vae: this VAE has 4 latent channels and scale factor 2"),
        "{stderr}"
    );
    let (status, stderr) = refused(std::path::Path::new("/nonexistent/vae"));
    assert!(!status.success());
    assert!(
        stderr.contains("--vae") && stderr.contains("/nonexistent/vae"),
        "{stderr}"
    );
}

//! The running stack as a client sees it: streaming progress and previews,
//! PNG metadata, other image formats, ListModels, health and reflection, and
//! sdctl's outputs and errors. One stack serves every check (starting one
//! takes seconds).

#![allow(clippy::unwrap_used)]
// One scenario against one running stack, read top to bottom; the
// 100-line limit is for non-test code.
#![allow(clippy::too_many_lines)]

mod common;

use common::stack::{bin_dir, Stack};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{generate_event, GenerateRequest, ImageFormat, ListModelsRequest};
use tokio_stream::StreamExt;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn req(steps: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        steps,
        seed: Some(5),
        ..Default::default()
    }
}

#[test]
fn the_stack_serves_streams_formats_and_metadata() {
    let stack = Stack::start(&common::model("sd1-tiny"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();

        // GenerateStream: a progress event per step, a preview every 2, then the result.
        let mut stream = client
            .generate_stream(GenerateRequest {
                preview_every: 2,
                ..req(6)
            })
            .await
            .unwrap()
            .into_inner();
        let (mut progress, mut previews, mut result) = (Vec::new(), Vec::new(), None);
        while let Some(ev) = stream.next().await {
            match ev.unwrap().event.unwrap() {
                generate_event::Event::Progress(p) => progress.push(p),
                generate_event::Event::Preview(p) => previews.push(p),
                generate_event::Event::Result(r) => result = Some(r),
            }
        }
        // PNDM evaluates once more than the step count (its PLMS warm-up).
        let total = progress[0].total;
        assert_eq!(progress.len() as u32, total);
        assert!(progress
            .windows(2)
            .all(|w| w[1].step == w[0].step + 1 && w[1].elapsed_seconds >= w[0].elapsed_seconds));
        assert_eq!(progress.last().unwrap().step, total);
        assert_eq!(
            previews.iter().map(|p| p.step).collect::<Vec<_>>(),
            (1..total).filter(|s| s % 2 == 0).collect::<Vec<_>>()
        );
        let preview = image::load_from_memory(&previews[0].images[0].data).unwrap();
        assert_eq!(
            (preview.width(), preview.height()),
            (8, 8),
            "latent previews are latent-sized"
        );
        let streamed = result.expect("a result after the events");

        // The unary call gives the same image for the same seed.
        let unary = client.generate(req(6)).await.unwrap().into_inner();
        assert_eq!(unary.images[0].data, streamed.images[0].data);

        // PNG text chunks carry the parameters.
        let decoder = png::Decoder::new(std::io::Cursor::new(unary.images[0].data.to_vec()));
        let reader = decoder.read_info().unwrap();
        let text: std::collections::HashMap<String, String> = reader
            .info()
            .utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap()))
            .collect();
        assert_eq!(text["prompt"], "a lighthouse at dusk");
        assert_eq!(text["seed"], "5");
        assert_eq!(text["steps"], "6");
        assert_eq!(text["scheduler"], "pndm");
        assert!(text["parameters"].contains("Seed: 5"));

        // JPEG and WebP on request.
        for (fmt, magic) in [
            (ImageFormat::Jpeg, &b"\xff\xd8\xff"[..]),
            (ImageFormat::Webp, &b"RIFF"[..]),
        ] {
            let r = client
                .generate(GenerateRequest {
                    format: fmt as i32,
                    ..req(2)
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.images[0].data.starts_with(magic), "{fmt:?}");
        }

        // No seed: each request draws its own, returns it, and so gets an
        // image of its own (JPEG: no seed in the metadata, only pixels).
        let mut unseeded = Vec::new();
        for _ in 0..2 {
            let r = client
                .generate(GenerateRequest {
                    seed: None,
                    format: ImageFormat::Jpeg as i32,
                    ..req(2)
                })
                .await
                .unwrap()
                .into_inner();
            unseeded.push((r.parameters.unwrap().seed, r.images[0].data.clone()));
        }
        assert_ne!(
            unseeded[0].0, unseeded[1].0,
            "two unseeded requests, one seed"
        );
        assert_ne!(unseeded[0].1, unseeded[1].1, "two seeds, one image");

        let models = client
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models;
        assert_eq!(models.len(), 1);
        assert_eq!(
            (models[0].name.as_str(), models[0].default_width),
            ("sd1-tiny", 32)
        );

        // Health says SERVING, and a bad request names its field.
        let ch = tonic::transport::Endpoint::from_shared(stack.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let h = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "sd.v1.Generation".into(),
            })
            .await
            .unwrap();
        assert_eq!(h.into_inner().status, 1);
        let e = client
            .generate(GenerateRequest {
                width: 33,
                ..req(2)
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("width"), "{}", e.message());
    });

    // sdctl generate: numbered files for several images, the seed printed,
    // and a non-zero exit with the gRPC code on errors.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pic.png");
    let run = |extra: &[&str]| {
        std::process::Command::new(bin_dir().join("sdctl"))
            .args([
                "generate",
                "--gateway",
                &stack.url,
                "--prompt",
                "a boat",
                "--steps",
                "2",
                "--output",
            ])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&["--num-images", "2", "--seed", "77"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(dir.path().join("pic-0.png").is_file() && dir.path().join("pic-1.png").is_file());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("seed 77"));
    let bad = run(&["--width", "31"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("width"),
        "{err}"
    );
}

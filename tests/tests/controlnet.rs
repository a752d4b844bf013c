//! ControlNets through sdserve: the same request and seed as diffusers'
//! StableDiffusionControlNetPipeline (and the XL one) on the tiny fixtures
//! (`make_controlnet_reference.py`: two random-weight ControlNets whose
//! residuals change the picture, one a diffusers folder, one a single file
//! in the original `control_model.*` layout) — a weight, a window, two at
//! once, and the cases all at once (different ControlNets, weights and
//! windows, and one without, batched into shared UNet forwards), each
//! equal to its own reference within 2/255; and bad units refused naming
//! the field.

#![allow(clippy::unwrap_used)]

mod common;

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{ControlUnit, GenerateRequest, ListControlNetsRequest};

/// The ControlNet fixtures of `model` and a stack serving them.
fn stack(model: &str) -> (common::stack::Stack, std::path::PathBuf) {
    let inputs = common::fixtures().join("controlnet");
    let nets = inputs.join(model).join("nets");
    let stack = common::stack::Stack::start_with(
        &common::model(model),
        &["--controlnet-dir", nets.to_str().unwrap()],
    );
    (stack, inputs)
}

fn run(model: &str) {
    let (stack, inputs) = stack(model);
    let references = inputs.join(model);
    let cases = common::e2e::load_cases(&references);
    assert!(
        cases.iter().any(|c| c.params.get("controlnets").is_none()),
        "{model}: a case without control rides along"
    );
    common::e2e::check_all_in(&stack.url, &cases, &inputs, &references, model);
}

#[test]
fn sd_controlnets_match_diffusers_alone_and_batched() {
    run("sd1-tiny");
}

#[test]
fn sdxl_controlnets_match_diffusers_alone_and_batched() {
    run("sdxl-tiny");
}

/// Both layouts are listed and loaded; units that cannot work are refused
/// before any step, naming the field.
#[test]
fn controlnets_are_listed_and_bad_units_refused_by_field() {
    let (stack, inputs) = stack("sd1-tiny");
    let hint = std::fs::read(inputs.join("control-sd1.png")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let listed = client
            .list_control_nets(ListControlNetsRequest {
                check: vec!["edges".into(), "depth".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let layouts: Vec<(&str, &str)> = listed
            .controlnets
            .iter()
            .map(|c| (c.name.as_str(), c.layout.as_str()))
            .collect();
        assert_eq!(layouts, [("edges", "folder"), ("depth", "file")]);
        assert!(listed
            .controlnets
            .iter()
            .all(|c| c.cost_ratio > 0.0 && c.short_hash.len() == 8));
        let unit = ControlUnit {
            name: "edges".into(),
            image: hint.clone().into(),
            ..Default::default()
        };
        let base = GenerateRequest {
            prompt: "a cat".into(),
            steps: 2,
            seed: Some(1),
            controlnets: vec![unit.clone()],
            ..Default::default()
        };
        let cases = bad_units(&unit).into_iter().map(|(u, field, says)| {
            let req = GenerateRequest {
                controlnets: vec![unit.clone(), u],
                ..base.clone()
            };
            (req, field, says)
        });
        for (req, field, says) in cases {
            let e = client.generate(req).await.unwrap_err();
            assert_eq!(
                e.code(),
                tonic::Code::InvalidArgument,
                "{field}: {}",
                e.message()
            );
            assert!(
                e.message().contains(field) && e.message().contains(says),
                "{field}: {}",
                e.message()
            );
        }
        // Canny on the hint picture: it runs, and steers the image.
        let plain = client
            .generate(GenerateRequest {
                controlnets: vec![],
                ..base.clone()
            })
            .await
            .unwrap()
            .into_inner();
        let canny = client
            .generate(GenerateRequest {
                controlnets: vec![ControlUnit {
                    preprocessor: "canny".into(),
                    ..unit.clone()
                }],
                ..base.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(
            plain.images[0].data, canny.images[0].data,
            "canny's hint changed nothing"
        );
        let p = canny.parameters.unwrap();
        assert_eq!(p.controlnets.len(), 1);
        assert!(
            p.controlnets[0].image.is_empty(),
            "the hint is not echoed back"
        );
    });
}

/// Second units that must be refused, with the field named and what the
/// message says.
fn bad_units(unit: &ControlUnit) -> Vec<(ControlUnit, &'static str, &'static str)> {
    let u = |f: &dyn Fn(&mut ControlUnit)| {
        let mut u = unit.clone();
        f(&mut u);
        u
    };
    vec![
        (
            u(&|u| u.name = "nothing".into()),
            "controlnets[1].name",
            "unknown ControlNet",
        ),
        (
            u(&|u| u.weight = Some(3.0)),
            "controlnets[1].weight",
            "0..=2",
        ),
        (
            u(&|u| (u.start, u.end) = (Some(0.8), Some(0.2))),
            "controlnets[1].start",
            "after end",
        ),
        (
            u(&|u| u.image = b"no picture".to_vec().into()),
            "controlnets[1].image",
            "PNG",
        ),
        (
            u(&|u| u.preprocessor = "depth_midas".into()),
            "controlnets[1].preprocessor",
            "network",
        ),
        (
            u(&|u| {
                u.preprocessor = "canny".into();
                u.threshold_a = Some(300.0);
            }),
            "controlnets[1].threshold_a",
            "0..=255",
        ),
    ]
}

/// webuiapi's ControlNetUnit on A1111's txt2img equals gRPC's request with
/// A1111's window rule (and not diffusers'); the openai package's
/// `controlnets` equals diffusers' reference (tests/clients/controlnet_clients.py).
#[test]
fn webuiapi_and_openai_clients_steer_with_controlnets() {
    use sd_proto::v1::ControlWindowRule;
    let (stack, inputs) = stack("sd1-tiny");
    let dir = tempfile::tempdir().unwrap();
    let hint = std::fs::read(inputs.join("control-sd1.png")).unwrap();
    let unit = |rule: ControlWindowRule| ControlUnit {
        name: "edges".into(),
        image: hint.clone().into(),
        weight: Some(0.8),
        start: Some(0.0),
        end: Some(0.5),
        window_rule: rule as i32,
        ..Default::default()
    };
    // What the A1111 route asks for webuiapi's request.
    let req = |rule| GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        prompt_syntax: sd_proto::v1::PromptSyntax::A1111 as i32,
        steps: 8,
        seed: Some(7),
        guidance_scale: Some(7.0),
        scheduler: "euler".into(),
        width: 32,
        height: 32,
        controlnets: vec![unit(rule)],
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        for (rule, file) in [
            (ControlWindowRule::A1111, "a1111.png"),
            (ControlWindowRule::Diffusers, "diffusers.png"),
        ] {
            let r = client.generate(req(rule)).await.unwrap().into_inner();
            std::fs::write(dir.path().join(file), &r.images[0].data).unwrap();
        }
    });
    std::fs::write(dir.path().join("hint.png"), &hint).unwrap();
    std::fs::copy(
        inputs.join("sd1-tiny").join("weight-0.png"),
        dir.path().join("weight.png"),
    )
    .unwrap();
    common::run_client(
        "controlnet_clients.py",
        &[stack.http.as_ref(), dir.path().as_os_str()],
    );
}

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

/// Four guided calls in one batched forward — a ControlNet at a weight,
/// the other with A1111's soft injection and no control on the
/// unconditional rows, both at once, and none — run the UNet once on all
/// eight rows, each ControlNet once on its rows; each call's prediction
/// equals its own forward's, and the controlled ones differ from the plain.
#[test]
fn mixed_controls_share_one_forward_and_each_call_equals_its_own() {
    use sd_models::{Denoiser, ModelDir, Placement};
    use sd_service::compute::{forward_calls, Call, Half};
    use sd_service::control::{Control, ControlArgs};
    use tch::{Kind, Tensor};
    let net = Denoiser::load(
        &ModelDir::open(common::model("sd1-tiny")).unwrap(),
        Placement::cpu(),
    )
    .unwrap();
    let args = ControlArgs {
        controlnet_dir: Some(common::fixtures().join("controlnet/sd1-tiny/nets")),
        controlnet_cache_mb: 1024,
    };
    let base = net.unet().unwrap().config().clone();
    let store = sd_service::control::store(&args, Some(base), Placement::cpu(), None).unwrap();
    let f = (Kind::Float, tch::Device::Cpu);
    tch::manual_seed(7);
    let control = |name: &str, scale: f64, uncond_scale: f64, soft: bool| {
        let net = store.get(name, "test").unwrap();
        let hint = net.item.embed(&Tensor::rand([1, 3, 32, 32], f)).unwrap();
        Control {
            net,
            hint,
            scale,
            uncond_scale,
            soft,
        }
    };
    let call = |controls: Vec<Control>| Call {
        latents: Tensor::randn([1, 4, 8, 8], f),
        timesteps: Tensor::from_slice(&[500.0f32]),
        cond: Half::text(Tensor::randn([1, 77, 32], f)),
        uncond: Some(Half::text(Tensor::randn([1, 77, 32], f))),
        guidance: 7.5,
        embedded_guidance: None,
        image: None,
        loras: Default::default(),
        references: None,
        controls,
        ip: Vec::new(),
    };
    let calls = [
        call(vec![control("edges", 0.7, 0.7, false)]),
        call(vec![control("depth", 1.0, 0.0, true)]),
        call(vec![
            control("edges", 1.0, 1.0, false),
            control("depth", 0.5, 0.5, false),
        ]),
        call(Vec::new()),
    ];
    let refs: Vec<&Call> = calls.iter().collect();
    let together = forward_calls(&net, &refs).unwrap();
    for (i, c) in calls.iter().enumerate() {
        let alone = forward_calls(&net, &[c]).unwrap().remove(0);
        let d = common::max_abs_diff(&together[i], &alone);
        assert!(d < 1e-4, "call {i}: batched differs from alone by {d}");
    }
    // The same inputs without their controls: the controls changed them.
    for (i, c) in calls.iter().take(3).enumerate() {
        let plain = Call {
            latents: c.latents.shallow_clone(),
            timesteps: c.timesteps.shallow_clone(),
            cond: Half::text(c.cond.context.shallow_clone()),
            uncond: c
                .uncond
                .as_ref()
                .map(|u| Half::text(u.context.shallow_clone())),
            controls: Vec::new(),
            ..call(Vec::new())
        };
        let p = forward_calls(&net, &[&plain]).unwrap().remove(0);
        let d = common::max_abs_diff(&together[i], &p);
        assert!(d > 1e-3, "call {i}: its controls changed nothing ({d})");
    }
}

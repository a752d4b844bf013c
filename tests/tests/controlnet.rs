//! ControlNets through sdserve: the same request and seed as diffusers'
//! StableDiffusionControlNetPipeline (and the XL one) on the tiny fixtures
//! (`make_controlnet_reference.py`: two random-weight ControlNets whose
//! residuals change the picture, one a diffusers folder, one a single file
//! in the original `control_model.*` layout) — a weight, a window, two at
//! once, and the cases all at once (different ControlNets, weights and
//! windows, and one without, batched into shared UNet forwards), each
//! equal to its own reference within 2/255; and bad units refused naming
//! the field. FLUX.1's ControlNets (`make_flux_controlnet_reference.py`:
//! an InstantX-style one shallower than the transformer and a union) the
//! same against FluxControlNetPipeline, and the network alone against
//! FluxControlNetModel on fixed inputs.

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

/// Weight, window, a union's control type, two at once (diffusers'
/// MultiControlNet merge of a shallower and a deeper net), true CFG (the
/// negative pass reuses the prompt's samples) and a plain case, one at a
/// time and batched.
#[test]
fn flux_controlnets_match_diffusers_alone_and_batched() {
    run("flux-dev-tiny");
}

/// FLUX ControlNets are listed with a union's control types; units that
/// cannot work on them are refused before any step, naming the field: a
/// union without its control type or with one past its types, a control
/// type for a net that is no union, A1111's control modes, a hires pass.
#[test]
fn flux_controlnets_list_union_types_and_refuse_bad_units() {
    let (stack, inputs) = stack("flux-dev-tiny");
    let hint = std::fs::read(inputs.join("control-flux.png")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let listed = client
            .list_control_nets(ListControlNetsRequest {
                check: vec!["canny".into(), "union".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let types: Vec<(&str, u32)> = listed
            .controlnets
            .iter()
            .map(|c| (c.name.as_str(), c.union_modes))
            .collect();
        assert_eq!(types, [("canny", 0), ("union", 3)]);
        assert!(listed.controlnets.iter().all(|c| c.cost_ratio > 0.0));
        let unit = |name: &str, union_mode: Option<u32>| ControlUnit {
            name: name.into(),
            image: hint.clone().into(),
            union_mode,
            ..Default::default()
        };
        let base = GenerateRequest {
            prompt: "a cat".into(),
            width: 32,
            height: 32,
            steps: 2,
            seed: Some(1),
            ..Default::default()
        };
        let with = |units: Vec<ControlUnit>| GenerateRequest {
            controlnets: units,
            ..base.clone()
        };
        let cases = [
            (
                with(vec![unit("union", None)]),
                "controlnets[0].union_mode",
                "union of 3",
            ),
            (
                with(vec![unit("union", Some(3))]),
                "controlnets[0].union_mode",
                "0..3",
            ),
            (
                with(vec![unit("canny", None), unit("canny", Some(1))]),
                "controlnets[1].union_mode",
                "not a union",
            ),
            (
                with(vec![ControlUnit {
                    mode: sd_proto::v1::ControlMode::Prompt as i32,
                    ..unit("canny", None)
                }]),
                "controlnets[0].mode",
                "UNet ControlNets",
            ),
            (
                GenerateRequest {
                    hires: Some(sd_proto::v1::Hires {
                        scale: 2.0,
                        ..Default::default()
                    }),
                    ..with(vec![unit("canny", None)])
                },
                "hires",
                "FLUX ControlNets",
            ),
        ];
        for (req, field, says) in cases {
            let e = client.generate(req).await.unwrap_err();
            common::assert_refused(&e, field, says);
        }
        // A good union unit runs, and steers the picture.
        let plain = client.generate(base.clone()).await.unwrap().into_inner();
        let union = client
            .generate(with(vec![unit("union", Some(2))]))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(plain.images[0].data, union.images[0].data);
        let p = union.parameters.unwrap();
        assert_eq!(p.controlnets[0].union_mode, Some(2));
    });
}

/// FLUX ControlNets through grpcio stubs generated from our proto (every
/// case equal to diffusers', a union's types listed, a unit without one
/// named) and the official openai package (the union case with
/// `union_mode`; a bad type named by `param`):
/// tests/clients/flux_controlnet_clients.py.
#[test]
fn grpcio_and_openai_clients_steer_flux_with_controlnets() {
    let (stack, _) = stack("flux-dev-tiny");
    let target = stack.url.trim_start_matches("http://");
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out = common::run_client(
        "flux_controlnet_clients.py",
        &[
            target.as_ref(),
            common::fixtures().as_os_str(),
            proto.as_os_str(),
            stack.http.as_ref(),
        ],
    );
    eprintln!("{out}");
    assert!(out.contains("a bad type named"), "{out}");
}

/// The web page in headless Chromium on FLUX: a union ControlNet shows its
/// control types, and with one chosen gives gRPC's image for the same
/// request (tests/clients/web_page_flux_controls.py).
#[test]
fn the_web_page_offers_a_union_controlnets_types_on_flux() {
    let (stack, inputs) = stack("flux-dev-tiny");
    let work = tempfile::tempdir().unwrap();
    let hint = std::fs::read(inputs.join("control-flux.png")).unwrap();
    std::fs::write(work.path().join("hint.png"), &hint).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let r = client
            .generate(GenerateRequest {
                prompt: "a photograph of an astronaut riding a horse".into(),
                width: 32,
                height: 32,
                steps: 4,
                seed: Some(63),
                guidance_scale: Some(3.5),
                controlnets: vec![ControlUnit {
                    name: "union".into(),
                    image: hint.into(),
                    weight: Some(0.8),
                    union_mode: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        r.images[0].data.clone()
    });
    std::fs::write(work.path().join("union.png"), image).unwrap();
    common::run_client(
        "web_page_flux_controls.py",
        &[stack.http.as_ref(), work.path().as_os_str()],
    );
}

/// The FLUX ControlNet alone on diffusers' fixed inputs (packed latents
/// and control latents, per-row timesteps and guidance, a union's control
/// types), and the transformer with its samples added.
#[test]
fn the_flux_controlnet_and_its_samples_match_diffusers() {
    use sd_models::flux::{pack, unpack};
    use sd_models::{ControlResiduals, FluxControlNet, FluxResiduals, Placement};
    let root = common::fixtures().join("controlnet/flux-dev-tiny");
    let r: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(root.join("forward.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let latents = unpack(&r["hidden_states"], 16, 4, 4);
    let control = unpack(&r["controlnet_cond"], 16, 4, 4);
    let timesteps = &r["timestep"] * 1000.0;
    let modes = r["controlnet_mode"].reshape([-1]);
    let mut samples = Vec::new();
    for name in ["canny", "union"] {
        let net = FluxControlNet::load(&root.join("nets").join(name), Placement::cpu()).unwrap();
        assert_eq!(net.union_modes().is_some(), name == "union");
        let out = net
            .forward(
                &latents,
                &timesteps,
                &r["encoder_hidden_states"],
                Some(&r["pooled_projections"]),
                Some(&r["guidance"]),
                &net.embed(&control).unwrap(),
                net.union_modes().map(|_| &modes),
            )
            .unwrap();
        for (kind, got) in [("double", &out.double), ("single", &out.single)] {
            for (i, t) in got.iter().enumerate() {
                let key = format!("{name}.{kind}.{i}");
                common::assert_close(&key, t, &r[&key]);
            }
        }
        samples.push(out);
    }
    let dir = sd_models::ModelDir::open(common::model("flux-dev-tiny")).unwrap();
    let transformer = sd_models::Denoiser::load(&dir, Placement::cpu()).unwrap();
    let run = |control: Option<&FluxResiduals>| {
        let control = control.map(|c| {
            ControlResiduals::Flux(FluxResiduals {
                double: c.double.iter().map(|t| t.shallow_clone()).collect(),
                single: c.single.iter().map(|t| t.shallow_clone()).collect(),
            })
        });
        let out = transformer
            .forward(
                &latents,
                &timesteps,
                sd_models::Conditioning {
                    context: &r["encoder_hidden_states"],
                    pooled: Some(&r["pooled_projections"]),
                    time_ids: None,
                    guidance: Some(&r["guidance"]),
                    image: None,
                    control: control.as_ref(),
                    references: None,
                },
            )
            .unwrap();
        pack(&out)
    };
    let plain = run(None);
    common::assert_close("transformer.out.plain", &plain, &r["transformer.out.plain"]);
    for (name, s) in ["canny", "union"].iter().zip(&samples) {
        let key = format!("transformer.out.{name}");
        let got = run(Some(s));
        common::assert_close(&key, &got, &r[&key]);
        assert!(
            common::max_abs_diff(&got, &plain) > 1e-2,
            "{name}'s samples change the prediction"
        );
    }
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
            common::assert_refused(&e, field, says);
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

/// Fixture `model`'s denoising network and a store of its fixture
/// ControlNets, in process.
fn network_and_controlnets(
    model: &str,
) -> (sd_models::Denoiser, sd_service::control::ControlStore) {
    use sd_models::{Denoiser, ModelDir, Placement};
    let net = Denoiser::load(
        &ModelDir::open(common::model(model)).unwrap(),
        Placement::cpu(),
    )
    .unwrap();
    let args = sd_service::control::ControlArgs {
        controlnet_dir: Some(common::fixtures().join(format!("controlnet/{model}/nets"))),
        controlnet_cache_mb: 1024,
    };
    let store =
        sd_service::control::store(&args, net.control_base(), Placement::cpu(), None).unwrap();
    (net, store)
}

/// Four guided calls in one batched forward — a ControlNet at a weight,
/// the other with A1111's soft injection and no control on the
/// unconditional rows, both at once, and none — run the UNet once on all
/// eight rows, each ControlNet once on its rows; each call's prediction
/// equals its own forward's, and the controlled ones differ from the plain.
#[test]
fn mixed_controls_share_one_forward_and_each_call_equals_its_own() {
    use sd_service::compute::{forward_calls, Call, Half};
    use sd_service::control::Control;
    use tch::{Kind, Tensor};
    let (net, store) = network_and_controlnets("sd1-tiny");
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
            mode: None,
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

/// FLUX calls with ControlNets of different depths in one batched forward
/// — the shallow net, the deeper union with a control type, both on one
/// call (diffusers' merge), none, and a true-CFG call whose unconditional
/// rows take the prompt's samples — each equal to its own forward (the
/// forward lays the samples out per block, as the calls merge to
/// different counts), the controlled ones different from the plain.
#[test]
fn flux_controls_of_different_depths_share_one_forward() {
    use sd_service::compute::{forward_calls, Call, Half};
    use sd_service::control::Control;
    use tch::{Kind, Tensor};
    let (net, store) = network_and_controlnets("flux-dev-tiny");
    let f = (Kind::Float, tch::Device::Cpu);
    tch::manual_seed(11);
    let control = |name: &str, scale: f64, mode: Option<i64>| {
        let net = store.get(name, "test").unwrap();
        let hint = net.item.embed(&Tensor::randn([1, 16, 4, 4], f)).unwrap();
        Control {
            net,
            hint,
            scale,
            uncond_scale: scale,
            soft: false,
            mode,
        }
    };
    let half = || Half {
        context: Tensor::randn([1, 8, 32], f),
        pooled: Some(Tensor::randn([1, 32], f)),
        time_ids: None,
    };
    let call = |controls: Vec<Control>, true_cfg: bool| Call {
        latents: Tensor::randn([1, 16, 4, 4], f),
        timesteps: Tensor::from_slice(&[700.0f32]),
        cond: half(),
        uncond: true_cfg.then(half),
        guidance: if true_cfg { 4.0 } else { 1.0 },
        embedded_guidance: Some(3.5),
        image: None,
        loras: Default::default(),
        references: None,
        controls,
        ip: Vec::new(),
    };
    let calls = [
        call(vec![control("canny", 0.7, None)], false),
        call(vec![control("union", 0.8, Some(1))], false),
        call(
            vec![control("canny", 1.0, None), control("union", 0.5, Some(2))],
            false,
        ),
        call(Vec::new(), false),
        call(vec![control("canny", 1.0, None)], true),
    ];
    let refs: Vec<&Call> = calls.iter().collect();
    let together = forward_calls(&net, &refs).unwrap();
    for (i, c) in calls.iter().enumerate() {
        let alone = forward_calls(&net, &[c]).unwrap().remove(0);
        let d = common::max_abs_diff(&together[i], &alone);
        assert!(d < 1e-4, "call {i}: batched differs from alone by {d}");
    }
    for i in [0, 1, 2, 4] {
        let c = &calls[i];
        let clone = |h: &Half| Half {
            context: h.context.shallow_clone(),
            pooled: h.pooled.as_ref().map(Tensor::shallow_clone),
            time_ids: None,
        };
        let plain = Call {
            latents: c.latents.shallow_clone(),
            cond: clone(&c.cond),
            uncond: c.uncond.as_ref().map(clone),
            guidance: c.guidance,
            ..call(Vec::new(), false)
        };
        let p = forward_calls(&net, &[&plain]).unwrap().remove(0);
        let d = common::max_abs_diff(&together[i], &p);
        assert!(d > 1e-3, "call {i}: its controls changed nothing ({d})");
    }
}

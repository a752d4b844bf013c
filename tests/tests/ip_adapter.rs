//! IP-Adapters (image prompts) through sdserve: pictures prepared as
//! transformers' CLIPImageProcessor prepares them, read by the CLIP vision
//! encoder in the text-encoder service, projected and attended to by the
//! UNet's cross-attention beside the text — equal to diffusers'
//! `load_ip_adapter` + `set_ip_adapter_scale` on the tiny fixtures
//! (`make_ip_adapter_reference.py`: random adapters that change the
//! picture), one at a time and batched with a request without one; and
//! the pieces equal to transformers' and diffusers' own.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, IpAdapterUnit};
use tch::Tensor;

fn run(model: &str) {
    let dir = common::ip_adapter_dir(model);
    let inputs = common::fixtures().join("ip-adapter");
    let references = inputs.join(model);
    let stack = common::stack::Stack::start_with(
        &common::model(model),
        &["--ip-adapter-dir", dir.path().to_str().unwrap()],
    );
    let cases = common::e2e::load_cases(&references);
    assert!(cases.iter().any(|c| c.params.get("ip_adapters").is_none()));
    common::e2e::check_all_in(&stack.url, &cases, &inputs, &references, model);
}

#[test]
fn sd_image_prompts_match_diffusers_alone_and_batched() {
    run("sd1-tiny");
}

#[test]
fn sdxl_image_prompts_match_diffusers_alone_and_batched() {
    run("sdxl-tiny");
}

fn reference() -> HashMap<String, Tensor> {
    let path = common::fixtures()
        .join("ip-adapter")
        .join("encoder_reference.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

/// The gateway's preparation of a picture, the vision encoder and the
/// adapter's projection, each against the reference's own.
#[test]
fn pictures_embeddings_and_tokens_equal_the_references() {
    use sd_models::clip_vision::ClipVisionModel;
    use sd_models::ip_adapter::IpAdapter;
    use sd_models::Placement;
    let root = common::fixtures().join("ip-adapter");
    let r = reference();
    let encoder = ClipVisionModel::load(&root.join("image_encoder"), Placement::cpu()).unwrap();
    let p = encoder.preprocessing();
    let info = sd_proto::v1::ImageEncoderInfo {
        size: p.size as u32,
        mean: p.mean.to_vec(),
        std: p.std.to_vec(),
        ..Default::default()
    };
    for (i, file) in ["ref-a.png", "ref-b.png"].iter().enumerate() {
        let picture = image::open(root.join(file)).unwrap();
        let host = sd_gateway::ip::prepare(&picture, &info).unwrap();
        let got = Tensor::from_slice(&host.data).view([1, 3, p.size, p.size]);
        let want = r["pixel_values"].get(i as i64).unsqueeze(0);
        common::assert_close(&format!("{file}: pixels"), &got, &want);
        let embeds = encoder.forward(&want).unwrap();
        let want = r["image_embeds"].get(i as i64).unsqueeze(0);
        common::assert_close(&format!("{file}: image_embeds"), &embeds, &want);
    }
    for model in ["sd1-tiny", "sdxl-tiny"] {
        let unet = sd_models::ModelDir::open(common::model(model))
            .unwrap()
            .load_unet(Placement::cpu())
            .unwrap();
        let path = root.join(model).join("adapters").join("face.safetensors");
        let adapter = IpAdapter::load(&path, &unet, Placement::cpu()).unwrap();
        let tokens = adapter.project(&r["image_embeds"].unsqueeze(1)).unwrap();
        let want = &r[&format!("{model}_ip_tokens")];
        common::assert_close(&format!("{model}: tokens"), &tokens.view_as(want), want);
        let zeros = adapter
            .project(&r["uncond_image_embeds"].unsqueeze(1))
            .unwrap();
        let want = &r[&format!("{model}_uncond_ip_tokens")];
        common::assert_close(
            &format!("{model}: uncond tokens"),
            &zeros.view_as(want),
            want,
        );
    }
}

/// Adapters that cannot work are refused before any step, naming the field.
#[test]
fn bad_image_prompts_are_refused_by_field() {
    let dir = common::ip_adapter_dir("sd1-tiny");
    let root = common::fixtures().join("ip-adapter");
    let stack = common::stack::Stack::start_with(
        &common::model("sd1-tiny"),
        &["--ip-adapter-dir", dir.path().to_str().unwrap()],
    );
    let picture = std::fs::read(root.join("ref-a.png")).unwrap();
    let unit = IpAdapterUnit {
        name: "face".into(),
        image: picture.into(),
        ..Default::default()
    };
    let base = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        seed: Some(1),
        ..Default::default()
    };
    let bad = |f: &dyn Fn(&mut IpAdapterUnit)| {
        let mut u = unit.clone();
        f(&mut u);
        GenerateRequest {
            ip_adapters: vec![unit.clone(), u],
            ..base.clone()
        }
    };
    let cases = [
        (
            bad(&|u| u.name = "nothing".into()),
            "ip_adapters[1].name",
            "unknown IP-Adapter",
        ),
        (
            bad(&|u| u.scale = Some(9.0)),
            "ip_adapters[1].scale",
            "0..=2",
        ),
        (
            bad(&|u| u.image = b"text".to_vec().into()),
            "ip_adapters[1].image",
            "PNG",
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        for (req, field, says) in cases {
            let e = client.generate(req).await.unwrap_err();
            common::assert_refused(&e, field, says);
        }
        // Listed, and a good request still works.
        let listed = client
            .list_ip_adapters(sd_proto::v1::ListIpAdaptersRequest::default())
            .await
            .unwrap()
            .into_inner();
        let names: Vec<&str> = listed.ip_adapters.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["face", "style"]);
        client
            .generate(GenerateRequest {
                ip_adapters: vec![unit.clone()],
                ..base.clone()
            })
            .await
            .unwrap();
    });
}

/// The openai package's `ip_adapters` equals diffusers' reference;
/// webuiapi's ControlNetUnit with an IP-Adapter module equals gRPC's
/// request (tests/clients/ip_adapter_clients.py).
#[test]
fn openai_and_webuiapi_clients_send_image_prompts() {
    let dir = common::ip_adapter_dir("sd1-tiny");
    let root = common::fixtures().join("ip-adapter");
    let stack = common::stack::Stack::start_with(
        &common::model("sd1-tiny"),
        &["--ip-adapter-dir", dir.path().to_str().unwrap()],
    );
    let work = tempfile::tempdir().unwrap();
    let picture = std::fs::read(root.join("ref-a.png")).unwrap();
    // What the A1111 route asks for webuiapi's request.
    let req = GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        prompt_syntax: sd_proto::v1::PromptSyntax::A1111 as i32,
        steps: 6,
        seed: Some(3),
        guidance_scale: Some(7.0),
        scheduler: "euler".into(),
        width: 32,
        height: 32,
        ip_adapters: vec![IpAdapterUnit {
            name: "face".into(),
            image: picture.clone().into(),
            scale: Some(0.7),
            window_rule: sd_proto::v1::ControlWindowRule::A1111 as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a1111 = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        client.generate(req).await.unwrap().into_inner()
    });
    std::fs::write(work.path().join("a1111.png"), &a1111.images[0].data).unwrap();
    std::fs::write(work.path().join("ref.png"), &picture).unwrap();
    std::fs::copy(
        root.join("sd1-tiny").join("scale-0.png"),
        work.path().join("scale.png"),
    )
    .unwrap();
    common::run_client(
        "ip_adapter_clients.py",
        &[stack.http.as_ref(), work.path().as_os_str()],
    );
}

/// The web page in headless Chromium offers the served ControlNets and
/// IP-Adapters; each, chosen with its picture, gives diffusers' image
/// (tests/clients/web_page_controls.py).
#[test]
fn the_web_page_steers_with_a_controlnet_and_an_image_prompt() {
    let dir = common::ip_adapter_dir("sd1-tiny");
    let f = common::fixtures();
    let nets = f.join("controlnet/sd1-tiny/nets");
    let stack = common::stack::Stack::start_with(
        &common::model("sd1-tiny"),
        &[
            "--ip-adapter-dir",
            dir.path().to_str().unwrap(),
            "--controlnet-dir",
            nets.to_str().unwrap(),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("controlnet/control-sd1.png", "hint.png"),
        ("controlnet/sd1-tiny/weight-0.png", "controlnet.png"),
        ("ip-adapter/ref-a.png", "picture.png"),
        ("ip-adapter/sd1-tiny/scale-0.png", "ip.png"),
    ] {
        std::fs::copy(f.join(from), work.path().join(to)).unwrap();
    }
    common::run_client(
        "web_page_controls.py",
        &[stack.http.as_ref(), work.path().as_os_str()],
    );
}

//! LoRA per request: `sdctl up --lora-dir` serves the adapters in a
//! folder, requests name them with scales (gRPC `loras`, sdctl `--lora`,
//! A1111 `<lora:NAME:SCALE>` tags), and the images equal diffusers'
//! `load_lora_weights` + `set_adapters` for the same seed
//! (`tests/fixtures/make_lora.py`): kohya at 0.8, PEFT at 1.0, both
//! together, kohya's original block names, LoCon convolutions (3×3,
//! strided), the text encoder's and the UNet's scales apart (0.8 / 0.3) —
//! one at a time, and four
//! generations with different adapters (kohya 0.8, PEFT 1.0, none, kohya
//! 0.4) at once, so the denoiser runs them in shared forwards. Unknown
//! names and files that do not fit are refused naming them, before any
//! work; a request without LoRA after LoRA requests gives the base image.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::e2e::{assert_all_match, check_cases, compare, request, Case};
use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, ListLorasRequest, LoraRef, PromptSyntax};

#[derive(serde::Deserialize)]
struct Manifest {
    cases: Vec<Case>,
    together: Vec<String>,
}

fn dir() -> PathBuf {
    common::fixtures().join("lora")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(dir().join("cases.json")).expect("run make fixtures");
    serde_json::from_str(&text).unwrap()
}

/// The SDXL part of the LoRA fixtures: its model and cases.
#[derive(serde::Deserialize)]
struct Xl {
    xl_model: String,
    xl_cases: Vec<Case>,
}

fn xl_manifest() -> Xl {
    let text = std::fs::read_to_string(dir().join("cases.json")).expect("run make fixtures");
    serde_json::from_str(&text).unwrap()
}

/// A LoRA folder: the fixtures' files and two that do not fit the model.
fn lora_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("loras");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    // One kohya module (down, up) as a LoRA file of its own.
    let mk = |name: &str, stem: &str, down: [i64; 2], up: [i64; 2]| {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let (dk, uk) = (
            format!("{stem}.lora_down.weight"),
            format!("{stem}.lora_up.weight"),
        );
        let tensors = [
            (dk.as_str(), tch::Tensor::zeros(down, f)),
            (uk.as_str(), tch::Tensor::zeros(up, f)),
        ];
        tch::Tensor::write_safetensors(&tensors, d.join(format!("{name}.safetensors"))).unwrap();
    };
    // a module the model lacks (a fourth down block)
    mk(
        "misfit",
        "lora_unet_down_blocks_3_attentions_0_proj_in",
        [4, 32],
        [32, 4],
    );
    // the right module, the wrong width
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    mk("wrong-shape", q, [4, 999], [32, 4]);
    d
}

fn start(tmp: &Path) -> Stack {
    let model = common::fixtures().join("a1111/sd1-a1111");
    let loras = lora_dir(tmp);
    Stack::start_with(&model, &["--lora-dir", loras.to_str().unwrap()])
}

#[test]
fn loras_match_diffusers_alone_and_batched_together() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = start(tmp.path());
    let m = manifest();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = rt.block_on(check_cases(
        &stack.url,
        &m.cases,
        &dir(),
        &dir(),
        "lora",
        false,
    ));
    let together: Vec<Case> = m
        .together
        .iter()
        .map(|n| {
            let c = m.cases.iter().find(|c| &c.name == n).unwrap();
            Case {
                name: c.name.clone(),
                params: c.params.clone(),
                files: c.files.clone(),
            }
        })
        .collect();
    failures.extend(rt.block_on(check_cases(
        &stack.url,
        &together,
        &dir(),
        &dir(),
        "lora",
        true,
    )));
    // After all of that, no LoRA is the base image, exactly as before.
    let none = m.cases.iter().find(|c| c.name == "none").unwrap();
    failures.extend(rt.block_on(check_cases(
        &stack.url,
        std::slice::from_ref(none),
        &dir(),
        &dir(),
        "lora, last",
        false,
    )));
    assert_all_match(&failures);
    // An A1111 tag is the same adapter at the same scales; its text
    // encoder's and UNet's multipliers apart as A1111's Lora extension
    // reads them.
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        for (tag, case, unet_scale) in [
            ("<lora:kohya:0.8>", "kohya-0.8", None),
            ("<lora:kohya:0.8:0.3>", "kohya-te0.8-unet0.3", Some(0.3)),
            (
                "<lora:kohya:te=0.8:unet=0.3>",
                "kohya-te0.8-unet0.3",
                Some(0.3),
            ),
        ] {
            let c = m.cases.iter().find(|c| c.name == case).unwrap();
            let mut req: GenerateRequest = request(&c.params, &dir());
            req.loras.clear();
            req.prompt = format!("{tag}{}", req.prompt);
            req.prompt_syntax = PromptSyntax::A1111 as i32;
            let resp = client.generate(req).await.unwrap().into_inner();
            let params = resp.parameters.unwrap();
            assert_eq!(
                params.loras,
                vec![LoraRef {
                    name: "kohya".into(),
                    scale: 0.8,
                    unet_scale,
                }]
            );
            assert_eq!(
                params.prompt,
                c.params["prompt"].as_str().unwrap(),
                "the tag is taken out"
            );
            compare(tag, &resp.images[0].data, &dir().join(&c.files[0])).unwrap();
        }
    });
}

/// A LoRA file replaced under the same name is what later requests get,
/// its text-encoder part included: the prompt-embedding cache keys on the
/// file's version (size and modification time, as the denoiser lists it),
/// not only its name and scale.
#[test]
fn a_replaced_lora_file_is_read_again_prompt_embeddings_too() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = start(tmp.path());
    let m = manifest();
    let peft = m.cases.iter().find(|c| c.name == "peft-1.0").unwrap();
    let swap = tmp.path().join("loras/swap.safetensors");
    std::fs::copy(dir().join("kohya.safetensors"), &swap).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        // The PEFT case's request, its adapter named `swap`.
        let req = || {
            let mut r: GenerateRequest = request(&peft.params, &dir());
            r.loras = vec![LoraRef {
                name: "swap".into(),
                scale: 1.0,
                unet_scale: None,
            }];
            r
        };
        let first = client.generate(req()).await.unwrap().into_inner();
        assert!(
            compare(
                "kohya as swap",
                &first.images[0].data,
                &dir().join(&peft.files[0])
            )
            .is_err(),
            "the kohya adapter draws another image than the PEFT one"
        );
        // Replaced by the PEFT adapter; the services look at a file they
        // found unchanged again after a second.
        std::fs::copy(dir().join("peft.safetensors"), &swap).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let second = client.generate(req()).await.unwrap().into_inner();
        compare(
            "peft as swap",
            &second.images[0].data,
            &dir().join(&peft.files[0]),
        )
        .unwrap();
        let listed = client
            .list_loras(ListLorasRequest::default())
            .await
            .unwrap()
            .into_inner();
        let info = listed.loras.iter().find(|l| l.name == "swap").unwrap();
        // A check lists the checked adapters alone, with the same version.
        let checked = client
            .list_loras(ListLorasRequest {
                check: vec![LoraRef {
                    name: "swap".into(),
                    scale: 1.0,
                    unet_scale: None,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checked.loras, vec![info.clone()]);
        let bytes = std::fs::metadata(&swap).unwrap().len();
        assert_eq!(info.file_bytes, bytes);
        assert!(
            info.version.starts_with(&format!("{bytes}-")),
            "{}",
            info.version
        );
    });
    // sdctl loras lists the folder.
    let out = std::process::Command::new(common::stack::bin_dir().join("sdctl"))
        .args(["loras", "--gateway", &stack.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in ["kohya", "peft", "swap"] {
        assert!(names.contains(&name), "{listed}");
    }
}

#[test]
fn unknown_and_misfit_loras_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = start(tmp.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let listed = client
            .list_loras(ListLorasRequest::default())
            .await
            .unwrap()
            .into_inner();
        let names: Vec<&str> = listed.loras.iter().map(|l| l.name.as_str()).collect();
        for n in ["kohya", "kohya-sgm", "peft", "misfit"] {
            assert!(names.contains(&n), "{n} not listed: {names:?}");
        }
        let refused = |loras: Vec<(&'static str, f32)>| {
            let mut client = client.clone();
            async move {
                let req = GenerateRequest {
                    prompt: "a cat".into(),
                    steps: 2,
                    seed: Some(1),
                    loras: loras
                        .into_iter()
                        .map(|(n, s)| LoraRef {
                            name: n.into(),
                            scale: s,
                            unet_scale: None,
                        })
                        .collect(),
                    ..Default::default()
                };
                let e = client.generate(req).await.unwrap_err();
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
                e.message().to_string()
            }
        };
        let m = refused(vec![("kohya", 0.5), ("no-such-style", 1.0)]).await;
        assert!(
            m.contains("loras[1].name") && m.contains("no-such-style"),
            "{m}"
        );
        let m = refused(vec![("misfit", 1.0)]).await;
        assert!(m.contains("misfit") && m.contains("down_blocks_3"), "{m}");
        let m = refused(vec![("wrong-shape", 1.0)]).await;
        assert!(m.contains("wrong-shape") && m.contains("999"), "{m}");
        let m = refused(vec![("../etc/passwd", 1.0)]).await;
        assert!(m.contains("loras"), "{m}");
        let m = refused(vec![("kohya", 1.0), ("kohya", 0.5)]).await;
        assert!(m.contains("twice"), "{m}");
        let m = refused(vec![("kohya", f32::NAN)]).await;
        assert!(m.contains("scale"), "{m}");
    });
}

/// An SDXL LoRA in kohya's SDXL naming (`lora_te1_`, `lora_te2_`, the UNet
/// in the original block names) equals diffusers on an SDXL-style model
/// whose two text encoders differ in width.
#[test]
fn an_sdxl_kohya_lora_matches_diffusers() {
    let m = xl_manifest();
    let model = common::fixtures().join(&m.xl_model);
    let stack = Stack::start_with(&model, &["--lora-dir", dir().to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut failures = rt.block_on(check_cases(
        &stack.url,
        &m.xl_cases,
        &dir(),
        &dir(),
        "xl",
        false,
    ));
    failures.extend(rt.block_on(check_cases(
        &stack.url,
        &m.xl_cases,
        &dir(),
        &dir(),
        "xl",
        true,
    )));
    assert_all_match(&failures);
}

/// The text encoder service applies an SDXL LoRA's `lora_te1_` and
/// `lora_te2_` parts as diffusers does: hidden states of both encoders and
/// the pooled embedding equal `encode_prompt` with the adapter set.
#[test]
fn the_text_encoder_applies_both_sdxl_encoders_parts() {
    use common::procs::Proc;
    use sd_proto::v1::text_encoder_client::TextEncoderClient;
    use sd_proto::v1::EncodeTextRequest;
    use sd_proto::wire::HostTensor;
    let m = xl_manifest();
    let case = m
        .xl_cases
        .iter()
        .find(|c| c.name == "xl-kohya-0.7")
        .unwrap();
    let want: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir().join("xl-kohya-0.7-text.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let model = common::fixtures().join(&m.xl_model);
    let p = Proc::spawn(
        "sd-text-encoder",
        &[
            "--model".into(),
            model.to_string_lossy().into_owned(),
            "--lora-dir".into(),
            dir().to_string_lossy().into_owned(),
        ],
        &[],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        p.wait_serving(std::time::Duration::from_secs(60)).await;
        let mut c = TextEncoderClient::connect(p.url()).await.unwrap();
        let out = c
            .encode(EncodeTextRequest {
                prompts: vec![case.params["prompt"].as_str().unwrap().to_string()],
                loras: vec![LoraRef {
                    name: "xl-kohya".into(),
                    scale: 0.7,
                    unet_scale: None,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let t = |w: &sd_proto::v1::Tensor| {
            let h = HostTensor::from_wire(w).unwrap();
            tch::Tensor::from_slice(&h.data).reshape(&h.shape)
        };
        let got = &out.prompts[0];
        common::assert_close(
            "hidden",
            &t(got.embeddings.as_ref().unwrap()),
            &want["hidden"],
        );
        common::assert_close("pooled", &t(got.pooled.as_ref().unwrap()), &want["pooled"]);
    });
}

/// Through the HTTP door: the OpenAI extension field `loras` and A1111's
/// `<lora:NAME:SCALE>` prompt tag give diffusers' LoRA image, and
/// `/sdapi/v1/loras` lists the folder.
#[test]
fn loras_through_the_openai_and_a1111_apis() {
    use common::raw::{exchange, host_port, post_json};
    let tmp = tempfile::tempdir().unwrap();
    let stack = start(tmp.path());
    let m = manifest();
    let case = m.cases.iter().find(|c| c.name == "kohya-0.8").unwrap();
    let p = &case.params;
    let png = |b64: &serde_json::Value| {
        sd_gateway::http::decode_base64("image", b64.as_str().expect("a base64 image")).unwrap()
    };
    // The OpenAI field with the text encoder's and the UNet's scales apart.
    let split = m
        .cases
        .iter()
        .find(|c| c.name == "kohya-te0.8-unet0.3")
        .unwrap();
    let q = &split.params;
    assert!(q["loras"][0]["unet_scale"].is_number());
    let openai = serde_json::json!({
        "prompt": q["prompt"], "negative_prompt": q["negative_prompt"], "steps": q["steps"],
        "seed": q["seed"], "guidance_scale": q["guidance"], "loras": q["loras"],
        "response_format": "b64_json",
    });
    let (status, v) = post_json(&stack.http, "/v1/images/generations", &openai.to_string());
    assert_eq!(status, 200, "{v}");
    compare(
        "openai loras",
        &png(&v["data"][0]["b64_json"]),
        &dir().join(&split.files[0]),
    )
    .unwrap();
    let a1111 = serde_json::json!({
        "prompt": format!("<lora:kohya:0.8>{}", p["prompt"].as_str().unwrap()),
        "negative_prompt": p["negative_prompt"], "steps": p["steps"], "seed": p["seed"],
        "cfg_scale": p["guidance"], "sampler_name": "PLMS", "width": 32, "height": 32,
    });
    let (status, v) = post_json(&stack.http, "/sdapi/v1/txt2img", &a1111.to_string());
    assert_eq!(status, 200, "{v}");
    compare(
        "a1111 <lora:> tag",
        &png(&v["images"][0]),
        &dir().join(&case.files[0]),
    )
    .unwrap();
    let (status, v) = post_json(
        &stack.http,
        "/v1/images/generations",
        r#"{"prompt": "x", "loras": [{"name": "nope", "scale": 1}]}"#,
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("nope"), "{v}");
    let (status, v) = post_json(
        &stack.http,
        "/v1/images/generations",
        r#"{"prompt": "x", "loras": [{"name": "kohya", "scale": 1, "unet_scale": 11}]}"#,
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("unet_scale"), "{v}");
    let get = format!(
        "GET /sdapi/v1/loras HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host_port(&stack.http)
    );
    let (status, v) = exchange(&stack.http, get.as_bytes());
    assert_eq!(status, 200, "{v}");
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert!(
        names.contains(&"kohya") && names.contains(&"peft"),
        "{names:?}"
    );
}

//! Several models behind one gateway: `sdctl up --model A --model B` runs
//! each model's services and a gateway routing to both (`--model-route`);
//! `ListModels` lists both, a request's `model` picks one (an unknown name
//! is INVALID_ARGUMENT listing what is served), and each model's images
//! equal diffusers' for it — one at a time and with both models busy at
//! once (the denoisers batch only within their own model).

#![allow(clippy::unwrap_used)]

mod common;

use common::e2e::{assert_all_match, check_cases, Case};
use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, ListLorasRequest, ListModelsRequest};

#[derive(serde::Deserialize)]
struct Manifest {
    models: std::collections::HashMap<String, Vec<Case>>,
}

/// Two e2e cases of `model`, asking for it by name.
fn cases(m: &Manifest, model: &str) -> Vec<Case> {
    m.models[model]
        .iter()
        .filter(|c| c.name == "negative" || c.name == "guidance-1")
        .map(|c| {
            let mut params = c.params.clone();
            params["model"] = model.into();
            Case {
                name: format!("{model}/{}", c.name),
                params,
                files: c.files.iter().map(|f| format!("{model}/{f}")).collect(),
            }
        })
        .collect()
}

#[test]
fn two_models_behind_one_gateway() {
    let fixtures = common::fixtures();
    let e2e = fixtures.join("e2e");
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(e2e.join("cases.json")).unwrap()).unwrap();
    let (sd1, sd2) = (fixtures.join("sd1-tiny"), fixtures.join("sd2-tiny"));
    let stack = Stack::start_with(&sd1, &["--model", sd2.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let listed = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sd1-tiny", "sd2-tiny"]);
        assert_eq!(listed.models[1].prediction_type, "v_prediction");
        let e = c
            .generate(GenerateRequest {
                prompt: "a cat".into(),
                model: "sd3".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("sd1-tiny") && e.message().contains("sd2-tiny"),
            "{}",
            e.message()
        );
        // Each model's adapters; an unknown model is refused naming it.
        for model in ["", "sd2-tiny"] {
            c.list_loras(ListLorasRequest {
                model: model.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let e = c
            .list_loras(ListLorasRequest {
                model: "sd3".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("model"), "{}", e.message());
        // The A1111 list takes the model too (sdserve's ?model=).
        use common::raw::{exchange, host_port};
        for (query, ok) in [("sd2-tiny", true), ("sd3", false)] {
            let get = format!(
                "GET /sdapi/v1/loras?model={query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                host_port(&stack.http)
            );
            let (status, v) = exchange(&stack.http, get.as_bytes());
            assert_eq!(status == 200, ok, "{query}: {status} {v}");
        }
    });
    let all: Vec<Case> = cases(&m, "sd1-tiny")
        .into_iter()
        .chain(cases(&m, "sd2-tiny"))
        .collect();
    let mut failures = rt.block_on(check_cases(&stack.url, &all, &e2e, &e2e, "models", false));
    failures.extend(rt.block_on(check_cases(&stack.url, &all, &e2e, &e2e, "models", true)));
    assert_all_match(&failures);
}

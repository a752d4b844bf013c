//! End to end: real processes on free ports (`sdctl up`), requests through
//! the gateway, PNGs compared with what diffusers generates for the same
//! parameters and seed (`tests/fixtures/make_e2e_reference.py`).

#![allow(clippy::unwrap_used)]

mod common;

use common::stack::Stack;
use sd_proto::v1::generation_client::GenerationClient;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    params: serde_json::Value,
    files: Vec<String>,
}

#[derive(Deserialize)]
struct Manifest {
    models: std::collections::HashMap<String, Vec<Case>>,
}

fn run_model(model: &str) {
    let fixtures = common::fixtures();
    let e2e = fixtures.join("e2e");
    let manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(e2e.join("cases.json")).expect("run make fixtures"),
    )
    .unwrap();
    let cases = &manifest.models[model];
    let stack = Stack::start(&fixtures.join(model));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let failures: Vec<String> = rt.block_on(async {
        let mut client = GenerationClient::connect(stack.url.clone()).await.unwrap();
        let mut failures = Vec::new();
        for case in cases {
            let resp = match client
                .generate(common::e2e::request(&case.params, &e2e))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    failures.push(format!("{}: {:?} {}", case.name, s.code(), s.message()));
                    continue;
                }
            };
            assert_eq!(
                resp.images.len(),
                case.files.len(),
                "{}: image count",
                case.name
            );
            let params = resp.parameters.unwrap();
            assert_eq!(Some(params.seed), case.params["seed"].as_u64());
            for (img, file) in resp.images.iter().zip(&case.files) {
                if let Err(e) = common::e2e::compare(
                    &format!("{model}/{file}"),
                    &img.data,
                    &e2e.join(model).join(file),
                ) {
                    failures.push(e);
                }
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sd1_epsilon_model_matches_diffusers_images() {
    run_model("sd1-tiny");
}

#[test]
fn sd2_v_prediction_model_matches_diffusers_images() {
    run_model("sd2-tiny");
}

//! End to end: real processes on free ports (`sdctl up`), requests through
//! the gateway, PNGs compared with what diffusers generates for the same
//! parameters and seed (`tests/fixtures/make_e2e_reference.py`).

#![allow(clippy::unwrap_used)]

mod common;

use common::e2e::{assert_all_match, check_cases, Case};
use common::stack::Stack;
use serde::Deserialize;

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
    let failures = rt.block_on(check_cases(
        &stack.url,
        cases,
        &e2e,
        &e2e.join(model),
        model,
        false,
    ));
    assert_all_match(&failures);
}

#[test]
fn sd1_epsilon_model_matches_diffusers_images() {
    run_model("sd1-tiny");
}

#[test]
fn sd2_v_prediction_model_matches_diffusers_images() {
    run_model("sd2-tiny");
}

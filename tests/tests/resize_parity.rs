//! The gateway's init-image resize gives Pillow's pixels: diffusers resizes
//! init images with `PIL.Image.resize(size, LANCZOS)` before its VAE sees
//! them (`tests/fixtures/make_resize_reference.py`).

#![allow(clippy::unwrap_used)]

mod common;

use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    source: String,
    width: u32,
    height: u32,
    want: String,
}

#[derive(Deserialize)]
struct Manifest {
    pillow: String,
    cases: Vec<Case>,
}

#[test]
fn init_image_resize_matches_pillow_lanczos_exactly() {
    let dir = common::fixtures().join("resize");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &manifest.cases {
        let src = image::open(dir.join(&case.source)).unwrap().to_rgb8();
        let want = image::open(dir.join(&case.want)).unwrap().to_rgb8();
        let got = sd_gateway::resample::resize_lanczos(&src, case.width, case.height);
        assert_eq!(got.dimensions(), want.dimensions(), "{}", case.want);
        let differ = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        if differ > 0 {
            let worst = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            failures.push(format!(
                "{}: {differ} samples differ (max {worst})",
                case.want
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "differs from Pillow {}:\n{}",
        manifest.pillow,
        failures.join("\n")
    );
}

//! The sampling references committed for crates/sd-sampling's tests (which
//! run without the venv) are current: the same script made them as made
//! the fixtures, and its numbers agree with a fresh run of diffusers here.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::Value;

fn load(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Walk two JSON documents together; numbers may differ by `tol` relative
/// (torch's vectorised math differs by a few ulps between CPUs).
fn close(a: &Value, b: &Value, path: &str, tol: f64) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{path}: committed {x}, fresh {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: lengths differ");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                close(x, y, &format!("{path}[{i}]"), tol);
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            let kx: Vec<_> = x.keys().collect();
            let ky: Vec<_> = y.keys().collect();
            assert_eq!(kx, ky, "{path}: keys differ");
            for (k, v) in x {
                close(v, &y[k], &format!("{path}.{k}"), tol);
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

#[test]
fn the_committed_sampling_reference_is_current() {
    let committed = load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/sd-sampling/tests/data/sampling_reference.json"),
    );
    let fresh = load(&common::fixtures().join("sampling_reference.json"));
    assert_eq!(
        committed["digest"], fresh["digest"],
        "tests/fixtures/make_sampling_reference.py changed: regenerate the committed copy \
         (python tests/fixtures/make_sampling_reference.py crates/sd-sampling/tests/data)"
    );
    close(&committed, &fresh, "", 1e-5);
}

//! Fixtures and tensor comparison shared by the integration tests.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

pub mod e2e;
pub mod families;
pub mod procfs;
pub mod procs;
pub mod raw;
pub mod stack;

use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;

/// Where `make fixtures` writes the tiny pipelines (`SD_FIXTURES`, default
/// `target/sd-fixtures` in the workspace).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("SD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/sd-fixtures"));
    assert!(
        dir.join("STAMP").is_file(),
        "fixtures missing in {}: run `make fixtures` (or `make test`)",
        dir.display()
    );
    dir
}

/// The project venv's Python (`make setup` makes it; `VIRTUAL_ENV` when
/// set), with the reference implementation and the third-party clients.
pub fn python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
        .join("bin/python")
}

/// Run `tests/clients/SCRIPT` with the venv's Python and `args`; panic
/// with its output unless it succeeds. Its stdout, for reports.
pub fn run_client(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(script);
    let out = std::process::Command::new(python())
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn model(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// `--ip-adapter-dir` for fixture `model`: its IP-Adapters and the image
/// encoder beside them, as the adapters are published.
pub fn ip_adapter_dir(model: &str) -> tempfile::TempDir {
    let root = fixtures().join("ip-adapter");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("image_encoder"), dir.path().join("image_encoder"))
        .unwrap();
    for e in std::fs::read_dir(root.join(model).join("adapters")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// The reference tensors diffusers/transformers computed for a fixture.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = model(name).join("reference.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The bound for CPU fp32 parity. The same libtorch kernels run on
/// both sides, so real differences come only from op order (SDPA vs manual
/// softmax, fused vs split adds) and stay near 1e-6; 1e-4 leaves headroom
/// while still catching any wrong layer, norm or scale (those move outputs by
/// 1e-2 or more on these random weights).
pub const TOL: f64 = 1e-4;

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let d = max_abs_diff(got, want);
    let scale = want.abs().max().double_value(&[]);
    eprintln!("{what}: max |diff| = {d:.3e} (max |ref| = {scale:.3e})");
    assert!(d <= TOL, "{what}: max |diff| {d:.3e} exceeds {TOL:e}");
}

/// A refusal as a client reads it: INVALID_ARGUMENT, its message naming
/// `field` and saying `says`.
pub fn assert_refused(e: &tonic::Status, field: &str, says: &str) {
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

/// Zeros of `shape` as a float32 wire tensor.
pub fn wire_zeros(shape: &[i64]) -> sd_proto::v1::Tensor {
    let n = shape.iter().product::<i64>() as usize;
    sd_proto::wire::HostTensor::new(shape.to_vec(), vec![0.0; n])
        .unwrap()
        .to_wire(sd_proto::v1::Dtype::Float32)
}

/// A `w × h` PNG of a colour gradient.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

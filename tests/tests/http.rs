//! The HTTP door of a live stack: the official `openai` client and the
//! PyPI `webuiapi` client work unchanged (tests/clients/http_clients.py),
//! the web page works in headless Chromium (tests/clients/web_page.py),
//! and bad input — malformed JSON, wrong types, oversized bodies, bad
//! base64, unknown samplers, sizes off the VAE's grid, missing keys, a
//! slow client — gets its status and names its field.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::{exchange, host_port, post, post_json};
use common::stack::Stack;

fn stack(extra: &[&str]) -> Stack {
    let mut flags = vec![
        "--gateway-arg=--max-steps=1000",
        // The long generations that progress, interrupt and cancel are
        // seen on must not be refused on a loaded machine, where the
        // denoiser's measured cost predicts them slow.
        "--gateway-arg=--max-request-seconds=36000",
        "--gateway-arg=--http-read-timeout-secs=1",
        "--gateway-arg=--http-max-body-bytes=200000",
    ];
    flags.extend_from_slice(extra);
    Stack::start_with(&common::model("sd1-tiny"), &flags)
}

fn param(v: &serde_json::Value) -> Option<&str> {
    v["error"]["param"].as_str()
}

#[test]
fn the_official_openai_and_webuiapi_clients_work_unchanged() {
    let stack = stack(&[]);
    common::run_client(
        "http_clients.py",
        &[stack.http.as_ref(), "sd1-tiny".as_ref()],
    );
}

/// (path, body, status, the field named).
fn bad_input_cases() -> Vec<(&'static str, String, u16, Option<&'static str>)> {
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(300_000));
    vec![
        (
            "/v1/images/generations",
            "{not json".into(),
            400,
            Some("body"),
        ),
        ("/v1/images/generations", "[1, 2]".into(), 400, Some("body")),
        (
            "/v1/images/generations",
            r#"{"prompt": 7}"#.into(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "n": "two"}"#.into(),
            400,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "size": "63x64"}"#.into(),
            400,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "steps": 0}"#.into(),
            400,
            Some("steps"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "model": "sd-9"}"#.into(),
            404,
            None,
        ),
        ("/v1/images/generations", big, 413, Some("body")),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "sampler_name": "Nope"}"#.into(),
            404,
            Some("sampler_name"),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "width": 66}"#.into(),
            400,
            Some("width"),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "enable_hr": true, "hr_scale": 9}"#.into(),
            400,
            Some("hr_scale"),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "a [cat:dog:0.5]"}"#.into(),
            400,
            Some("prompt"),
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "cfg_scale": "high"}"#.into(),
            400,
            Some("cfg_scale"),
        ),
        (
            "/sdapi/v1/img2img",
            r#"{"prompt": "x", "init_images": ["@@@"]}"#.into(),
            400,
            Some("init_images"),
        ),
        (
            "/sdapi/v1/img2img",
            r#"{"prompt": "x"}"#.into(),
            400,
            Some("init_images"),
        ),
        (
            "/sdapi/v1/img2img",
            r#"{"prompt": "x", "init_images": ["aGk="]}"#.into(),
            400,
            Some("init_images"),
        ),
        (
            "/sdapi/v1/options",
            r#"{"sd_model_checkpoint": "other"}"#.into(),
            400,
            Some("sd_model_checkpoint"),
        ),
    ]
}

#[test]
fn the_web_page_works_in_headless_chromium() {
    // A LoRA folder with one adapter for sd1-tiny, for the page's picker.
    let loras = tempfile::tempdir().unwrap();
    let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let f = (tch::Kind::Float, tch::Device::Cpu);
    let (down, up) = (
        format!("{stem}.lora_down.weight"),
        format!("{stem}.lora_up.weight"),
    );
    let tensors = [
        (down.as_str(), tch::Tensor::randn([4, 32], f)),
        (up.as_str(), tch::Tensor::randn([32, 4], f)),
    ];
    tch::Tensor::write_safetensors(&tensors, loras.path().join("ink.safetensors")).unwrap();
    let dir = format!("--lora-dir={}", loras.path().display());
    let stack = stack(&[&dir]);
    common::run_client("web_page.py", &[stack.http.as_ref(), "32".as_ref()]);
}

#[test]
fn bad_http_input_gets_its_status_and_names_its_field() {
    let stack = stack(&[]);
    let base = stack.http.as_str();
    for (path, body, status, field) in bad_input_cases() {
        let (got, v) = post_json(base, path, &body);
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{path} {shown}: {v}");
        assert_eq!(param(&v), field, "{path} {shown}: {v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    }
    let (got, v) = exchange(
        base,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(got, 404, "{v}");
}

#[test]
fn a_slow_client_is_cut_off() {
    let stack = stack(&[]);
    let base = stack.http.as_str();
    // Headers that never finish: the connection is closed.
    let mut s = TcpStream::connect(host_port(base)).unwrap();
    s.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "headers never timed out"
    );
    // A body that never finishes: 408.
    let mut s = TcpStream::connect(host_port(base)).unwrap();
    s.write_all(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\
          Content-Type: application/json\r\n\r\n{\"prompt\"",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // The door still serves.
    let (got, _) = exchange(
        base,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(got, 200);
}

#[test]
fn api_keys_guard_the_http_door_as_they_guard_grpc() {
    let dir = std::env::temp_dir().join(format!("sd-http-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "s3cret\n").unwrap();
    let flag = format!("--gateway-arg=--api-keys-file={}", keys.display());
    let stack = stack(&[flag.as_str()]);
    let base = stack.http.as_str();
    let body = r#"{"prompt": "a cat", "size": "64x64", "steps": 2}"#;
    let (got, v) = post_json(base, "/v1/images/generations", body);
    assert_eq!(got, 401, "{v}");
    let (got, v) = post(
        base,
        "/v1/images/generations",
        "Authorization: Bearer nope\r\n",
        body.as_bytes(),
    );
    assert_eq!(got, 401, "{v}");
    let (got, v) = post(
        base,
        "/v1/images/generations",
        "Authorization: Bearer s3cret\r\n",
        body.as_bytes(),
    );
    assert_eq!(got, 200, "{v}");
    assert!(v["data"][0]["b64_json"]
        .as_str()
        .is_some_and(|s| s.len() > 100));
    // A1111 clients send HTTP Basic: the key is the password.
    let (got, _) = post(
        base,
        "/sdapi/v1/txt2img",
        "Authorization: Basic dXNlcjpzM2NyZXQ=\r\n",
        br#"{"prompt": "a cat", "width": 64, "height": 64, "steps": 2}"#,
    );
    assert_eq!(got, 200);
    let (got, _) = exchange(
        base,
        b"GET /sdapi/v1/sd-models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(got, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

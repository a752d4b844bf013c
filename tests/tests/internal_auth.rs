//! Internal traffic: with a shared internal token, every model service
//! refuses a call that lacks it or brings a wrong one (UNAUTHENTICATED),
//! serves one that brings it, and leaves health and reflection open for
//! probes; the gateway sends it on every call; `sdctl up` makes one per
//! stack and gives it to its children in their environment, never on their
//! command line. Reflection answers in both versions (v1 and v1alpha).

#![allow(clippy::unwrap_used)]
// Scenarios against running processes, read top to bottom; the 100-line
// limit is for non-test code.
#![allow(clippy::too_many_lines)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::procfs::{children, cmdline, environ};
use common::procs::{Cluster, ClusterOptions, Proc};
use common::stack::{bin_dir, Stack};
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfoRequest, DenoiserInfoRequest, EncodeTextRequest, GenerateRequest,
    PredictRequest, TextEncoderInfoRequest,
};
use sd_proto::INTERNAL_TOKEN_ENV;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TOKEN: &str = "test-internal-token-0123456789abcdef";

async fn channel(url: String) -> Channel {
    tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A request with `authorization: Bearer <token>` when given.
fn bearer<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn small(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        steps: 2,
        seed: Some(3),
        ..Default::default()
    }
}

/// The services reflection lists, asked with the v1alpha client (what
/// grpcio's reflection client speaks) and with v1 (grpcurl); both must
/// agree. A v1alpha answer also describes the service's file.
async fn reflected_services(ch: Channel, service: &str) -> Vec<String> {
    use tonic_reflection::pb::{v1, v1alpha};
    let alpha = {
        use v1alpha::server_reflection_client::ServerReflectionClient;
        use v1alpha::server_reflection_request::MessageRequest;
        use v1alpha::server_reflection_response::MessageResponse;
        let ask = |m| v1alpha::ServerReflectionRequest {
            message_request: Some(m),
            ..Default::default()
        };
        let mut answers = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter([
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(service.into())),
            ]))
            .await
            .unwrap()
            .into_inner();
        let listed = match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("v1alpha: {other:?}"),
        };
        match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                assert!(!f.file_descriptor_proto.is_empty(), "{service}");
            }
            other => panic!("v1alpha describing {service}: {other:?}"),
        }
        listed
    };
    let v1 = {
        use v1::server_reflection_client::ServerReflectionClient;
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let req = v1::ServerReflectionRequest {
            message_request: Some(MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut answers = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("v1: {other:?}"),
        }
    };
    let (mut a, mut b) = (alpha.clone(), v1);
    a.sort();
    b.sort();
    assert_eq!(a, b, "v1alpha and v1 list different services");
    alpha
}

/// Health answers without any token.
async fn serving_without_token(ch: Channel) -> bool {
    let h = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    h.into_inner().status == 1
}

/// The denoiser refuses `token` on a unary call and on a step stream.
async fn denoiser_refuses(ch: Channel, token: Option<&str>) {
    let mut c = DenoiserClient::new(ch);
    let e = c
        .info(bearer(DenoiserInfoRequest {}, token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
    assert!(e.message().len() < 100, "{}", e.message());
    assert!(!e.message().contains(TOKEN));
    let steps = tokio_stream::iter([PredictRequest::default()]);
    let e = match c.predict_stream(bearer(steps, token)).await {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unauthenticated, "stream {token:?}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_services_require_the_token_and_the_gateway_sends_it() {
    let env = vec![(INTERNAL_TOKEN_ENV, TOKEN.to_string())];
    let cluster = Cluster::start(
        &common::model("sd1-tiny"),
        ClusterOptions {
            env,
            ..Default::default()
        },
    )
    .await;

    // The gateway passes the token on every hop (text, steps, decode).
    let mut g = GenerationClient::new(channel(cluster.gateway.url()).await);
    let r = g.generate(small("a guarded lighthouse")).await.unwrap();
    assert_eq!(r.into_inner().images.len(), 1);

    // Each model service: health without a token; a call without the token
    // or with a wrong one refused; with it, served.
    let den = channel(cluster.denoisers[0].url()).await;
    assert!(serving_without_token(den.clone()).await);
    for bad in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        denoiser_refuses(den.clone(), bad).await;
    }
    let info = DenoiserClient::new(den.clone())
        .info(bearer(DenoiserInfoRequest {}, Some(TOKEN)))
        .await
        .unwrap();
    assert_eq!(info.into_inner().latent_channels, 4);

    let text = channel(cluster.text.url()).await;
    assert!(serving_without_token(text.clone()).await);
    let mut t = TextEncoderClient::new(text.clone());
    let encode = || EncodeTextRequest {
        prompts: vec!["x".into()],
        ..Default::default()
    };
    let e = t.encode(bearer(encode(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = t
        .info(bearer(TextEncoderInfoRequest {}, Some(&TOKEN[1..])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    t.encode(bearer(encode(), Some(TOKEN))).await.unwrap();

    let ae = channel(cluster.autoencoder.url()).await;
    assert!(serving_without_token(ae.clone()).await);
    let mut a = sd_proto::v1::autoencoder_client::AutoencoderClient::new(ae.clone());
    let e = a
        .info(bearer(AutoencoderInfoRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    a.info(bearer(AutoencoderInfoRequest {}, Some(TOKEN)))
        .await
        .unwrap();

    // Reflection stays open, in both versions, on every server.
    for (ch, service) in [
        (den, "sd.v1.Denoiser"),
        (text, "sd.v1.TextEncoder"),
        (ae, "sd.v1.Autoencoder"),
        (channel(cluster.gateway.url()).await, "sd.v1.Generation"),
    ] {
        let mut listed = reflected_services(ch, service).await;
        listed.sort();
        let mut want = vec![
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        want.sort();
        assert_eq!(listed, want, "{service}: only what it serves");
    }

    // The token was never on a command line.
    for p in [&cluster.text, &cluster.denoisers[0], &cluster.autoencoder] {
        assert!(!cmdline(p.pid()).contains(TOKEN));
    }

    // A gateway with a wrong token gives up at start at once, rather than
    // waiting for services that will never let it in.
    let url = |p: &Proc| p.url();
    let mut wrong = Proc::spawn(
        "sd-gateway",
        &[
            "--text-encoder".into(),
            url(&cluster.text),
            "--denoiser".into(),
            url(&cluster.denoisers[0]),
            "--autoencoder".into(),
            url(&cluster.autoencoder),
        ],
        &[(INTERNAL_TOKEN_ENV, "not-the-token-0123456789".into())],
    );
    let status = wrong.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(status, Some(s) if !s.success()),
        "a gateway with the wrong token: {status:?}"
    );
}

/// The value after `flag` on a command line.
fn flag_value(cmdline: &str, flag: &str) -> Option<String> {
    let mut words = cmdline.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next().map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdctl_up_gives_each_stack_a_token_in_the_environment_only() {
    let stack = Stack::start(&common::model("sd1-tiny"));
    let mut g = GenerationClient::new(channel(stack.url.clone()).await);
    let r = g.generate(small("a stack of one's own")).await.unwrap();
    assert_eq!(r.into_inner().images.len(), 1);

    let kids = children(stack.pid());
    assert_eq!(kids.len(), 4, "three model services and the gateway");
    let tokens: Vec<String> = kids
        .iter()
        .map(|&k| environ(k, INTERNAL_TOKEN_ENV).expect("the token in each child's environment"))
        .collect();
    let token = tokens[0].clone();
    assert!(tokens.iter().all(|t| *t == token), "one token per stack");
    assert!(token.len() >= 32, "a random token: {} bytes", token.len());
    let lines: Vec<String> = kids.iter().map(|&k| cmdline(k)).collect();
    for line in &lines {
        assert!(
            !line.contains(&token),
            "the token on a command line: {line}"
        );
    }

    // The model services behind this stack refuse a caller without it.
    let gateway = lines
        .iter()
        .find(|l| l.contains("--denoiser"))
        .expect("the gateway's command line");
    let den = flag_value(gateway, "--denoiser").unwrap();
    let den = channel(den.split(',').next().unwrap().to_string()).await;
    denoiser_refuses(den.clone(), None).await;
    DenoiserClient::new(den)
        .info(bearer(DenoiserInfoRequest {}, Some(&token)))
        .await
        .unwrap();

    // Another stack, another token.
    let other = Stack::start(&common::model("sd1-tiny"));
    let other_token = children(other.pid())
        .first()
        .and_then(|&k| environ(k, INTERNAL_TOKEN_ENV))
        .unwrap();
    assert_ne!(other_token, token);
}

#[test]
fn secrets_on_the_command_line_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |bin: &str, args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(bin_dir().join(bin));
        c.args(args).args(["--listen", "127.0.0.1:0"]);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{bin} {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // API keys on argv: refused, pointing at the file and the environment.
    let err = run("sd-gateway", &["--api-keys", "k-argv-secret"], &[]);
    assert!(
        err.contains("--api-keys-file") && err.contains("SD_API_KEYS"),
        "{err}"
    );
    assert!(!err.contains("k-argv-secret"), "{err}");
    // The internal token has no argv flag at all.
    let err = run(
        "sd-text-encoder",
        &["--model", "/nonexistent", "--internal-token", TOKEN],
        &[],
    );
    assert!(err.contains("--internal-token"), "{err}");
    // A token file and the variable both: which one? Refused.
    let file = dir.path().join("token");
    std::fs::write(&file, TOKEN).unwrap();
    let file = file.to_string_lossy().into_owned();
    let err = run(
        "sd-text-encoder",
        &["--model", "/nonexistent", "--internal-token-file", &file],
        &[(INTERNAL_TOKEN_ENV, TOKEN)],
    );
    assert!(err.contains("one way"), "{err}");
    // A token too short to be a secret, refused without being echoed.
    std::fs::write(dir.path().join("short"), "abc123").unwrap();
    let short = dir.path().join("short").to_string_lossy().into_owned();
    let err = run(
        "sd-denoiser",
        &["--model", "/nonexistent", "--internal-token-file", &short],
        &[],
    );
    assert!(err.contains("bytes") && !err.contains("abc123"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_a_file_guards_a_service_too() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let model = common::model("sd1-tiny").to_string_lossy().into_owned();
    let p = Proc::spawn(
        "sd-text-encoder",
        &[
            "--model".into(),
            model,
            "--internal-token-file".into(),
            file.to_string_lossy().into_owned(),
        ],
        &[],
    );
    p.wait_serving(Duration::from_secs(60)).await;
    let mut t = TextEncoderClient::new(channel(p.url()).await);
    let e = t
        .info(bearer(TextEncoderInfoRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    t.info(bearer(TextEncoderInfoRequest {}, Some(TOKEN)))
        .await
        .unwrap();
}

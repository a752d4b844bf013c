//! What the model services answer to bad input, as an independent client
//! meets it: INVALID_ARGUMENT with a short message in our words that names
//! the field (also as a BadRequest field violation) — never libtorch's text,
//! a server path or a backtrace, never an input echoed whole — and the
//! service still answers a good call afterwards. Each service starts once.
//! The public gateway decodes with the same codec: an undecodable request
//! is INVALID_ARGUMENT there too.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::procs::Proc;
use sd_proto::codec::Raw;
use sd_proto::status::{field_violations, is_embedding_miss};
use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::text_encoder_client::TextEncoderClient;
use sd_proto::v1::{
    AutoencoderInfoRequest, DecodeRequest, DenoiserInfoRequest, Dtype, Embedding,
    EncodeImageRequest, EncodeTextRequest, PredictRequest, Tensor,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Longest message a service may answer with, whatever the input.
const BRIEF: usize = 300;

/// The shape that overflowed libtorch's stride computation: no element,
/// yet 2^62 along one side.
const OVERFLOWING: [i64; 4] = [1, 4, 0, 1 << 62];

async fn start(bin: &str) -> Proc {
    let model = common::model("sd1-tiny").to_string_lossy().into_owned();
    let p = Proc::spawn(bin, &["--model".into(), model], &[]);
    p.wait_serving(Duration::from_secs(60)).await;
    p
}

async fn channel(p: &Proc) -> Channel {
    tonic::transport::Endpoint::from_shared(p.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `s` is a brief refusal with `code`: short, in our words, and (for
/// INVALID_ARGUMENT) naming `field` in a BadRequest field violation.
fn assert_brief(what: &str, s: &Status, code: Code, field: Option<&str>) {
    eprintln!("{what}: {:?} {:?}", s.code(), s.message());
    assert_eq!(s.code(), code, "{what}: {s:?}");
    let m = s.message();
    assert!(m.len() < BRIEF, "{what}: {} bytes: {m:.400}", m.len());
    assert!(
        s.details().len() < BRIEF,
        "{what}: {} detail bytes",
        s.details().len()
    );
    let lower = m.to_lowercase();
    for leak in ["torch", "backtrace", "frame #", "0x", ".so", "/"] {
        assert!(!lower.contains(leak), "{what}: {leak:?} in {m:?}");
    }
    if let Some(field) = field {
        let v = field_violations(s);
        assert!(
            v.iter().any(|v| v.field == field),
            "{what}: no violation of {field}: {v:?}"
        );
    }
}

fn overflowing() -> Tensor {
    Tensor {
        shape: OVERFLOWING.to_vec(),
        dtype: Dtype::Float32 as i32,
        data: Bytes::new(),
    }
}

/// Send `body` as the message of unary `path`.
async fn raw_call(ch: Channel, path: &'static str, body: Vec<u8>) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(Bytes::from(body)), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

/// A length-delimited protobuf field (strings, bytes, messages).
fn field(number: u8, payload: &[u8]) -> Vec<u8> {
    assert!(
        number < 16 && payload.len() < 128,
        "one-byte tag and length"
    );
    let mut out = vec![(number << 3) | 2, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// A body whose first field claims 100 bytes and holds 3.
fn truncated() -> Vec<u8> {
    vec![(1 << 3) | 2, 100, 1, 2, 3]
}

/// A string field (`number`, inside `within` when given) that is not UTF-8.
fn not_utf8(within: Option<u8>, number: u8) -> Vec<u8> {
    let inner = field(number, &[0xff, 0xfe, b'x']);
    match within {
        Some(outer) => field(outer, &inner),
        None => inner,
    }
}

/// A checked Predict request: latents (1, 4, 8, 8), one timestep, cond
/// sent in full with `context` dims.
fn good_predict(context: i64) -> PredictRequest {
    PredictRequest {
        latents: Some(common::wire_zeros(&[1, 4, 8, 8])),
        timesteps: vec![500.0],
        cond: Some(Embedding {
            pooled: None,
            id: "hygiene-cond".into(),
            tensor: Some(common::wire_zeros(&[1, 77, context])),
        }),
        guidance_scale: 1.0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_denoiser_refuses_bad_input_briefly_and_keeps_serving() {
    let p = start("sd-denoiser").await;
    let ch = channel(&p).await;
    let mut c = DenoiserClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let info = c.info(DenoiserInfoRequest {}).await.unwrap().into_inner();
    let context = info.context_dim as i64;
    let good = || good_predict(context);

    let bad = PredictRequest {
        latents: Some(overflowing()),
        ..good()
    };
    let s = c.predict(bad.clone()).await.unwrap_err();
    assert_brief(
        "overflowing latents",
        &s,
        Code::InvalidArgument,
        Some("latents"),
    );
    // The same through a step stream.
    let mut stream = c
        .predict_stream(tokio_stream::iter([bad]))
        .await
        .unwrap()
        .into_inner();
    let s = stream.message().await.unwrap_err();
    assert_brief(
        "overflowing latents, streamed",
        &s,
        Code::InvalidArgument,
        Some("latents"),
    );

    let many = PredictRequest {
        timesteps: vec![1.5; 100_000],
        ..good()
    };
    let s = c.predict(many).await.unwrap_err();
    assert_brief(
        "100k timesteps",
        &s,
        Code::InvalidArgument,
        Some("timesteps"),
    );
    assert!(s.message().contains("timesteps"), "{}", s.message());

    let mut long_id = good();
    long_id.cond.as_mut().unwrap().id = "i".repeat(1 << 20);
    let s = c.predict(long_id).await.unwrap_err();
    assert_brief(
        "1 MiB embedding id",
        &s,
        Code::InvalidArgument,
        Some("cond.id"),
    );

    // An id the denoiser never saw: the miss is known by its reason.
    let mut unknown = good();
    unknown.cond = Some(Embedding {
        pooled: None,
        id: "never-sent".into(),
        tensor: None,
    });
    let s = c.predict(unknown).await.unwrap_err();
    assert_brief("unknown embedding id", &s, Code::FailedPrecondition, None);
    assert!(is_embedding_miss(&s), "{s:?}");

    let s = raw_call(ch.clone(), "/sd.v1.Denoiser/Predict", truncated())
        .await
        .unwrap_err();
    assert_brief("truncated Predict", &s, Code::InvalidArgument, None);
    // cond (3) → Embedding.id (1) not UTF-8.
    let s = raw_call(ch.clone(), "/sd.v1.Denoiser/Predict", not_utf8(Some(3), 1))
        .await
        .unwrap_err();
    assert_brief("non-UTF-8 embedding id", &s, Code::InvalidArgument, None);

    let out = c.predict(good()).await.unwrap().into_inner();
    assert_eq!(out.output.unwrap().shape, vec![1, 4, 8, 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoencoder_refuses_bad_input_briefly_and_keeps_serving() {
    let p = start("sd-autoencoder").await;
    let ch = channel(&p).await;
    let mut c = AutoencoderClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let info = c
        .info(AutoencoderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let channels = info.latent_channels as i64;

    let s = c
        .decode(DecodeRequest {
            latents: Some(overflowing()),
        })
        .await
        .unwrap_err();
    assert_brief(
        "overflowing latents",
        &s,
        Code::InvalidArgument,
        Some("latents"),
    );
    let s = c
        .encode(EncodeImageRequest {
            pixels: Some(Tensor {
                shape: vec![1, 3, 0, 1 << 62],
                ..overflowing()
            }),
        })
        .await
        .unwrap_err();
    assert_brief(
        "overflowing pixels",
        &s,
        Code::InvalidArgument,
        Some("pixels"),
    );
    let s = c
        .decode(DecodeRequest {
            latents: Some(common::wire_zeros(&[1, channels + 1, 4, 4])),
        })
        .await
        .unwrap_err();
    assert_brief("wrong channels", &s, Code::InvalidArgument, Some("latents"));

    let s = raw_call(ch.clone(), "/sd.v1.Autoencoder/Decode", truncated())
        .await
        .unwrap_err();
    assert_brief("truncated Decode", &s, Code::InvalidArgument, None);

    let out = c
        .decode(DecodeRequest {
            latents: Some(common::wire_zeros(&[1, channels, 4, 4])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_encoder_refuses_bad_input_briefly_and_keeps_serving() {
    let p = start("sd-text-encoder").await;
    let ch = channel(&p).await;
    let mut c = TextEncoderClient::new(ch.clone()).max_decoding_message_size(64 << 20);

    // prompts (1) not UTF-8.
    let s = raw_call(ch.clone(), "/sd.v1.TextEncoder/Encode", not_utf8(None, 1))
        .await
        .unwrap_err();
    assert_brief("non-UTF-8 prompt", &s, Code::InvalidArgument, None);
    let s = raw_call(ch.clone(), "/sd.v1.TextEncoder/Encode", truncated())
        .await
        .unwrap_err();
    assert_brief("truncated Encode", &s, Code::InvalidArgument, None);
    let s = c
        .encode(EncodeTextRequest {
            prompts: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_brief("no prompts", &s, Code::InvalidArgument, Some("prompts"));
    let s = c
        .encode(EncodeTextRequest {
            prompts: vec!["a".into()],
            clip_skip: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_brief("clip_skip", &s, Code::InvalidArgument, Some("clip_skip"));

    let out = c
        .encode(EncodeTextRequest {
            prompts: vec!["a lighthouse".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.prompts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_undecodable_requests_as_invalid_and_keeps_serving() {
    use common::procs::{Cluster, ClusterOptions};
    use sd_proto::v1::generation_client::GenerationClient;
    use sd_proto::v1::GenerateRequest;

    let cluster = Cluster::start(&common::model("sd1-tiny"), ClusterOptions::default()).await;
    let ch = channel(&cluster.gateway).await;
    const GENERATE: &str = "/sd.v1.Generation/Generate";
    for (what, body) in [
        ("a truncated request", truncated()),
        ("a prompt that is not UTF-8", not_utf8(None, 1)),
    ] {
        let s = raw_call(ch.clone(), GENERATE, body).await.unwrap_err();
        assert_brief(what, &s, Code::InvalidArgument, None);
    }
    let mut client = GenerationClient::new(ch);
    let r = client
        .generate(GenerateRequest {
            prompt: "still serving".into(),
            steps: 2,
            seed: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().images.len(), 1);
}

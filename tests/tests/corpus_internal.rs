//! The bad-input corpus behind the gateway, as a table: each malformed
//! call to a model service (as anyone who reaches its port could send it)
//! is refused with the right code and a short message naming the field,
//! nothing of it is computed, and the service still serves afterwards. The
//! memory cases that once grew without bound (long embedding ids filling
//! the cache, a stream piling up embeddings, a decode far larger than the
//! documented side) are bounded, measured by the process's resident memory.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::procs::Proc;
use sd_proto::status::field_violations;
use sd_proto::v1::autoencoder_client::AutoencoderClient;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::{
    AutoencoderInfoRequest, DecodeRequest, DenoiserInfoRequest, Dtype, Embedding,
    EncodeImageRequest, PredictRequest, Tensor,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

async fn start(bin: &str, flags: &[&str]) -> Proc {
    let model = common::model("sd1-tiny").to_string_lossy().into_owned();
    let mut args = vec!["--model".to_string(), model];
    args.extend(flags.iter().map(ToString::to_string));
    let p = Proc::spawn(bin, &args, &[]);
    p.wait_serving(Duration::from_secs(60)).await;
    p
}

fn f32s(shape: &[i64], value: f32) -> Tensor {
    let n = shape.iter().product::<i64>().max(0) as usize;
    Tensor {
        shape: shape.to_vec(),
        dtype: Dtype::Float32 as i32,
        data: value.to_le_bytes().repeat(n).into(),
    }
}

/// `s` has `code`, a short message, and (when `field` is given) names it
/// in a BadRequest violation or, for RESOURCE_EXHAUSTED, in its text.
fn check(case: &str, s: &Status, code: Code, field: &str) {
    assert_eq!(s.code(), code, "{case}: {s:?}");
    assert!(s.message().len() < 300, "{case}: {}", s.message());
    if code == Code::InvalidArgument {
        let v = field_violations(s);
        assert!(
            v.iter().any(|v| v.field == field),
            "{case}: {field} not named: {v:?}"
        );
    } else {
        assert!(s.message().starts_with(field), "{case}: {}", s.message());
    }
}

struct Case {
    name: &'static str,
    request: PredictRequest,
    code: Code,
    field: &'static str,
}

#[allow(clippy::too_many_lines)] // one row per case: a table, not logic
fn predict_cases(good: &PredictRequest, context: i64) -> Vec<Case> {
    let with = |f: &dyn Fn(&mut PredictRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let invalid = |name, request, field| Case {
        name,
        request,
        code: Code::InvalidArgument,
        field,
    };
    let latents = |t: Tensor| with(&|r| r.latents = Some(t.clone()));
    let cond = |t: Tensor| {
        with(&|r| {
            r.cond = Some(Embedding {
                pooled: None,
                id: String::new(),
                tensor: Some(t.clone()),
            })
        })
    };
    let mut short = f32s(&[1, 4, 8, 8], 0.0);
    short.data = short.data.slice(..100);
    let mut int = f32s(&[1, 4, 8, 8], 0.0);
    int.dtype = 99;
    vec![
        invalid("latents missing", with(&|r| r.latents = None), "latents"),
        invalid("latents 3-d", latents(f32s(&[4, 8, 8], 0.0)), "latents"),
        invalid(
            "latents 3 channels",
            latents(f32s(&[1, 3, 8, 8], 0.0)),
            "latents",
        ),
        invalid(
            "latents batch 0",
            latents(f32s(&[0, 4, 8, 8], 0.0)),
            "latents",
        ),
        invalid(
            "latents batch 17",
            latents(f32s(&[17, 4, 8, 8], 0.0)),
            "latents",
        ),
        invalid("latents short data", latents(short), "latents"),
        invalid("latents unknown dtype", latents(int), "latents"),
        invalid(
            "latents NaN",
            latents(f32s(&[1, 4, 8, 8], f32::NAN)),
            "latents",
        ),
        invalid(
            "latents +Inf",
            latents(f32s(&[1, 4, 8, 8], f32::INFINITY)),
            "latents",
        ),
        invalid(
            "latents past --max-side",
            latents(f32s(&[1, 4, 2, 2048], 0.0)),
            "latents",
        ),
        invalid(
            "timestep -1",
            with(&|r| r.timesteps = vec![-1.0]),
            "timesteps",
        ),
        invalid(
            "timestep 1e9",
            with(&|r| r.timesteps = vec![1e9]),
            "timesteps",
        ),
        invalid(
            "timestep NaN",
            with(&|r| r.timesteps = vec![f32::NAN]),
            "timesteps",
        ),
        invalid("no timesteps", with(&|r| r.timesteps = vec![]), "timesteps"),
        invalid(
            "guidance Inf",
            with(&|r| r.guidance_scale = f32::INFINITY),
            "guidance_scale",
        ),
        invalid(
            "output dtype 77",
            with(&|r| r.output_dtype = 77),
            "output_dtype",
        ),
        invalid("cond missing", with(&|r| r.cond = None), "cond"),
        invalid("cond width", cond(f32s(&[1, 77, context + 1], 0.0)), "cond"),
        invalid(
            "cond 20,000 tokens",
            cond(f32s(&[1, 20_000, context], 0.0)),
            "cond",
        ),
        invalid(
            "cond NaN",
            cond(f32s(&[1, 77, context], f32::NAN)),
            "cond.tensor",
        ),
        invalid(
            "cond id 129 bytes",
            with(&|r| r.cond.as_mut().unwrap().id = "x".repeat(129)),
            "cond.id",
        ),
        invalid(
            "cond neither id nor tensor",
            with(&|r| r.cond = Some(Embedding::default())),
            "cond",
        ),
        Case {
            name: "cond id never sent",
            request: with(&|r| {
                r.cond = Some(Embedding {
                    pooled: None,
                    id: "never-sent".into(),
                    tensor: None,
                })
            }),
            code: Code::FailedPrecondition,
            field: "cond",
        },
    ]
}

fn good_predict(context: i64) -> PredictRequest {
    PredictRequest {
        latents: Some(f32s(&[1, 4, 8, 8], 0.1)),
        timesteps: vec![500.0],
        cond: Some(Embedding {
            pooled: None,
            id: "corpus-cond".into(),
            tensor: Some(f32s(&[1, 77, context], 0.5)),
        }),
        guidance_scale: 1.0,
        ..Default::default()
    }
}

async fn denoiser(p: &Proc) -> (DenoiserClient<Channel>, i64) {
    let mut c = DenoiserClient::connect(p.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let info = c.info(DenoiserInfoRequest {}).await.unwrap().into_inner();
    (c, info.context_dim as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_denoiser_refuses_each_bad_call_and_computes_none() {
    let p = start("sd-denoiser", &["--metrics-listen", "127.0.0.1:0"]).await;
    let (mut c, context) = denoiser(&p).await;
    let good = good_predict(context);
    let cases = predict_cases(&good, context);
    let forwards = p.metric("sd_unet_batch_items_count").await;
    for case in &cases {
        let s = c.predict(case.request.clone()).await.unwrap_err();
        check(case.name, &s, case.code, case.field);
    }
    assert_eq!(
        p.metric("sd_unet_batch_items_count").await,
        forwards,
        "a refused call reached the UNet"
    );
    eprintln!("{} bad Predict calls refused", cases.len());
    let out = c.predict(good).await.unwrap().into_inner();
    assert_eq!(out.output.unwrap().shape, vec![1, 4, 8, 8]);
}

/// Findings 1 and 2: a client filling the embedding cache with long ids and
/// tiny tensors, and a stream sending a new embedding each message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_bounded_in_memory_ids_included() {
    let p = start("sd-denoiser", &["--embedding-cache-mib", "1"]).await;
    let (mut c, context) = denoiser(&p).await;
    // Each call caches a 128-byte id with a (1, 1, context) tensor, then is
    // refused (uncond's width is not the context's) before any forward.
    let flood = |i: usize| {
        let e = |id: String, width| Embedding {
            pooled: None,
            id,
            tensor: Some(f32s(&[1, 1, width], 0.5)),
        };
        PredictRequest {
            cond: Some(e(format!("{i:0>128}"), context)),
            uncond: Some(e(String::new(), context + 1)),
            guidance_scale: 7.5,
            ..good_predict(context)
        }
    };
    let mut rss = Vec::new();
    for i in 0..8000 {
        let s = c.predict(flood(i)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        if i == 2000 || i == 7999 {
            rss.push(p.rss_bytes());
        }
    }
    let growth = rss[1] as i64 - rss[0] as i64;
    eprintln!("RSS after 2,000 and 8,000 cached ids: {rss:?} ({growth:+} bytes)");
    // Unbounded, 6,000 more entries of ~1 KB each would add ~6 MB.
    assert!(growth < 2 << 20, "the cache grew by {growth} bytes");

    // A stream holds at most 4 embeddings: the fifth new one ends it with
    // RESOURCE_EXHAUSTED naming the field.
    let steps: Vec<PredictRequest> = (0..6)
        .map(|i| PredictRequest {
            cond: Some(Embedding {
                pooled: None,
                id: format!("stream-{i}"),
                tensor: Some(f32s(&[1, 77, context], 0.5)),
            }),
            steps_after: 5 - i,
            ..good_predict(context)
        })
        .collect();
    let mut stream = c
        .predict_stream(tokio_stream::iter(steps))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..4 {
        assert!(stream.message().await.unwrap().is_some());
    }
    let s = stream.message().await.unwrap_err();
    check(
        "fifth embedding on a stream",
        &s,
        Code::ResourceExhausted,
        "cond",
    );
    assert!(c.predict(good_predict(context)).await.is_ok());
}

/// Finding 3: decode sizes are checked in pixels, per image and per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoencoder_checks_sizes_in_pixels() {
    let p = start(
        "sd-autoencoder",
        &["--max-side", "64", "--max-pixels", "8192"],
    )
    .await;
    let mut c = AutoencoderClient::connect(p.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let info = c
        .info(AutoencoderInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_pixels, 8192);
    let sf = i64::from(info.scale_factor);
    let ch = i64::from(info.latent_channels);
    let side = 64 / sf; // latents of the largest side
    let decode = |shape: &[i64], v: f32| DecodeRequest {
        latents: Some(f32s(shape, v)),
    };
    let cases = [
        ("1×2048 latents", decode(&[1, ch, 2, 2048], 0.0), "latents"),
        (
            "one latent past the side",
            decode(&[1, ch, side + 1, 1], 0.0),
            "latents",
        ),
        (
            "3 images of 64² > 8192 pixels",
            decode(&[3, ch, side, side], 0.0),
            "latents",
        ),
        (
            "NaN latents",
            decode(&[1, ch, side, side], f32::NAN),
            "latents",
        ),
    ];
    for (name, req, field) in cases {
        let s = c.decode(req).await.unwrap_err();
        check(name, &s, Code::InvalidArgument, field);
    }
    let pixels = EncodeImageRequest {
        pixels: Some(f32s(&[1, 3, 64 + sf, 64 + sf], 0.0)),
    };
    let s = c.encode(pixels).await.unwrap_err();
    check("encode past the side", &s, Code::InvalidArgument, "pixels");
    let ok = c.decode(decode(&[2, ch, side, side], 0.0)).await.unwrap();
    let images = ok.into_inner().images;
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].width, images[0].height), (64, 64));
}

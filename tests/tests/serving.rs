//! Production behaviour on real processes: truthful health, draining on
//! SIGTERM, admission control, deadlines, cancellation, replica failover and
//! the prompt-embedding cache.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::procs::{Cluster, ClusterOptions, Proc};
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{generate_event, DenoiserInfoRequest, GenerateRequest};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// A generation that takes a few seconds on the tiny model (many steps).
fn long(steps: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a long generation".into(),
        steps,
        seed: Some(1),
        ..Default::default()
    }
}

fn short() -> GenerateRequest {
    GenerateRequest {
        prompt: "a short one".into(),
        steps: 2,
        seed: Some(2),
        ..Default::default()
    }
}

async fn client(url: String) -> GenerationClient<Channel> {
    GenerationClient::connect(url).await.unwrap()
}

/// Start a stream and wait for its first progress event.
async fn started_stream(
    c: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> tonic::Streaming<sd_proto::v1::GenerateEvent> {
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    match s.next().await.unwrap().unwrap().event.unwrap() {
        generate_event::Event::Progress(_) => s,
        other => panic!("expected progress first, got {other:?}"),
    }
}

async fn finish(
    mut s: tonic::Streaming<sd_proto::v1::GenerateEvent>,
) -> Result<usize, tonic::Status> {
    while let Some(ev) = s.next().await {
        if let generate_event::Event::Result(r) = ev?.event.unwrap() {
            return Ok(r.images.len());
        }
    }
    Err(tonic::Status::unknown("stream ended without a result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_not_serving_until_loaded_and_warm() {
    let model = common::model("sd1-tiny");
    let args = vec!["--model".to_string(), model.to_string_lossy().into_owned()];
    let p = Proc::spawn(
        "sd-text-encoder",
        &args,
        &[("SD_LOAD_DELAY_MS", "1500".into())],
    );
    // Listening, but still loading: NOT_SERVING overall and for the service.
    assert_eq!(p.health("").await, Some(NOT_SERVING));
    assert_eq!(p.health("sd.v1.TextEncoder").await, Some(NOT_SERVING));
    p.wait_serving(Duration::from_secs(30)).await;
    assert_eq!(p.health("sd.v1.TextEncoder").await, Some(SERVING));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_generation_in_flight_and_refuses_new_ones() {
    let mut cluster = Cluster::start(&common::model("sd1-tiny"), ClusterOptions::default()).await;
    let mut c = client(cluster.gateway.url()).await;
    let stream = started_stream(&mut c, long(150)).await;
    cluster.gateway.signal(libc::SIGTERM);
    // NOT_SERVING and refusing at once …
    let deadline = Instant::now() + Duration::from_secs(2);
    while cluster.gateway.health("").await != Some(NOT_SERVING) {
        assert!(
            Instant::now() < deadline,
            "gateway still SERVING after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = c.generate(short()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    // … while the generation in flight completes.
    assert_eq!(finish(stream).await.unwrap(), 1);
    let status = cluster
        .gateway
        .wait_exit(Duration::from_secs(20))
        .expect("gateway exited");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_while_admitted_work_completes() {
    let opts = ClusterOptions {
        gateway_args: &["--max-concurrent", "1", "--max-queue", "1"],
        ..Default::default()
    };
    let cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut c = client(cluster.gateway.url()).await;
    let running = started_stream(&mut c, long(150)).await;
    // The second waits in the queue …
    let mut c2 = c.clone();
    let queued = tokio::spawn(async move {
        c2.generate(long(5))
            .await
            .map(|r| r.into_inner().images.len())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.gateway.metric("sd_queue_depth").await < 1.0 {
        assert!(Instant::now() < deadline, "second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // … and the third is refused at once.
    let t = Instant::now();
    let e = c.generate(short()).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    eprintln!("RESOURCE_EXHAUSTED after {took:?}");
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    assert_eq!(finish(running).await.unwrap(), 1);
    assert_eq!(queued.await.unwrap().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passed_deadline_stops_the_generation_and_frees_its_slot() {
    let opts = ClusterOptions {
        gateway_args: &["--max-concurrent", "1", "--max-queue", "0"],
        ..Default::default()
    };
    let cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut c = client(cluster.gateway.url()).await;
    let mut req = tonic::Request::new(long(150));
    req.set_timeout(Duration::from_millis(700));
    let t = Instant::now();
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(t.elapsed() < Duration::from_secs(5));
    // The slot is free again: with no queue, a busy gateway would refuse.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match c.generate(short()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The denoiser publishes what a forward costs; the gateway refuses what
/// could never finish (a deadline shorter than one predicted step) at once,
/// and what would take too long with the field to lower — before any model
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_is_admitted_by_the_denoisers_measured_cost() {
    let opts = ClusterOptions {
        gateway_args: &["--max-request-seconds", "60"],
        ..Default::default()
    };
    let cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut d = DenoiserClient::connect(cluster.denoisers[0].url())
        .await
        .unwrap();
    let info = d.info(DenoiserInfoRequest {}).await.unwrap().into_inner();
    let cost = info.cost.expect("the denoiser measured its cost");
    let positions: Vec<u64> = cost.points.iter().map(|p| p.positions).collect();
    assert_eq!(
        positions,
        vec![64, 256],
        "8² and 16² latents for the tiny model"
    );
    // 64×64 latents: four times the side measured, sixteen times the positions.
    let side = 64 * info.vae_scale_factor;
    let step = cost.seconds(64 * 64, 2).unwrap();
    let step_x8 = cost.seconds(64 * 64, 16).unwrap();
    let mut c = client(cluster.gateway.url()).await;
    let big = |steps: u32| GenerateRequest {
        prompt: "a big one".into(),
        steps,
        width: side,
        height: side,
        scheduler: "ddim".into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(big(2));
    req.set_timeout(Duration::from_secs_f64((step / 2.0).min(0.5)));
    let t = Instant::now();
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(e.message().contains("predicted"), "{}", e.message());
    assert!(t.elapsed() < Duration::from_secs(2), "refused at once");
    let steps = ((60.0 / step_x8).ceil() as u32 + 1).min(150);
    let e = c
        .generate(GenerateRequest {
            num_images: 8,
            ..big(steps)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("predicted to take"), "{}", e.message());
    // The stack serves what fits.
    assert!(c.generate(short()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_frees_its_slot() {
    let opts = ClusterOptions {
        gateway_args: &["--max-concurrent", "1", "--max-queue", "0"],
        ..Default::default()
    };
    let cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut c = client(cluster.gateway.url()).await;
    let stream = started_stream(&mut c, long(150)).await;
    assert_eq!(
        c.generate(short()).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    drop(stream);
    // Within about a step, the slot is free.
    let t = Instant::now();
    loop {
        match c.generate(short()).await {
            Ok(_) => break,
            Err(e)
                if e.code() == Code::ResourceExhausted && t.elapsed() < Duration::from_secs(3) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("slot not freed after {:?}: {e}", t.elapsed()),
        }
    }
    eprintln!("slot free {:?} after the client left", t.elapsed());
    assert_eq!(cluster.gateway.metric("sd_in_flight").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_denoiser_replica_mid_generation_does_not_fail_it() {
    let opts = ClusterOptions {
        denoisers: 2,
        ..Default::default()
    };
    let mut cluster = Cluster::start(&common::model("sd1-tiny"), opts).await;
    let mut c = client(cluster.gateway.url()).await;
    let stream = started_stream(&mut c, long(150)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.denoisers[0].signal(libc::SIGKILL);
    assert_eq!(
        finish(stream).await.unwrap(),
        1,
        "generation survived the kill"
    );
    assert!(cluster.denoisers[1].metric("sd_requests_total{").await > 0.0);

    // With the only replica left gone, the client hears UNAVAILABLE within seconds …
    let port = cluster.denoisers[1].port();
    cluster.denoisers[1].signal(libc::SIGKILL);
    cluster.denoisers[1].wait_exit(Duration::from_secs(5));
    let t = Instant::now();
    let e = c.generate(short()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.gateway.health("").await != Some(NOT_SERVING) {
        assert!(
            Instant::now() < deadline,
            "gateway SERVING without a denoiser"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // … and once a denoiser is back on that address, requests succeed again.
    let model = common::model("sd1-tiny");
    let back = Proc::spawn(
        "sd-denoiser",
        &[
            "--model".into(),
            model.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    back.wait_serving(Duration::from_secs(30)).await;
    cluster.gateway.wait_serving(Duration::from_secs(10)).await;
    let r = c.generate(short()).await.unwrap().into_inner();
    assert_eq!(r.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_prompt_skips_the_text_encoder_and_the_embedding_transfer() {
    let cluster = Cluster::start(&common::model("sd1-tiny"), ClusterOptions::default()).await;
    let mut c = client(cluster.gateway.url()).await;
    let encodes = r#"sd_requests_total{service="text-encoder",method="Encode",code="Ok"}"#;
    c.generate(short()).await.unwrap();
    let after_first = cluster.text.metric(encodes).await;
    assert_eq!(
        after_first, 1.0,
        "one Encode call for prompt + negative prompt"
    );
    c.generate(GenerateRequest {
        seed: Some(99),
        ..short()
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.text.metric(encodes).await,
        after_first,
        "the text encoder was called again"
    );
    let hits = r#"sd_cache_requests_total{service="gateway",cache="prompt",result="hit"}"#;
    assert_eq!(cluster.gateway.metric(hits).await, 2.0);
    // The denoiser got the tensors once, then ids it had cached.
    let d_hits = r#"sd_cache_requests_total{service="denoiser",cache="embedding",result="hit"}"#;
    assert!(cluster.denoisers[0].metric(d_hits).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_services_refuse_bad_calls_with_clear_codes() {
    let cluster = Cluster::start(&common::model("sd1-tiny"), ClusterOptions::default()).await;
    denoiser_refuses_bad_calls(&cluster.denoisers[0].url()).await;
    text_encoder_refuses_bad_calls(&cluster.text.url()).await;
    autoencoder_refuses_bad_calls(&cluster.autoencoder.url()).await;
}

fn emb(id: &str, t: Option<sd_proto::v1::Tensor>) -> sd_proto::v1::Embedding {
    sd_proto::v1::Embedding {
        pooled: None,
        id: id.into(),
        tensor: t,
    }
}

fn predict(
    latents: sd_proto::v1::Tensor,
    ts: Vec<f32>,
    cond: sd_proto::v1::Embedding,
    g: f32,
) -> sd_proto::v1::PredictRequest {
    sd_proto::v1::PredictRequest {
        latents: Some(latents),
        timesteps: ts,
        cond: Some(cond),
        uncond: None,
        guidance_scale: g,
        output_dtype: 0,
        ..Default::default()
    }
}

fn good_ctx() -> Option<sd_proto::v1::Tensor> {
    Some(common::wire_zeros(&[1, 77, 32]))
}

async fn denoiser_refuses_bad_calls(url: &str) {
    use sd_proto::v1::denoiser_client::DenoiserClient;

    let mut d = DenoiserClient::connect(url.to_string()).await.unwrap();
    for (what, req, code) in bad_predicts() {
        let e = d.predict(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {}", e.message());
    }
    // The denoiser still works after all that.
    d.predict(predict(
        common::wire_zeros(&[1, 4, 8, 8]),
        vec![1.0],
        emb("a", good_ctx()),
        1.0,
    ))
    .await
    .unwrap();
}

/// Predict calls the denoiser must refuse, and the code it refuses with.
fn bad_predicts() -> Vec<(&'static str, sd_proto::v1::PredictRequest, Code)> {
    use sd_proto::v1::Tensor;
    vec![
        (
            "bytes short of the shape",
            {
                let mut t = common::wire_zeros(&[1, 4, 8, 8]);
                t.data = t.data.slice(..100);
                predict(t, vec![1.0], emb("a", good_ctx()), 1.0)
            },
            Code::InvalidArgument,
        ),
        (
            "wrong channels",
            predict(
                common::wire_zeros(&[1, 3, 8, 8]),
                vec![1.0],
                emb("a", good_ctx()),
                1.0,
            ),
            Code::InvalidArgument,
        ),
        (
            "unknown dtype",
            {
                let mut t = common::wire_zeros(&[1, 4, 8, 8]);
                t.dtype = 42;
                predict(t, vec![1.0], emb("a", good_ctx()), 1.0)
            },
            Code::InvalidArgument,
        ),
        (
            "timesteps count",
            predict(
                common::wire_zeros(&[2, 4, 8, 8]),
                vec![1.0, 2.0, 3.0],
                emb("a", good_ctx()),
                1.0,
            ),
            Code::InvalidArgument,
        ),
        (
            "NaN timestep",
            predict(
                common::wire_zeros(&[1, 4, 8, 8]),
                vec![f32::NAN],
                emb("a", good_ctx()),
                1.0,
            ),
            Code::InvalidArgument,
        ),
        (
            "context width",
            predict(
                common::wire_zeros(&[1, 4, 8, 8]),
                vec![1.0],
                emb("b", Some(common::wire_zeros(&[1, 77, 31]))),
                1.0,
            ),
            Code::InvalidArgument,
        ),
        (
            "infinite guidance",
            predict(
                common::wire_zeros(&[1, 4, 8, 8]),
                vec![1.0],
                emb("a", good_ctx()),
                f32::INFINITY,
            ),
            Code::InvalidArgument,
        ),
        (
            "unknown embedding id",
            predict(
                common::wire_zeros(&[1, 4, 8, 8]),
                vec![1.0],
                emb("never-sent", None),
                1.0,
            ),
            Code::FailedPrecondition,
        ),
        (
            "negative dims",
            predict(
                Tensor {
                    shape: vec![-1, 4, 8, 8],
                    dtype: 1,
                    data: Default::default(),
                },
                vec![1.0],
                emb("a", good_ctx()),
                1.0,
            ),
            Code::InvalidArgument,
        ),
    ]
}

async fn text_encoder_refuses_bad_calls(url: &str) {
    use sd_proto::v1::text_encoder_client::TextEncoderClient;
    use sd_proto::v1::EncodeTextRequest;

    let mut t = TextEncoderClient::connect(url.to_string()).await.unwrap();
    let enc = |prompts: Vec<String>, clip_skip| EncodeTextRequest {
        prompts,
        clip_skip,
        dtype: 0,
        syntax: 0,
        loras: vec![],
        max_sequence_length: 0,
    };
    assert_eq!(
        t.encode(enc(vec![], 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        t.encode(enc(vec!["x".into()], 99))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        t.encode(enc(vec!["x".into(); 1000], 0))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // AUTOMATIC1111's syntax: a prompt in three chunks is 231 tokens; more
    // than 8 chunks is refused, naming the prompts; an unknown syntax too.
    let a1111 = |prompts: Vec<String>| EncodeTextRequest {
        syntax: sd_proto::v1::PromptSyntax::A1111 as i32,
        ..enc(prompts, 0)
    };
    let r = t
        .encode(a1111(vec![
            "a cat BREAK a (dog:1.2) BREAK [a bird]".into(),
            "x".into(),
        ]))
        .await
        .unwrap()
        .into_inner();
    let shape = |i: usize| r.prompts[i].embeddings.as_ref().unwrap().shape.clone();
    assert_eq!(shape(0)[0], 231);
    assert_eq!(shape(1)[0], 77);
    let long = vec!["word ".repeat(700)];
    let e = t.encode(a1111(long)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("prompts"), "{}", e.message());
    let e = t
        .encode(EncodeTextRequest {
            syntax: 9,
            ..enc(vec!["x".into()], 0)
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("syntax"), "{}", e.message());
}

async fn autoencoder_refuses_bad_calls(url: &str) {
    use sd_proto::v1::autoencoder_client::AutoencoderClient;
    use sd_proto::v1::{DecodeRequest, EncodeImageRequest};

    let mut a = AutoencoderClient::connect(url.to_string()).await.unwrap();
    let e = a
        .decode(DecodeRequest {
            latents: Some(common::wire_zeros(&[1, 3, 8, 8])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = a.decode(DecodeRequest { latents: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Pixels must be a multiple of the VAE's scale (4 here) and within the size limit.
    let e = a
        .encode(EncodeImageRequest {
            pixels: Some(common::wire_zeros(&[1, 3, 10, 8])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = a
        .encode(EncodeImageRequest {
            pixels: Some(common::wire_zeros(&[1, 3, 4096, 4])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_can_be_found_by_dns_name() {
    let model = common::model("sd1-tiny");
    let args = || vec!["--model".to_string(), model.to_string_lossy().into_owned()];
    let text = Proc::spawn("sd-text-encoder", &args(), &[]);
    let denoiser = Proc::spawn("sd-denoiser", &args(), &[]);
    let vae = Proc::spawn("sd-autoencoder", &args(), &[]);
    // `localhost` resolves to every loopback address; only 127.0.0.1 answers,
    // and the pool routes around the others.
    let gateway = Proc::spawn(
        "sd-gateway",
        &[
            "--text-encoder".into(),
            text.url(),
            "--denoiser".into(),
            format!("dns://localhost:{}", denoiser.port()),
            "--autoencoder".into(),
            vae.url(),
            "--backend-refresh-ms".into(),
            "200".into(),
        ],
        &[],
    );
    gateway.wait_serving(Duration::from_secs(60)).await;
    let r = client(gateway.url())
        .await
        .generate(short())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_stream_answers_each_step_in_order_and_ends_on_a_bad_one() {
    use sd_proto::v1::denoiser_client::DenoiserClient;
    use sd_proto::v1::{Dtype, Embedding, PredictRequest, Tensor};

    // An embedding cache of 0 MiB keeps nothing: id-only steps work only
    // because the stream holds what it was sent.
    let cluster = Cluster::start(
        &common::model("sd1-tiny"),
        ClusterOptions {
            env: vec![("SD_EMBEDDING_CACHE_MIB", "0".into())],
            ..Default::default()
        },
    )
    .await;
    let f32s = |shape: Vec<i64>, value: f32| {
        let n: i64 = shape.iter().product();
        Tensor {
            shape,
            dtype: Dtype::Float32 as i32,
            data: value.to_le_bytes().repeat(n as usize).into(),
        }
    };
    let step = |latent: f32, t: f32, full: bool, steps_after: u32| PredictRequest {
        latents: Some(f32s(vec![1, 4, 8, 8], latent)),
        timesteps: vec![t],
        cond: Some(Embedding {
            pooled: None,
            id: "prompt".into(),
            tensor: full.then(|| f32s(vec![1, 77, 32], 0.5)),
        }),
        uncond: Some(Embedding {
            pooled: None,
            id: "negative".into(),
            tensor: full.then(|| f32s(vec![1, 77, 32], -0.5)),
        }),
        guidance_scale: 7.5,
        steps_after,
        ..Default::default()
    };
    let mut d = DenoiserClient::connect(cluster.denoisers[0].url())
        .await
        .unwrap();
    // What each step gives as a call of its own, embeddings sent in full.
    let inputs = [(0.1f32, 900.0f32), (0.2, 500.0), (0.3, 100.0)];
    let mut want = Vec::new();
    for (x, t) in inputs {
        let r = d.predict(step(x, t, true, 0)).await.unwrap().into_inner();
        want.push(r.output.unwrap().data);
    }
    // The same steps on one stream, embeddings in full only the first time,
    // then a step with latents of the wrong shape.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for (i, (x, t)) in inputs.iter().enumerate() {
        tx.send(step(*x, *t, i == 0, (inputs.len() - i) as u32))
            .await
            .unwrap();
    }
    let mut bad = step(0.4, 50.0, false, 0);
    bad.latents = Some(f32s(vec![1, 3, 8, 8], 0.0));
    tx.send(bad).await.unwrap();
    let mut stream = d
        .predict_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (i, w) in want.iter().enumerate() {
        let got = stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .output
            .unwrap()
            .data;
        assert_eq!(&got, w, "step {i} differs from the same call alone");
    }
    let e = stream.message().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("latents"), "{}", e.message());
    // The error ended the stream; the service goes on.
    drop(tx);
    assert!(d.predict(step(0.1, 900.0, true, 0)).await.is_ok());
}

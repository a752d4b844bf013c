//! Step-level batching end to end: concurrent generations share UNet
//! forwards and give the images they give one at a time, unbatched.

#![allow(clippy::unwrap_used)]

mod common;

use common::procs::{Cluster, ClusterOptions};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::GenerateRequest;

fn requests() -> Vec<GenerateRequest> {
    ["pndm", "euler-a", "dpmpp-2m", "ddim"]
        .iter()
        .enumerate()
        .map(|(i, s)| GenerateRequest {
            prompt: format!("prompt number {i}"),
            steps: 12,
            scheduler: s.to_string(),
            guidance_scale: Some(if i == 3 { 1.0 } else { 7.5 }),
            seed: Some(40 + i as u64),
            num_images: 1 + (i as u32 % 2),
            ..Default::default()
        })
        .collect()
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_generations_batch_and_match_unbatched_ones() {
    let model = common::model("sd1-tiny");
    // Unbatched, one at a time.
    let alone = Cluster::start(
        &model,
        ClusterOptions {
            env: vec![("SD_NO_BATCHING", "true".into())],
            ..Default::default()
        },
    )
    .await;
    let mut c = GenerationClient::connect(alone.gateway.url())
        .await
        .unwrap();
    let mut want = Vec::new();
    for r in requests() {
        want.push(c.generate(r).await.unwrap().into_inner());
    }
    drop(alone);

    // Batched, all at once (and on multi-threaded I/O runtimes, the
    // non-default runtime, in every process).
    let batched = Cluster::start(
        &model,
        ClusterOptions {
            env: vec![
                ("SD_MAX_WAIT_MS", "20".into()),
                ("SD_IO_THREADS", "2".into()),
                // One UNet worker, so that every concurrent call meets the
                // others in its batches (the machine's rule would give a
                // small UNet one worker per core).
                ("SD_MODEL_CONCURRENCY", "1".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let client = GenerationClient::connect(batched.gateway.url())
        .await
        .unwrap();
    let handles: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            let mut c = client.clone();
            tokio::spawn(async move { c.generate(r).await.map(|r| r.into_inner()) })
        })
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        let got = h.await.unwrap().unwrap();
        assert_eq!(got.images.len(), w.images.len());
        for (a, b) in got.images.iter().zip(&w.images) {
            let (a, b) = (pixels(&a.data), pixels(&b.data));
            let max = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            assert!(max <= 2, "batched image differs by {max}/255");
        }
    }
    // Some forwards really carried more than one call (a guided latent is 2 rows).
    let d = &batched.denoisers[0];
    let sum = d.metric("sd_unet_batch_items_sum").await;
    let count = d.metric("sd_unet_batch_items_count").await;
    eprintln!("{count} UNet forwards for {sum} rows");
    assert!(
        count > 0.0 && sum / count > 2.0,
        "no call shared a forward ({sum} rows in {count} forwards)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_precision_latents_on_the_wire_stay_close() {
    let model = common::model("sd1-tiny");
    let req = || GenerateRequest {
        prompt: "wire".into(),
        steps: 8,
        seed: Some(8),
        ..Default::default()
    };
    let full = Cluster::start(&model, ClusterOptions::default()).await;
    let a = GenerationClient::connect(full.gateway.url())
        .await
        .unwrap()
        .generate(req())
        .await
        .unwrap()
        .into_inner();
    drop(full);
    let half = Cluster::start(
        &model,
        ClusterOptions {
            gateway_args: &["--wire-dtype", "f16"],
            ..Default::default()
        },
    )
    .await;
    let b = GenerationClient::connect(half.gateway.url())
        .await
        .unwrap()
        .generate(req())
        .await
        .unwrap()
        .into_inner();
    let (a, b) = (pixels(&a.images[0].data), pixels(&b.images[0].data));
    let mean = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64;
    eprintln!("f16 wire: mean |diff| {mean:.3}/255");
    assert!(mean < 2.0, "mean difference {mean}/255");
    // Deterministic: float16 rounding does move a few values, so the f16 path ran.
    assert!(
        mean > 0.0,
        "identical images: were latents really sent as f16?"
    );
}

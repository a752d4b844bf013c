//! The batcher against the tiny UNet: merged forwards equal separate
//! ones, sessions stay in step, timings and spans reach each caller.

use super::*;
use sd_models::{ModelDir, Placement};
use sd_service::compute::Half;

fn fixture() -> std::path::PathBuf {
    std::env::var_os("SD_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/sd-fixtures")
        })
        .join("sd1-tiny")
}

fn tiny_unet() -> Arc<Denoiser> {
    Arc::new(Denoiser::load(&ModelDir::open(fixture()).unwrap(), Placement::cpu()).unwrap())
}

fn job(seed: i64, b: i64, t: f32, guided: bool, g: f64) -> Call {
    tch::manual_seed(seed);
    let f = (tch::Kind::Float, tch::Device::Cpu);
    Call {
        latents: Tensor::randn([b, 4, 8, 8], f),
        timesteps: Tensor::from_slice(&vec![t; b as usize]),
        cond: Half::text(Tensor::randn([1, 77, 32], f)),
        uncond: guided.then(|| Half::text(Tensor::randn([1, 77, 32], f))),
        guidance: g,
        embedded_guidance: None,
        image: None,
        loras: Default::default(),
        references: None,
        controls: Vec::new(),
        ip: Vec::new(),
    }
}

#[test]
fn merged_forwards_equal_separate_ones() {
    let unet = tiny_unet();
    // Different generations: batch sizes, timesteps, guidance on and off.
    let jobs = [
        job(1, 1, 999.0, true, 7.5),
        job(2, 2, 500.0, true, 3.0),
        job(3, 1, 20.5, false, 1.0),
    ];
    let refs: Vec<&Call> = jobs.iter().collect();
    let merged = forward_calls(&unet, &refs).unwrap();
    for (j, m) in jobs.iter().zip(&merged) {
        let alone = forward_calls(&unet, &[j]).unwrap().remove(0);
        assert_eq!(alone.size(), m.size());
        let d = (&alone - m).abs().max().double_value(&[]);
        let scale = alone.abs().max().double_value(&[]).max(1.0);
        // Same kernels; only batch-size-dependent summation order differs
        // (which kernels libtorch picks by batch size depends on the CPU:
        // 1.3e-5 of outputs up to ~2 on an AMD EPYC, guidance 7.5
        // amplifying it). A wrong row or guidance is off by O(1).
        assert!(
            d < 2e-5 * scale,
            "merged vs alone: {d:e} (outputs up to {scale})"
        );
    }
    // And the guided result is uncond + g (cond - uncond), not cond alone.
    let mut unguided = job(1, 1, 999.0, true, 1.0);
    unguided.uncond = None;
    let plain = forward_calls(&unet, &[&unguided]).unwrap().remove(0);
    assert!((&plain - &merged[0]).abs().max().double_value(&[]) > 1e-3);
}

fn metric(m: &Metrics, name: &str) -> f64 {
    m.encode()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Four generations of five steps each (guided and not, batch 1 and 2,
/// different guidance) through a batcher with `workers` workers, all
/// at once; every result must be the call's own. Returns the number of
/// forwards each worker ran.
async fn run_sessions(workers: usize) -> Vec<u64> {
    let unet = tiny_unet();
    let metrics = Metrics::new("test");
    let config = BatchConfig {
        max_items: 16,
        max_wait: Duration::ZERO,
        session_wait: Duration::from_millis(50),
        workers,
    };
    let batcher = Batcher::start(unet.clone(), config, metrics.clone()).unwrap();
    let steps = 5u32;
    // Inputs and expected outputs first, one at a time (the global torch
    // RNG is not for concurrent use).
    let sessions: Vec<Vec<(Call, Tensor)>> = (0..4u64)
        .map(|s| {
            (0..steps)
                .map(|k| {
                    let (b, guided) = (1 + (s as i64 % 2), s != 3);
                    let t = 900.0 - 100.0 * k as f32;
                    let call = job((s * 100 + k as u64) as i64, b, t, guided, 2.0 + s as f64);
                    let want = forward_calls(&unet, &[&call]).unwrap().remove(0);
                    (call, want)
                })
                .collect()
        })
        .collect();
    let mut tasks = Vec::new();
    for (s, work) in sessions.into_iter().enumerate() {
        let batcher = batcher.clone();
        tasks.push(tokio::spawn(async move {
            for (k, (call, want)) in work.into_iter().enumerate() {
                let session = Session::caller(s as u64 + 1, steps - k as u32 - 1);
                let (got, _) = batcher.submit(call, session).await.unwrap();
                let d = (&got - &want).abs().max().double_value(&[]);
                assert!(d < 1e-5, "session {s} step {k}: {d:e}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_worker = batcher.forwards_per_worker();
    // The metric counts the same forwards.
    let total = metric(&metrics, "sd_unet_batch_items_count");
    assert_eq!(total, per_worker.iter().sum::<u64>() as f64);
    per_worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_share_forwards_and_get_their_own_results() {
    // One worker: generations in flight together share forwards.
    let forwards: u64 = run_sessions(1).await.iter().sum();
    assert!(forwards < 20, "{forwards} forwards for 20 calls");
    // Two workers: the work spreads over both; results stay each call's own.
    let per_worker = run_sessions(2).await;
    assert!(
        per_worker.iter().all(|&n| n >= 1),
        "forwards per worker: {per_worker:?}"
    );
}

#[tokio::test]
async fn a_session_that_never_returns_does_not_stall_the_others() {
    let unet = tiny_unet();
    let config = BatchConfig {
        max_items: 16,
        max_wait: Duration::ZERO,
        session_wait: Duration::from_millis(200),
        workers: 1,
    };
    let batcher = Batcher::start(unet, config, Metrics::new("test")).unwrap();
    // Session 1 promises more steps and vanishes.
    let gone = Session::caller(1, 10);
    let (first, _) = batcher
        .submit(job(1, 1, 500.0, true, 3.0), gone)
        .await
        .unwrap();
    assert_eq!(first.size(), vec![1, 4, 8, 8]);
    // Session 2 still gets its steps done: the first waits (at most as
    // long as a forward took) for session 1, which is then forgotten.
    let start = Instant::now();
    for k in 0..3 {
        let s = Session::caller(2, 2 - k);
        let (out, _) = tokio::time::timeout(
            Duration::from_secs(30),
            batcher.submit(job(2, 1, 400.0, true, 3.0), s),
        )
        .await
        .expect("the batcher stalled")
        .unwrap();
        assert_eq!(out.size(), vec![1, 4, 8, 8]);
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_call_larger_than_a_batch_runs_alone() {
    let unet = tiny_unet();
    let config = BatchConfig {
        max_items: 2,
        max_wait: Duration::ZERO,
        session_wait: Duration::ZERO,
        workers: 2,
    };
    let batcher = Batcher::start(unet, config, Metrics::new("test")).unwrap();
    // Guided, batch 2: four UNet rows against a limit of two.
    for _ in 0..2 {
        let (out, _) = tokio::time::timeout(
            Duration::from_secs(30),
            batcher.submit(job(5, 2, 300.0, true, 7.5), Session::default()),
        )
        .await
        .expect("the batcher stalled")
        .unwrap();
        assert_eq!(out.size(), vec![2, 4, 8, 8]);
    }
}

#[test]
fn caller_and_stream_sessions_never_meet() {
    assert_eq!(Session::caller(0, 3).key, None);
    assert_eq!(Session::caller(7, 3).key, Some(SessionKey::Caller(7)));
    assert_ne!(Session::caller(7, 3).key, Session::stream(7, 3).key);
}

/// Queue `calls` (each in its span) at once, so that the next gather
/// finds them all; their replies.
fn enqueue_together(
    batcher: &Batcher,
    calls: Vec<(Call, tracing::Span)>,
) -> Vec<tokio::sync::oneshot::Receiver<Reply>> {
    let mut state = batcher.shared.lock();
    calls
        .into_iter()
        .map(|(call, span)| {
            span.in_scope(|| batcher.enqueue(&mut state, call, Session::default()))
                .unwrap()
        })
        .collect()
}

async fn timings(rx: tokio::sync::oneshot::Receiver<Reply>) -> Timings {
    rx.await.unwrap().unwrap().1
}

#[tokio::test]
async fn each_call_gets_its_queue_wait_and_forward_time() {
    // Two rows a forward: each guided call runs alone, one after the other.
    let config = BatchConfig {
        max_items: 2,
        max_wait: Duration::ZERO,
        session_wait: Duration::ZERO,
        workers: 1,
    };
    let batcher = Batcher::start(tiny_unet(), config, Metrics::new("test")).unwrap();
    let calls = vec![
        (job(1, 1, 500.0, true, 3.0), tracing::Span::none()),
        (job(2, 1, 400.0, true, 3.0), tracing::Span::none()),
    ];
    let start = Instant::now();
    let mut rxs = enqueue_together(&batcher, calls).into_iter();
    let (a, b) = (rxs.next().unwrap(), rxs.next().unwrap());
    let ta = timings(a).await;
    let tb = timings(b).await;
    let wall = start.elapsed();
    for t in [ta, tb] {
        assert!(t.forward > Duration::ZERO, "{t:?}");
        assert!(t.queue + t.forward <= wall, "{t:?} in {wall:?}");
    }
    // Two forwards; the second call waited while the first's ran.
    assert_eq!(batcher.forwards_per_worker(), vec![2]);
    assert!(tb.queue >= ta.forward, "{ta:?} then {tb:?}");
}

/// What a test subscriber saw: spans by id (name and fields) and
/// follows-from links.
#[derive(Default)]
struct Seen {
    spans: HashMap<u64, (String, String)>,
    follows: Vec<(u64, u64)>,
}

struct Recorder(Arc<Mutex<Seen>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0 += &format!("{}={v:?} ", f.name());
            }
        }
        let mut fields = Fields(String::new());
        attrs.record(&mut fields);
        let name = attrs.metadata().name().to_string();
        let mut seen = self.0.lock().unwrap();
        seen.spans.insert(id.into_u64(), (name, fields.0));
    }

    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut seen = self.0.lock().unwrap();
        seen.follows.push((span.into_u64(), follows.into_u64()));
    }
}

/// tracing caches each callsite's interest process-wide: another test
/// creating `unet_batch` spans with no subscriber at the same moment can
/// leave the callsite disabled for this one. So this test runs alone, in
/// a process of its own (this test binary, re-run on just this test).
#[test]
fn a_batched_forward_follows_from_the_calls_it_serves() {
    const ALONE: &str = "SD_TEST_ALONE";
    if std::env::var_os(ALONE).is_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        return rt.block_on(batched_forward_follows_from_the_calls_it_serves());
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "batch::tests::a_batched_forward_follows_from_the_calls_it_serves",
            "--test-threads",
            "1",
            "--nocapture",
        ])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the test did not run: {text}");
}

async fn batched_forward_follows_from_the_calls_it_serves() {
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let subscriber = tracing_subscriber::registry().with(Recorder(seen.clone()));
    let _default = tracing::subscriber::set_default(subscriber);
    let config = BatchConfig {
        max_items: 16,
        max_wait: Duration::ZERO,
        session_wait: Duration::ZERO,
        workers: 1,
    };
    let batcher = Batcher::start(tiny_unet(), config, Metrics::new("test")).unwrap();
    let spans: Vec<tracing::Span> = (0..2)
        .map(|i| tracing::info_span!("rpc", call = i))
        .collect();
    let requests: Vec<u64> = spans.iter().map(|s| s.id().unwrap().into_u64()).collect();
    let calls = vec![
        (job(1, 1, 500.0, true, 3.0), spans[0].clone()),
        (job(2, 2, 400.0, false, 1.0), spans[1].clone()),
    ];
    let mut rxs = enqueue_together(&batcher, calls).into_iter();
    let (a, b) = (rxs.next().unwrap(), rxs.next().unwrap());
    let (ta, tb) = (timings(a).await, timings(b).await);
    // Queued together, the two calls shared one forward of four rows.
    assert_eq!(ta.forward, tb.forward);
    drop(batcher);
    let seen = seen.lock().unwrap();
    let batches: Vec<(&u64, &String)> = seen
        .spans
        .iter()
        .filter(|(_, (name, _))| name == "unet_batch")
        .map(|(id, (_, fields))| (id, fields))
        .collect();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let (batch, fields) = batches[0];
    assert!(
        fields.contains("rows=4") && fields.contains("calls=2"),
        "{fields}"
    );
    for r in &requests {
        assert!(seen.follows.contains(&(*batch, *r)), "{:?}", seen.follows);
    }
}

/// A batcher with one worker that never waits for company.
fn one_worker() -> Batcher {
    let config = BatchConfig {
        max_items: 16,
        max_wait: Duration::ZERO,
        session_wait: Duration::ZERO,
        workers: 1,
    };
    Batcher::start(tiny_unet(), config, Metrics::new("test")).unwrap()
}

/// A call whose caller leaves while it waits in the queue (the UNet busy
/// with another) is never computed; the next caller is served as usual.
#[tokio::test]
async fn calls_whose_callers_left_are_not_computed() {
    let batcher = one_worker();
    let shared = batcher.shared.clone();
    let mut busy = job(1, 4, 10.0, true, 7.5);
    busy.latents = Tensor::randn([4, 4, 48, 48], (tch::Kind::Float, tch::Device::Cpu));
    let busy = batcher
        .enqueue(&mut shared.lock(), busy, Session::default())
        .unwrap();
    while !shared.lock().queue.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let gone = batcher.submit(job(2, 1, 10.0, false, 1.0), Session::default());
    assert!(tokio::time::timeout(Duration::from_millis(2), gone)
        .await
        .is_err());
    assert_eq!(
        batcher.forwards_per_worker(),
        vec![0],
        "the busy forward must still run when the caller leaves (make it bigger)"
    );
    let _ = busy.await.unwrap().unwrap();
    let (out, _) = batcher
        .submit(job(3, 1, 10.0, false, 1.0), Session::default())
        .await
        .unwrap();
    assert_eq!(out.size(), vec![1, 4, 8, 8]);
    assert_eq!(
        batcher.forwards_per_worker(),
        vec![2],
        "the abandoned call ran"
    );
}

/// Dropping the batcher waits for a forward in progress: when the drop
/// returns, the forward has finished and its caller has its answer (no
/// worker is left inside libtorch when the process exits).
#[tokio::test]
async fn stopping_waits_for_the_forward_in_progress() {
    let batcher = one_worker();
    let shared = batcher.shared.clone();
    let mut big = job(1, 4, 10.0, true, 7.5);
    big.latents = Tensor::randn([4, 4, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    let rx = batcher
        .enqueue(&mut shared.lock(), big, Session::default())
        .unwrap();
    let answered = tokio::spawn(rx);
    // Until the worker has taken the call off the queue.
    while !shared.lock().queue.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::task::spawn_blocking(move || drop(batcher))
        .await
        .unwrap();
    assert_eq!(
        shared.forwards[0].load(Ordering::Relaxed),
        1,
        "forward finished"
    );
    let reply = tokio::time::timeout(Duration::from_millis(500), answered)
        .await
        .expect("answered by the time the drop returned")
        .unwrap();
    assert_eq!(reply.unwrap().unwrap().0.size(), vec![4, 4, 32, 32]);
}

/// A UNet of the SDXL family written by `make_xl_models.py`.
fn xl_unet(name: &str) -> Denoiser {
    let dir = fixture().parent().unwrap().join("unets").join(name);
    let w = sd_models::Weights::open(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        Placement::cpu(),
    )
    .unwrap();
    sd_models::UNet::load(&dir.join("unet/config.json"), &w)
        .unwrap()
        .into()
}

fn xl_job(seed: i64, b: i64, t: f32, guided: bool, g: f64) -> Call {
    tch::manual_seed(seed);
    let f = (tch::Kind::Float, tch::Device::Cpu);
    let ids = |w: f64| {
        Tensor::from_slice(&[64.0f32, 80.0, 8.0, 0.0, 64.0, 80.0])
            .unsqueeze(0)
            .repeat([b, 1])
            * w
    };
    Call {
        latents: Tensor::randn([b, 4, 8, 8], f),
        timesteps: Tensor::from_slice(&vec![t; b as usize]),
        cond: Half {
            context: Tensor::randn([1, 77, 64], f),
            pooled: Some(Tensor::randn([1, 32], f)),
            time_ids: Some(ids(1.0 + seed as f64)),
        },
        uncond: guided.then(|| Half {
            context: Tensor::randn([1, 77, 64], f),
            pooled: Some(Tensor::randn([1, 32], f)),
            time_ids: Some(ids(0.5)),
        }),
        guidance: g,
        embedded_guidance: None,
        image: None,
        loras: Default::default(),
        references: None,
        controls: Vec::new(),
        ip: Vec::new(),
    }
}

#[test]
fn sdxl_calls_merge_and_each_gets_its_own_guided_result() {
    let unet = xl_unet("xl-unet");
    let jobs = [
        xl_job(1, 1, 999.0, true, 5.0),
        xl_job(2, 2, 500.0, true, 3.0),
        xl_job(3, 1, 20.5, false, 1.0),
    ];
    let refs: Vec<&Call> = jobs.iter().collect();
    let merged = forward_calls(&unet, &refs).unwrap();
    for (j, m) in jobs.iter().zip(&merged) {
        // Written out: each half with its own embeddings and time ids.
        let b = j.batch();
        let unet = unet.unet().unwrap();
        let half = |h: &Half| {
            unet.forward_with(
                &j.latents,
                &j.timesteps,
                &h.context.expand([b, -1, -1], false),
                sd_models::Added {
                    text_embeds: Some(&h.pooled.as_ref().unwrap().expand([b, -1], false)),
                    time_ids: h.time_ids.as_ref(),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let cond = half(&j.cond);
        let want = match &j.uncond {
            Some(u) => {
                let uncond = half(u);
                &uncond + (&cond - &uncond) * j.guidance
            }
            None => cond,
        };
        let d = (&want - m).abs().max().double_value(&[]);
        assert!(d < 1e-5, "merged vs written out: {d:e}");
    }
}

#[test]
fn an_lcm_unet_takes_the_guidance_as_an_embedding() {
    let unet = xl_unet("lcm-unet");
    let dir = fixture().parent().unwrap().join("unets/lcm-unet");
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // diffusers' get_guidance_scale_embedding of w = [6.5, 0, 2].
    for (row, w) in [6.5, 0.0, 2.0].into_iter().enumerate() {
        let got = sd_service::compute::guidance_embedding(w, 1, 16);
        let want = r["timestep_cond"].narrow(0, row as i64, 1);
        let d = (&got - &want).abs().max().double_value(&[]);
        assert!(d < 1e-6, "guidance embedding of {w}: {d:e}");
    }
    let jobs = [
        xl_job(4, 1, 999.0, false, 7.5),
        xl_job(5, 1, 259.0, false, 2.0),
    ];
    let refs: Vec<&Call> = jobs.iter().collect();
    let merged = forward_calls(&unet, &refs).unwrap();
    for (j, m) in jobs.iter().zip(&merged) {
        let cond = sd_service::compute::guidance_embedding(j.guidance - 1.0, 1, 16);
        let want = unet
            .unet()
            .unwrap()
            .forward_with(
                &j.latents,
                &j.timesteps,
                &j.cond.context,
                sd_models::Added {
                    text_embeds: j.cond.pooled.as_ref(),
                    time_ids: j.cond.time_ids.as_ref(),
                    timestep_cond: Some(&cond),
                    control: None,
                },
            )
            .unwrap();
        let d = (&want - m).abs().max().double_value(&[]);
        assert!(d < 1e-5, "lcm merged vs written out: {d:e}");
    }
}

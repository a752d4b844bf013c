//! Step-level dynamic batching: Predict calls for the same latent shape —
//! from different generations, at different timesteps, with different
//! guidance scales — merged into one UNet forward. Each call keeps its
//! conditional/unconditional pair together and its own guidance; a batch
//! takes up to `max_items` latents (guided calls count twice, as they run
//! twice) and waits at most `max_wait` for company.

use std::collections::VecDeque;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_models::UNet;
use sd_runtime::metrics::Metrics;
use tch::Tensor;
use tonic::Status;

/// One Predict call, checked.
pub struct Job {
    /// (B, C, h, w)
    pub latents: Tensor,
    /// (B,)
    pub timesteps: Tensor,
    /// (1 or B, tokens, dim)
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub guidance: f64,
    pub reply: tokio::sync::oneshot::Sender<Result<Tensor, Status>>,
}

// SAFETY: a Job's tensors are created for it and moved to the batcher
// thread; nothing else holds them.
unsafe impl Send for Job {}

impl Job {
    fn batch(&self) -> i64 {
        self.latents.size()[0]
    }

    /// UNet rows this call needs (twice its batch when guided).
    fn rows(&self) -> i64 {
        self.batch() * if self.uncond.is_some() { 2 } else { 1 }
    }

    /// Calls merge when latents and text embeddings have the same shape past the batch.
    fn key(&self) -> (Vec<i64>, Vec<i64>) {
        (
            self.latents.size()[1..].to_vec(),
            self.cond.size()[1..].to_vec(),
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub max_items: i64,
    pub max_wait: Duration,
}

/// Run several calls as one forward; outputs in call order.
pub fn forward_merged(unet: &UNet, jobs: &[&Job]) -> sd_models::Result<Vec<Tensor>> {
    let mut xs = Vec::new();
    let mut ts = Vec::new();
    let mut ctxs = Vec::new();
    for j in jobs {
        let b = j.batch();
        let expand = |t: &Tensor| t.expand([b, -1, -1], false);
        let t = j.timesteps.expand([b], false);
        if let Some(u) = &j.uncond {
            // diffusers' order within a call: [uncond, cond].
            xs.extend([j.latents.shallow_clone(), j.latents.shallow_clone()]);
            ts.extend([t.shallow_clone(), t]);
            ctxs.extend([expand(u), expand(&j.cond)]);
        } else {
            xs.push(j.latents.shallow_clone());
            ts.push(t);
            ctxs.push(expand(&j.cond));
        }
    }
    let out = unet.forward(
        &Tensor::cat(&xs, 0),
        &Tensor::cat(&ts, 0),
        &Tensor::cat(&ctxs, 0),
    )?;
    let mut results = Vec::with_capacity(jobs.len());
    let mut offset = 0;
    for j in jobs {
        let b = j.batch();
        if j.uncond.is_some() {
            let u = out.narrow(0, offset, b);
            let c = out.narrow(0, offset + b, b);
            results.push(&u + (&c - &u) * j.guidance);
            offset += 2 * b;
        } else {
            results.push(out.narrow(0, offset, b));
            offset += b;
        }
    }
    Ok(results)
}

/// Queue of calls in front of the UNet, drained by one thread.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    pub fn start(unet: Arc<UNet>, config: BatchConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("unet-batcher".into())
            .spawn(move || run(unet, rx, config, metrics))
            .expect("spawning the batcher thread");
        Batcher { tx }
    }

    pub async fn submit(&self, mut job: Job) -> Result<Tensor, Status> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        job.reply = reply;
        self.tx
            .send(job)
            .map_err(|_| Status::unavailable("the UNet worker stopped"))?;
        rx.await
            .map_err(|_| Status::internal("the UNet worker dropped the call"))?
    }
}

fn run(unet: Arc<UNet>, rx: mpsc::Receiver<Job>, config: BatchConfig, metrics: Arc<Metrics>) {
    let _guard = tch::no_grad_guard();
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match pending.pop_front() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // service shutting down
            },
        };
        if first.reply.is_closed() {
            continue; // the caller went away while queued
        }
        let key = first.key();
        let mut rows = first.rows();
        let mut batch = vec![first];
        // Calls already waiting that fit join first …
        let mut keep = VecDeque::new();
        while let Some(j) = pending.pop_front() {
            if j.key() == key && rows + j.rows() <= config.max_items {
                rows += j.rows();
                batch.push(j);
            } else {
                keep.push_back(j);
            }
        }
        pending = keep;
        // … then new ones, for at most max_wait.
        let deadline = Instant::now() + config.max_wait;
        while rows < config.max_items {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) if j.key() == key && rows + j.rows() <= config.max_items => {
                    rows += j.rows();
                    batch.push(j);
                }
                Ok(j) => pending.push_back(j),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let start = Instant::now();
        let refs: Vec<&Job> = batch.iter().collect();
        let outcome = sd_models::error::guarded(|| forward_merged(&unet, &refs));
        metrics.step("unet_forward", start.elapsed());
        metrics.step_batch(rows as f64);
        match outcome {
            Ok(outs) => {
                for (job, out) in batch.into_iter().zip(outs) {
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                let s = sd_service::status(e);
                for job in batch {
                    let _ = job.reply.send(Err(s.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_models::{ModelDir, Placement};

    fn fixture() -> std::path::PathBuf {
        std::env::var_os("SD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/sd-fixtures")
            })
            .join("sd1-tiny")
    }

    fn job(seed: i64, b: i64, t: f32, guided: bool, g: f64) -> Job {
        tch::manual_seed(seed);
        let f = (tch::Kind::Float, tch::Device::Cpu);
        Job {
            latents: Tensor::randn([b, 4, 8, 8], f),
            timesteps: Tensor::from_slice(&vec![t; b as usize]),
            cond: Tensor::randn([1, 77, 32], f),
            uncond: guided.then(|| Tensor::randn([1, 77, 32], f)),
            guidance: g,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    #[test]
    fn merged_forwards_equal_separate_ones() {
        let unet = ModelDir::open(fixture())
            .unwrap()
            .load_unet(Placement::cpu())
            .unwrap();
        // Different generations: batch sizes, timesteps, guidance on and off.
        let jobs = [
            job(1, 1, 999.0, true, 7.5),
            job(2, 2, 500.0, true, 3.0),
            job(3, 1, 20.5, false, 1.0),
        ];
        let refs: Vec<&Job> = jobs.iter().collect();
        let merged = forward_merged(&unet, &refs).unwrap();
        for (j, m) in jobs.iter().zip(&merged) {
            let alone = forward_merged(&unet, &[j]).unwrap().remove(0);
            assert_eq!(alone.size(), m.size());
            let d = (&alone - m).abs().max().double_value(&[]);
            // Same kernels; only batch-size-dependent summation order differs.
            assert!(d < 1e-5, "merged vs alone: {d:e}");
        }
        // And the guided result is uncond + g (cond - uncond), not cond alone.
        let mut unguided = job(1, 1, 999.0, true, 1.0);
        unguided.uncond = None;
        let plain = forward_merged(&unet, &[&unguided]).unwrap().remove(0);
        assert!((&plain - &merged[0]).abs().max().double_value(&[]) > 1e-3);
    }
}

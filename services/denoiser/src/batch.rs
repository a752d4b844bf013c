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
use sd_service::compute::{forward_calls, Call};
use tch::Tensor;
use tonic::Status;

/// One Predict call waiting for its result.
pub struct Job {
    pub call: Call,
    pub reply: tokio::sync::oneshot::Sender<Result<Tensor, Status>>,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub max_items: i64,
    pub max_wait: Duration,
}

/// Queue of calls in front of the UNet, drained by one thread.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    pub fn start(
        unet: Arc<UNet>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("unet-batcher".into())
            .spawn(move || run(unet, rx, config, metrics))?;
        Ok(Batcher { tx })
    }

    pub async fn submit(&self, call: Call) -> Result<Tensor, Status> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job { call, reply })
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
        let key = first.call.key();
        let mut rows = first.call.rows();
        let mut batch = vec![first];
        // Calls already waiting that fit join first …
        let mut keep = VecDeque::new();
        while let Some(j) = pending.pop_front() {
            if j.call.key() == key && rows + j.call.rows() <= config.max_items {
                rows += j.call.rows();
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
                Ok(j) if j.call.key() == key && rows + j.call.rows() <= config.max_items => {
                    rows += j.call.rows();
                    batch.push(j);
                }
                Ok(j) => pending.push_back(j),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let start = Instant::now();
        let refs: Vec<&Call> = batch.iter().map(|j| &j.call).collect();
        let outcome = sd_models::error::guarded(|| forward_calls(&unet, &refs));
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

    fn job(seed: i64, b: i64, t: f32, guided: bool, g: f64) -> Call {
        tch::manual_seed(seed);
        let f = (tch::Kind::Float, tch::Device::Cpu);
        Call {
            latents: Tensor::randn([b, 4, 8, 8], f),
            timesteps: Tensor::from_slice(&vec![t; b as usize]),
            cond: Tensor::randn([1, 77, 32], f),
            uncond: guided.then(|| Tensor::randn([1, 77, 32], f)),
            guidance: g,
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
        let refs: Vec<&Call> = jobs.iter().collect();
        let merged = forward_calls(&unet, &refs).unwrap();
        for (j, m) in jobs.iter().zip(&merged) {
            let alone = forward_calls(&unet, &[j]).unwrap().remove(0);
            assert_eq!(alone.size(), m.size());
            let d = (&alone - m).abs().max().double_value(&[]);
            // Same kernels; only batch-size-dependent summation order differs.
            assert!(d < 1e-5, "merged vs alone: {d:e}");
        }
        // And the guided result is uncond + g (cond - uncond), not cond alone.
        let mut unguided = job(1, 1, 999.0, true, 1.0);
        unguided.uncond = None;
        let plain = forward_calls(&unet, &[&unguided]).unwrap().remove(0);
        assert!((&plain - &merged[0]).abs().max().double_value(&[]) > 1e-3);
    }
}

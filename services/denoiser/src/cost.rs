//! What a UNet forward costs on this replica's device, measured at start
//! and published in `DenoiserInfo.cost`: one row's seconds at latent sides
//! doubling from 8 up to twice the model's native side (while a time budget
//! lasts), and what a second row adds. The gateway admits requests by the
//! seconds this predicts (sd_proto's `ForwardCost::seconds`).
//!
//! How a forward's time grows with the latent size depends on the device
//! and the attention kernel: between linear (convolutions, memory-efficient
//! attention) and the square of the positions (attention's scores
//! materialised). One CPU took 1.9 s at 256², ~30 s at 512², ~390 s at 1024²
//! for SD 1.5; this project's 2-vCPU machine 1.5 s and 5.2 s. So the growth
//! is measured, and beyond the largest size measured the prediction follows
//! the last measured segment's growth, between linear and square. Erring
//! low there mends itself (the request runs, and the denoiser's live cost
//! then knows its size); erring high would not (a refused size never runs).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_models::{Denoiser, Layout};
use sd_proto::v1::{CostPoint, ForwardCost};
use tch::Kind;

/// Forward passes per size while forwards are quick; the fastest counts
/// (the first at a new shape pays one-time set-up, and a busy machine slows
/// some). Slower ones run once.
const RUNS: usize = 3;

/// What counts as quick for [`RUNS`].
const QUICK: Duration = Duration::from_millis(500);

fn runs_for(expected: Duration) -> usize {
    if expected < QUICK {
        RUNS
    } else {
        1
    }
}

/// Most points a live cost keeps (forwards at sizes not measured at start
/// add theirs).
const MAX_POINTS: usize = 24;

/// Weight of one observed forward in a point's running average.
const OBSERVED_WEIGHT: f64 = 0.2;

/// The cost as measured at start, kept current by the forwards the service
/// runs: each one moves the point of its size toward what it took (or adds
/// that size), so a start-up measurement skewed by a busy machine mends
/// with use. Info publishes the current one.
pub struct LiveCost(Mutex<ForwardCost>);

impl LiveCost {
    pub fn new(cost: ForwardCost) -> Self {
        LiveCost(Mutex::new(cost))
    }

    pub fn snapshot(&self) -> ForwardCost {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A forward of `rows` rows at `positions` latent positions took `took`.
    pub fn observe(&self, positions: u64, rows: i64, took: Duration) {
        let mut cost = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let extra = (rows.max(1) - 1) as f64 * cost.row_factor.clamp(0.0, 1.0);
        let one = took.as_secs_f64() / (1.0 + extra);
        if !(one.is_finite() && one > 0.0) {
            return;
        }
        if let Some(p) = cost.points.iter_mut().find(|p| p.positions == positions) {
            p.seconds += OBSERVED_WEIGHT * (one - p.seconds);
        } else if cost.points.len() < MAX_POINTS {
            let at = cost.points.partition_point(|p| p.positions < positions);
            cost.points.insert(
                at,
                CostPoint {
                    positions,
                    seconds: one,
                },
            );
        }
    }
}

/// How far to measure.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Time the measurement may take in all.
    pub time: Duration,
    /// Largest latent side to try.
    pub max_side: i64,
}

/// Measure `net`; the first size is always measured (it is the warm-up).
pub fn measure(
    net: &Denoiser,
    layout: &Layout,
    budget: Budget,
) -> sd_models::error::Result<ForwardCost> {
    let started = Instant::now();
    let native = layout.native_side.max(1);
    let mut side = native.min(8);
    // Untimed: the very first forward sets up libtorch's kernels and pools.
    let _ = fastest(net, 1, side, 1)?;
    let mut points = Vec::new();
    let mut last = Duration::ZERO;
    let mut runs = RUNS;
    loop {
        let seconds = fastest(net, 1, side, runs)?;
        points.push(CostPoint {
            positions: (side * side) as u64,
            seconds: seconds.as_secs_f64(),
        });
        last = last.max(seconds);
        side *= 2;
        // The next size: 4× the positions, at least 4× the time.
        let next = last * 4;
        runs = runs_for(next);
        let whole = next * runs as u32;
        if side > (2 * native).min(budget.max_side) || started.elapsed() + whole > budget.time {
            break;
        }
    }
    let row_factor = row_factor(net, &points, budget.time.saturating_sub(started.elapsed()))?;
    let cost = ForwardCost {
        growth_exponent: growth_exponent(&points),
        points,
        row_factor,
    };
    tracing::info!(
        took_s = started.elapsed().as_secs_f64(),
        "forward cost measured: {}",
        cost
    );
    Ok(cost)
}

/// What a second row adds, measured at the largest size that fits the
/// time left (1, linear, when none does).
fn row_factor(
    net: &Denoiser,
    points: &[CostPoint],
    left: Duration,
) -> sd_models::error::Result<f64> {
    let fits = points.iter().rev().find(|p| {
        let two = Duration::from_secs_f64(p.seconds * 2.0);
        two * runs_for(two) as u32 <= left
    });
    let Some(p) = fits else { return Ok(1.0) };
    let side = (p.positions as f64).sqrt().round() as i64;
    let expected = Duration::from_secs_f64(p.seconds * 2.0);
    let two = fastest(net, 2, side, runs_for(expected))?.as_secs_f64();
    Ok((two / p.seconds - 1.0).clamp(0.05, 1.0))
}

/// Growth beyond the largest size measured: the last measured segment's,
/// between linear and square; linear when only one size was measured.
/// A large model on a slow device may manage only the smallest size in
/// the budget, where its time is mostly reading the weights and hardly
/// grows with the size: squaring from there refused SDXL at 256² on this
/// project's CPU as a 2,000-second request. Erring low mends itself (the
/// request runs and its size becomes a point); erring high never would.
fn growth_exponent(points: &[CostPoint]) -> f64 {
    let [.., a, b] = points else { return 1.0 };
    let slope = (b.seconds / a.seconds).ln() / (b.positions as f64 / a.positions as f64).ln();
    if slope.is_finite() {
        slope.clamp(1.0, 2.0)
    } else {
        2.0
    }
}

/// The fastest of `runs` forwards of `rows` rows at `side`².
fn fastest(
    net: &Denoiser,
    rows: i64,
    side: i64,
    runs: usize,
) -> sd_models::error::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let start = Instant::now();
        let out = net.probe(rows, side, net.typical_tokens())?;
        // Reading a value waits for the device to finish.
        let _ = out.f_sum(Kind::Float)?.f_double_value(&[])?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_models::{ModelDir, Placement};

    fn tiny_unet() -> (Denoiser, Layout) {
        let dir = std::env::var_os("SD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/sd-fixtures")
            })
            .join("sd1-tiny");
        let dir = ModelDir::open(dir).unwrap();
        let net = Denoiser::load(&dir, Placement::cpu()).unwrap();
        let vae = sd_models::config::VaeConfig::read(&dir.config_path(sd_models::Component::Vae))
            .unwrap();
        let layout = net.layout(&vae);
        (net, layout)
    }

    #[test]
    fn measures_doubling_sides_and_predicts_what_it_measured() {
        let (unet, layout) = tiny_unet();
        let budget = Budget {
            time: Duration::from_secs(30),
            max_side: 256,
        };
        let cost = measure(&unet, &layout, budget).unwrap();
        let sides: Vec<u64> = cost.points.iter().map(|p| p.positions).collect();
        assert_eq!(sides, vec![64, 256], "8² and 16² (twice the native 8)");
        assert!(cost.points.iter().all(|p| p.seconds > 0.0));
        assert!(
            (0.05..=1.0).contains(&cost.row_factor),
            "{}",
            cost.row_factor
        );
        assert!((1.0..=2.0).contains(&cost.growth_exponent));
        // (How close its predictions come is sd-bench's to show: timings
        // in a test flake on a shared machine.)
    }

    #[test]
    fn observed_forwards_mend_and_extend_the_cost() {
        let live = LiveCost::new(ForwardCost {
            points: vec![CostPoint {
                positions: 64,
                seconds: 1.0,
            }],
            row_factor: 0.5,
            growth_exponent: 2.0,
        });
        // A start-up measurement ten times too slow mends toward the truth.
        for _ in 0..30 {
            live.observe(64, 1, Duration::from_millis(100));
        }
        let p = live.snapshot().points[0].seconds;
        assert!((p - 0.1).abs() < 0.01, "{p}");
        // Three rows at row factor 0.5 are twice one row: 0.8 s is 0.4 s a row.
        live.observe(256, 3, Duration::from_millis(800));
        let c = live.snapshot();
        assert_eq!(
            c.points.iter().map(|p| p.positions).collect::<Vec<_>>(),
            vec![64, 256]
        );
        assert!((c.points[1].seconds - 0.4).abs() < 1e-9);
        assert!((c.seconds(256, 1).unwrap() - 0.4).abs() < 1e-9);
        for n in 0..100 {
            live.observe(1000 + n, 1, Duration::from_millis(5));
        }
        assert_eq!(live.snapshot().points.len(), MAX_POINTS);
    }

    #[test]
    fn a_spent_budget_measures_only_the_first_size() {
        let (unet, layout) = tiny_unet();
        let budget = Budget {
            time: Duration::ZERO,
            max_side: 256,
        };
        let cost = measure(&unet, &layout, budget).unwrap();
        assert_eq!(cost.points.len(), 1);
        assert_eq!(cost.row_factor, 1.0, "no time to measure rows: linear");
        assert_eq!(cost.growth_exponent, 1.0, "one size: linear beyond it");
        assert!(cost.to_string().starts_with("8²: "), "{cost}");
    }
}

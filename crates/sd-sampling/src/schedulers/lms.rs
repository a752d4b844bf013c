//! Linear multistep (diffusers' `LMSDiscreteScheduler`, order 4). The
//! coefficients are integrals of Lagrange polynomials over sigma; diffusers
//! integrates numerically, here they are integrated exactly (Gauss–Legendre
//! with enough points for the polynomial's degree).

use super::common::{k_denoised, SchedulerConfig};
use super::euler::{sigma_schedule_methods, SigmaSchedule};
use super::{Scheduler, SchedulerError};

const ORDER: usize = 4;

pub struct Lms {
    s: SigmaSchedule,
    derivatives: Vec<Vec<f32>>,
}

impl Lms {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        Ok(Lms {
            s: SigmaSchedule::new(c, steps, use_karras)?,
            derivatives: Vec::new(),
        })
    }

    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sig = |k: usize| self.s.sigmas[k] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - sig(t - k)) / (sig(t - current) - sig(t - k)))
                .product::<f64>()
        };
        // 4-point Gauss–Legendre: exact for degree <= 7 (the basis has degree < 4).
        const X: [f64; 4] = [
            -0.861_136_311_594_052_6,
            -0.339_981_043_584_856_3,
            0.339_981_043_584_856_3,
            0.861_136_311_594_052_6,
        ];
        const W: [f64; 4] = [
            0.347_854_845_137_453_9,
            0.652_145_154_862_546_1,
            0.652_145_154_862_546_1,
            0.347_854_845_137_453_9,
        ];
        let (a, b) = (sig(t), sig(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        X.iter()
            .zip(W)
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Scheduler for Lms {
    sigma_schedule_methods!();

    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        _: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let sigma = self.s.sigmas[i];
        let x0 = k_denoised(self.s.common.prediction, model_output, sample, sigma);
        self.derivatives.push(
            sample
                .iter()
                .zip(&x0)
                .map(|(s, x)| (s - x) / sigma)
                .collect(),
        );
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let coeffs: Vec<f32> = (0..order)
            .map(|c| self.coefficient(order, i, c) as f32)
            .collect();
        let n = self.derivatives.len();
        (0..sample.len())
            .map(|k| {
                // As diffusers' zip: image-to-image can start with fewer
                // derivatives than coefficients.
                let update: f32 = coeffs
                    .iter()
                    .take(n)
                    .enumerate()
                    .map(|(j, c)| c * self.derivatives[n - 1 - j][k])
                    .sum();
                sample[k] + update
            })
            .collect()
    }
}

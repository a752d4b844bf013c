//! The forward cost a denoiser publishes in `DenoiserInfo.cost` (measured
//! on its own device at start), evaluated the one way both sides read it:
//! the gateway to admit by predicted seconds, the denoiser's tests to check
//! what it measured; and written the one way logs and the benchmark show it.

use crate::v1::ForwardCost;

/// `8²: 0.0120 s, 16²: 0.0400 s; a row more: ×0.80; beyond: ^2.0`.
impl std::fmt::Display for ForwardCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let points: Vec<String> = self
            .points
            .iter()
            .map(|p| {
                let side = (p.positions as f64).sqrt().round();
                format!("{side}²: {:.4} s", p.seconds)
            })
            .collect();
        write!(
            f,
            "{}; a row more: ×{:.2}; beyond: ^{:.1}",
            points.join(", "),
            self.row_factor,
            self.growth_exponent
        )
    }
}

impl ForwardCost {
    /// Predicted seconds of one forward over `rows` rows of
    /// `positions` latent positions (height × width); None when nothing was
    /// measured.
    pub fn seconds(&self, positions: u64, rows: u64) -> Option<f64> {
        let one = self.one_row(positions.max(1))?;
        let extra = rows.max(1) - 1;
        Some(one * (1.0 + extra as f64 * self.row_factor.clamp(0.0, 1.0)))
    }

    /// One row's seconds: the first point's below it, log-log interpolation
    /// between points, growth by `growth_exponent` (1 to 4) beyond.
    fn one_row(&self, n: u64) -> Option<f64> {
        let mut points: Vec<(f64, f64)> = self
            .points
            .iter()
            .filter(|p| p.positions > 0 && p.seconds.is_finite() && p.seconds > 0.0)
            .map(|p| (p.positions as f64, p.seconds))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (&first, &last) = (points.first()?, points.last()?);
        let n = n as f64;
        if n <= first.0 {
            return Some(first.1);
        }
        if n >= last.0 {
            let exponent = if self.growth_exponent.is_finite() {
                self.growth_exponent.clamp(1.0, 4.0)
            } else {
                2.0
            };
            return Some(last.1 * (n / last.0).powf(exponent));
        }
        let i = points.iter().position(|p| p.0 >= n)?;
        let ((n0, t0), (n1, t1)) = (points[i - 1], points[i]);
        let f = (n / n0).ln() / (n1 / n0).ln();
        Some((t0.ln() + f * (t1.ln() - t0.ln())).exp())
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::{CostPoint, ForwardCost};

    fn cost() -> ForwardCost {
        ForwardCost {
            points: vec![
                CostPoint {
                    positions: 64,
                    seconds: 0.1,
                },
                CostPoint {
                    positions: 1024,
                    seconds: 1.6,
                },
                CostPoint {
                    positions: 256,
                    seconds: 0.4,
                },
            ],
            row_factor: 0.5,
            growth_exponent: 2.0,
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9 * b.max(1.0))
    }

    #[test]
    fn interpolates_measured_points_and_grows_beyond_them() {
        let c = cost();
        assert!(close(c.seconds(256, 1), 0.4), "a measured point");
        assert!(close(c.seconds(16, 1), 0.1), "below: the smallest's");
        assert!(close(c.seconds(128, 1), 0.2), "log-log between 64 and 256");
        assert!(
            close(c.seconds(4096, 1), 1.6 * 16.0),
            "4× positions: 16× beyond"
        );
        assert!(close(c.seconds(256, 3), 0.4 * 2.0), "two more rows at half");
        let steeper = ForwardCost {
            growth_exponent: 2.5,
            ..cost()
        };
        assert!(close(steeper.seconds(4096, 1), 1.6 * 32.0));
        let linear = ForwardCost {
            growth_exponent: 1.0,
            ..cost()
        };
        assert!(close(linear.seconds(4096, 1), 1.6 * 4.0));
        let falling = ForwardCost {
            growth_exponent: 0.2,
            ..cost()
        };
        assert!(
            close(falling.seconds(4096, 1), 1.6 * 4.0),
            "never below linear"
        );
    }

    #[test]
    fn nothing_measured_predicts_nothing() {
        assert_eq!(ForwardCost::default().seconds(64, 1), None);
        let junk = ForwardCost {
            points: vec![CostPoint {
                positions: 0,
                seconds: f64::NAN,
            }],
            ..ForwardCost::default()
        };
        assert_eq!(junk.seconds(64, 1), None);
    }
}

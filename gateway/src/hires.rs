//! Hires fix, as AUTOMATIC1111's `StableDiffusionProcessingTxt2Img` runs
//! it: the first pass at the requested size; its latents enlarged (torch's
//! `interpolate` in one of A1111's latent modes) or its image enlarged
//! (Lanczos, nearest) and encoded again; then an image-to-image pass at the
//! larger size that runs exactly the second pass's steps on the tail of a
//! longer schedule (`int(steps / strength)` steps, A1111's "fix steps"),
//! its noise from a fresh generator with the same seed. The second pass is
//! a generation like any other: it batches with other work.

use sd_proto::v1::{GenerateRequest, Hires};

use crate::error::{Error, Result};
use crate::facts::ModelFacts;
use crate::limits::Limits;
use crate::plan::Plan;

/// The second pass's strength when a request sets none (A1111's API).
pub const DEFAULT_STRENGTH: f32 = 0.75;

/// How torch's `interpolate` resamples latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    Bilinear,
    Bicubic,
    Nearest,
    NearestExact,
}

/// How the first pass is enlarged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upscaler {
    /// Its latents, as `F.interpolate(mode, antialias)`.
    Latent { mode: LatentMode, antialias: bool },
    /// Its decoded image, resized (Pillow's Lanczos; `nearest` first
    /// enlarges with nearest neighbours) and encoded again.
    Image { nearest: bool },
}

/// The upscaler A1111 calls `name` (empty: `Latent`).
pub fn upscaler(name: &str) -> Result<Upscaler> {
    use LatentMode::*;
    let latent = |mode, antialias| Ok(Upscaler::Latent { mode, antialias });
    match name {
        "" | "Latent" => latent(Bilinear, false),
        "Latent (antialiased)" => latent(Bilinear, true),
        "Latent (bicubic)" => latent(Bicubic, false),
        "Latent (bicubic antialiased)" => latent(Bicubic, true),
        "Latent (nearest)" => latent(Nearest, false),
        "Latent (nearest-exact)" => latent(NearestExact, false),
        "None" | "Lanczos" => Ok(Upscaler::Image { nearest: false }),
        "Nearest" => Ok(Upscaler::Image { nearest: true }),
        other => Err(Error::invalid(
            "hires.upscaler",
            format!(
                "`{other}` is not served (upscaler models are not served yet): Latent, Latent \
                 (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent (nearest), \
                 Latent (nearest-exact), None, Lanczos, Nearest"
            ),
        )),
    }
}

/// The names [`upscaler`] takes, as A1111 lists them.
pub const UPSCALERS: [&str; 9] = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
    "None",
    "Lanczos",
    "Nearest",
];

/// The second pass of a request.
pub struct HiresPlan {
    /// The second pass: a text-to-image plan at the larger size whose
    /// schedule is the longer one; the steps start at `first`.
    pub second: Box<Plan>,
    pub upscaler: Upscaler,
    /// The latents' size the first pass is enlarged to (h, w), before the
    /// crop to `second`'s size (a target of another aspect ratio).
    pub latent_size: (usize, usize),
    /// The timestep index the second pass starts at.
    pub first: usize,
    /// What was asked, resolved (for the generation's parameters).
    pub resolved: Hires,
}

/// A field error of the second pass's plan, named under `hires`.
fn within_hires(e: Error) -> Error {
    match e {
        Error::Invalid { field, message } => Error::Invalid {
            field: "hires",
            message: format!("{field}: {message}"),
        },
        other => other,
    }
}

/// The larger size, as A1111's `calculate_target_resolution`: `scale`
/// times the first pass's (truncated), or one side given (the other
/// keeping the aspect ratio), or both (the first pass covering them, the
/// excess cropped). (to_x, to_y, excess x, excess y) in pixels.
fn target(h: &Hires, w: u32, hgt: u32) -> Result<(u32, u32, u32, u32)> {
    let (rx, ry) = (h.width, h.height);
    if rx == 0 && ry == 0 {
        let scale = if h.scale == 0.0 { 2.0 } else { h.scale };
        if !scale.is_finite() || !(1.0..=8.0).contains(&scale) {
            return Err(Error::invalid(
                "hires.scale",
                format!("{scale} given, 1..=8 allowed (0: 2)"),
            ));
        }
        return Ok(((w as f32 * scale) as u32, (hgt as f32 * scale) as u32, 0, 0));
    }
    if h.scale != 0.0 {
        return Err(Error::invalid(
            "hires.scale",
            "give a scale or a size (width, height), not both",
        ));
    }
    Ok(if ry == 0 {
        (rx, rx * hgt / w, 0, 0)
    } else if rx == 0 {
        (ry * w / hgt, ry, 0, 0)
    } else if (w as f64 / hgt as f64) < (rx as f64 / ry as f64) {
        let to_y = rx * hgt / w;
        (rx, to_y, 0, to_y - ry)
    } else {
        let to_x = ry * w / hgt;
        (to_x, ry, to_x - rx, 0)
    })
}

/// The second pass of `req` (its first pass planned as `first`).
pub fn plan(
    h: &Hires,
    req: &GenerateRequest,
    first: &Plan,
    facts: &ModelFacts,
    limits: &Limits,
) -> Result<HiresPlan> {
    if !req.init_image.is_empty() {
        return Err(Error::invalid(
            "hires",
            "applies to text-to-image only (send no init_image)",
        ));
    }
    let upscaler = upscaler(&h.upscaler)?;
    let strength = h.strength.unwrap_or(DEFAULT_STRENGTH);
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(Error::invalid(
            "hires.strength",
            format!("{strength} given, (0, 1] allowed"),
        ));
    }
    let steps = if h.steps == 0 { first.steps } else { h.steps };
    // A1111: the second pass runs exactly `steps` steps, the tail of a
    // schedule of int(steps / strength).
    let total = (steps as f32 / strength.min(0.999)) as u32;
    let (to_x, to_y, ex, ey) = target(h, first.width, first.height)?;
    let s = facts.layout.scale_factor.max(1);
    let f = facts.layout.size_multiple.max(1);
    let (lw, lh) = (to_x / s, to_y / s);
    // The final size: the excess cropped (in latents), then down to the
    // network's size multiple.
    let per = (f / s).max(1);
    let cw = (lw - (ex / s).min(lw)) / per * per;
    let ch = (lh - (ey / s).min(lh)) / per * per;
    let second_req = GenerateRequest {
        width: cw * s,
        height: ch * s,
        steps: total,
        scheduler: if h.scheduler.is_empty() {
            req.scheduler.clone()
        } else {
            h.scheduler.clone()
        },
        prompt: if h.prompt.is_empty() {
            req.prompt.clone()
        } else {
            h.prompt.clone()
        },
        negative_prompt: if h.negative_prompt.is_empty() {
            req.negative_prompt.clone()
        } else {
            h.negative_prompt.clone()
        },
        seed: Some(first.seed),
        init_image: Default::default(),
        strength: None,
        mask: Default::default(),
        inpaint: None,
        hires: None,
        conditioning: None,
        ..req.clone()
    };
    // The time limit is checked on both passes together, below.
    let unlimited = Limits {
        max_request_seconds: f64::INFINITY,
        ..limits.clone()
    };
    let mut second = Plan::new(second_req, facts, &unlimited).map_err(within_hires)?;
    let order = second.schedule.timesteps().len() / total.max(1) as usize;
    let first_index = second
        .schedule
        .timesteps()
        .len()
        .saturating_sub(steps as usize * order.max(1));
    // Only the tail of the longer schedule runs.
    let forwards = second.schedule.timesteps().len() - first_index;
    second.predicted_seconds = second
        .predicted_step_seconds
        .map(|step| step * forwards as f64);
    check_seconds(first, &second, limits)?;
    Ok(HiresPlan {
        resolved: Hires {
            scale: h.scale,
            width: second.width,
            height: second.height,
            upscaler: if h.upscaler.is_empty() {
                "Latent".into()
            } else {
                h.upscaler.clone()
            },
            steps,
            strength: Some(strength),
            prompt: second.prompt.clone(),
            negative_prompt: second.negative_prompt.clone(),
            scheduler: second.scheduler.name().to_string(),
        },
        second: Box::new(second),
        upscaler,
        latent_size: (lh as usize, lw as usize),
        first: first_index,
    })
}

/// Both passes together within `--max-request-seconds`.
fn check_seconds(first: &Plan, second: &Plan, limits: &Limits) -> Result<()> {
    if let (Some(a), Some(b)) = (first.predicted_seconds, second.predicted_seconds) {
        if a + b > limits.max_request_seconds {
            return Err(Error::invalid(
                "hires",
                format!(
                    "the first pass ({a:.0} s) and the second at {}×{} ({b:.0} s) are predicted \
                     to take {:.0} s of UNet time on this model's denoiser, at most {:.0} s \
                     allowed: lower the scale, the steps or the size",
                    second.width,
                    second.height,
                    a + b,
                    limits.max_request_seconds
                ),
            ));
        }
    }
    Ok(())
}

/// Cubic convolution weights (torch's: A = −0.75; antialiased: −0.5).
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// For each output index along one axis: (input index, weight) pairs, as
/// torch's `interpolate` with `align_corners=False` computes them.
fn axis_weights(
    input: usize,
    output: usize,
    mode: LatentMode,
    antialias: bool,
) -> Vec<Vec<(usize, f64)>> {
    let scale = input as f64 / output as f64;
    let clamp = |i: i64| i.clamp(0, input as i64 - 1) as usize;
    (0..output)
        .map(|o| match mode {
            LatentMode::Nearest => vec![(clamp((o as f64 * scale).floor() as i64), 1.0)],
            LatentMode::NearestExact => {
                vec![(clamp(((o as f64 + 0.5) * scale).floor() as i64), 1.0)]
            }
            _ if antialias => {
                // torch's antialiased path (PIL-style): a filter widened
                // when shrinking, taps inside the input, weights normalised.
                let (support, a) = match mode {
                    LatentMode::Bicubic => (2.0, -0.5),
                    _ => (1.0, 0.0),
                };
                let fs = scale.max(1.0);
                let center = (o as f64 + 0.5) * scale;
                let lo = ((center - support * fs + 0.5).floor() as i64).max(0);
                let hi = ((center + support * fs + 0.5).floor() as i64).min(input as i64);
                let mut w: Vec<(usize, f64)> = (lo..hi)
                    .map(|i| {
                        let x = (i as f64 - center + 0.5) / fs;
                        let k = if mode == LatentMode::Bicubic {
                            cubic(x, a)
                        } else {
                            (1.0 - x.abs()).max(0.0)
                        };
                        (i as usize, k)
                    })
                    .collect();
                let sum: f64 = w.iter().map(|p| p.1).sum();
                if sum != 0.0 {
                    w.iter_mut().for_each(|p| p.1 /= sum);
                }
                w
            }
            LatentMode::Bilinear => {
                let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = src.floor() as i64;
                let t = src - i0 as f64;
                let i1 = if i0 < input as i64 - 1 { i0 + 1 } else { i0 };
                vec![(clamp(i0), 1.0 - t), (clamp(i1), t)]
            }
            LatentMode::Bicubic => {
                let src = (o as f64 + 0.5) * scale - 0.5;
                let i0 = src.floor() as i64;
                let t = src - i0 as f64;
                (-1..=2)
                    .map(|k| (clamp(i0 + k), cubic(t - k as f64, -0.75)))
                    .collect()
            }
        })
        .collect()
}

/// `latents` (n, c, h, w) resized to `(h2, w2)` as torch's
/// `F.interpolate(latents, size, mode, antialias)` does (separably: width,
/// then height).
pub fn upscale_latents(
    latents: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (h2, w2): (usize, usize),
    mode: LatentMode,
    antialias: bool,
) -> Vec<f32> {
    let wx = axis_weights(w, w2, mode, antialias);
    let wy = axis_weights(h, h2, mode, antialias);
    let mut out = vec![0f32; n * c * h2 * w2];
    let mut row = vec![0f64; h * w2];
    for plane in 0..n * c {
        let src = &latents[plane * h * w..(plane + 1) * h * w];
        for y in 0..h {
            for (x, taps) in wx.iter().enumerate() {
                row[y * w2 + x] = taps
                    .iter()
                    .map(|&(i, k)| f64::from(src[y * w + i]) * k)
                    .sum();
            }
        }
        let dst = &mut out[plane * h2 * w2..(plane + 1) * h2 * w2];
        for (y, taps) in wy.iter().enumerate() {
            for x in 0..w2 {
                dst[y * w2 + x] =
                    taps.iter().map(|&(i, k)| row[i * w2 + x] * k).sum::<f64>() as f32;
            }
        }
    }
    out
}

/// The centre crop A1111 takes of latents enlarged past the target:
/// `samples[:, :, ty//2 : h-(ty+1)//2, tx//2 : w-(tx+1)//2]`.
pub fn crop_latents(
    latents: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (h2, w2): (usize, usize),
) -> Vec<f32> {
    if (h, w) == (h2, w2) {
        return latents.to_vec();
    }
    let (ty, tx) = (h - h2, w - w2);
    let (y0, x0) = (ty / 2, tx / 2);
    let mut out = Vec::with_capacity(n * c * h2 * w2);
    for plane in 0..n * c {
        for y in 0..h2 {
            let start = plane * h * w + (y0 + y) * w + x0;
            out.extend_from_slice(&latents[start..start + w2]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_doubling_matches_torch() {
        // torch: F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear")
        let out = upscale_latents(
            &[0.0, 1.0, 2.0, 3.0],
            (1, 1, 2, 2),
            (4, 4),
            LatentMode::Bilinear,
            false,
        );
        let first_row = [0.0, 0.25, 0.75, 1.0];
        for (g, w) in out[..4].iter().zip(first_row) {
            assert!((g - w).abs() < 1e-6, "{out:?}");
        }
        assert!((out[5] - 0.75).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn nearest_modes_pick_as_torch() {
        let v: Vec<f32> = (0..3).map(|i| i as f32).collect();
        let n = upscale_latents(&v, (1, 1, 1, 3), (1, 5), LatentMode::Nearest, false);
        assert_eq!(n, vec![0.0, 0.0, 1.0, 1.0, 2.0]);
        let e = upscale_latents(&v, (1, 1, 1, 3), (1, 5), LatentMode::NearestExact, false);
        assert_eq!(e, vec![0.0, 0.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn a_flat_plane_stays_flat_in_every_mode() {
        for mode in [LatentMode::Bilinear, LatentMode::Bicubic] {
            for aa in [false, true] {
                let out = upscale_latents(&[0.5; 12], (1, 1, 3, 4), (7, 9), mode, aa);
                assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-5), "{mode:?} {aa}");
            }
        }
    }

    #[test]
    fn sizes_follow_a1111() {
        let h = |scale, width, height| Hires {
            scale,
            width,
            height,
            ..Default::default()
        };
        assert_eq!(target(&h(0.0, 0, 0), 64, 48).unwrap(), (128, 96, 0, 0));
        assert_eq!(target(&h(1.5, 0, 0), 64, 48).unwrap(), (96, 72, 0, 0));
        assert_eq!(target(&h(0.0, 100, 0), 64, 48).unwrap(), (100, 75, 0, 0));
        // Both: the first pass's aspect covers the target, the rest cropped.
        assert_eq!(
            target(&h(0.0, 128, 128), 64, 48).unwrap(),
            (170, 128, 42, 0)
        );
        assert!(target(&h(2.0, 128, 0), 64, 48).is_err());
    }

    #[test]
    fn upscalers_by_a1111_name() {
        assert_eq!(
            upscaler("Latent (nearest-exact)").unwrap(),
            Upscaler::Latent {
                mode: LatentMode::NearestExact,
                antialias: false
            }
        );
        assert_eq!(
            upscaler("Lanczos").unwrap(),
            Upscaler::Image { nearest: false }
        );
        assert!(upscaler("R-ESRGAN 4x+").is_err());
    }
}

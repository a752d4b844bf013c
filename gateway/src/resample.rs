//! Lanczos resizing with Pillow's arithmetic, so an init image that is not
//! already the generation's size turns into the same pixels diffusers feeds
//! its VAE (`VaeImageProcessor.resize` calls `PIL.Image.resize(...,
//! LANCZOS)`).
//!
//! What makes it Pillow's and not just any Lanczos-3: the filter widens by
//! the scale factor when shrinking; each output pixel's window is rounded
//! from its centre the way Pillow rounds it, the weights are normalised to
//! sum to one and then turned into 22-bit fixed point; one direction is
//! resized into an 8-bit intermediate image which the other pass then reads,
//! in the order Pillow 13 picks.

use image::RgbImage;

/// Fraction bits of the fixed-point weights (Pillow's `PRECISION_BITS` for
/// 8-bit channels: 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

/// Pillow's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.LANCZOS` (what diffusers' VaeImageProcessor and A1111's
    /// resize_image use).
    Lanczos,
    /// `Image.BICUBIC` (PIL's default for `resize`, what A1111 shrinks its
    /// inpainting mask to the latents with).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => SUPPORT,
            Filter::Bicubic => 2.0,
        }
    }

    fn at(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
        }
    }
}

/// For each output position: the first input index and the fixed-point
/// weights of the inputs from there on.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // Pillow multiplies by the reciprocal; so do we, for the same rounding.
    let inv = 1.0 / filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // `as` truncates toward zero, as Pillow's C casts do.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|i| filter.at((i as f64 - center + 0.5) * inv))
            .collect();
        let sum: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if sum != 0.0 { k / sum } else { k };
                let v = k * f64::from(1u32 << PRECISION_BITS);
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        first.push(lo);
        weights.push(fixed);
    }
    Taps { first, weights }
}

/// A weighted sum of 8-bit samples, rounded and clamped back to 8 bits.
/// (Sums are i64: with extreme shrinking the window holds thousands of
/// taps, and an overflow must not be possible.)
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `img` resized to `width`×`height` as `PIL.Image.resize((width, height),
/// Image.LANCZOS)` resizes an RGB image (Pillow 13).
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize(img, width, height, Filter::Lanczos)
}

/// `img` resized to `width`×`height` as `PIL.Image.resize((width, height),
/// filter)` resizes an RGB image (Pillow 13).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 || w == 0 || h == 0 {
        return RgbImage::new(width, height);
    }
    let src = img.as_raw().as_slice();
    // Pillow 13 runs the vertical pass first when the height shrinks by more
    // than twice as many pixels as the width does (a shrinking height with a
    // growing width included); the passes round to 8 bits in between, so the
    // order shows in the result.
    let vertical_first = oh < h && (h - oh) as i64 > 2 * (w as i64 - ow as i64);
    let out = if vertical_first {
        let tmp = columns(src, w, h, oh, filter);
        let second = rows(tmp.as_deref().unwrap_or(src), w, oh, ow, filter);
        second.or(tmp)
    } else {
        let tmp = rows(src, w, h, ow, filter);
        let second = columns(tmp.as_deref().unwrap_or(src), ow, h, oh, filter);
        second.or(tmp)
    }
    // Neither pass ran (same size): a copy.
    .unwrap_or_else(|| src.to_vec());
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Each row of a `w`×`h` RGB buffer resized to `ow` pixels (None: same width).
fn rows(src: &[u8], w: usize, h: usize, ow: usize, filter: Filter) -> Option<Vec<u8>> {
    if ow == w {
        return None;
    }
    let t = taps(w, ow, filter);
    let round = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; ow * h * 3];
    for (line, dst) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(ow * 3)) {
        for (px, (lo, ks)) in dst.chunks_exact_mut(3).zip(t.first.iter().zip(&t.weights)) {
            let mut acc = [round; 3];
            for (p, k) in line[lo * 3..].chunks_exact(3).zip(ks) {
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * i64::from(*k);
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    Some(out)
}

/// Each column of a `w`×`h` RGB buffer resized to `oh` pixels (None: same height).
fn columns(src: &[u8], w: usize, h: usize, oh: usize, filter: Filter) -> Option<Vec<u8>> {
    if oh == h {
        return None;
    }
    let t = taps(h, oh, filter);
    let round = 1i64 << (PRECISION_BITS - 1);
    let stride = w * 3;
    let mut out = vec![0u8; oh * stride];
    for (dst, (lo, ks)) in out
        .chunks_exact_mut(stride)
        .zip(t.first.iter().zip(&t.weights))
    {
        for (j, d) in dst.iter_mut().enumerate() {
            let mut acc = round;
            for (i, k) in ks.iter().enumerate() {
                acc += i64::from(src[(lo + i) * stride + j]) * i64::from(*k);
            }
            *d = clip8(acc);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(37, 32), (32, 48), (4096, 512), (7, 64), (100, 99)] {
            let t = taps(i, o, Filter::Lanczos);
            for (lo, ks) in t.first.iter().zip(&t.weights) {
                let sum: i32 = ks.iter().sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= ks.len() as i32,
                    "{i}->{o}"
                );
                assert!(lo + ks.len() <= i);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_sizes_are_kept() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for (w, h) in [(32, 16), (64, 40), (37, 8), (5, 23)] {
            let out = resize_lanczos(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{w}×{h}");
        }
    }

    #[test]
    fn overshoot_is_clamped_not_wrapped() {
        // A hard edge rings with Lanczos; the ringing must clamp at 0 and 255.
        let img = RgbImage::from_fn(16, 1, |x, _| {
            let v = if x < 8 { 0 } else { 255 };
            image::Rgb([v, v, v])
        });
        let out = resize_lanczos(&img, 40, 1);
        let v: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert!(v[..16].iter().all(|&p| p < 64), "{v:?}");
        assert!(v[24..].iter().all(|&p| p > 192), "{v:?}");
    }
}

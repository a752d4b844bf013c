//! AUTOMATIC1111's pixel work around an img2img request, as its
//! `images.py`, `masking.py` and `processing.py` do it: flattening onto
//! white, `resize_image`'s modes, the mask's OpenCV Gaussian blur, the
//! crop of "only masked" inpainting, the "fill" of the masked part from its
//! surroundings, and the overlay of the original outside the mask.

use image::{GrayImage, Luma, Rgb, RgbImage, RgbaImage};

use crate::mask::resize_gray;
use crate::resample::{resize, Filter};

/// `images.flatten(img, "#ffffff")`: an image with alpha composited onto
/// white; any other made RGB.
pub fn flatten(img: &image::DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u32::from(p[3]);
        let c = |v: u8| ((u32::from(v) * a + 255 * (255 - a) + 127) / 255) as u8;
        Rgb([c(p[0]), c(p[1]), c(p[2])])
    })
}

/// A1111's `create_binary_mask`: an RGBA mask with transparency is its
/// alpha, thresholded (> 128 masks); any other its luminance, soft.
pub fn binary_mask(img: &image::DynamicImage) -> GrayImage {
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        if rgba.pixels().any(|p| p.0[3] != 255) {
            return GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                Luma([if rgba.get_pixel(x, y).0[3] > 128 {
                    255
                } else {
                    0
                }])
            });
        }
    }
    let rgb = img.to_rgb8();
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        Luma([crate::mask::luma(rgb.get_pixel(x, y).0)])
    })
}

/// OpenCV's `getGaussianKernel(k, sigma)` with A1111's size for a blur of
/// `sigma`: `2·int(2.5·sigma + 0.5) + 1`.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let k = 2 * (2.5 * sigma + 0.5) as usize + 1;
    let mid = (k as f64 - 1.0) / 2.0;
    let w: Vec<f64> = (0..k)
        .map(|i| (-((i as f64 - mid).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// OpenCV's BORDER_REFLECT_101 index (`dcb|abcd|cba`).
fn reflect101(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// A1111's mask blur: `cv2.GaussianBlur(m, (kx, 1), sx)` then `(1, ky)`,
/// `sy` (each pass rounded to 8 bits, as OpenCV's 8-bit path; it may
/// differ from OpenCV's fixed point by one).
pub fn blur(mask: &GrayImage, sx: f64, sy: f64) -> GrayImage {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let mut out = mask.clone();
    if sx > 0.0 {
        let k = gaussian_kernel(sx);
        let r = (k.len() / 2) as i64;
        let src = out.clone();
        for y in 0..h {
            for x in 0..w {
                let v: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, kw)| {
                        kw * f64::from(
                            src.get_pixel(reflect101(x + j as i64 - r, w) as u32, y as u32)
                                .0[0],
                        )
                    })
                    .sum();
                out.put_pixel(
                    x as u32,
                    y as u32,
                    Luma([v.round().clamp(0.0, 255.0) as u8]),
                );
            }
        }
    }
    if sy > 0.0 {
        let k = gaussian_kernel(sy);
        let r = (k.len() / 2) as i64;
        let src = out.clone();
        for y in 0..h {
            for x in 0..w {
                let v: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, kw)| {
                        kw * f64::from(
                            src.get_pixel(x as u32, reflect101(y + j as i64 - r, h) as u32)
                                .0[0],
                        )
                    })
                    .sum();
                out.put_pixel(
                    x as u32,
                    y as u32,
                    Luma([v.round().clamp(0.0, 255.0) as u8]),
                );
            }
        }
    }
    out
}

/// A region (x1, y1, x2, y2), x2 and y2 exclusive.
pub type Region = (u32, u32, u32, u32);

/// `masking.get_crop_region_v2` then `expand_crop_region`: the masked
/// pixels' bounding box grown by `pad`, then grown to the aspect ratio of
/// `width`×`height` within the image; None for an empty mask.
pub fn crop_region(mask: &GrayImage, pad: u32, width: u32, height: u32) -> Option<Region> {
    let (iw, ih) = (mask.width() as i64, mask.height() as i64);
    let (mut x1, mut y1, mut x2, mut y2) = (i64::MAX, i64::MAX, -1i64, -1i64);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] > 0 {
            let (x, y) = (i64::from(x), i64::from(y));
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    if x2 < 0 {
        return None;
    }
    let pad = i64::from(pad);
    let (mut x1, mut y1) = ((x1 - pad).max(0), (y1 - pad).max(0));
    let (mut x2, mut y2) = ((x2 + pad).min(iw), (y2 + pad).min(ih));
    let r_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let r_proc = f64::from(width) / f64::from(height);
    // Grow one axis; shift back inside the image; clip.
    let grow = |lo: &mut i64, hi: &mut i64, d: i64, limit: i64| {
        *lo -= d / 2;
        *hi += d - d / 2;
        if *hi >= limit {
            let diff = *hi - limit;
            *hi -= diff;
            *lo -= diff;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        if *hi >= limit {
            *hi = limit;
        }
    };
    if r_crop > r_proc {
        let d = ((x2 - x1) as f64 / r_proc - (y2 - y1) as f64) as i64;
        grow(&mut y1, &mut y2, d, ih);
    } else {
        let d = ((y2 - y1) as f64 * r_proc - (x2 - x1) as f64) as i64;
        grow(&mut x1, &mut x2, d, iw);
    }
    Some((x1 as u32, y1 as u32, x2 as u32, y2 as u32))
}

/// An RGB image's pixels as three channels of a one-channel resize.
fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    resize(img, w, h, Filter::Lanczos)
}

/// A1111's edge band: a zero-thickness box resized by Pillow's bicubic puts
/// the filter's centre on the edge: `1.125·edge − 0.125·next inner`.
fn band(edge: u8, inner: u8) -> u8 {
    (1.125 * f64::from(edge) - 0.125 * f64::from(inner))
        .round()
        .clamp(0.0, 255.0) as u8
}

/// `images.resize_image(mode, img, width, height)` with Lanczos: 0 just
/// resize (stretch), 1 crop and resize (cover, centred), 2 resize and fill
/// (fit, centred, the bands filled from the image's edges; how clients
/// outpaint).
pub fn resize_image(mode: i64, img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if mode == 0 {
        return resize_rgb(img, width, height);
    }
    let ratio = f64::from(width) / f64::from(height);
    let src_ratio = f64::from(iw) / f64::from(ih);
    let (src_w, src_h) = if mode == 1 {
        (
            if ratio > src_ratio {
                width
            } else {
                iw * height / ih
            },
            if ratio <= src_ratio {
                height
            } else {
                ih * width / iw
            },
        )
    } else {
        (
            if ratio < src_ratio {
                width
            } else {
                iw * height / ih
            },
            if ratio >= src_ratio {
                height
            } else {
                ih * width / iw
            },
        )
    };
    let resized = resize_rgb(img, src_w.max(1), src_h.max(1));
    let mut res = RgbImage::new(width, height);
    let (ox, oy) = (
        i64::from(width / 2) - i64::from(src_w / 2),
        i64::from(height / 2) - i64::from(src_h / 2),
    );
    paste(&mut res, &resized, ox, oy);
    if mode == 2 {
        let (rw, rh) = resized.dimensions();
        if ratio < src_ratio {
            let fill = (height / 2).saturating_sub(src_h / 2);
            for x in 0..width.min(rw) {
                let top = resized.get_pixel(x, 0).0;
                let top_in = resized.get_pixel(x, 1.min(rh - 1)).0;
                let bottom = resized.get_pixel(x, rh - 1).0;
                let bottom_in = resized.get_pixel(x, rh.saturating_sub(2)).0;
                let t = Rgb([0, 1, 2].map(|c| band(top[c], top_in[c])));
                let b = Rgb([0, 1, 2].map(|c| band(bottom[c], bottom_in[c])));
                for y in 0..fill {
                    res.put_pixel(x, y, t);
                    if fill + src_h + y < height {
                        res.put_pixel(x, fill + src_h + y, b);
                    }
                }
            }
        } else if ratio > src_ratio {
            let fill = (width / 2).saturating_sub(src_w / 2);
            for y in 0..height.min(rh) {
                let left = resized.get_pixel(0, y).0;
                let left_in = resized.get_pixel(1.min(rw - 1), y).0;
                let right = resized.get_pixel(rw - 1, y).0;
                let right_in = resized.get_pixel(rw.saturating_sub(2), y).0;
                let l = Rgb([0, 1, 2].map(|c| band(left[c], left_in[c])));
                let r = Rgb([0, 1, 2].map(|c| band(right[c], right_in[c])));
                for x in 0..fill {
                    res.put_pixel(x, y, l);
                    if fill + src_w + x < width {
                        res.put_pixel(fill + src_w + x, y, r);
                    }
                }
            }
        }
    }
    res
}

/// A gray mask through [`resize_image`] (its value in each channel).
pub fn resize_mask(mode: i64, mask: &GrayImage, width: u32, height: u32) -> GrayImage {
    if mode == 0 {
        return resize_gray(mask, width, height, Filter::Lanczos);
    }
    let rgb = RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        let v = mask.get_pixel(x, y).0[0];
        Rgb([v, v, v])
    });
    let out = resize_image(mode, &rgb, width, height);
    GrayImage::from_fn(width, height, |x, y| Luma([out.get_pixel(x, y).0[0]]))
}

/// `img` pasted onto `dst` at (x, y), clipped.
pub fn paste(dst: &mut RgbImage, img: &RgbImage, x: i64, y: i64) {
    for (sx, sy, p) in img.enumerate_pixels() {
        let (dx, dy) = (x + i64::from(sx), y + i64::from(sy));
        if dx >= 0 && dy >= 0 && dx < i64::from(dst.width()) && dy < i64::from(dst.height()) {
            dst.put_pixel(dx as u32, dy as u32, *p);
        }
    }
}

/// `img.crop(region)`.
pub fn crop(img: &RgbImage, (x1, y1, x2, y2): Region) -> RgbImage {
    image::imageops::crop_imm(img, x1, y1, x2 - x1, y2 - y1).to_image()
}

pub fn crop_gray(img: &GrayImage, (x1, y1, x2, y2): Region) -> GrayImage {
    image::imageops::crop_imm(img, x1, y1, x2 - x1, y2 - y1).to_image()
}

/// Pillow's `GaussianBlur(radius)`: three passes of an extended box blur
/// per axis (edges clamped), on float channels.
fn pillow_gaussian(data: &mut [f32], w: usize, h: usize, channels: usize, radius: f64) {
    if radius <= 0.0 {
        return;
    }
    let passes = 3.0;
    let sigma2 = radius * radius / passes;
    let l = ((12.0 * sigma2 + 1.0).sqrt() - 1.0) / 2.0;
    let l = l.floor();
    let a =
        (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    let r = l + a;
    let ri = r.floor() as i64;
    let frac = (r - r.floor()) as f32;
    let norm = 1.0 / (2.0 * r as f32 + 1.0);
    let line =
        |get: &dyn Fn(i64) -> usize, n: i64, buf: &mut [f32], c: usize, tmp: &mut Vec<f32>| {
            tmp.clear();
            for i in 0..n {
                let mut acc = 0.0;
                for j in -ri..=ri {
                    acc += buf[get((i + j).clamp(0, n - 1)) * channels + c];
                }
                acc += frac
                    * (buf[get((i - ri - 1).clamp(0, n - 1)) * channels + c]
                        + buf[get((i + ri + 1).clamp(0, n - 1)) * channels + c]);
                tmp.push(acc * norm);
            }
            for i in 0..n {
                buf[get(i) * channels + c] = tmp[i as usize];
            }
        };
    let mut tmp = Vec::new();
    for _ in 0..3 {
        for y in 0..h {
            for c in 0..channels {
                line(&|i| y * w + i as usize, w as i64, data, c, &mut tmp);
            }
        }
        for x in 0..w {
            for c in 0..channels {
                line(&|i| i as usize * w + x, h as i64, data, c, &mut tmp);
            }
        }
    }
}

/// `masking.fill(image, mask)` (A1111's "fill"): the masked part painted
/// with ever less blurred copies of the kept part (premultiplied by its
/// alpha, composited over each other), so it takes the colours around
/// it; an all-masked image becomes black.
pub fn fill(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut masked = vec![0f32; w * h * 4];
    for (i, (p, m)) in img.pixels().zip(mask.pixels()).enumerate() {
        let a = f32::from(255 - m.0[0]) / 255.0;
        for c in 0..3 {
            masked[i * 4 + c] = f32::from(p.0[c]) * a;
        }
        masked[i * 4 + 3] = a;
    }
    let mut out = vec![0f32; w * h * 4]; // straight RGB, alpha 0..1
    for (radius, repeats) in [
        (256.0, 1),
        (64.0, 1),
        (16.0, 2),
        (4.0, 4),
        (2.0, 2),
        (0.0, 1),
    ] {
        let mut blurred = masked.clone();
        pillow_gaussian(&mut blurred, w, h, 4, radius);
        for _ in 0..repeats {
            for i in 0..w * h {
                let sa = blurred[i * 4 + 3].clamp(0.0, 1.0);
                if sa <= 0.0 {
                    continue;
                }
                let da = out[i * 4 + 3];
                let oa = sa + da * (1.0 - sa);
                for c in 0..3 {
                    let src = blurred[i * 4 + c] / sa;
                    out[i * 4 + c] = (src * sa + out[i * 4 + c] * da * (1.0 - sa)) / oa;
                }
                out[i * 4 + 3] = oa;
            }
        }
    }
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = (y as usize * w + x as usize) * 4;
        Rgb([0, 1, 2].map(|c| out[i + c].round().clamp(0.0, 255.0) as u8))
    })
}

/// The original outside the mask, over a generated image: A1111's
/// `apply_overlay` — `original · a + generated · (1 − a)` with `a = (255 −
/// mask) / 255`; with `paste_to`, the generated image is first fitted to
/// that region (crop and resize) of a canvas of the original's size.
pub fn overlay(
    generated: &RgbImage,
    original: &RgbImage,
    mask: &GrayImage,
    paste_to: Option<Region>,
) -> RgbImage {
    let mut base = RgbaImage::new(original.width(), original.height());
    match paste_to {
        Some((x1, y1, x2, y2)) => {
            let fitted = resize_image(1, generated, x2 - x1, y2 - y1);
            for (x, y, p) in fitted.enumerate_pixels() {
                let (dx, dy) = (x1 + x, y1 + y);
                if dx < base.width() && dy < base.height() {
                    base.put_pixel(dx, dy, image::Rgba([p.0[0], p.0[1], p.0[2], 255]));
                }
            }
        }
        None => {
            for (x, y, p) in generated.enumerate_pixels() {
                if x < base.width() && y < base.height() {
                    base.put_pixel(x, y, image::Rgba([p.0[0], p.0[1], p.0[2], 255]));
                }
            }
        }
    }
    RgbImage::from_fn(original.width(), original.height(), |x, y| {
        let a = f32::from(255 - mask.get_pixel(x, y).0[0]) / 255.0;
        let g = base.get_pixel(x, y).0;
        let ga = f32::from(g[3]) / 255.0;
        let o = original.get_pixel(x, y).0;
        let oa = a + ga * (1.0 - a);
        Rgb([0, 1, 2].map(|c| {
            if oa <= 0.0 {
                0
            } else {
                ((f32::from(o[c]) * a + f32::from(g[c]) * ga * (1.0 - a)) / oa)
                    .round()
                    .clamp(0.0, 255.0) as u8
            }
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opencv_kernel_size_and_reflection() {
        assert_eq!(gaussian_kernel(4.0).len(), 21);
        assert!((gaussian_kernel(4.0).iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let idx: Vec<usize> = (-3..7).map(|i| reflect101(i, 4)).collect();
        assert_eq!(idx, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
    }

    #[test]
    fn a_blurred_edge_softens_and_flat_areas_stay() {
        let m = GrayImage::from_fn(32, 8, |x, _| Luma([if x >= 16 { 255 } else { 0 }]));
        let b = blur(&m, 4.0, 4.0);
        assert_eq!(b.get_pixel(0, 4).0[0], 0);
        assert_eq!(b.get_pixel(31, 4).0[0], 255);
        let mid = b.get_pixel(16, 4).0[0];
        assert!((100..200).contains(&mid), "{mid}");
    }

    #[test]
    fn crop_regions_grow_to_the_aspect_ratio() {
        let m = GrayImage::from_fn(64, 64, |x, y| {
            Luma([u8::from((20..30).contains(&x) && (10..50).contains(&y)) * 255])
        });
        // 10 × 40 at a square target: widened to 40 × 40.
        assert_eq!(crop_region(&m, 0, 512, 512), Some((5, 10, 45, 50)));
        assert_eq!(crop_region(&GrayImage::new(8, 8), 4, 64, 64), None);
    }

    #[test]
    fn resize_and_fill_keeps_the_picture_centred_and_fills_the_bands() {
        let img = RgbImage::from_pixel(32, 16, Rgb([10, 200, 30]));
        let out = resize_image(2, &img, 32, 32);
        assert_eq!(out.dimensions(), (32, 32));
        assert_eq!(out.get_pixel(16, 16).0, [10, 200, 30]);
        // The bands repeat the flat edge.
        assert_eq!(out.get_pixel(3, 2).0, [10, 200, 30]);
        let crop = resize_image(1, &img, 16, 16);
        assert_eq!(crop.get_pixel(8, 8).0, [10, 200, 30]);
    }

    #[test]
    fn fill_paints_the_hole_with_the_colours_around_it() {
        let img = RgbImage::from_fn(32, 32, |x, _| {
            if x < 16 {
                Rgb([200, 0, 0])
            } else {
                Rgb([0, 0, 0])
            }
        });
        let mask = GrayImage::from_fn(32, 32, |x, _| Luma([if x >= 16 { 255 } else { 0 }]));
        let out = fill(&img, &mask);
        assert_eq!(out.get_pixel(2, 5).0[0], 200, "the kept part stays");
        assert!(
            out.get_pixel(28, 5).0[0] > 150,
            "the hole takes the red around it"
        );
    }

    #[test]
    fn the_overlay_keeps_the_original_where_the_mask_is_black() {
        let gen = RgbImage::from_pixel(4, 1, Rgb([0, 0, 0]));
        let orig = RgbImage::from_pixel(4, 1, Rgb([100, 100, 100]));
        let mask = GrayImage::from_fn(4, 1, |x, _| Luma([[0, 255, 128, 0][x as usize]]));
        let out = overlay(&gen, &orig, &mask, None);
        let v: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(v, vec![100, 0, 50, 100]);
    }
}

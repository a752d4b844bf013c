//! Inpainting masks: read as diffusers' mask processor reads them (PIL's
//! luminance, resized to the image with Pillow's Lanczos, binarised at one
//! half: white repaints, black keeps), and brought to the latents' size —
//! diffusers' nearest-neighbour pick, or AUTOMATIC1111's bicubic shrink
//! rounded to 0 or 1.

use image::{GrayImage, Luma, RgbImage};
use sd_proto::wire::HostTensor;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::resample::{self, Filter};

/// A request's mask at the image's size.
#[derive(Debug, Clone)]
pub struct Mask {
    /// Luminance per pixel, as sent (resized to the image).
    pub gray: GrayImage,
}

/// PIL's `convert("L")` of an RGB pixel (ITU-R 601-2 luma in its fixed point).
pub fn luma(p: [u8; 3]) -> u8 {
    let [r, g, b] = p.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// A single-channel image resized as Pillow resizes an "L" image (each
/// channel of an RGB image is resized alone, so three equal ones give it).
pub fn resize_gray(gray: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    if gray.dimensions() == (width, height) {
        return gray.clone();
    }
    let rgb = RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
        let v = gray.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    });
    let out = resample::resize(&rgb, width, height, filter);
    GrayImage::from_fn(width, height, |x, y| Luma([out.get_pixel(x, y).0[0]]))
}

impl Mask {
    /// The mask in `bytes` (PNG, JPEG or WebP; alpha ignored, colour read as
    /// PIL's luminance) at `width`×`height`: another size is resized with
    /// Pillow's Lanczos, as diffusers' mask processor does.
    pub fn decode(bytes: &[u8], limits: &Limits, width: u32, height: u32) -> Result<Mask> {
        let img =
            crate::images::decode_picture(bytes, limits).map_err(|e| Error::invalid("mask", e))?;
        let rgb = img.to_rgb8();
        let gray = GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            Luma([luma(rgb.get_pixel(x, y).0)])
        });
        let gray = resize_gray(&gray, width, height, Filter::Lanczos);
        let mask = Mask { gray };
        if mask.binary().iter().all(|&v| v == 0.0) {
            return Err(Error::invalid(
                "mask",
                "all black: nothing to repaint (white marks what to repaint)",
            ));
        }
        Ok(mask)
    }

    pub fn width(&self) -> u32 {
        self.gray.width()
    }

    pub fn height(&self) -> u32 {
        self.gray.height()
    }

    /// Per pixel 1 (repaint) where the luminance is at least one half, else
    /// 0: diffusers' `do_binarize`.
    pub fn binary(&self) -> Vec<f32> {
        self.gray
            .pixels()
            .map(|p| {
                if f32::from(p.0[0]) / 255.0 < 0.5 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// The mask at the latents' size (`f` pixels a latent): diffusers'
    /// `interpolate(mask, size)` (nearest: the pixel at f·i of each latent
    /// row and column) of the binarised mask.
    pub fn latent_nearest(&self, f: u32) -> Vec<f32> {
        let (lw, lh) = (self.width() / f, self.height() / f);
        let bin = self.binary();
        let w = self.width() as usize;
        let (sx, sy) = (
            f64::from(self.width()) / f64::from(lw),
            f64::from(self.height()) / f64::from(lh),
        );
        let mut out = Vec::with_capacity((lw * lh) as usize);
        for y in 0..lh {
            let py = ((f64::from(y) * sy).floor() as usize).min(self.height() as usize - 1);
            for x in 0..lw {
                let px = ((f64::from(x) * sx).floor() as usize).min(w - 1);
                out.push(bin[py * w + px]);
            }
        }
        out
    }

    /// The mask at the latents' size as AUTOMATIC1111 makes it: PIL's
    /// default (bicubic) resize of the mask, over 255, rounded half to even
    /// (`np.around`).
    pub fn latent_a1111(&self, f: u32) -> Vec<f32> {
        let (lw, lh) = (self.width() / f, self.height() / f);
        resize_gray(&self.gray, lw, lh, Filter::Bicubic)
            .pixels()
            .map(|p| (f32::from(p.0[0]) / 255.0).round_ties_even())
            .collect()
    }

    /// diffusers' masked image: `image × (mask < 0.5)`, the part to repaint
    /// set to 0 (mid-gray) in the (1, 3, H, W) pixels in [-1, 1].
    pub fn masked_image(&self, pixels: &HostTensor) -> HostTensor {
        let keep: Vec<f32> = self.binary().iter().map(|&m| 1.0 - m).collect();
        let plane = keep.len();
        let data = pixels
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| v * keep[i % plane])
            .collect();
        HostTensor {
            shape: pixels.shape.clone(),
            data,
        }
    }
}

/// OpenAI's mask convention read into ours: where the picture has an
/// alpha channel with any pixel below 255, its transparency marks what to
/// repaint (white = 255 − alpha, so fully transparent repaints, opaque
/// keeps); otherwise its luminance does, as A1111 and diffusers read it.
/// None when `bytes` has no transparency (for an image standing in as its
/// own mask).
pub fn alpha_as_mask(img: &image::DynamicImage) -> Option<GrayImage> {
    if !img.color().has_alpha() {
        return None;
    }
    let rgba = img.to_rgba8();
    if rgba.pixels().all(|p| p.0[3] == 255) {
        return None;
    }
    Some(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        Luma([255 - rgba.get_pixel(x, y).0[3]])
    }))
}

/// A grayscale mask as PNG bytes (RGB, each channel the value: its
/// luminance is the value again).
pub fn to_png(gray: &GrayImage) -> Result<Vec<u8>> {
    let rgb: Vec<u8> = gray.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
    crate::images::encode_png(&rgb, gray.width(), gray.height(), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Mask {
        Mask {
            gray: GrayImage::from_fn(w, h, |x, y| Luma([f(x, y)])),
        }
    }

    #[test]
    fn luminance_is_pils() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        for (rgb, want) in [
            ([255, 0, 0], 76),
            ([0, 255, 0], 150),
            ([0, 0, 255], 29),
            ([255, 255, 255], 255),
            ([10, 200, 30], 124),
        ] {
            assert_eq!(luma(rgb), want, "{rgb:?}");
        }
    }

    #[test]
    fn binarised_at_one_half_and_picked_at_each_latents_corner() {
        let m = mask(16, 8, |x, _| if x >= 8 { 128 } else { 127 });
        let bin = m.binary();
        assert_eq!(bin[7], 0.0);
        assert_eq!(bin[8], 1.0);
        assert_eq!(m.latent_nearest(8), vec![0.0, 1.0]);
        // The pick is the latent's first pixel, not a vote.
        let m = mask(16, 8, |x, _| if x == 8 { 255 } else { 0 });
        assert_eq!(m.latent_nearest(8), vec![0.0, 1.0]);
    }

    #[test]
    fn the_masked_image_is_gray_where_repainted() {
        let m = mask(2, 1, |x, _| if x == 1 { 255 } else { 0 });
        let px = HostTensor {
            shape: vec![1, 3, 1, 2],
            data: vec![0.5, 0.5, -0.2, -0.2, 1.0, 1.0],
        };
        assert_eq!(
            m.masked_image(&px).data,
            vec![0.5, 0.0, -0.2, 0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn transparency_marks_the_repaint_and_opaque_images_have_none() {
        let img = image::RgbaImage::from_fn(2, 1, |x, _| {
            image::Rgba([9, 9, 9, if x == 0 { 0 } else { 255 }])
        });
        let m = alpha_as_mask(&image::DynamicImage::ImageRgba8(img)).unwrap();
        assert_eq!(m.as_raw(), &vec![255, 0]);
        let opaque = image::RgbaImage::from_pixel(2, 1, image::Rgba([0, 0, 0, 255]));
        assert!(alpha_as_mask(&image::DynamicImage::ImageRgba8(opaque)).is_none());
        let rgb = image::RgbImage::new(2, 1);
        assert!(alpha_as_mask(&image::DynamicImage::ImageRgb8(rgb)).is_none());
        // Luminance back from the PNG.
        let png = to_png(&m).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(back.as_raw(), &vec![255, 0]);
    }

    #[test]
    fn a1111_rounds_the_shrunk_mask() {
        let m = mask(16, 16, |x, _| if x < 8 { 0 } else { 255 });
        assert_eq!(m.latent_a1111(8), vec![0.0, 1.0, 0.0, 1.0]);
    }
}

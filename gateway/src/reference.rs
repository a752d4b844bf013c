//! FLUX.2 Klein's reference images as `Flux2KleinPipeline` prepares them
//! (`Flux2ImageProcessor`): each checked (sides of at least 64 pixels, an
//! aspect ratio of at most 8:1), shrunk with Pillow's Lanczos to 1024²
//! pixels when larger, cropped about its centre to multiples of the
//! pipeline's 16 pixels (no resampling), normalised to [-1, 1]. The
//! autoencoder encodes them (the distribution's mean) and the gateway packs
//! their latents as tokens with the positions the pipeline gives them.

use sd_proto::wire::HostTensor;

use crate::error::{Error, Result};
use crate::limits::Limits;

/// Most reference images a request may send (the OpenAI edit route's
/// limit on `image`).
pub const MAX_REFERENCES: usize = 16;

/// Largest reference area in pixels before it is shrunk.
const TARGET_AREA: u64 = 1024 * 1024;
/// Smallest side and most extreme aspect ratio the pipeline takes.
const MIN_SIDE: u32 = 64;
const MAX_ASPECT: f64 = 8.0;

/// One reference image, prepared: (1, 3, H, W) pixels in [-1, 1].
#[derive(Debug, Clone)]
pub struct Reference {
    pub pixels: HostTensor,
    pub width: u32,
    pub height: u32,
}

/// Prepare the request's reference images (`field` names them in errors,
/// with the image's place), cropped to multiples of `multiple` pixels.
pub fn prepare(
    images: &[impl AsRef<[u8]>],
    limits: &Limits,
    multiple: u32,
    field: &'static str,
) -> Result<Vec<Reference>> {
    if images.len() > MAX_REFERENCES {
        return Err(Error::invalid(
            field,
            format!("{} images, at most {MAX_REFERENCES}", images.len()),
        ));
    }
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let which = |e: String| {
                Error::invalid(
                    field,
                    format!("reference image {} of {}: {e}", i + 1, images.len()),
                )
            };
            let img = crate::images::decode_picture(bytes.as_ref(), limits).map_err(which)?;
            prepare_one(&img.to_rgb8(), multiple).map_err(which)
        })
        .collect()
}

/// `Flux2ImageProcessor.check_image_input`, `_resize_to_target_area` and
/// the crop of `preprocess(resize_mode="crop")`, as the pipeline runs them.
fn prepare_one(rgb: &image::RgbImage, multiple: u32) -> std::result::Result<Reference, String> {
    let (w, h) = rgb.dimensions();
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(format!(
            "too small: {w}×{h}, both sides must be at least {MIN_SIDE} pixels"
        ));
    }
    let aspect = (f64::from(w) / f64::from(h)).max(f64::from(h) / f64::from(w));
    if aspect > MAX_ASPECT {
        return Err(format!(
            "aspect ratio too extreme: {w}×{h} ({aspect:.1}:1), at most {MAX_ASPECT}:1"
        ));
    }
    let shrunk;
    let rgb = if u64::from(w) * u64::from(h) > TARGET_AREA {
        // Python's float arithmetic: int(side * sqrt(target / area)).
        let scale = (TARGET_AREA as f64 / (f64::from(w) * f64::from(h))).sqrt();
        let (sw, sh) = ((f64::from(w) * scale) as u32, (f64::from(h) * scale) as u32);
        shrunk = crate::resample::resize_lanczos(rgb, sw, sh);
        &shrunk
    } else {
        rgb
    };
    let (w, h) = rgb.dimensions();
    let m = multiple.max(1);
    let (cw, ch) = (w / m * m, h / m * m);
    if cw == 0 || ch == 0 {
        return Err(format!("{w}×{h} is smaller than {m}×{m} pixels"));
    }
    // PIL's crop box about the centre: left = (w − cw) // 2.
    let (left, top) = ((w - cw) / 2, (h - ch) / 2);
    let cropped = image::imageops::crop_imm(rgb, left, top, cw, ch).to_image();
    let pixels = crate::images::normalized(&cropped).map_err(|e| e.to_string())?;
    Ok(Reference {
        pixels,
        width: cw,
        height: ch,
    })
}

/// The references' latents as the transformer takes them: tokens (1, n,
/// channels), each image's (channels, h, w) latents row-major, one image
/// after the other; and their positions (n, 4): (10·(i+1), row, column, 0)
/// for the i-th image, as `Flux2KleinPipeline._prepare_image_ids`.
pub fn pack(latents: &[HostTensor]) -> Result<(HostTensor, HostTensor)> {
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    let mut channels = None;
    for (i, l) in latents.iter().enumerate() {
        let [1, c, h, w] = l.shape[..] else {
            return Err(Error::Internal(format!(
                "reference latents of shape {:?}",
                l.shape
            )));
        };
        if *channels.get_or_insert(c) != c {
            return Err(Error::Internal("references of different channels".into()));
        }
        let plane = (h * w) as usize;
        let t = 10.0 * (i as f32 + 1.0);
        for p in 0..plane {
            tokens.extend((0..c as usize).map(|ch| l.data[ch * plane + p]));
            let (row, col) = ((p as i64 / w) as f32, (p as i64 % w) as f32);
            ids.extend([t, row, col, 0.0]);
        }
    }
    let n = (ids.len() / 4) as i64;
    let c = channels.unwrap_or(0);
    let internal = |e: sd_proto::wire::WireError| Error::Internal(format!("reference tokens: {e}"));
    Ok((
        HostTensor::new(vec![1, n, c], tokens).map_err(internal)?,
        HostTensor::new(vec![n, 4], ids).map_err(internal)?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        })
    }

    #[test]
    fn references_are_cropped_about_the_centre_to_multiples_of_16() {
        let r = prepare_one(&gradient(100, 70), 16).unwrap();
        assert_eq!((r.width, r.height), (96, 64));
        assert_eq!(r.pixels.shape, [1, 3, 64, 96]);
        // The crop starts at ((100 − 96) / 2, (70 − 64) / 2) = (2, 3).
        let first = r.pixels.data[0];
        assert!((first - (2.0 * 2.0 / 255.0 - 1.0)).abs() < 1e-6);
        let green = r.pixels.data[64 * 96];
        assert!((green - (2.0 * 3.0 / 255.0 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn large_references_shrink_to_a_megapixel_then_crop() {
        // sqrt(1024² / (2000·1000)) · 2000 = 1448.15 → 1448, then 1440.
        let r = prepare_one(&gradient(2000, 1000), 16).unwrap();
        assert_eq!((r.width, r.height), (1440, 720));
    }

    #[test]
    fn small_or_extreme_references_are_refused() {
        assert!(prepare_one(&gradient(63, 200), 16)
            .unwrap_err()
            .contains("too small"));
        assert!(prepare_one(&gradient(64 * 9, 64), 16)
            .unwrap_err()
            .contains("aspect ratio"));
    }

    #[test]
    fn packing_lays_tokens_row_major_at_the_pipelines_positions() {
        let a = HostTensor::new(vec![1, 2, 1, 2], vec![1., 2., 3., 4.]).unwrap();
        let b = HostTensor::new(vec![1, 2, 2, 1], vec![5., 6., 7., 8.]).unwrap();
        let (tokens, ids) = pack(&[a, b]).unwrap();
        assert_eq!(tokens.shape, [1, 4, 2]);
        assert_eq!(tokens.data, [1., 3., 2., 4., 5., 7., 6., 8.]);
        assert_eq!(ids.shape, [4, 4]);
        assert_eq!(
            ids.data,
            [10., 0., 0., 0., 10., 0., 1., 0., 20., 0., 0., 0., 20., 1., 0., 0.]
        );
    }
}

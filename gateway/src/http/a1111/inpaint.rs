//! `/sdapi/v1/img2img`'s pictures as AUTOMATIC1111 prepares them (its
//! `StableDiffusionProcessingImg2Img.init`): each init image flattened
//! onto white and resized by `resize_mode`; with a `mask`, the mask read
//! (alpha or luminance), inverted, blurred, the masked region cropped with
//! its padding ("only masked", the API's default) or the whole picture
//! taken, the masked part filled; and after the generation the original
//! laid back over it outside the mask. The generation itself gets the
//! prepared picture and mask with A1111's inpainting options (its latent
//! fills, noise multiplier and per-step blend of the denoised prediction).

use image::{GrayImage, Luma, RgbImage};
use sd_proto::v1::{InpaintOptions, MaskedContent};

use super::picture::{self, Region};
use super::*;
use crate::limits::Limits;

/// How the original goes back over a generated image.
pub(super) struct Overlay {
    /// The original (resized to the request in "whole picture"; at its own
    /// size in "only masked", where the result is too).
    original: RgbImage,
    /// 255 where the generated image shows, 0 where the original does.
    mask: GrayImage,
    /// "Only masked": where the generated image goes.
    paste_to: Option<Region>,
}

/// One init image, ready to send.
pub(super) struct Prepared {
    /// PNG bytes at the request's size.
    pub image: Vec<u8>,
    pub overlay: Option<Overlay>,
}

/// The request's pictures prepared, its mask (PNG at the request's size)
/// and options, and the infotext A1111 adds for them.
pub(super) struct Pictures {
    pub images: Vec<Prepared>,
    pub mask: Vec<u8>,
    pub options: Option<InpaintOptions>,
    pub infotext: Vec<(String, String)>,
}

fn png(rgb: &RgbImage) -> HttpResult<Vec<u8>> {
    crate::images::encode_png(rgb.as_raw(), rgb.width(), rgb.height(), &[])
        .map_err(|e| HttpError::invalid("init_images", e))
}

fn decode(field: &str, bytes: &[u8], limits: &Limits) -> HttpResult<image::DynamicImage> {
    crate::images::decode_picture(bytes, limits).map_err(|e| HttpError::invalid(field, e))
}

/// The mask as A1111 reads it: alpha or luminance, inverted when asked,
/// blurred at its own size.
fn read_mask(f: &Fields, bytes: &[u8], limits: &Limits) -> HttpResult<GrayImage> {
    let mut m = picture::binary_mask(&decode("mask", bytes, limits)?);
    if f.int_in("inpainting_mask_invert", 0, 1)?.unwrap_or(0) == 1 {
        image::imageops::invert(&mut m);
    }
    let blur = f.int_in("mask_blur", 0, 64)?;
    let bx = blur.or(f.int_in("mask_blur_x", 0, 64)?).unwrap_or(4);
    let by = blur.or(f.int_in("mask_blur_y", 0, 64)?).unwrap_or(4);
    Ok(picture::blur(&m, bx as f64, by as f64))
}

/// The init images (and mask) of an img2img request at `width`×`height`.
pub(super) fn prepare(
    f: &Fields,
    init_images: &[Vec<u8>],
    (width, height): (u32, u32),
    limits: &Limits,
) -> HttpResult<Pictures> {
    let resize_mode = f.int_in("resize_mode", 0, 3)?.unwrap_or(0);
    if resize_mode == 3 {
        return Err(HttpError::invalid(
            "resize_mode",
            "3 (just resize, latent upscale) is not supported: 0 just resize, 1 crop and \
             resize, 2 resize and fill",
        ));
    }
    let originals: Vec<RgbImage> = init_images
        .iter()
        .map(|b| decode("init_images", b, limits).map(|i| picture::flatten(&i)))
        .collect::<HttpResult<_>>()?;
    let mask = match f.str("mask")? {
        Some(s) if !s.is_empty() => Some(decode_base64("mask", s)?),
        _ => None,
    };
    let mut infotext = Vec::new();
    let Some(mask) = mask else {
        return plain(&originals, resize_mode, (width, height));
    };
    let first = &originals[0];
    let blurred = read_mask(f, &mask, limits)?;
    if f.int_in("inpainting_mask_invert", 0, 1)?.unwrap_or(0) == 1 {
        infotext.push(("Mask mode".into(), "Inpaint not masked".into()));
    }
    let blur = f.int_in("mask_blur", 0, 64)?.unwrap_or(4);
    if blur > 0 {
        infotext.push(("Mask blur".into(), blur.to_string()));
    }
    let full_res = f.bool("inpaint_full_res")?.unwrap_or(true);
    let padding = f.int_in("inpaint_full_res_padding", 0, 4096)?.unwrap_or(0) as u32;
    let fill = f.int_in("inpainting_fill", 0, 3)?.unwrap_or(0);
    let multiplier = f.f64("initial_noise_multiplier")?.unwrap_or(1.0);
    // "Only masked": the masked region with its padding, grown to the
    // request's aspect ratio; an empty mask falls back to img2img of the
    // whole picture, as A1111 does.
    let (mask_image, overlay_mask, crop) = if full_res {
        // The region is found in the image's pixels: a mask of another size
        // is resized to the image first (A1111 would misplace it).
        let (iw, ih) = first.dimensions();
        let blurred = if blurred.dimensions() == (iw, ih) {
            blurred
        } else {
            crate::mask::resize_gray(&blurred, iw, ih, crate::resample::Filter::Lanczos)
        };
        match picture::crop_region(&blurred, padding, width, height) {
            Some(crop) => {
                infotext.push(("Inpaint area".into(), "Only masked".into()));
                infotext.push(("Masked area padding".into(), padding.to_string()));
                let m = picture::resize_mask(2, &picture::crop_gray(&blurred, crop), width, height);
                (m, blurred.clone(), Some(crop))
            }
            None => (GrayImage::new(width, height), GrayImage::new(1, 1), None),
        }
    } else {
        let m = picture::resize_mask(resize_mode, &blurred, width, height);
        let doubled = GrayImage::from_fn(width, height, |x, y| {
            Luma([m.get_pixel(x, y).0[0].saturating_mul(2)])
        });
        (m, doubled, None)
    };
    if mask_image.pixels().all(|p| p.0[0] < 128) {
        // Nothing reaches the latents: plain img2img of the whole picture.
        return plain(&originals, resize_mode, (width, height));
    }
    let images = masked_images(
        &originals,
        (resize_mode, fill == 1),
        (&mask_image, &overlay_mask, crop),
        (width, height),
    )?;
    let masked_content = match fill {
        2 => MaskedContent::LatentNoise,
        3 => MaskedContent::LatentNothing,
        _ => MaskedContent::Original,
    };
    if fill != 1 {
        let name = ["fill", "original", "latent noise", "latent nothing"][fill as usize];
        infotext.push(("Masked content".into(), name.into()));
    }
    if multiplier != 1.0 {
        infotext.push(("Noise multiplier".into(), multiplier.to_string()));
    }
    Ok(Pictures {
        images,
        mask: crate::mask::to_png(&mask_image).map_err(|e| HttpError::invalid("mask", e))?,
        options: Some(InpaintOptions {
            masked_content: masked_content as i32,
            blend_denoised: true,
            initial_noise_multiplier: multiplier as f32,
        }),
        infotext,
    })
}

impl Overlay {
    /// The generated image (PNG) with the original laid over it outside
    /// the mask, re-encoded with `chunks`.
    pub(super) fn apply(
        &self,
        generated: &[u8],
        chunks: &[(String, String)],
    ) -> HttpResult<(Vec<u8>, u32, u32)> {
        let gen = image::load_from_memory(generated)
            .map_err(|e| HttpError::invalid("init_images", format_args!("a result: {e}")))?
            .to_rgb8();
        let mask = if self.mask.dimensions() == self.original.dimensions() {
            self.mask.clone()
        } else {
            crate::mask::resize_gray(
                &self.mask,
                self.original.width(),
                self.original.height(),
                crate::resample::Filter::Lanczos,
            )
        };
        let out = picture::overlay(&gen, &self.original, &mask, self.paste_to);
        let png = crate::images::encode_png(out.as_raw(), out.width(), out.height(), chunks)
            .map_err(|e| HttpError::invalid("init_images", e))?;
        Ok((png, out.width(), out.height()))
    }
}

/// Each init image resized (or cropped to the masked region) for the
/// latents, filled under the mask unless the original is kept (`keep`), with
/// what is laid back over the result.
fn masked_images(
    originals: &[RgbImage],
    (resize_mode, keep): (i64, bool),
    (mask_image, overlay_mask, crop): (&GrayImage, &GrayImage, Option<picture::Region>),
    (width, height): (u32, u32),
) -> HttpResult<Vec<Prepared>> {
    let first = &originals[0];
    let mut images = Vec::new();
    for original in originals {
        let (mut image, kept) = match crop {
            Some(c) => {
                let o = if original.dimensions() == first.dimensions() {
                    original.clone()
                } else {
                    picture::resize_image(0, original, first.width(), first.height())
                };
                (
                    picture::resize_image(2, &picture::crop(&o, c), width, height),
                    o,
                )
            }
            None => {
                let r = picture::resize_image(resize_mode, original, width, height);
                (r.clone(), r)
            }
        };
        if !keep {
            image = picture::fill(&image, mask_image);
        }
        images.push(Prepared {
            image: png(&image)?,
            overlay: Some(Overlay {
                original: kept,
                mask: overlay_mask.clone(),
                paste_to: crop,
            }),
        });
    }
    Ok(images)
}

/// Plain img2img: each init image resized by `resize_mode`, nothing masked.
fn plain(
    originals: &[RgbImage],
    resize_mode: i64,
    (width, height): (u32, u32),
) -> HttpResult<Pictures> {
    let images = originals
        .iter()
        .map(|o| {
            Ok(Prepared {
                image: png(&picture::resize_image(resize_mode, o, width, height))?,
                overlay: None,
            })
        })
        .collect::<HttpResult<_>>()?;
    Ok(Pictures {
        images,
        mask: Vec::new(),
        options: None,
        infotext: Vec::new(),
    })
}

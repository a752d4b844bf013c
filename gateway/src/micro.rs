//! SDXL's micro-conditioning: the time ids each latent carries (original
//! size, crop top-left, then target size — or, for the refiner, an
//! aesthetic score), as diffusers' SDXL pipelines build them from a
//! request's size and crop conditioning. Sizes are (height, width) in
//! diffusers' order.

use sd_proto::v1::SizeConditioning;

use crate::error::{Error, Result};
use crate::facts::ModelFacts;

/// Largest size or crop coordinate accepted, in pixels.
pub const MAX_CONDITIONING_PIXELS: u32 = 16384;

/// diffusers' default aesthetic scores for the refiner.
const AESTHETIC_SCORE: f32 = 6.0;
const NEGATIVE_AESTHETIC_SCORE: f32 = 2.5;

/// The time ids of both halves of a guided step, one row per latent.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeIds {
    pub positive: Vec<f32>,
    pub negative: Vec<f32>,
}

/// A (height, width) pair given as two fields, both or neither.
/// `field` names the width (`conditioning.original_width`).
fn size((width, height): (u32, u32), field: &'static str) -> Result<Option<(u32, u32)>> {
    match (width, height) {
        (0, 0) => Ok(None),
        (w, h) if w == 0 || h == 0 => Err(Error::invalid(
            field,
            format!("width {w} and height {h}: give both or neither"),
        )),
        (w, h) if w > MAX_CONDITIONING_PIXELS || h > MAX_CONDITIONING_PIXELS => {
            Err(Error::invalid(
                field,
                format!("{w}×{h}, at most {MAX_CONDITIONING_PIXELS} each"),
            ))
        }
        (w, h) => Ok(Some((h, w))),
    }
}

/// A crop's top-left corner must lie inside the original image; `field`
/// names the top (`conditioning.crop_top`).
fn crop(top: u32, left: u32, original: (u32, u32), field: &'static str) -> Result<(u32, u32)> {
    if top >= original.0 || left >= original.1 {
        return Err(Error::invalid(
            field,
            format!(
                "crop ({top}, {left}) lies outside the {}×{} original image",
                original.1, original.0
            ),
        ));
    }
    Ok((top, left))
}

fn score(v: Option<f32>, default: f32, field: &'static str) -> Result<f32> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || !(0.0..=10.0).contains(&v) {
        return Err(Error::invalid(field, format!("{v} given, 0..=10 allowed")));
    }
    Ok(v)
}

/// The time ids of a generation of `height` × `width` pixels, or None for
/// models that take none (a conditioning given to such a model is
/// INVALID_ARGUMENT). `img2img` follows StableDiffusionXLImg2ImgPipeline,
/// which builds the negative ids a little differently from the text-to-
/// image pipeline.
pub fn time_ids(
    c: Option<&SizeConditioning>,
    facts: &ModelFacts,
    (height, width): (u32, u32),
    img2img: bool,
) -> Result<Option<TimeIds>> {
    let Some(sdxl) = facts.profile.sdxl() else {
        return match c {
            Some(_) => Err(Error::invalid(
                "conditioning",
                "this model takes no size conditioning (not an SDXL-family model)",
            )),
            None => Ok(None),
        };
    };
    let d = SizeConditioning::default();
    let c = c.unwrap_or(&d);
    let image = (height, width);
    let original = size(
        (c.original_width, c.original_height),
        "conditioning.original_width",
    )?
    .unwrap_or(image);
    let target = size(
        (c.target_width, c.target_height),
        "conditioning.target_width",
    )?
    .unwrap_or(image);
    let crops = crop(c.crop_top, c.crop_left, original, "conditioning.crop_top")?;
    let neg_original = size(
        (c.negative_original_width, c.negative_original_height),
        "conditioning.negative_original_width",
    )?;
    let neg_target = size(
        (c.negative_target_width, c.negative_target_height),
        "conditioning.negative_target_width",
    )?;
    let neg_crops = crop(
        c.negative_crop_top,
        c.negative_crop_left,
        neg_original.unwrap_or(original),
        "conditioning.negative_crop_top",
    )?;
    let ids = |o: (u32, u32), cr: (u32, u32), last: &[f32]| {
        let mut v = vec![o.0 as f32, o.1 as f32, cr.0 as f32, cr.1 as f32];
        v.extend_from_slice(last);
        v
    };
    let pair = |t: (u32, u32)| [t.0 as f32, t.1 as f32];
    if sdxl.requires_aesthetics_score {
        if c.target_width != 0 || c.negative_target_width != 0 {
            return Err(Error::invalid(
                "conditioning.target_width",
                "the refiner takes an aesthetic score, not a target size",
            ));
        }
        let s = score(
            c.aesthetic_score,
            AESTHETIC_SCORE,
            "conditioning.aesthetic_score",
        )?;
        let ns = score(
            c.negative_aesthetic_score,
            NEGATIVE_AESTHETIC_SCORE,
            "conditioning.negative_aesthetic_score",
        )?;
        return Ok(Some(TimeIds {
            positive: ids(original, crops, &[s]),
            negative: ids(neg_original.unwrap_or(original), neg_crops, &[ns]),
        }));
    }
    if c.aesthetic_score.is_some() || c.negative_aesthetic_score.is_some() {
        return Err(Error::invalid(
            "conditioning.aesthetic_score",
            "only a refiner (requires_aesthetics_score) takes aesthetic scores",
        ));
    }
    let positive = ids(original, crops, &pair(target));
    let negative = match (img2img, neg_original, neg_target) {
        // The image-to-image pipeline: the negative sizes default to the
        // positive ones, and the positive crop is used.
        (true, o, t) => ids(o.unwrap_or(original), crops, &pair(t.unwrap_or(target))),
        // Text to image: the negative ids only when both sizes are given.
        (false, Some(o), Some(t)) => ids(o, neg_crops, &pair(t)),
        (false, _, _) => positive.clone(),
    };
    Ok(Some(TimeIds { positive, negative }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::tests::facts;
    use sd_proto::v1::denoiser_info::FamilyParams;
    use sd_proto::v1::SdxlParams;

    fn sdxl(time_ids_len: u32, requires_aesthetics_score: bool) -> ModelFacts {
        let mut f = facts();
        f.profile.params = FamilyParams::Sdxl(SdxlParams {
            pooled_dim: 32,
            time_ids_len,
            requires_aesthetics_score,
            force_zeros_for_empty_prompt: !requires_aesthetics_score,
        });
        f
    }

    fn xl() -> ModelFacts {
        sdxl(6, false)
    }

    #[test]
    fn defaults_are_the_image_size_and_no_crop() {
        let t = time_ids(None, &xl(), (768, 1024), false).unwrap().unwrap();
        assert_eq!(t.positive, vec![768.0, 1024.0, 0.0, 0.0, 768.0, 1024.0]);
        assert_eq!(t.negative, t.positive);
        assert_eq!(time_ids(None, &facts(), (512, 512), false).unwrap(), None);
    }

    #[test]
    fn given_sizes_and_crops_are_used_in_diffusers_order() {
        let c = SizeConditioning {
            original_width: 4096,
            original_height: 2048,
            crop_top: 16,
            crop_left: 8,
            target_width: 1024,
            target_height: 512,
            negative_original_width: 512,
            negative_original_height: 512,
            negative_target_width: 1024,
            negative_target_height: 1024,
            negative_crop_top: 4,
            ..Default::default()
        };
        let t = time_ids(Some(&c), &xl(), (1024, 1024), false)
            .unwrap()
            .unwrap();
        assert_eq!(t.positive, vec![2048.0, 4096.0, 16.0, 8.0, 512.0, 1024.0]);
        assert_eq!(t.negative, vec![512.0, 512.0, 4.0, 0.0, 1024.0, 1024.0]);
        // Image to image: negative sizes, positive crop.
        let t = time_ids(Some(&c), &xl(), (1024, 1024), true)
            .unwrap()
            .unwrap();
        assert_eq!(t.negative, vec![512.0, 512.0, 16.0, 8.0, 1024.0, 1024.0]);
        // Text to image with one negative size only: the positive ids.
        let one = SizeConditioning {
            negative_target_width: 0,
            negative_target_height: 0,
            ..c
        };
        let t = time_ids(Some(&one), &xl(), (1024, 1024), false)
            .unwrap()
            .unwrap();
        assert_eq!(t.negative, t.positive);
    }

    #[test]
    fn the_refiner_takes_aesthetic_scores() {
        let refiner = sdxl(5, true);
        let t = time_ids(None, &refiner, (1024, 1024), true)
            .unwrap()
            .unwrap();
        assert_eq!(t.positive, vec![1024.0, 1024.0, 0.0, 0.0, 6.0]);
        assert_eq!(t.negative, vec![1024.0, 1024.0, 0.0, 0.0, 2.5]);
        let c = SizeConditioning {
            target_width: 8,
            target_height: 8,
            ..Default::default()
        };
        assert!(time_ids(Some(&c), &refiner, (64, 64), true).is_err());
    }

    #[test]
    fn bad_conditioning_is_refused_naming_the_field() {
        let field = |c: SizeConditioning, f: &ModelFacts| {
            let e = time_ids(Some(&c), f, (64, 64), false).unwrap_err();
            match e {
                Error::Invalid { field, .. } => field,
                other => panic!("{other:?}"),
            }
        };
        let crop = SizeConditioning {
            crop_top: 64,
            ..Default::default()
        };
        assert_eq!(field(crop, &xl()), "conditioning.crop_top");
        let half = SizeConditioning {
            original_width: 64,
            ..Default::default()
        };
        assert_eq!(field(half, &xl()), "conditioning.original_width");
        let score = SizeConditioning {
            aesthetic_score: Some(6.0),
            ..Default::default()
        };
        assert_eq!(field(score, &xl()), "conditioning.aesthetic_score");
        assert_eq!(field(SizeConditioning::default(), &facts()), "conditioning");
    }
}

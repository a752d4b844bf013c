//! A request's ControlNet units: checked, their hint images made (the
//! preprocessor, then fitted to the output size) once per generation, and,
//! each step, which units control it and at what scales — diffusers' rule
//! or AUTOMATIC1111's ControlNet extension's, as the unit says.

use image::RgbImage;
use sd_proto::v1::{ControlMode, ControlRef, ControlResize, ControlUnit, ControlWindowRule};
use sd_proto::wire::HostTensor;

use crate::canny::canny;
use crate::error::{Error, Result};
use crate::facts::ModelFacts;
use crate::limits::Limits;

/// Most units on one request (the denoiser's bound).
pub const MAX_UNITS: usize = 8;

/// The session tensors the hint images travel as, by unit.
pub const IMAGE_NAMES: [&str; MAX_UNITS] = [
    "control.0",
    "control.1",
    "control.2",
    "control.3",
    "control.4",
    "control.5",
    "control.6",
    "control.7",
];

/// Preprocessors that need networks sdserve does not serve yet, refused by
/// name (A1111's module names; a prefix covers its variants).
const NEED_NETWORKS: [&str; 24] = [
    "depth",
    "normal",
    "openpose",
    "dw_openpose",
    "animal_openpose",
    "densepose",
    "lineart",
    "softedge",
    "hed",
    "pidinet",
    "scribble_hed",
    "scribble_pidinet",
    "seg",
    "oneformer",
    "segmentation",
    "mlsd",
    "mediapipe",
    "ip-adapter",
    "clip_vision",
    "revision",
    "reference",
    "inpaint",
    "tile",
    "instant_id",
];

/// A unit ready for the steps.
#[derive(Debug, Clone)]
pub struct ControlPlan {
    /// The unit as given, its image left out (what the parameters report).
    pub unit: ControlUnit,
    /// The hint (1, 3, H, W), RGB in 0..=1, at the output size (a FLUX
    /// ControlNet sees its VAE latents, made by the pipeline).
    pub hint: HostTensor,
    pub weight: f32,
    pub mode: ControlMode,
    pub window: Window,
}

/// The part of the steps a unit (a ControlNet, an IP-Adapter) steers.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: f32,
    pub end: f32,
    pub rule: ControlWindowRule,
}

impl Window {
    /// `start` and `end` (fractions, unset: 0 and 1) and `rule`, checked;
    /// errors name unit `i` of `list`.
    pub fn new(
        list: &'static str,
        i: usize,
        (start, end): (Option<f32>, Option<f32>),
        rule: i32,
    ) -> Result<Self> {
        let (start, end) = (start.unwrap_or(0.0), end.unwrap_or(1.0));
        for (name, v) in [("start", start), ("end", end)] {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid(
                    field_name(list, i, name),
                    format!("{v} given, a fraction in 0..=1 allowed"),
                ));
            }
        }
        if start > end {
            return Err(Error::invalid(
                field_name(list, i, "start"),
                format!("{start} is after end {end}"),
            ));
        }
        let rule = ControlWindowRule::try_from(rule).map_err(|_| {
            Error::invalid(
                field_name(list, i, "window_rule"),
                format!("unknown rule {rule}"),
            )
        })?;
        Ok(Window { start, end, rule })
    }

    /// Whether step `k` (0-based) of `n` model evaluations is in the
    /// window: diffusers' `not (k/n < start or (k+1)/n > end)`;
    /// AUTOMATIC1111's extension reads its step counter, which its sampler
    /// moves after each step's model call, so step k sees max(k − 1, 0)/n,
    /// and is in when start <= that <= end.
    pub fn active(&self, k: usize, n: usize) -> bool {
        let n = n.max(1) as f64;
        let (start, end) = (f64::from(self.start), f64::from(self.end));
        match self.rule {
            ControlWindowRule::Diffusers => !(k as f64 / n < start || (k + 1) as f64 / n > end),
            ControlWindowRule::A1111 => {
                let pct = k.saturating_sub(1) as f64 / n;
                start <= pct && pct <= end
            }
        }
    }

    /// The share of `n` steps it controls.
    pub fn share(&self, n: usize) -> f64 {
        (0..n).filter(|&k| self.active(k, n)).count() as f64 / n.max(1) as f64
    }
}

impl ControlPlan {
    /// Whether this unit controls step `k` (0-based) of `n` model
    /// evaluations (its window's rule).
    pub fn active(&self, k: usize, n: usize) -> bool {
        self.window.active(k, n)
    }

    /// The share of `n` steps it controls.
    pub fn share(&self, n: usize) -> f64 {
        self.window.share(n)
    }
}

/// The ControlRefs of step `k` of `n`: the active units, each naming its
/// hint image's session tensor. With `all` (FLUX), every unit, those
/// outside their window or at weight 0 at scale 0: diffusers' FLUX
/// MultiControlNet runs them at 0, and how many samples its merge keeps
/// depends on every unit's depth.
pub fn refs(units: &[ControlPlan], k: usize, n: usize, all: bool) -> Vec<ControlRef> {
    units
        .iter()
        .enumerate()
        .filter(|(_, u)| all || (u.active(k, n) && u.weight != 0.0))
        .map(|(i, u)| ControlRef {
            name: u.unit.name.clone(),
            image: IMAGE_NAMES[i].to_string(),
            scale: if u.active(k, n) { u.weight } else { 0.0 },
            uncond_scale: (u.mode == ControlMode::Control).then_some(0.0),
            soft: u.mode != ControlMode::Balanced,
            union_mode: u.unit.union_mode,
        })
        .collect()
}

/// What the units add to a generation's UNet time, as a factor: each
/// unit's measured share of a UNet forward (half, until the denoiser has
/// measured it) over the share of the `steps` it controls.
pub fn cost_factor(units: &[ControlPlan], cost: &crate::facts::SharedCost, steps: usize) -> f64 {
    1.0 + units
        .iter()
        .map(|c| cost.control_ratio(&c.unit.name).unwrap_or(0.5) * c.share(steps))
        .sum::<f64>()
}

/// The request's units, checked and prepared for an output of
/// `width`×`height`.
pub fn plan(
    units: &[ControlUnit],
    facts: &ModelFacts,
    limits: &Limits,
    (width, height): (u32, u32),
) -> Result<Vec<ControlPlan>> {
    if units.is_empty() {
        return Ok(Vec::new());
    }
    if !facts.profile.takes_controlnet() {
        return Err(Error::invalid(
            "controlnets",
            "this model takes none: ControlNets serve SD 1.x/2.x, SDXL and FLUX.1 models",
        ));
    }
    let flux = facts.profile.controlnet_takes_latents();
    if units.len() > MAX_UNITS {
        return Err(Error::invalid(
            "controlnets",
            format!("{} units, at most {MAX_UNITS}", units.len()),
        ));
    }
    units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let plan = unit(i, u, limits, (width, height))?;
            if flux && plan.mode != ControlMode::Balanced {
                return Err(Error::invalid(
                    field_name("controlnets", i, "mode"),
                    "the prompt/ControlNet balance (A1111's control modes) applies to UNet \
                     ControlNets; FLUX's take the weight alone",
                ));
            }
            Ok(plan)
        })
        .collect()
}

fn unit(i: usize, u: &ControlUnit, limits: &Limits, size: (u32, u32)) -> Result<ControlPlan> {
    let field = |f: &str| -> &'static str { field_name("controlnets", i, f) };
    if u.name.is_empty() {
        return Err(Error::invalid(
            field("name"),
            "empty: name a ControlNet (ListControlNets)",
        ));
    }
    let weight = u.weight.unwrap_or(1.0);
    if !weight.is_finite() || !(0.0..=2.0).contains(&weight) {
        return Err(Error::invalid(
            field("weight"),
            format!("{weight} given, 0..=2 allowed"),
        ));
    }
    let window = Window::new("controlnets", i, (u.start, u.end), u.window_rule)?;
    let mode = ControlMode::try_from(u.mode)
        .map_err(|_| Error::invalid(field("mode"), format!("unknown mode {}", u.mode)))?;
    let resize = ControlResize::try_from(u.resize_mode).map_err(|_| {
        Error::invalid(
            field("resize_mode"),
            format!("unknown resize mode {}", u.resize_mode),
        )
    })?;
    if u.image.is_empty() {
        return Err(Error::invalid(
            field("image"),
            "empty: send the hint image (PNG, JPEG or WebP)",
        ));
    }
    let picture = crate::images::decode_picture(&u.image, limits)
        .map_err(|e| Error::invalid(field("image"), e))?
        .to_rgb8();
    let hint = preprocess(i, u, picture)?;
    let hint = fit(&hint, size, resize);
    let mut reported = u.clone();
    reported.image = Default::default();
    Ok(ControlPlan {
        unit: reported,
        hint: to_tensor(&hint)?,
        weight,
        mode,
        window,
    })
}

/// The hint unit `u` makes at `width`×`height`, as PNG: what A1111's
/// ControlNet extension returns as the unit's detected map.
pub fn hint_png(u: &ControlUnit, limits: &Limits, (width, height): (u32, u32)) -> Result<Vec<u8>> {
    let resize = ControlResize::try_from(u.resize_mode).unwrap_or(ControlResize::JustResize);
    let picture = crate::images::decode_picture(&u.image, limits)
        .map_err(|e| Error::invalid("controlnets", e))?
        .to_rgb8();
    let hint = fit(&preprocess(0, u, picture)?, (width, height), resize);
    let mut png = Vec::new();
    hint.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("a hint's PNG: {e}")))?;
    Ok(png)
}

/// The hint the unit's preprocessor makes of `picture`.
fn preprocess(i: usize, u: &ControlUnit, picture: RgbImage) -> Result<RgbImage> {
    let module = u.preprocessor.trim().to_ascii_lowercase();
    match module.as_str() {
        "" | "none" => Ok(picture),
        "canny" => {
            let low = u.threshold_a.unwrap_or(100.0);
            let high = u.threshold_b.unwrap_or(200.0);
            for (name, v) in [("threshold_a", low), ("threshold_b", high)] {
                if !v.is_finite() || !(0.0..=255.0).contains(&v) {
                    return Err(Error::invalid(
                        field_name("controlnets", i, name),
                        format!("{v} given, 0..=255 allowed"),
                    ));
                }
            }
            let res = if u.processor_res == 0 {
                512
            } else {
                u.processor_res
            };
            // A1111's slider is 64..=2048; its pixel perfect may go below.
            if !(1..=4096).contains(&res) {
                return Err(Error::invalid(
                    field_name("controlnets", i, "processor_res"),
                    format!("{res} given, 1..=4096 allowed"),
                ));
            }
            Ok(canny_at(&picture, res, low.trunc(), high.trunc()))
        }
        other => {
            let needs = NEED_NETWORKS
                .iter()
                .any(|p| other.starts_with(p) || other.contains(&format!("_{p}")));
            let why = if needs {
                "needs a network of its own that sdserve does not serve yet; send the hint \
                 itself with preprocessor `none`"
            } else {
                "unknown"
            };
            Err(Error::invalid(
                field_name("controlnets", i, "preprocessor"),
                format!(
                    "{} {why} (served: none, canny)",
                    sd_proto::status::quote(other)
                ),
            ))
        }
    }
}

/// A1111's canny: the picture's shorter side resized to `res`, edges
/// padded to multiples of 64, OpenCV's Canny on the RGB image, the padding
/// cropped off; white edges on black, as RGB.
fn canny_at(picture: &RgbImage, res: u32, low: f32, high: f32) -> RgbImage {
    let (w, h) = picture.dimensions();
    let short = w.min(h).max(1);
    let k = f64::from(res) / f64::from(short);
    let (tw, th) = (
        ((f64::from(w) * k).round() as u32).max(1),
        ((f64::from(h) * k).round() as u32).max(1),
    );
    let resized = if (tw, th) == (w, h) {
        picture.clone()
    } else {
        crate::resample::resize_lanczos(picture, tw, th)
    };
    let pad = |x: u32| x.div_ceil(64) * 64;
    let (pw, ph) = (pad(tw), pad(th));
    let padded = RgbImage::from_fn(pw, ph, |x, y| {
        *resized.get_pixel(x.min(tw - 1), y.min(th - 1))
    });
    let edges = canny(&padded, low, high);
    RgbImage::from_fn(tw, th, |x, y| {
        let v = edges.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}

/// `hint` fitted to `width`×`height` as `mode` says: stretched (diffusers'
/// Lanczos resize), scaled to cover and cropped about the centre, or scaled
/// to fit and the rest filled with the median of its border pixels.
fn fit(hint: &RgbImage, (width, height): (u32, u32), mode: ControlResize) -> RgbImage {
    let (w, h) = hint.dimensions();
    if (w, h) == (width, height) {
        return hint.clone();
    }
    let resize = |img: &RgbImage, tw: u32, th: u32| {
        if img.dimensions() == (tw, th) {
            img.clone()
        } else {
            crate::resample::resize_lanczos(img, tw.max(1), th.max(1))
        }
    };
    let (kw, kh) = (
        f64::from(width) / f64::from(w),
        f64::from(height) / f64::from(h),
    );
    match mode {
        ControlResize::JustResize => resize(hint, width, height),
        ControlResize::CropAndResize => {
            let k = kw.max(kh);
            let (nw, nh) = (round_even(f64::from(w) * k), round_even(f64::from(h) * k));
            let scaled = resize(hint, nw.max(width), nh.max(height));
            let (x0, y0) = ((scaled.width() - width) / 2, (scaled.height() - height) / 2);
            image::imageops::crop_imm(&scaled, x0, y0, width, height).to_image()
        }
        ControlResize::ResizeAndFill => {
            let k = kw.min(kh);
            let (nw, nh) = (
                round_even(f64::from(w) * k).clamp(1, width),
                round_even(f64::from(h) * k).clamp(1, height),
            );
            let scaled = resize(hint, nw, nh);
            let mut out = RgbImage::from_pixel(width, height, border_median(hint));
            image::imageops::replace(
                &mut out,
                &scaled,
                i64::from((width - nw) / 2),
                i64::from((height - nh) / 2),
            );
            out
        }
    }
}

/// numpy's round (half to even), as A1111 sizes the scaled hint.
fn round_even(v: f64) -> u32 {
    v.round_ties_even().max(0.0) as u32
}

/// Per channel, the median of the first and last rows and columns.
fn border_median(img: &RgbImage) -> image::Rgb<u8> {
    let (w, h) = img.dimensions();
    let mut channels: [Vec<u8>; 3] = Default::default();
    let mut push = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        for c in 0..3 {
            channels[c].push(p[c]);
        }
    };
    for x in 0..w {
        push(x, 0);
        push(x, h - 1);
    }
    for y in 0..h {
        push(0, y);
        push(w - 1, y);
    }
    let median = |v: &mut Vec<u8>| -> u8 {
        v.sort_unstable();
        let n = v.len();
        if n == 0 {
            0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            ((u16::from(v[n / 2 - 1]) + u16::from(v[n / 2])) / 2) as u8
        }
    };
    let [mut r, mut g, mut b] = channels;
    image::Rgb([median(&mut r), median(&mut g), median(&mut b)])
}

/// (1, 3, H, W), values / 255, as diffusers' control image processor.
fn to_tensor(img: &RgbImage) -> Result<HostTensor> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = f32::from(p.0[c]) / 255.0;
        }
    }
    HostTensor::new(vec![1, 3, i64::from(h), i64::from(w)], data)
        .map_err(|e| Error::Internal(format!("a hint tensor: {e}")))
}

/// `LIST[i].FIELD` (LIST `controlnets` or `ip_adapters`), as a static
/// name for errors; `LIST` alone past the known fields.
pub fn field_name(list: &'static str, i: usize, f: &str) -> &'static str {
    const FIELDS: [&str; 14] = [
        "name",
        "union_mode",
        "weight",
        "scale",
        "start",
        "end",
        "mode",
        "window_rule",
        "resize_mode",
        "image",
        "preprocessor",
        "threshold_a",
        "threshold_b",
        "processor_res",
    ];
    const LISTS: [&str; 2] = ["controlnets", "ip_adapters"];
    if i >= MAX_UNITS || !FIELDS.contains(&f) || !LISTS.contains(&list) {
        return list;
    }
    // Built once: (list, unit, field) → its name.
    static NAMES: std::sync::OnceLock<Vec<(&'static str, usize, &'static str, String)>> =
        std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut v = Vec::new();
        for l in LISTS {
            for i in 0..MAX_UNITS {
                for f in FIELDS {
                    v.push((l, i, f, format!("{l}[{i}].{f}")));
                }
            }
        }
        v
    });
    names
        .iter()
        .find(|(l, j, g, _)| *l == list && *j == i && *g == f)
        .map_or(list, |(_, _, _, s)| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(start: f32, end: f32, rule: ControlWindowRule) -> ControlPlan {
        ControlPlan {
            unit: ControlUnit::default(),
            hint: HostTensor::new(vec![1], vec![0.0]).unwrap(),
            weight: 1.0,
            mode: ControlMode::Balanced,
            window: Window { start, end, rule },
        }
    }

    fn steps(u: &ControlPlan, n: usize) -> Vec<usize> {
        (0..n).filter(|&k| u.active(k, n)).collect()
    }

    #[test]
    fn diffusers_windows_keep_steps_inside_both_ends() {
        let u = unit(0.25, 0.75, ControlWindowRule::Diffusers);
        // k/8 >= 0.25 and (k+1)/8 <= 0.75
        assert_eq!(steps(&u, 8), vec![2, 3, 4, 5]);
        assert_eq!(
            steps(&unit(0.0, 1.0, ControlWindowRule::Diffusers), 3),
            vec![0, 1, 2]
        );
        assert_eq!(
            steps(&unit(0.0, 0.5, ControlWindowRule::Diffusers), 4),
            vec![0, 1]
        );
    }

    #[test]
    fn a1111_windows_read_the_extensions_lagging_counter() {
        // N=20, end=0.5: max(k-1,0) <= 10, steps 0..=11 (12 steps).
        let u = unit(0.0, 0.5, ControlWindowRule::A1111);
        assert_eq!(steps(&u, 20), (0..=11).collect::<Vec<_>>());
        // start=0.5: from step 11.
        let u = unit(0.5, 1.0, ControlWindowRule::A1111);
        assert_eq!(steps(&u, 20), (11..20).collect::<Vec<_>>());
        // The same window under diffusers' rule differs.
        let d = unit(0.0, 0.5, ControlWindowRule::Diffusers);
        assert_eq!(steps(&d, 20), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn modes_set_soft_scales_and_the_unconditional_rows() {
        let mut u = unit(0.0, 1.0, ControlWindowRule::Diffusers);
        u.unit.name = "edges".into();
        u.weight = 0.6;
        let r = refs(std::slice::from_ref(&u), 0, 4, false);
        assert_eq!(
            (r[0].scale, r[0].uncond_scale, r[0].soft),
            (0.6, None, false)
        );
        u.mode = ControlMode::Prompt;
        let r = refs(std::slice::from_ref(&u), 0, 4, false);
        assert_eq!((r[0].uncond_scale, r[0].soft), (None, true));
        u.mode = ControlMode::Control;
        let r = refs(std::slice::from_ref(&u), 0, 4, false);
        assert_eq!((r[0].uncond_scale, r[0].soft), (Some(0.0), true));
        assert_eq!(r[0].image, "control.0");
        u.weight = 0.0;
        assert!(
            refs(std::slice::from_ref(&u), 0, 4, false).is_empty(),
            "a zero weight controls nothing"
        );
        // FLUX's: every unit, at scale 0 where it does not control.
        let r = refs(&[u], 0, 4, true);
        assert_eq!((r.len(), r[0].scale), (1, 0.0));
    }

    #[test]
    fn hints_are_fitted_as_each_resize_mode_says() {
        // A 4×2 picture: left half white, right half black.
        let img = RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            }
        });
        let just = fit(&img, (4, 4), ControlResize::JustResize);
        assert_eq!(just.dimensions(), (4, 4));
        let crop = fit(&img, (4, 4), ControlResize::CropAndResize);
        // Scaled to 8×4... then 8×4 covers 4×4: the centre, half white.
        assert_eq!(crop.dimensions(), (4, 4));
        assert!(crop.get_pixel(0, 0).0[0] > 200 && crop.get_pixel(3, 0).0[0] < 55);
        let fill = fit(&img, (4, 4), ControlResize::ResizeAndFill);
        assert_eq!(fill.dimensions(), (4, 4));
        // Fitted 4×2 in the middle rows; the border median fills the rest.
        assert_eq!(fill.get_pixel(0, 1), img.get_pixel(0, 0));
    }

    #[test]
    fn canny_hints_are_edges_at_the_picture_size() {
        let img = RgbImage::from_fn(96, 64, |x, _| {
            if x < 48 {
                image::Rgb([250, 250, 250])
            } else {
                image::Rgb([5, 5, 5])
            }
        });
        let edges = canny_at(&img, 64, 100.0, 200.0);
        // The shorter side at processor_res: 64 → the picture's own size.
        assert_eq!(edges.dimensions(), (96, 64));
        let lit: Vec<u32> = (0..96)
            .filter(|&x| edges.get_pixel(x, 32).0[0] == 255)
            .collect();
        assert!(
            !lit.is_empty() && lit.iter().all(|&x| (46..=49).contains(&x)),
            "{lit:?}"
        );
    }

    #[test]
    fn field_names_are_per_unit() {
        assert_eq!(
            field_name("controlnets", 2, "weight"),
            "controlnets[2].weight"
        );
        assert_eq!(
            field_name("controlnets", 0, "threshold_b"),
            "controlnets[0].threshold_b"
        );
        assert_eq!(
            field_name("ip_adapters", 1, "scale"),
            "ip_adapters[1].scale"
        );
        assert_eq!(field_name("controlnets", 9, "weight"), "controlnets");
    }
}

//! A request's IP-Adapters (image prompts): checked, each picture prepared
//! as diffusers' IP-Adapter pipelines prepare it for the CLIP vision
//! encoder (transformers' `CLIPImageProcessor`: RGB — transparency over
//! white —, the shorter side resized to the encoder's size with the longer
//! side truncated, Pillow's bicubic, the centre cut out, / 255, then
//! normalised per channel), and each step's references to them.

use image::{DynamicImage, RgbImage};
use sd_proto::v1::{ImageEncoderInfo, IpAdapterRef, IpAdapterUnit};
use sd_proto::wire::HostTensor;

use crate::control::{field_name, Window, MAX_UNITS};
use crate::error::{Error, Result};
use crate::facts::ModelFacts;
use crate::limits::Limits;

/// The session tensors the image embeddings travel as, by unit.
pub const EMBEDS_NAMES: [&str; MAX_UNITS] = [
    "ip.0", "ip.1", "ip.2", "ip.3", "ip.4", "ip.5", "ip.6", "ip.7",
];

/// An adapter ready for the steps.
#[derive(Debug, Clone)]
pub struct IpPlan {
    /// The unit as given, its picture left out.
    pub unit: IpAdapterUnit,
    /// The picture prepared for the encoder, (1, 3, size, size).
    pub pixels: HostTensor,
    /// The prepared picture's digest (the embedding cache's key).
    pub digest: String,
    pub scale: f32,
    pub window: Window,
}

/// The request's adapters, checked and their pictures prepared.
pub fn plan(units: &[IpAdapterUnit], facts: &ModelFacts, limits: &Limits) -> Result<Vec<IpPlan>> {
    if units.is_empty() {
        return Ok(Vec::new());
    }
    if !facts.profile.takes_ip_adapter() {
        return Err(Error::invalid(
            "ip_adapters",
            "this model takes none: IP-Adapters serve SD 1.x/2.x and SDXL models",
        ));
    }
    let Some(encoder) = &facts.image_encoder else {
        return Err(Error::invalid(
            "ip_adapters",
            "this model's text encoder has no image encoder (its services were started \
             without --ip-adapter-dir)",
        ));
    };
    if units.len() > MAX_UNITS {
        return Err(Error::invalid(
            "ip_adapters",
            format!("{} adapters, at most {MAX_UNITS}", units.len()),
        ));
    }
    units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let field = |f: &str| field_name("ip_adapters", i, f);
            if u.name.is_empty() {
                return Err(Error::invalid(
                    field("name"),
                    "empty: name an IP-Adapter (ListIpAdapters)",
                ));
            }
            let scale = u.scale.unwrap_or(1.0);
            if !scale.is_finite() || !(0.0..=2.0).contains(&scale) {
                return Err(Error::invalid(
                    field("scale"),
                    format!("{scale} given, 0..=2 allowed"),
                ));
            }
            let window = Window::new("ip_adapters", i, (u.start, u.end), u.window_rule)?;
            if u.image.is_empty() {
                return Err(Error::invalid(
                    field("image"),
                    "empty: send the picture (PNG, JPEG or WebP)",
                ));
            }
            let picture = crate::images::decode_picture(&u.image, limits)
                .map_err(|e| Error::invalid(field("image"), e))?;
            let pixels = prepare(&picture, encoder)?;
            let digest = {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                for v in &pixels.data {
                    h.update(v.to_le_bytes());
                }
                h.finalize().iter().map(|b| format!("{b:02x}")).collect()
            };
            let mut unit = u.clone();
            unit.image = Default::default();
            Ok(IpPlan {
                unit,
                pixels,
                digest,
                scale,
                window,
            })
        })
        .collect()
}

/// `picture` as `CLIPImageProcessor` prepares it for `encoder`.
pub fn prepare(picture: &DynamicImage, encoder: &ImageEncoderInfo) -> Result<HostTensor> {
    let rgb = over_white(picture);
    let size = encoder.size.max(1);
    let (w, h) = rgb.dimensions();
    // The shorter side to `size`, the longer truncated (not rounded).
    let (tw, th) = if w <= h {
        (
            size,
            ((u64::from(size) * u64::from(h)) / u64::from(w.max(1))) as u32,
        )
    } else {
        (
            ((u64::from(size) * u64::from(w)) / u64::from(h.max(1))) as u32,
            size,
        )
    };
    let resized = if (tw, th) == (w, h) {
        rgb
    } else {
        crate::resample::resize(&rgb, tw, th, crate::resample::Filter::Bicubic)
    };
    let (top, left) = ((th.saturating_sub(size)) / 2, (tw.saturating_sub(size)) / 2);
    let plane = (size * size) as usize;
    let mut data = vec![0f32; 3 * plane];
    let (mean, std) = (&encoder.mean, &encoder.std);
    if mean.len() != 3 || std.len() != 3 || std.contains(&0.0) {
        return Err(Error::Internal(
            "the image encoder published no usable mean and std".into(),
        ));
    }
    for y in 0..size {
        for x in 0..size {
            let p = resized
                .get_pixel((x + left).min(tw - 1), (y + top).min(th - 1))
                .0;
            for c in 0..3 {
                // float64 × 1/255, then float32, as the processor rescales.
                let v = (f64::from(p[c]) * (1.0 / 255.0)) as f32;
                data[c * plane + (y * size + x) as usize] = (v - mean[c]) / std[c];
            }
        }
    }
    HostTensor::new(vec![1, 3, i64::from(size), i64::from(size)], data)
        .map_err(|e| Error::Internal(format!("a picture tensor: {e}")))
}

/// RGB, a picture with transparency composited over white (the
/// processor's `convert_rgb`).
fn over_white(picture: &DynamicImage) -> RgbImage {
    if !picture.color().has_alpha() {
        return picture.to_rgb8();
    }
    let rgba = picture.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over = |c: u8| {
            let (c, a) = (u32::from(c), u32::from(a));
            ((c * a + 255 * (255 - a) + 127) / 255) as u8
        };
        image::Rgb([over(r), over(g), over(b)])
    })
}

/// The IpAdapterRefs of step `k` of `n`: the adapters whose window it is in.
pub fn refs(units: &[IpPlan], k: usize, n: usize) -> Vec<IpAdapterRef> {
    units
        .iter()
        .enumerate()
        .filter(|(_, u)| u.window.active(k, n) && u.scale != 0.0)
        .map(|(i, u)| IpAdapterRef {
            name: u.unit.name.clone(),
            embeds: EMBEDS_NAMES[i].to_string(),
            scale: u.scale,
        })
        .collect()
}

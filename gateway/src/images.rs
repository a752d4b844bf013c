//! Images in and out of the gateway: init images (checked before they are
//! decoded, then resized with Pillow's Lanczos arithmetic, `resample`, and
//! normalised as diffusers' VaeImageProcessor does), result encoding (PNG
//! with the generation parameters in text chunks, JPEG, WebP) and cheap
//! latent previews.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat as Fmt, ImageReader};
use sd_proto::v1::{GenerationParameters, ImageFormat};
use sd_proto::wire::HostTensor;

use crate::error::{Error, Result};
use crate::limits::Limits;

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::invalid("init_image", msg)
}

/// Formats accepted for init images, by their magic bytes.
fn sniff(bytes: &[u8]) -> Option<Fmt> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Fmt::Png)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(Fmt::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Fmt::WebP)
    } else {
        None
    }
}

/// Largest init image accepted before resizing, in pixels per side …
const MAX_SOURCE_SIDE: u32 = 8192;
/// … and in pixels (4096², about 50 MB decoded).
const MAX_SOURCE_PIXELS: u64 = 4096 * 4096;

/// Decode an init image to (1, 3, H, W) pixels in [-1, 1].
///
/// The size is `target` when given (0 in one side keeps the image's), else
/// the image's own rounded down to a multiple of `scale`, as diffusers does.
/// The image is taken as diffusers' `load_image` takes it: turned as its
/// EXIF orientation says (PIL's `ImageOps.exif_transpose`, and what
/// browsers show), the first frame of an animation, converted to 8-bit RGB
/// (alpha dropped, 16-bit scaled, CMYK converted).
pub fn decode_init_image(
    bytes: &[u8],
    limits: &Limits,
    scale: u32,
    target: Option<(u32, u32)>,
) -> Result<(HostTensor, u32, u32)> {
    let img = decode_picture(bytes, limits).map_err(invalid)?;
    let (w, h) = (img.width(), img.height());
    let round = |v: u32| v - v % scale;
    let (tw, th) = match target {
        Some((tw, th)) => (
            if tw == 0 { round(w) } else { tw },
            if th == 0 { round(h) } else { th },
        ),
        None => (round(w), round(h)),
    };
    if tw == 0 || th == 0 {
        return Err(invalid(format!(
            "{w}×{h} is smaller than one latent ({scale}×{scale})"
        )));
    }
    let rgb = img.to_rgb8();
    let rgb = if (tw, th) == (w, h) {
        rgb
    } else {
        crate::resample::resize_lanczos(&rgb, tw, th)
    };
    let (tw, th) = rgb.dimensions();
    Ok((normalized(&rgb)?, tw, th))
}

/// A picture a request sends (an init image, a mask), as PIL's `open`
/// and diffusers' `load_image` take it: checked before it is decoded
/// (format by its magic bytes, size by its header, within the limits),
/// turned as its EXIF orientation says, the first frame of an animation.
pub fn decode_picture(bytes: &[u8], limits: &Limits) -> std::result::Result<DynamicImage, String> {
    if bytes.len() > limits.max_init_image_bytes {
        return Err(format!(
            "{} bytes, at most {} allowed",
            bytes.len(),
            limits.max_init_image_bytes
        ));
    }
    let format = sniff(bytes).ok_or("not a PNG, JPEG or WebP image")?;
    if format == Fmt::Jpeg && !jpeg_ends(bytes) {
        // The decoder would fill what is missing with gray; PIL refuses.
        return Err("truncated JPEG: no end-of-image marker after its scans".into());
    }
    let stored = checked_dimensions(bytes, format)?;
    decode_oriented(bytes, format, stored)
}

/// Whether a JPEG's scans end with an end-of-image marker (FF D9), as
/// libjpeg (and so PIL, and so diffusers) insists. The marker segments
/// before the first scan are skipped by their lengths (an EXIF thumbnail
/// has markers of its own); after it, FF D9 cannot occur inside
/// entropy-coded data (an FF there is followed by 00 or a restart marker).
fn jpeg_ends(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xff {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xff {
            i += 1; // fill byte
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if marker == 0xda {
            let scans = bytes.get(i + 2 + len..).unwrap_or_default();
            return scans.windows(2).any(|w| w == [0xff, 0xd9]);
        }
        i += 2 + len;
    }
    false
}

/// The stored size from the header alone, before any pixel is allocated,
/// checked against the limits.
fn checked_dimensions(bytes: &[u8], format: Fmt) -> std::result::Result<(u32, u32), String> {
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("unreadable header: {e}"))?;
    if w == 0 || h == 0 || w > MAX_SOURCE_SIDE || h > MAX_SOURCE_SIDE {
        return Err(format!("{w}×{h}: each side must be 1..={MAX_SOURCE_SIDE}"));
    }
    if w as u64 * h as u64 > MAX_SOURCE_PIXELS {
        return Err(format!("{w}×{h} is more than {MAX_SOURCE_PIXELS} pixels"));
    }
    Ok((w, h))
}

/// Decode within allocation limits for the checked `(w, h)`, then turn the
/// image as its EXIF orientation says (an orientation that cannot be read
/// leaves it as stored, as PIL does). Animated images give their first
/// frame.
fn decode_oriented(
    bytes: &[u8],
    format: Fmt,
    (w, h): (u32, u32),
) -> std::result::Result<DynamicImage, String> {
    let cannot = |e: image::ImageError| format!("cannot decode: {e}");
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(w as u64 * h as u64 * 8 + (64 << 20));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(cannot)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    limits.reserve(decoder.total_bytes()).map_err(cannot)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(cannot)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// RGB8 pixels as a (1, 3, H, W) tensor in [-1, 1].
pub fn normalized(rgb: &image::RgbImage) -> Result<HostTensor> {
    let (w, h) = rgb.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = 2.0 * (p.0[c] as f32 / 255.0) - 1.0;
        }
    }
    HostTensor::new(vec![1, 3, h as i64, w as i64], data)
        .map_err(|e| Error::Internal(format!("init image tensor: {e}")))
}

/// A request's LoRA adapters as AUTOMATIC1111's prompt tags:
/// `<lora:NAME:SCALE>`, or `<lora:NAME:TE:UNET>` where the scales differ.
pub fn lora_tags(loras: &[sd_proto::v1::LoraRef]) -> String {
    loras
        .iter()
        .map(|l| match l.unet_scale {
            Some(u) if u != l.scale => format!("<lora:{}:{}:{u}>", l.name, l.scale),
            _ => format!("<lora:{}:{}>", l.name, l.scale),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The generation parameters as text chunks: one key each, plus the
/// `parameters` infotext AUTOMATIC1111's PNG Info reads (its prompt with
/// the LoRA tags that reproduce the image; [`crate::infotext`]).
pub fn text_chunks(p: &GenerationParameters) -> Vec<(String, String)> {
    let tags = lora_tags(&p.loras);
    let summary = crate::infotext::write(p);
    let mut chunks = vec![
        ("parameters".into(), summary),
        ("prompt".into(), p.prompt.clone()),
        ("negative_prompt".into(), p.negative_prompt.clone()),
        ("seed".into(), p.seed.to_string()),
        ("steps".into(), p.steps.to_string()),
        ("guidance_scale".into(), p.guidance_scale.to_string()),
        ("scheduler".into(), p.scheduler.clone()),
        ("karras".into(), p.karras.to_string()),
        ("model".into(), p.model.clone()),
        ("size".into(), format!("{}x{}", p.width, p.height)),
        (
            "software".into(),
            format!("sdserve {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if !tags.is_empty() {
        chunks.push(("loras".into(), tags));
    }
    if p.true_cfg_scale > 0.0 {
        // FLUX.1: guidance_scale is the distilled guidance; this is its own.
        chunks.push(("true_cfg_scale".into(), p.true_cfg_scale.to_string()));
    }
    if p.max_sequence_length > 0 {
        chunks.push((
            "max_sequence_length".into(),
            p.max_sequence_length.to_string(),
        ));
    }
    chunks
}

/// PNG with UTF-8 text chunks, compressed with the png crate's `Fast`
/// level (fdeflate): on photographic 512² and 1024² images it encodes 16–23×
/// faster than the default level for files within ±1.5% of its size
/// (docs/BENCHMARKS.md, "PNG encoding"); the default cost a GPU generation
/// 35–145 ms, as much as two to three denoising steps.
pub fn encode_png(rgb: &[u8], w: u32, h: u32, text: &[(String, String)]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::Internal(format!("png: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        for (k, v) in text {
            enc.add_itxt_chunk(k.clone(), v.clone()).map_err(err)?;
        }
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(rgb).map_err(err)?;
    }
    Ok(out)
}

/// Encode RGB8 pixels as the requested format.
pub fn encode(
    rgb: &[u8],
    w: u32,
    h: u32,
    format: ImageFormat,
    params: &GenerationParameters,
) -> Result<Vec<u8>> {
    match format {
        ImageFormat::Png => encode_png(rgb, w, h, &text_chunks(params)),
        ImageFormat::Jpeg | ImageFormat::Webp => {
            let buf = image::RgbImage::from_raw(w, h, rgb.to_vec())
                .ok_or_else(|| Error::Internal("decoded image has the wrong size".into()))?;
            let mut out = Cursor::new(Vec::new());
            let fmt = if format == ImageFormat::Jpeg {
                Fmt::Jpeg
            } else {
                Fmt::WebP
            };
            buf.write_to(&mut out, fmt)
                .map_err(|e| Error::Internal(format!("encoding {fmt:?}: {e}")))?;
            Ok(out.into_inner())
        }
    }
}

/// Latent → RGB factors for SD's 4-channel latents (a least-squares fit of
/// decoded colours on latents, widely used for live previews).
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// Latent → RGB factors and bias for FLUX.1's 16-channel latents (the fit
/// ComfyUI's previews use for them).
const FLUX_LATENT_RGB: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const FLUX_LATENT_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// A preview of one image's (unscaled-by-VAE, model-space) latents: a linear
/// projection to RGB at latent resolution, PNG-encoded.
pub fn latent_preview(latents: &[f32], channels: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let plane = h * w;
    let mut rgb = vec![0u8; plane * 3];
    for i in 0..plane {
        for c in 0..3 {
            let v: f32 = if channels == 4 {
                (0..4)
                    .map(|k| latents[k * plane + i] * LATENT_RGB[k][c])
                    .sum()
            } else if channels == 16 {
                FLUX_LATENT_RGB_BIAS[c]
                    + (0..16)
                        .map(|k| latents[k * plane + i] * FLUX_LATENT_RGB[k][c])
                        .sum::<f32>()
            } else {
                (0..channels).map(|k| latents[k * plane + i]).sum::<f32>() / channels as f32 * 0.5
            };
            rgb[i * 3 + c] = ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    encode_png(&rgb, w as u32, h as u32, &[])
}

/// Peak signal-to-noise ratio of `b` against `a` (8-bit RGB), in dB
/// (infinite for equal images): the benchmark's and the tests' one measure
/// of how far a picture is from its reference.
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> std::result::Result<f64, String> {
    if a.dimensions() != b.dimensions() {
        return Err(format!(
            "images of {:?} and {:?}",
            a.dimensions(),
            b.dimensions()
        ));
    }
    let n = a.as_raw().len() as f64;
    let se: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let mse = se / n;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_latents_preview_through_their_own_factors() {
        // One latent pixel, channel 4 alone set: FLUX's factors for that
        // channel plus the bias, not the channel mean the fallback takes.
        let mut latents = vec![0.0f32; 16];
        latents[4] = 2.0;
        let png = latent_preview(&latents, 16, 1, 1).unwrap();
        let px = image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .get_pixel(0, 0)
            .0;
        let want = |c: usize| {
            let v = FLUX_LATENT_RGB_BIAS[c] + 2.0 * FLUX_LATENT_RGB[4][c];
            ((v + 1.0) / 2.0 * 255.0).round() as u8
        };
        assert_eq!(px, [want(0), want(1), want(2)]);
        // The fallback (mean of channels, halved) would give 136 everywhere.
        assert_ne!(px, [136, 136, 136]);
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 60]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, Fmt::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_jpeg_must_reach_its_end_marker() {
        let whole = jpeg(40, 24);
        assert!(jpeg_ends(&whole));
        assert!(!jpeg_ends(&whole[..whole.len() - 2]));
        assert!(!jpeg_ends(&whole[..whole.len() / 2]));
        assert!(!jpeg_ends(&whole[..3]));
        // Trailing bytes after the end are tolerated, as by libjpeg.
        assert!(jpeg_ends(&[&whole[..], b"trailer"].concat()));
        // A whole thumbnail inside an APP1 segment does not end the image.
        let thumb = jpeg(8, 8);
        let mut app1 = vec![0xff, 0xe1];
        app1.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(&thumb);
        let with_thumb = [&whole[..2], &app1[..], &whole[2..]].concat();
        assert!(jpeg_ends(&with_thumb));
        assert!(!jpeg_ends(&with_thumb[..with_thumb.len() - 2]));
        let e =
            decode_init_image(&whole[..whole.len() - 2], &Limits::default(), 8, None).unwrap_err();
        assert!(e.to_string().contains("truncated JPEG"), "{e}");
    }

    #[test]
    fn the_parameters_chunk_carries_the_lora_tags_that_reproduce_the_image() {
        let lora = |name: &str, scale: f32, unet_scale: Option<f32>| sd_proto::v1::LoraRef {
            name: name.into(),
            scale,
            unet_scale,
        };
        let mut p = GenerationParameters {
            prompt: "a cat".into(),
            ..Default::default()
        };
        let get = |p: &GenerationParameters, key: &str| {
            text_chunks(p)
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
        };
        assert!(get(&p, "parameters").unwrap().starts_with("a cat\n"));
        assert_eq!(get(&p, "loras"), None);
        p.loras = vec![lora("ink", 0.8, None), lora("style", 1.0, Some(0.3))];
        let params = get(&p, "parameters").unwrap();
        assert!(
            params.starts_with("a cat <lora:ink:0.8> <lora:style:1:0.3>\n"),
            "{params}"
        );
        // The tags read back as the same adapters and scales.
        let (_, tags) = sd_prompt::take_loras(params.lines().next().unwrap()).unwrap();
        assert_eq!(
            tags.iter()
                .map(|t| (t.name.as_str(), t.scale, t.unet))
                .collect::<Vec<_>>(),
            [("ink", 0.8, None), ("style", 1.0, Some(0.3))]
        );
        assert_eq!(
            get(&p, "loras").unwrap(),
            "<lora:ink:0.8> <lora:style:1:0.3>"
        );
    }
}

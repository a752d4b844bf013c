//! The public bad-input corpus: a table of odd and malformed Generate and
//! GenerateStream requests against a running stack (gateway and the three
//! model services on the tiny model). Each is either served — where the
//! input is legitimate: unicode prompts, 16-bit and CMYK images, animations
//! (first frame), EXIF-rotated photos (turned as browsers and diffusers'
//! `load_image` show them) — or refused with its code, a short message,
//! and for INVALID_ARGUMENT the field in a BadRequest violation. After the
//! whole table the stack still serves a normal request.
//!
//! Unit-level limits (each field's range, header-only bomb checks) are in
//! gateway/tests/validation.rs; this file covers each *kind* end to end.
//! Images are made here with the `image` and `png` crates, except those
//! they cannot write (CMYK JPEG, animated WebP and GIF), which
//! tests/fixtures/make_odd_images.py wrote to tests/data/odd-images.

#![allow(clippy::unwrap_used)]
// Tables read top to bottom; the 100-line limit is for non-test code.
#![allow(clippy::too_many_lines)]

mod common;

use std::io::Cursor;

use common::procs::{Cluster, ClusterOptions};
use image::{DynamicImage, ImageBuffer, ImageEncoder, ImageFormat, Luma, LumaA, Rgb, RgbImage};
use sd_gateway::images::decode_init_image;
use sd_gateway::limits::Limits;
use sd_proto::status::field_violations;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{generate_event, GenerateRequest, GenerateResponse};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Longest refusal message accepted, whatever the input.
const BRIEF: usize = 300;

const RED: [u8; 3] = [255, 0, 0];
const GREEN: [u8; 3] = [0, 255, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const WHITE: [u8; 3] = [255, 255, 255];

// ---------------------------------------------------------------- images

fn encoded(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

/// `w`×`h` in four quadrants: red, green / blue, white.
fn quadrants(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb(match (x < w / 2, y < h / 2) {
            (true, true) => RED,
            (false, true) => GREEN,
            (true, false) => BLUE,
            (false, false) => WHITE,
        })
    })
}

/// A big-endian TIFF block holding one tag: Orientation = `o`.
fn exif_orientation(o: u16) -> Vec<u8> {
    let mut v = b"MM\0\x2a\0\0\0\x08".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0x0112u16.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    v
}

/// `img` in `format` with EXIF orientation `o`.
fn with_orientation(img: &RgbImage, format: ImageFormat, o: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    let color = image::ExtendedColorType::Rgb8;
    match format {
        ImageFormat::Jpeg => {
            let mut e = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            e.set_exif_metadata(exif_orientation(o)).unwrap();
            e.write_image(img.as_raw(), w, h, color).unwrap();
        }
        ImageFormat::Png => {
            let mut e = image::codecs::png::PngEncoder::new(&mut out);
            e.set_exif_metadata(exif_orientation(o)).unwrap();
            e.write_image(img.as_raw(), w, h, color).unwrap();
        }
        ImageFormat::WebP => {
            let mut e = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            e.set_exif_metadata(exif_orientation(o)).unwrap();
            e.write_image(img.as_raw(), w, h, color).unwrap();
        }
        other => panic!("{other:?}"),
    }
    out
}

/// RGB, 16 bits per channel (every channel `v`).
fn png16_rgb(w: u32, h: u32, v: u16) -> Vec<u8> {
    let img: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_pixel(w, h, Rgb([v, v, v]));
    encoded(&DynamicImage::ImageRgb16(img), ImageFormat::Png)
}

/// Grayscale, 16 bits.
fn png16_gray(w: u32, h: u32, v: u16) -> Vec<u8> {
    let img: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_pixel(w, h, Luma([v]));
    encoded(&DynamicImage::ImageLuma16(img), ImageFormat::Png)
}

/// Grayscale with alpha (half transparent).
fn png_gray_alpha(w: u32, h: u32, v: u8) -> Vec<u8> {
    let img: ImageBuffer<LumaA<u8>, Vec<u8>> = ImageBuffer::from_pixel(w, h, LumaA([v, 128]));
    encoded(&DynamicImage::ImageLumaA8(img), ImageFormat::Png)
}

/// An animated PNG: frame 0 red, frame 1 blue.
fn apng(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(png::ColorType::Rgb);
        e.set_depth(png::BitDepth::Eight);
        e.set_animated(2, 0).unwrap();
        let mut writer = e.write_header().unwrap();
        for c in [RED, BLUE] {
            writer
                .write_image_data(&c.repeat((w * h) as usize))
                .unwrap();
        }
        writer.finish().unwrap();
    }
    out
}

/// A PNG written by the `png` crate as given: colour type, depth, raw rows,
/// an optional palette with transparency, and an optional zTXt chunk.
struct RawPng<'a> {
    size: (u32, u32),
    color: png::ColorType,
    depth: png::BitDepth,
    rows: &'a [u8],
    palette: Option<(&'a [u8], &'a [u8])>,
    ztxt: Option<String>,
}

impl RawPng<'_> {
    fn encode(self) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, self.size.0, self.size.1);
            e.set_color(self.color);
            e.set_depth(self.depth);
            if let Some((plte, trns)) = self.palette {
                e.set_palette(plte);
                e.set_trns(trns);
            }
            if let Some(text) = self.ztxt {
                e.add_ztxt_chunk("Comment".into(), text).unwrap();
            }
            let mut writer = e.write_header().unwrap();
            writer.write_image_data(self.rows).unwrap();
            writer.finish().unwrap();
        }
        out
    }
}

/// A palette PNG (red, transparent blue), 16×16.
fn png_palette() -> Vec<u8> {
    let rows: Vec<u8> = (0..16 * 16).map(|i| (i % 2) as u8).collect();
    RawPng {
        size: (16, 16),
        color: png::ColorType::Indexed,
        depth: png::BitDepth::Eight,
        rows: &rows,
        palette: Some((&[255, 0, 0, 0, 0, 255], &[255, 0])),
        ztxt: None,
    }
    .encode()
}

/// A 1-bit grayscale PNG, 16×8, stripes.
fn png_one_bit() -> Vec<u8> {
    RawPng {
        size: (16, 8),
        color: png::ColorType::Grayscale,
        depth: png::BitDepth::One,
        rows: &[0b1010_1010; 16],
        palette: None,
        ztxt: None,
    }
    .encode()
}

/// A 16×16 PNG carrying a zTXt chunk that inflates to 32 MiB.
fn png_text_bomb() -> Vec<u8> {
    RawPng {
        size: (16, 16),
        color: png::ColorType::Rgb,
        depth: png::BitDepth::Eight,
        rows: &[90; 16 * 16 * 3],
        palette: None,
        ztxt: Some("A".repeat(32 << 20)),
    }
    .encode()
}

/// A PNG with its image data's checksum broken.
fn png_bad_crc() -> Vec<u8> {
    let mut png = encoded(&solid(16, 16, GREEN).into(), ImageFormat::Png);
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    let len = u32::from_be_bytes(png[idat - 4..idat].try_into().unwrap()) as usize;
    png[idat + 4 + len] ^= 0xff;
    png
}

fn data_file(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/odd-images")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JPEG whose frame header claims `w`×`h` (the data is for 16×16).
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = encoded(&solid(16, 16, GREEN).into(), ImageFormat::Jpeg);
    let sof = jpeg
        .windows(2)
        .position(|m| m == [0xff, 0xc0])
        .expect("a baseline frame header");
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

/// A lossless WebP header claiming `w`×`h` (at most 16384 each), no data.
fn webp_claiming(w: u32, h: u32) -> Vec<u8> {
    let bits = (w - 1) | ((h - 1) << 14);
    let mut vp8l = vec![0x2f];
    vp8l.extend_from_slice(&bits.to_le_bytes());
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(4 + 8 + vp8l.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WEBPVP8L");
    out.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    out.extend_from_slice(&vp8l);
    out
}

/// A PNG whose header claims `w`×`h` with a few bytes of data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = encoded(&solid(4, 4, RED).into(), ImageFormat::Png);
    // IHDR data starts after the signature (8), its length (4) and type (4).
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The first `n` bytes.
fn cut(mut v: Vec<u8>, n: usize) -> Vec<u8> {
    v.truncate(n);
    v
}

// ------------------------------------- decoding, as diffusers' load_image

/// Decode at the image's own size; RGB8 pixels and size.
fn decoded(bytes: &[u8]) -> Result<(Vec<[u8; 3]>, u32, u32), Status> {
    let (t, w, h) = decode_init_image(bytes, &Limits::default(), 1, None).map_err(Status::from)?;
    let plane = (w * h) as usize;
    let px = |i: usize| -> [u8; 3] {
        std::array::from_fn(|c| ((t.data[c * plane + i] + 1.0) / 2.0 * 255.0).round() as u8)
    };
    Ok(((0..plane).map(px).collect(), w, h))
}

/// The colour nearest to `p` among the four quadrant colours.
fn nearest(p: [u8; 3]) -> [u8; 3] {
    let d = |c: [u8; 3]| -> u32 {
        (0..3)
            .map(|i| (p[i] as i32 - c[i] as i32).unsigned_abs())
            .sum()
    };
    *[RED, GREEN, BLUE, WHITE]
        .iter()
        .min_by_key(|c| d(**c))
        .unwrap()
}

/// The corners (top-left, top-right, bottom-left, bottom-right), 2 px in.
fn corners(px: &[[u8; 3]], w: u32, h: u32) -> [[u8; 3]; 4] {
    let at = |x: u32, y: u32| px[(y * w + x) as usize];
    [at(2, 2), at(w - 3, 2), at(2, h - 3), at(w - 3, h - 3)]
}

fn close(a: [u8; 3], b: [u8; 3], tol: u8) -> bool {
    (0..3).all(|i| a[i].abs_diff(b[i]) <= tol)
}

#[test]
fn exif_orientation_is_applied_as_pil_exif_transpose_does() {
    // Pillow 13's `ImageOps.exif_transpose` on a 32×16 image in quadrants
    // (red, green / blue, white), for orientations 1..=8: the size, and the
    // corners TL, TR, BL, BR.
    type Corners = [[u8; 3]; 4];
    let pil: [((u32, u32), Corners); 8] = [
        ((32, 16), [RED, GREEN, BLUE, WHITE]),
        ((32, 16), [GREEN, RED, WHITE, BLUE]),
        ((32, 16), [WHITE, BLUE, GREEN, RED]),
        ((32, 16), [BLUE, WHITE, RED, GREEN]),
        ((16, 32), [RED, BLUE, GREEN, WHITE]),
        ((16, 32), [BLUE, RED, WHITE, GREEN]),
        ((16, 32), [WHITE, GREEN, BLUE, RED]),
        ((16, 32), [GREEN, WHITE, RED, BLUE]),
    ];
    let src = quadrants(32, 16);
    for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
        for (o, (size, want)) in (1u16..).zip(pil) {
            let (px, w, h) = decoded(&with_orientation(&src, format, o)).unwrap();
            assert_eq!((w, h), size, "{format:?} orientation {o}");
            let got = corners(&px, w, h).map(nearest);
            assert_eq!(got, want, "{format:?} orientation {o}");
        }
    }
}

#[test]
fn odd_images_decode_as_diffusers_load_image_takes_them() {
    // CMYK (Adobe) JPEG: Pillow gives each ink's complement.
    let (px, w, h) = decoded(&data_file("cmyk.jpg")).unwrap();
    assert_eq!((w, h), (32, 32));
    let pil = [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]];
    for (got, want) in corners(&px, w, h).into_iter().zip(pil) {
        assert!(close(got, want, 8), "CMYK: {got:?}, Pillow {want:?}");
    }
    // Animations: the first frame (red), as Pillow opens them.
    for (name, bytes) in [
        ("apng", apng(32, 24)),
        ("animated webp", data_file("animated.webp")),
    ] {
        let (px, w, h) = decoded(&bytes).unwrap();
        assert_eq!((w, h), (32, 24), "{name}");
        assert!(px.iter().all(|p| *p == RED), "{name}: not its first frame");
    }
    // 16 bits scaled to 8 (Pillow saturates 16-bit grayscale to white; we
    // do not copy that).
    let (px, ..) = decoded(&png16_rgb(8, 8, 40000)).unwrap();
    assert!(close(px[0], [156; 3], 1), "{:?}", px[0]);
    let (px, ..) = decoded(&png16_gray(8, 8, 32768)).unwrap();
    assert!(close(px[0], [128; 3], 1), "{:?}", px[0]);
    // Alpha dropped, gray to RGB (Pillow's convert("RGB")).
    let (px, ..) = decoded(&png_gray_alpha(8, 8, 77)).unwrap();
    assert_eq!(px[0], [77; 3]);
}

#[test]
fn broken_images_are_refused_naming_init_image() {
    let jpeg = encoded(&quadrants(64, 64).into(), ImageFormat::Jpeg);
    let png = encoded(&quadrants(64, 64).into(), ImageFormat::Png);
    let webp = encoded(&quadrants(64, 64).into(), ImageFormat::WebP);
    for (name, bytes) in [
        ("truncated jpeg", cut(jpeg.clone(), jpeg.len() / 2)),
        ("jpeg without its end", cut(jpeg.clone(), jpeg.len() - 2)),
        ("truncated png", cut(png.clone(), png.len() / 2)),
        ("truncated webp", cut(webp.clone(), webp.len() / 2)),
        ("jpeg claiming 65000×65000", jpeg_claiming(65000, 65000)),
        ("png claiming 4000×4000", png_claiming(4000, 4000)),
        ("gif", data_file("animated.gif")),
    ] {
        let e = decoded(&bytes).map(|(_, w, h)| (w, h)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert_eq!(field_violations(&e)[0].field, "init_image", "{name}");
    }
}

// ---------------------------------------------------------- the table

/// What a case should get.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Served; with the image size when the case decides it.
    Served(Option<(u32, u32)>),
    /// INVALID_ARGUMENT naming this field.
    Invalid(&'static str),
}

struct Case {
    name: String,
    req: GenerateRequest,
    want: Want,
}

fn base() -> GenerateRequest {
    GenerateRequest {
        prompt: "corpus".into(),
        steps: 2,
        seed: Some(1),
        ..Default::default()
    }
}

fn img2img(bytes: Vec<u8>) -> GenerateRequest {
    GenerateRequest {
        init_image: bytes.into(),
        ..base()
    }
}

fn case(name: impl Into<String>, req: GenerateRequest, want: Want) -> Case {
    Case {
        name: name.into(),
        req,
        want,
    }
}

fn prompt_cases() -> Vec<Case> {
    let p =
        |name: &str, prompt: String, want| case(name, GenerateRequest { prompt, ..base() }, want);
    let ok = Want::Served(None);
    vec![
        p("cjk and emoji", "猫の絵 🐱🎨".into(), ok),
        p("NUL inside", "a\0cat\0".into(), ok),
        p("only NUL", "\0".repeat(100), ok),
        p(
            "RTL override",
            "\u{202e}tac a\u{202c} \u{5d0}\u{5d1}".into(),
            ok,
        ),
        p(
            "ZWJ emoji family ×150",
            "👩\u{200d}👩\u{200d}👧\u{200d}👦".repeat(150),
            ok,
        ),
        p("combining marks", "e\u{301}\u{302}\u{303}".repeat(400), ok),
        p("empty", String::new(), ok),
        p(
            "ANSI escapes and CR/LF (log injection)",
            "\u{1b}[31mred\r\nINFO fake log line\u{7}".into(),
            ok,
        ),
        p(
            "BOM and noncharacters",
            "\u{feff}\u{fffe}\u{ffff}\u{fffd}\u{10ffff}".into(),
            ok,
        ),
        p("whitespace only", " \t\n\r".repeat(100), ok),
        p("4096 bytes (the limit)", "x".repeat(4096), ok),
        p("4097 bytes", "x".repeat(4097), Want::Invalid("prompt")),
        p("1 MiB", "y".repeat(1 << 20), Want::Invalid("prompt")),
        p(
            "4-byte chars past the limit",
            "😀".repeat(1025),
            Want::Invalid("prompt"),
        ),
        case(
            "negative prompt past the limit",
            GenerateRequest {
                negative_prompt: "é".repeat(3000),
                ..base()
            },
            Want::Invalid("negative_prompt"),
        ),
    ]
}

/// `base()` changed by `f`.
fn with(f: impl FnOnce(&mut GenerateRequest)) -> GenerateRequest {
    let mut r = base();
    f(&mut r);
    r
}

/// An image-to-image request changed by `f`.
fn img_with(f: impl FnOnce(&mut GenerateRequest)) -> GenerateRequest {
    let mut r = img2img(small_png());
    f(&mut r);
    r
}

fn number_cases() -> Vec<Case> {
    use Want::{Invalid, Served};
    let ok = Served(None);
    vec![
        case(
            "width u32::MAX",
            with(|r| r.width = u32::MAX),
            Invalid("width"),
        ),
        case(
            "height u32::MAX",
            with(|r| r.height = u32::MAX),
            Invalid("height"),
        ),
        case("width 1", with(|r| r.width = 1), Invalid("width")),
        case(
            "width 0: the default",
            with(|r| r.width = 0),
            Served(Some((32, 32))),
        ),
        case(
            "width 34: not a multiple of the tiny VAE's 4",
            with(|r| r.width = 34),
            Invalid("width"),
        ),
        case(
            "steps u32::MAX",
            with(|r| r.steps = u32::MAX),
            Invalid("steps"),
        ),
        case(
            "num_images u32::MAX",
            with(|r| r.num_images = u32::MAX),
            Invalid("num_images"),
        ),
        case("num_images 0: one", with(|r| r.num_images = 0), ok),
        case("seed u64::MAX", with(|r| r.seed = Some(u64::MAX)), ok),
        case("steps 1", with(|r| r.steps = 1), ok),
        case("steps 150 (the limit)", with(|r| r.steps = 150), ok),
        case("steps 151", with(|r| r.steps = 151), Invalid("steps")),
        case("num_images 8 (the limit)", with(|r| r.num_images = 8), ok),
        case(
            "num_images 9",
            with(|r| r.num_images = 9),
            Invalid("num_images"),
        ),
        case(
            "eta 1 (the limit)",
            with(|r| (r.scheduler, r.eta) = ("ddim".into(), 1.0)),
            ok,
        ),
        case(
            "eta just above 1",
            with(|r| (r.scheduler, r.eta) = ("ddim".into(), 1.000_001)),
            Invalid("eta"),
        ),
        case(
            "eta -1",
            with(|r| (r.scheduler, r.eta) = ("ddim".into(), -1.0)),
            Invalid("eta"),
        ),
        case("seed 0", with(|r| r.seed = Some(0)), ok),
        case(
            "clip_skip u32::MAX",
            with(|r| r.clip_skip = u32::MAX),
            Invalid("clip_skip"),
        ),
        case(
            "preview_every u32::MAX",
            with(|r| r.preview_every = u32::MAX),
            ok,
        ),
        case(
            "guidance NaN",
            with(|r| r.guidance_scale = Some(f32::NAN)),
            Invalid("guidance_scale"),
        ),
        case(
            "guidance +inf",
            with(|r| r.guidance_scale = Some(f32::INFINITY)),
            Invalid("guidance_scale"),
        ),
        case(
            "guidance -inf",
            with(|r| r.guidance_scale = Some(f32::NEG_INFINITY)),
            Invalid("guidance_scale"),
        ),
        case(
            "guidance -1",
            with(|r| r.guidance_scale = Some(-1.0)),
            Invalid("guidance_scale"),
        ),
        case(
            "guidance f32::MAX",
            with(|r| r.guidance_scale = Some(f32::MAX)),
            Invalid("guidance_scale"),
        ),
        case("guidance 0", with(|r| r.guidance_scale = Some(0.0)), ok),
        case(
            "guidance subnormal",
            with(|r| r.guidance_scale = Some(1e-45)),
            ok,
        ),
        case(
            "eta NaN",
            with(|r| (r.scheduler, r.eta) = ("ddim".into(), f32::NAN)),
            Invalid("eta"),
        ),
        case(
            "eta -0.0",
            with(|r| (r.scheduler, r.eta) = ("ddim".into(), -0.0)),
            ok,
        ),
        case(
            "strength NaN",
            img_with(|r| r.strength = Some(f32::NAN)),
            Invalid("strength"),
        ),
        case(
            "strength +inf",
            img_with(|r| r.strength = Some(f32::INFINITY)),
            Invalid("strength"),
        ),
        case(
            "strength 0",
            img_with(|r| r.strength = Some(0.0)),
            Invalid("strength"),
        ),
        case(
            "strength subnormal",
            img_with(|r| r.strength = Some(1e-45)),
            Invalid("strength"),
        ),
        case(
            "strength without an image",
            with(|r| r.strength = Some(0.5)),
            Invalid("strength"),
        ),
        case(
            "aspect 2048×8",
            with(|r| (r.width, r.height) = (2048, 8)),
            Served(Some((2048, 8))),
        ),
        case(
            "aspect 8×2048",
            with(|r| (r.width, r.height) = (8, 2048)),
            Served(Some((8, 2048))),
        ),
        case(
            "aspect 4096×8",
            with(|r| (r.width, r.height) = (4096, 8)),
            Invalid("width"),
        ),
    ]
}

fn enum_cases() -> Vec<Case> {
    use Want::Invalid;
    vec![
        case("format 3", with(|r| r.format = 3), Invalid("format")),
        case("format -1", with(|r| r.format = -1), Invalid("format")),
        case(
            "format i32::MAX",
            with(|r| r.format = i32::MAX),
            Invalid("format"),
        ),
        case(
            "preview_mode 2",
            with(|r| r.preview_mode = 2),
            Invalid("preview_mode"),
        ),
        case(
            "preview_mode i32::MIN",
            with(|r| r.preview_mode = i32::MIN),
            Invalid("preview_mode"),
        ),
        case(
            "scheduler with NUL",
            with(|r| r.scheduler = "ddim\0".into()),
            Invalid("scheduler"),
        ),
        case(
            "scheduler in cyrillic",
            with(|r| r.scheduler = "dдim".into()),
            Invalid("scheduler"),
        ),
        case(
            "scheduler 100 KiB",
            with(|r| r.scheduler = "e".repeat(100 << 10)),
            Invalid("scheduler"),
        ),
        case(
            "karras on ddim",
            with(|r| (r.scheduler, r.karras) = ("ddim".into(), true)),
            Invalid("karras"),
        ),
        case(
            "eta on euler",
            with(|r| (r.scheduler, r.eta) = ("euler".into(), 0.5)),
            Invalid("eta"),
        ),
        case(
            "model as a path",
            with(|r| r.model = "../../etc/passwd".into()),
            Invalid("model"),
        ),
        case(
            "model 1 MiB",
            with(|r| r.model = "m".repeat(1 << 20)),
            Invalid("model"),
        ),
    ]
}

fn small_png() -> Vec<u8> {
    encoded(&quadrants(32, 24).into(), ImageFormat::Png)
}

fn image_cases() -> Vec<Case> {
    let i = |name: &str, bytes: Vec<u8>, want| case(name, img2img(bytes), want);
    let own = |w, h| Want::Served(Some((w, h)));
    let bad = Want::Invalid("init_image");
    let jpeg = encoded(&quadrants(64, 48).into(), ImageFormat::Jpeg);
    let png = small_png();
    let mut cases = vec![
        i("16-bit RGB PNG", png16_rgb(40, 24, 40000), own(40, 24)),
        i("16-bit gray PNG", png16_gray(24, 16, 60000), own(24, 16)),
        i("gray + alpha PNG", png_gray_alpha(32, 16, 90), own(32, 16)),
        i("CMYK JPEG", data_file("cmyk.jpg"), own(32, 32)),
        i(
            "progressive JPEG",
            data_file("progressive.jpg"),
            own(40, 24),
        ),
        i(
            "grayscale JPEG",
            encoded(
                &DynamicImage::ImageLuma8(ImageBuffer::from_pixel(24, 16, Luma([99]))),
                ImageFormat::Jpeg,
            ),
            own(24, 16),
        ),
        i(
            "RGBA 16-bit PNG",
            encoded(
                &DynamicImage::ImageRgba16(ImageBuffer::from_pixel(
                    16,
                    16,
                    image::Rgba([9000, 0, 65535, 100]),
                )),
                ImageFormat::Png,
            ),
            own(16, 16),
        ),
        i("palette PNG with transparency", png_palette(), own(16, 16)),
        i("1-bit PNG", png_one_bit(), own(16, 8)),
        i(
            "RGBA lossless WebP",
            encoded(
                &DynamicImage::ImageRgba8(ImageBuffer::from_pixel(
                    24,
                    24,
                    image::Rgba([1, 2, 3, 0]),
                )),
                ImageFormat::WebP,
            ),
            own(24, 24),
        ),
        i("zTXt bomb (32 MiB of text)", png_text_bomb(), own(16, 16)),
        i("PNG with a broken checksum", png_bad_crc(), bad),
        i("APNG: first frame", apng(32, 24), own(32, 24)),
        i(
            "animated WebP: first frame",
            data_file("animated.webp"),
            own(32, 24),
        ),
        i(
            "animated GIF: not a format we take",
            data_file("animated.gif"),
            bad,
        ),
        i(
            "EXIF-rotated JPEG (6)",
            with_orientation(&quadrants(48, 24), ImageFormat::Jpeg, 6),
            own(24, 48),
        ),
        i(
            "EXIF-rotated PNG (8)",
            with_orientation(&quadrants(48, 24), ImageFormat::Png, 8),
            own(24, 48),
        ),
        i(
            "size not a multiple of 4: rounded down",
            encoded(&solid(37, 43, RED).into(), ImageFormat::Png),
            own(36, 40),
        ),
        i(
            "1×1: smaller than a latent",
            encoded(&solid(1, 1, RED).into(), ImageFormat::Png),
            bad,
        ),
        i(
            "8192×8: wider than the limit once kept",
            encoded(&solid(8192, 8, RED).into(), ImageFormat::Png),
            Want::Invalid("width"),
        ),
        i("truncated JPEG", cut(jpeg.clone(), jpeg.len() / 2), bad),
        i(
            "JPEG without its last bytes",
            cut(jpeg.clone(), jpeg.len() - 2),
            bad,
        ),
        i("truncated PNG", cut(png.clone(), png.len() - 20), bad),
        i("PNG signature only", cut(png.clone(), 8), bad),
        i(
            "bomb: PNG claiming 100000×100000",
            png_claiming(100_000, 100_000),
            bad,
        ),
        i(
            "bomb: PNG claiming 4000×4000",
            png_claiming(4000, 4000),
            bad,
        ),
        i(
            "bomb: JPEG claiming 65000×65000",
            jpeg_claiming(65000, 65000),
            bad,
        ),
        i(
            // Within the pixel limit and ending properly: decoded, gray
            // where data is missing (as PIL does), then too wide to keep.
            "bomb: JPEG claiming 4000×4000",
            jpeg_claiming(4000, 4000),
            Want::Invalid("width"),
        ),
        i(
            "bomb: WebP claiming 16384×16384",
            webp_claiming(16384, 16384),
            bad,
        ),
        i(
            "garbage",
            (0..4096u32)
                .map(|v| (v.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            bad,
        ),
        i("TIFF", [&b"II*\0"[..], &[0u8; 200]].concat(), bad),
        i(
            "JPEG magic then garbage",
            [&[0xff, 0xd8, 0xff][..], &[0x42; 500]].concat(),
            bad,
        ),
        i(
            "16 MiB + 1",
            [&png[..8], &vec![0u8; (16 << 20) - 7]].concat(),
            bad,
        ),
    ];
    cases.push(case(
        "zero bytes: text to image",
        img2img(Vec::new()),
        Want::Served(Some((32, 32))),
    ));
    cases.push(case(
        "resized to the asked size",
        GenerateRequest {
            width: 16,
            height: 64,
            ..img2img(jpeg)
        },
        own(16, 64),
    ));
    cases
}

async fn via_unary(
    c: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<GenerateResponse, Status> {
    c.generate(req).await.map(tonic::Response::into_inner)
}

async fn via_stream(
    c: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<GenerateResponse, Status> {
    let mut events = c.generate_stream(req).await?.into_inner();
    while let Some(e) = events.message().await? {
        if let Some(generate_event::Event::Result(r)) = e.event {
            return Ok(r);
        }
    }
    Err(Status::unknown("the stream ended without a result"))
}

/// What is wrong with `got` for `want`; None when it is right.
fn judge(want: Want, got: &Result<GenerateResponse, Status>) -> Option<String> {
    match (want, got) {
        (Want::Served(size), Ok(r)) => {
            let img = r.images.first()?;
            let got = (img.width, img.height);
            size.filter(|s| *s != got)
                .map(|s| format!("served at {got:?}, expected {s:?}"))
        }
        (want, Ok(_)) => Some(format!("served, expected {want:?}")),
        (Want::Served(_), Err(s)) => Some(format!("{:?}: {}", s.code(), s.message())),
        (Want::Invalid(field), Err(s)) => {
            let v = field_violations(s);
            let named = v.iter().any(|v| v.field == field) && s.message().starts_with(field);
            (s.code() != Code::InvalidArgument || !named || s.message().len() > BRIEF)
                .then(|| format!("{:?} {:?} {v:?}, expected {field}", s.code(), s.message()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_public_corpus_is_served_or_refused_and_the_stack_keeps_serving() {
    let cluster = Cluster::start(&common::model("sd1-tiny"), ClusterOptions::default()).await;
    let ch = tonic::transport::Endpoint::from_shared(cluster.gateway.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = GenerationClient::new(ch).max_decoding_message_size(64 << 20);
    let cases: Vec<Case> = [prompt_cases(), number_cases(), enum_cases(), image_cases()]
        .into_iter()
        .flatten()
        .collect();
    let mut wrong = Vec::new();
    for Case { name, req, want } in cases.iter() {
        for (how, got) in [
            ("unary", via_unary(&mut c, req.clone()).await),
            ("stream", via_stream(&mut c, req.clone()).await),
        ] {
            let verdict = judge(*want, &got);
            let code = got
                .as_ref()
                .map_or_else(|s| format!("{:?}", s.code()), |_| "OK".into());
            eprintln!(
                "{:<45} {how:<6} {code:<16} {}",
                name,
                verdict.as_deref().unwrap_or("as expected")
            );
            if let Some(v) = verdict {
                wrong.push(format!("{name} ({how}): {v}"));
            }
        }
    }
    eprintln!("{} cases, each unary and streamed", cases.len());
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Over the message limit: refused by the transport, not read.
    let huge = img2img(vec![0x89; 20 << 20]);
    let e = via_unary(&mut c, huge).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{e:?}"
    );
    // And the stack still serves a normal request.
    let ok = via_unary(&mut c, base()).await.unwrap();
    assert_eq!(ok.images.len(), 1);
    assert_eq!(cluster.gateway.health("").await, Some(1));
}

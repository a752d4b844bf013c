//! PNG compression levels on generated images: time per image and size,
//! the table behind the gateway's choice of `png::Compression::Fast`
//! (docs/BENCHMARKS.md, "PNG encoding").
//!
//! ```sh
//! cargo run --release -p sd-gateway --example png_levels -- out/*.png
//! ```
//!
//! Give it images the server made (any format the `image` crate reads);
//! with none it makes two photograph-like ones (smooth colour fields, edges
//! and grain) of 512² and 1024².

use std::time::Instant;

fn encode(rgb: &[u8], w: u32, h: u32, level: png::Compression) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(level);
    let mut writer = enc.write_header().expect("png header");
    writer.write_image_data(rgb).expect("png data");
    drop(writer);
    out
}

/// A deterministic photograph-like image: a few broad colour waves, a
/// sharp-edged disc, and a little grain.
fn synthetic(side: u32) -> (String, Vec<u8>, u32, u32) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut grain = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 7) as f32 - 3.0
    };
    let s = side as f32;
    let mut rgb = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let (u, v) = (x as f32 / s, y as f32 / s);
            let inside = (u - 0.6).powi(2) + (v - 0.4).powi(2) < 0.04;
            for c in 0..3 {
                let k = c as f32 + 1.0;
                let wave = (u * 3.1 * k + v * 1.7).sin() * 0.5 + (v * 4.3 - u * k).cos() * 0.3;
                let mut p = 128.0 + 90.0 * wave + if inside { 60.0 } else { 0.0 };
                p += grain();
                rgb.push(p.clamp(0.0, 255.0) as u8);
            }
        }
    }
    (format!("synthetic {side}²"), rgb, side, side)
}

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    let images: Vec<(String, Vec<u8>, u32, u32)> = if files.is_empty() {
        vec![synthetic(512), synthetic(1024)]
    } else {
        files
            .iter()
            .map(|f| {
                let img = image::open(f)
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
                    .to_rgb8();
                let (w, h) = img.dimensions();
                (f.clone(), img.into_raw(), w, h)
            })
            .collect()
    };
    let levels = [
        ("Balanced (png's default)", png::Compression::Balanced),
        ("Fast (the gateway's)", png::Compression::Fast),
        ("Fastest", png::Compression::Fastest),
        ("High", png::Compression::High),
    ];
    println!("| image | level | ms per image | bytes | of raw |");
    println!("|---|---|---:|---:|---:|");
    for (name, rgb, w, h) in &images {
        for (label, level) in levels {
            let _ = encode(rgb, *w, *h, level); // warm
            let runs = 5;
            let start = Instant::now();
            let mut bytes = 0;
            for _ in 0..runs {
                bytes = encode(rgb, *w, *h, level).len();
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / f64::from(runs);
            println!(
                "| {name} | {label} | {ms:.2} | {bytes} | {:.1}% |",
                100.0 * bytes as f64 / rgb.len() as f64
            );
        }
    }
}

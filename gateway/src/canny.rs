//! Canny edge detection that reproduces OpenCV's `cv2.Canny(img, low, high)`
//! with its default arguments (3×3 Sobel aperture, L1 gradient norm) on an
//! 8-bit, three-channel image, which is what the AUTOMATIC1111 ControlNet
//! extension's "canny" preprocessor runs on its HWC RGB input. Control images
//! made here therefore match the ones a ControlNet canny model saw in that UI,
//! pixel for pixel.
//!
//! The steps, and the details that matter for an exact match:
//!
//! 1. **Thresholds.** If `low > high` the two are swapped. Each is then rounded
//!    *down* to an integer (so `100.7` behaves as `100`), and every later
//!    comparison is a strict `>` against those integers. A NaN threshold
//!    counts as 0; values beyond `i32` saturate.
//! 2. **Gradient.** Per channel, a 3×3 Sobel derivative in x and in y (the
//!    `[1 2 1]` smoothing across, `[-1 0 1]` along), with the image's edge
//!    pixels repeated outward for the taps that fall outside it. The strength
//!    of a channel is `|dx| + |dy|`. Each pixel keeps the single channel with
//!    the largest strength — its strength *and* its own `dx`/`dy`, which
//!    decide the edge direction below; on a tie the earlier channel (R before
//!    G before B) wins.
//! 3. **Non-maximum suppression.** A pixel is a candidate only if its strength
//!    exceeds `low` and it is a local maximum across the edge. The gradient
//!    direction is put into one of four bins (horizontal, vertical, two
//!    diagonals) with integer arithmetic: `tan 22.5°` as a 15-bit fixed-point
//!    constant (13573), compared against `|dy| << 15`. Horizontal: the pixel
//!    must be strictly greater than its left neighbour and at least its right
//!    one; vertical: strictly greater than the one above and at least the one
//!    below; diagonal: strictly greater than both neighbours along the
//!    diagonal the gradient points along (top-left/bottom-right when `dx` and
//!    `dy` have the same sign, top-right/bottom-left otherwise). The asymmetry
//!    is what makes a two-pixel-wide plateau yield one line, not two.
//!    Positions outside the image have strength 0, so the first and last rows
//!    and columns can be edges.
//! 4. **Hysteresis.** Candidates whose strength exceeds `high` are edges; an
//!    edge spreads to every candidate among its eight neighbours, repeatedly.
//!    Candidates that no such chain reaches are dropped.
//!
//! The output is a single-channel image of the same size: 255 on edges, 0
//! elsewhere. Any size works, including empty and single-pixel images (which
//! have no gradient and so no edges).

use image::{GrayImage, RgbImage};

/// `tan(22.5°)` in 15-bit fixed point, rounded to nearest: bins a gradient
/// direction without floating point, exactly as OpenCV does.
const TAN_22_5_Q15: i32 = 13_573;
/// Fixed-point shift that goes with [`TAN_22_5_Q15`].
const SHIFT: u32 = 15;

/// Map states for the hysteresis pass.
const REJECTED: u8 = 0;
const CANDIDATE: u8 = 1;
const EDGE: u8 = 2;

/// Detects edges in `img` the way `cv2.Canny(img, low, high)` does on an
/// 8-bit RGB array (aperture 3, L1 gradient); see the module docs for the
/// exact rules. Returns a same-sized mask: 255 on edges, 0 elsewhere.
#[must_use]
pub fn canny(img: &RgbImage, low: f32, high: f32) -> GrayImage {
    let (width, height) = img.dimensions();
    let (low, high) = integer_thresholds(low, high);
    let grad = Gradient::of(img);
    let mut map = vec![REJECTED; grad.padded_len()];
    let mut strong = Vec::new();
    suppress_non_maxima(&grad, low, high, &mut map, &mut strong);
    extend_edges(&mut map, grad.stride(), strong);

    let stride = grad.stride();
    let mut out = GrayImage::new(width, height);
    for (x, y, px) in out.enumerate_pixels_mut() {
        if map[(y as usize + 1) * stride + x as usize + 1] == EDGE {
            px.0[0] = 255;
        }
    }
    out
}

/// Swaps the thresholds into order, then floors them to integers, the order
/// in which OpenCV applies the two steps.
fn integer_thresholds(low: f32, high: f32) -> (i32, i32) {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // `as` saturates out-of-range values and maps NaN to 0.
    (
        f64::from(low).floor() as i32,
        f64::from(high).floor() as i32,
    )
}

/// Per-pixel gradient of the strongest channel, stored with a one-pixel
/// border of zero strength around the image so that neighbour look-ups
/// never leave the buffer.
struct Gradient {
    width: usize,
    height: usize,
    /// `|dx| + |dy|` of the chosen channel, `(width + 2) × (height + 2)`.
    mag: Vec<i32>,
    /// Signed derivatives of the chosen channel, `width × height`.
    dx: Vec<i16>,
    dy: Vec<i16>,
}

impl Gradient {
    fn of(img: &RgbImage) -> Self {
        let width = img.width() as usize;
        let height = img.height() as usize;
        let stride = width + 2;
        let mut grad = Self {
            width,
            height,
            mag: vec![0; stride * (height + 2)],
            dx: vec![0; width * height],
            dy: vec![0; width * height],
        };
        let raw = img.as_raw();
        let px = |x: usize, y: usize, c: usize| i32::from(raw[(y * width + x) * 3 + c]);
        for y in 0..height {
            let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
            for x in 0..width {
                let (left, right) = (x.saturating_sub(1), (x + 1).min(width - 1));
                let mut best = (-1, 0, 0);
                for c in 0..3 {
                    let dx = px(right, up, c) + 2 * px(right, y, c) + px(right, down, c)
                        - px(left, up, c)
                        - 2 * px(left, y, c)
                        - px(left, down, c);
                    let dy = px(left, down, c) + 2 * px(x, down, c) + px(right, down, c)
                        - px(left, up, c)
                        - 2 * px(x, up, c)
                        - px(right, up, c);
                    let m = dx.abs() + dy.abs();
                    // Strict `>`: on equal strength the earlier channel stays.
                    if m > best.0 {
                        best = (m, dx, dy);
                    }
                }
                // Sobel of 8-bit data is within ±1020, so i16 always fits.
                grad.mag[(y + 1) * stride + x + 1] = best.0;
                grad.dx[y * width + x] = best.1 as i16;
                grad.dy[y * width + x] = best.2 as i16;
            }
        }
        grad
    }

    fn stride(&self) -> usize {
        self.width + 2
    }

    fn padded_len(&self) -> usize {
        self.stride() * (self.height + 2)
    }
}

/// Marks each pixel of `map` (padded like `grad.mag`) as a candidate or an
/// edge if it survives non-maximum suppression and the low threshold, and
/// pushes the edges (strength above `high`) onto `strong`.
fn suppress_non_maxima(
    grad: &Gradient,
    low: i32,
    high: i32,
    map: &mut [u8],
    strong: &mut Vec<usize>,
) {
    let stride = grad.stride();
    let mag = &grad.mag;
    for y in 0..grad.height {
        for x in 0..grad.width {
            let at = (y + 1) * stride + x + 1;
            let m = mag[at];
            if m <= low {
                continue;
            }
            let dx = i32::from(grad.dx[y * grad.width + x]);
            let dy = i32::from(grad.dy[y * grad.width + x]);
            let ax = dx.abs();
            let ay = dy.abs() << SHIFT;
            let tg22 = ax * TAN_22_5_Q15;
            let tg67 = tg22 + (ax << (SHIFT + 1));
            let is_max = if ay < tg22 {
                m > mag[at - 1] && m >= mag[at + 1]
            } else if ay > tg67 {
                m > mag[at - stride] && m >= mag[at + stride]
            } else if (dx < 0) == (dy < 0) {
                m > mag[at - stride - 1] && m > mag[at + stride + 1]
            } else {
                m > mag[at - stride + 1] && m > mag[at + stride - 1]
            };
            if !is_max {
                continue;
            }
            if m > high {
                map[at] = EDGE;
                strong.push(at);
            } else {
                map[at] = CANDIDATE;
            }
        }
    }
}

/// Grows edges from the `strong` seeds into 8-connected candidates. The map's
/// one-pixel border is never a candidate, so the walk stays inside the image.
fn extend_edges(map: &mut [u8], stride: usize, mut stack: Vec<usize>) {
    while let Some(at) = stack.pop() {
        let neighbours = [
            at - stride - 1,
            at - stride,
            at - stride + 1,
            at - 1,
            at + 1,
            at + stride - 1,
            at + stride,
            at + stride + 1,
        ];
        for n in neighbours {
            if map[n] == CANDIDATE {
                map[n] = EDGE;
                stack.push(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an RGB image from one string per row per channel; each digit
    /// `d` is the level `28 * d`.
    fn from_levels(r: &[&str], g: &[&str], b: &[&str]) -> RgbImage {
        let (w, h) = (r[0].len() as u32, r.len() as u32);
        let level = |rows: &[&str], x: u32, y: u32| {
            let d = rows[y as usize].as_bytes()[x as usize] - b'0';
            d * 28
        };
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([level(r, x, y), level(g, x, y), level(b, x, y)])
        })
    }

    /// Renders an edge mask as one string per row: `#` edge, `.` not.
    fn rows(edges: &GrayImage) -> Vec<String> {
        edges
            .rows()
            .map(|row| row.map(|p| if p.0[0] == 255 { '#' } else { '.' }).collect())
            .collect()
    }

    /// A `w × h` image that is black left of column `at` and `value` (all
    /// channels) from there on.
    fn step(w: u32, h: u32, at: u32, value: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            image::Rgb([if x >= at { value } else { 0 }; 3])
        })
    }

    #[test]
    fn fixed_point_tangent_is_opencvs_constant() {
        let tg22 = (0.414_213_562_373_095_05_f64 * f64::from(1 << SHIFT) + 0.5) as i32;
        assert_eq!(TAN_22_5_Q15, tg22);
    }

    #[test]
    fn vertical_step_gives_one_line_on_the_dark_side() {
        let edges = canny(&step(10, 6, 5, 255), 100.0, 200.0);
        // Columns 4 and 5 both have strength 1020; the tie goes to the left
        // one because only the left neighbour must be strictly smaller.
        assert!(rows(&edges).iter().all(|r| r == "....#....."));
    }

    #[test]
    fn flat_and_gentle_images_have_no_edges() {
        let flat = RgbImage::from_pixel(9, 7, image::Rgb([90, 140, 200]));
        assert!(canny(&flat, 0.0, 0.0).iter().all(|&p| p == 0));
        let ramp = RgbImage::from_fn(16, 8, |x, _| image::Rgb([(x * 3) as u8; 3]));
        assert!(canny(&ramp, 20.0, 40.0).iter().all(|&p| p == 0));
    }

    #[test]
    fn thresholds_are_swapped_floored_and_strict() {
        let img = from_levels(
            &[
                "0000000", "1000000", "2100000", "3210000", "5321000", "9532100",
            ],
            &[
                "0099000", "0099000", "0099000", "0000000", "0000000", "0000000",
            ],
            &[
                "0000000", "0000000", "0000000", "0000000", "0000077", "0000077",
            ],
        );
        assert_eq!(canny(&img, 150.0, 40.0), canny(&img, 40.0, 150.0));
        // A step of 50 has strength exactly 4 * 50 = 200: not above 200, but
        // above 199.9 once that is floored to 199.
        let img = step(6, 4, 3, 50);
        assert!(canny(&img, 10.0, 200.0).iter().all(|&p| p == 0));
        assert_eq!(
            canny(&img, 10.0, 199.9)
                .iter()
                .filter(|&&p| p == 255)
                .count(),
            4
        );
    }

    #[test]
    fn hysteresis_keeps_weak_edges_only_when_connected() {
        // A strong step (100) running into a weak one (30), then a gap, then
        // a weak step on its own. Weak strength is 4 * 30 = 120.
        let img = RgbImage::from_fn(12, 18, |x, y| {
            let v = match y {
                _ if x < 5 => 0,
                0..=3 => 100,
                4..=7 | 12..=17 => 30,
                _ => 0,
            };
            image::Rgb([v; 3])
        });
        let strict = rows(&canny(&img, 50.0, 300.0));
        assert_eq!(&strict[5][..6], "....#.", "connected weak edge is kept");
        assert!(
            strict[8..].iter().all(|r| !r.contains('#')),
            "isolated weak edge is dropped"
        );
        let loose = rows(&canny(&img, 50.0, 100.0));
        assert!(loose[12..].iter().all(|r| r.contains('#')));
    }

    #[test]
    fn empty_and_tiny_images_work() {
        assert_eq!(
            canny(&RgbImage::new(0, 0), 100.0, 200.0).dimensions(),
            (0, 0)
        );
        assert_eq!(canny(&RgbImage::new(0, 5), 1.0, 2.0).dimensions(), (0, 5));
        let one = RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 0]));
        assert_eq!(canny(&one, 0.0, 0.0).as_raw(), &vec![0]);
        for (w, h) in [(1, 7), (7, 1), (2, 2)] {
            let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([((x + y) % 2 * 255) as u8; 3]));
            assert_eq!(canny(&img, f32::NAN, -5.0).dimensions(), (w, h));
        }
    }

    #[test]
    fn matches_opencv_on_colour_shapes() {
        // cv2.Canny(img, 100, 200), OpenCV 4.12.0.
        let img = from_levels(
            &[
                "00000000", "00999900", "00999900", "00999900", "00000000", "00000000", "00000000",
                "00000000",
            ],
            &[
                "00000000", "00000000", "00000000", "00055555", "00055555", "00055555", "00055555",
                "00000000",
            ],
            &[
                "11111111", "11111111", "11111111", "11111111", "11111111", "11111111", "99999999",
                "99999999",
            ],
        );
        let want = [
            "...##...", "..#..#..", ".#...#.#", "..####..", "........", "##....##", "........",
            "........",
        ];
        assert_eq!(rows(&canny(&img, 100.0, 200.0)), want);
    }

    #[test]
    fn matches_opencv_on_grey_wedge() {
        // cv2.Canny(img, 40, 150), OpenCV 4.12.0: equal channels, so every
        // pixel is a three-way tie.
        let g = [
            "0000000", "1000000", "2100000", "3210000", "5321000", "9532100",
        ];
        let want = [
            ".......", "#......", "#......", "#......", "#......", ".####..",
        ];
        assert_eq!(rows(&canny(&from_levels(&g, &g, &g), 40.0, 150.0)), want);
    }

    #[test]
    fn matches_opencv_on_random_blocks() {
        // cv2.Canny(img, 60, 220), OpenCV 4.12.0.
        let img = from_levels(
            &[
                "865230001",
                "869569765",
                "592860385",
                "077810805",
                "024440010",
            ],
            &[
                "656267349",
                "893696867",
                "381578533",
                "447809536",
                "523755373",
            ],
            &[
                "382276003",
                "847327800",
                "635184877",
                "270549190",
                "658296817",
            ],
        );
        let want = [
            "#.#####..",
            "...#..###",
            "#...##...",
            "##..#..##",
            ".##.#....",
        ];
        assert_eq!(rows(&canny(&img, 60.0, 220.0)), want);
    }
}

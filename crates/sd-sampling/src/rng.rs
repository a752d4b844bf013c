//! torch's CPU random generator, reproduced: the mt19937 engine seeded as
//! `manual_seed` seeds it, its float32 uniform (24 random bits), and
//! `normal_`'s two paths — for contiguous tensors of at least 16 elements, a
//! uniform fill followed by Box–Muller over blocks of 16 (the last block
//! redrawn when the size is not a multiple of 16); for smaller ones, a
//! float64 Box–Muller per element that caches its second value in the
//! generator for the next draw.

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister, as `at::mt19937`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, index: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            engine: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// Uniform in [0, 1) from 24 random bits, as float32.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// Uniform in [0, 1) from 53 random bits, as float64.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>`: Box–Muller, second value cached.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` for a contiguous float32 tensor of `n` elements.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut i = 0;
        while i + 16 <= n {
            box_muller_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// Box–Muller over 16 uniforms in place, in float32 as torch's fill does.
fn box_muller_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0f32 as f64 * std::f64::consts::PI * u2 as f64) as f32;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard fixes the 10000th output of mt19937 seeded 5489.
        let mut mt = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10_000 {
            v = mt.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }
}

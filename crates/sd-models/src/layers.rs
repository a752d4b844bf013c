//! The building blocks the three networks share, each loaded by shape from
//! its weights (`load`) apart from running it (`forward`).

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::device::Fp8;
use crate::error::Result;
use crate::lora;
use crate::modules::{ModuleKind, ModuleShape};
use crate::weights::Vb;

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// Its path, where LoRA adapters may apply (see [`crate::lora`]).
    path: Option<Arc<str>>,
}

/// How a layer's weight is kept.
enum Weight {
    /// As loaded.
    Dense(Tensor),
    /// fp8 e4m3, `weight ≈ w · scale` (one float32 scale for the tensor),
    /// with the kind it was loaded in and how it is computed.
    Fp8 {
        w: Tensor,
        scale: Tensor,
        kind: Kind,
        mode: Fp8,
    },
}

/// The largest finite e4m3 value.
const E4M3_MAX: f64 = 448.0;

/// `t` as fp8 e4m3 and its float32 scale: `t ≈ q · scale`, the scale the
/// power of two that maps the largest magnitude into (224, 448] — exact in
/// bf16 and fp16 too, so upcasting a layer multiplies by it without
/// rounding (e4m3 being floating point, the power of two costs no
/// precision).
fn quantize(t: &Tensor) -> (Tensor, Tensor) {
    let f = t.to_kind(Kind::Float);
    let amax = f.abs().max();
    let scale = (amax / E4M3_MAX)
        .clamp_min(f64::from(f32::MIN_POSITIVE))
        .log2()
        .ceil()
        .exp2();
    let q = (f / &scale).to_kind(Kind::Float8e4m3fn);
    (q, scale)
}

/// Rows of `x` (M, K) as fp8 e4m3 with one float32 scale per row (M, 1),
/// each row's largest magnitude mapped to e4m3's largest.
fn quantize_rows(x: &Tensor) -> (Tensor, Tensor) {
    let scale =
        (x.abs().amax([1i64].as_slice(), true) / E4M3_MAX).clamp_min(f64::from(f32::MIN_POSITIVE));
    ((x / &scale).to_kind(Kind::Float8e4m3fn), scale)
}

impl Linear {
    pub fn load(vb: &Vb, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let weight = match vb.fp8() {
            Fp8::Off => Weight::Dense(weight),
            mode => {
                let (w, scale) = quantize(&weight);
                Weight::Fp8 {
                    w,
                    scale,
                    kind: weight.kind(),
                    mode,
                }
            }
        };
        Ok(Linear {
            weight,
            bias: if bias {
                Some(vb.get("bias", &[out_dim])?)
            } else {
                None
            },
            path: vb.register(ModuleShape {
                kind: ModuleKind::Linear,
                input: in_dim,
                output: out_dim,
            }),
        })
    }

    /// This layer with its weights in `kind` (T5's float32 `wo`); an fp8
    /// layer keeps its storage and computes in `kind`.
    pub fn into_kind(self, kind: tch::Kind) -> Self {
        let weight = match self.weight {
            Weight::Dense(w) => Weight::Dense(w.to_kind(kind)),
            Weight::Fp8 { w, scale, mode, .. } => Weight::Fp8 {
                w,
                scale,
                kind,
                mode,
            },
        };
        Linear {
            weight,
            bias: self.bias.map(|b| b.to_kind(kind)),
            path: self.path,
        }
    }

    /// The element type it computes in (its weights', or an fp8 layer's
    /// as loaded).
    pub fn kind(&self) -> tch::Kind {
        match &self.weight {
            Weight::Dense(w) => w.kind(),
            Weight::Fp8 { kind, .. } => *kind,
        }
    }

    /// Bytes its weight and bias take on the device.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let w = match &self.weight {
            Weight::Dense(w) => size(w),
            Weight::Fp8 { w, scale, .. } => size(w) + size(scale),
        };
        w + self.bias.as_ref().map_or(0, size)
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let y = match &self.weight {
            Weight::Dense(w) => xs.linear(w, self.bias.as_ref()),
            Weight::Fp8 {
                w,
                scale,
                mode: Fp8::Scaled,
                ..
            } => scaled_fp8(xs, w, scale, self.bias.as_ref()),
            Weight::Fp8 { w, scale, .. } => {
                let k = xs.kind();
                xs.linear(&(w.to_kind(k) * scale.to_kind(k)), self.bias.as_ref())
            }
        };
        match &self.path {
            Some(p) => lora::apply(p, xs, y, None),
            None => y,
        }
    }
}

/// `xs · (w · scale)ᵀ + bias` as one scaled fp8 matrix product: the
/// activations quantized to e4m3 with one scale per row (token), the
/// weight's one scale spread over its columns — the row-wise form Hopper's
/// kernels take, with a bf16 result (rows padded to a multiple of 16, as
/// they ask) — then in `xs`'s kind.
fn scaled_fp8(xs: &Tensor, w: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let size = xs.size();
    let k = *size.last().unwrap_or(&1);
    let x = xs.reshape([-1, k]).to_kind(Kind::Float);
    let rows = x.size()[0];
    let pad = (16 - rows % 16) % 16;
    let x = if pad > 0 {
        x.constant_pad_nd([0, 0, 0, pad])
    } else {
        x
    };
    let (x8, x_scale) = quantize_rows(&x);
    let n = w.size()[0];
    let w_scale = scale
        .to_device(x8.device())
        .reshape([1, 1])
        .expand([1, n], false)
        .contiguous();
    let y = x8
        .internal_scaled_mm(
            &w.tr(),
            &x_scale,
            &w_scale,
            None::<Tensor>,
            None::<Tensor>,
            Kind::BFloat16,
            false,
        )
        .narrow(0, 0, rows)
        .to_kind(xs.kind());
    let y = match bias {
        Some(b) => y + b.to_kind(xs.kind()),
        None => y,
    };
    let mut out = size;
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    y.reshape(out)
}

/// A convolution without bias whose stride is its kernel (a ViT's patch
/// embedding).
pub struct Conv2dNoBias {
    weight: Tensor,
    kernel: i64,
}

impl Conv2dNoBias {
    pub fn load(vb: &Vb, cin: i64, cout: i64, kernel: i64) -> Result<Self> {
        Ok(Conv2dNoBias {
            weight: vb.get("weight", &[cout, cin, kernel, kernel])?,
            kernel,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d::<Tensor>(
            &self.weight,
            None,
            [self.kernel, self.kernel],
            [0, 0],
            [1, 1],
            1,
        )
    }
}

pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    /// Its path, where LoRA adapters may apply (see [`crate::lora`]).
    path: Option<Arc<str>>,
}

impl Conv2d {
    pub fn load(
        vb: &Vb,
        cin: i64,
        cout: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: vb.get("weight", &[cout, cin, kernel, kernel])?,
            bias: vb.get("bias", &[cout])?,
            stride,
            padding,
            path: vb.register(ModuleShape {
                kind: ModuleKind::Conv {
                    kernel,
                    stride,
                    padding,
                },
                input: cin,
                output: cout,
            }),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let y = xs.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        match &self.path {
            Some(p) => lora::apply(p, xs, y, Some((self.stride, self.padding))),
            None => y,
        }
    }
}

pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: vb.get("weight", &[channels])?,
            bias: vb.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// RMS norm as T5 and diffusers' `RMSNorm` compute it: no mean, no bias;
/// the variance in float32, the normed values cast to a half-precision
/// weight's kind before the product.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &Vb, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let var = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        let normed = xs * (var + self.eps).rsqrt();
        let normed = match self.weight.kind() {
            Kind::Half | Kind::BFloat16 => normed.to_kind(self.weight.kind()),
            _ => normed,
        };
        &self.weight * normed
    }
}

/// Multi-head attention over (batch, tokens, heads * head_dim) inputs via
/// `scaled_dot_product_attention`, which picks fused kernels on CUDA.
/// `upcast` computes it in fp32 when the model runs in half precision
/// (diffusers' `upcast_attention`, needed by SD 2.x's 768 model in fp16).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
    upcast: bool,
) -> Tensor {
    let (b, n, inner) = q.size3().expect("attention inputs are 3-d");
    let m = k.size()[1];
    let head_dim = inner / heads;
    let split = |t: &Tensor, len: i64| t.view([b, len, heads, head_dim]).transpose(1, 2);
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    let kind = q.kind();
    let out = if upcast && kind != tch::Kind::Float {
        let f = tch::Kind::Float;
        Tensor::scaled_dot_product_attention::<Tensor>(
            &q.to_kind(f),
            &k.to_kind(f),
            &v.to_kind(f),
            None,
            0.0,
            causal,
            None,
            false,
        )
        .to_kind(kind)
    } else {
        Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, causal, None, false)
    };
    out.transpose(1, 2).reshape([b, n, inner])
}

/// Token ids as a text encoder takes them: (batch >= 1, 1..=`max_len`
/// tokens), each in 0..`vocab`; returned as int64.
pub fn token_ids(ids: &Tensor, vocab: i64, max_len: i64) -> Result<Tensor> {
    use crate::error::ModelError;
    let size = ids.size();
    let [batch, seq] = size[..] else {
        return Err(ModelError::Input(format!(
            "token ids must be 2-d (batch, seq), got {size:?}"
        )));
    };
    if batch < 1 || seq < 1 || seq > max_len {
        return Err(ModelError::Input(format!(
            "token ids shape {size:?}: need batch >= 1 and 1..={max_len} tokens"
        )));
    }
    let ids = ids.f_to_kind(tch::Kind::Int64)?;
    let (lo, hi) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
    if lo < 0 || hi >= vocab {
        return Err(ModelError::Input(format!(
            "token ids must lie in 0..{vocab}, got {lo}..={hi}"
        )));
    }
    Ok(ids)
}

#[cfg(test)]
mod fp8_tests {
    use super::*;

    #[test]
    fn fp8_weights_round_trip_within_e4m3s_precision() {
        tch::manual_seed(3);
        let w = Tensor::randn([64, 48], (Kind::Float, tch::Device::Cpu)) * 0.02;
        let (q, scale) = quantize(&w);
        assert_eq!(q.kind(), Kind::Float8e4m3fn);
        let back = q.to_kind(Kind::Float) * &scale;
        // The largest magnitude lands in e4m3's top octave, the scale a
        // power of two.
        let qmax = q.to_kind(Kind::Float).abs().max().double_value(&[]);
        assert!(qmax > E4M3_MAX / 2.0 && qmax <= E4M3_MAX, "{qmax}");
        let s = scale.double_value(&[]);
        assert_eq!(s.log2().fract(), 0.0, "scale {s} is no power of two");
        // Three mantissa bits: each normal value within 2^-4 of itself.
        let rel = ((&back - &w).abs() / (w.abs() + 1e-6))
            .max()
            .double_value(&[]);
        let err = (&back - &w).abs().max().double_value(&[]);
        assert!(
            rel <= 0.0625 + 1e-3 || err < 1e-4,
            "relative {rel}, absolute {err}"
        );
    }

    #[test]
    fn fp8_layers_compute_what_their_dense_weights_would() {
        tch::manual_seed(4);
        let f = (Kind::Float, tch::Device::Cpu);
        let w = Tensor::randn([32, 48], f) * 0.05;
        let bias = Tensor::randn([32], f);
        // 2 × 9 rows: not a multiple of 16, so the scaled path pads.
        let x = Tensor::randn([2, 9, 48], f);
        let (q, scale) = quantize(&w);
        let dense = x.linear(&(q.to_kind(Kind::Float) * &scale), Some(&bias));
        let layer = |mode| Linear {
            weight: Weight::Fp8 {
                w: q.shallow_clone(),
                scale: scale.shallow_clone(),
                kind: Kind::Float,
                mode,
            },
            bias: Some(bias.shallow_clone()),
            path: None,
        };
        let upcast = layer(Fp8::Upcast).forward(&x);
        assert!(upcast.allclose(&dense, 1e-5, 1e-5, false));
        let scaled = layer(Fp8::Scaled).forward(&x);
        assert_eq!(scaled.size(), [2, 9, 32]);
        // The activations' own quantization: a few percent of the output.
        let d = (&scaled - &dense).abs().max().double_value(&[]);
        let m = dense.abs().max().double_value(&[]);
        assert!(d > 0.0 && d < 0.08 * m, "scaled fp8 off by {d} (max {m})");
        let l = layer(Fp8::Upcast);
        assert_eq!(l.bytes(), 32 * 48 + 4 + 32 * 4);
        assert_eq!(l.kind(), Kind::Float);
    }
}

//! The building blocks the three networks share, each loaded by shape from
//! its weights (`load`) apart from running it (`forward`).

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::lora;
use crate::modules::{ModuleKind, ModuleShape};
use crate::weights::Vb;

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Its path, where LoRA adapters may apply (see [`crate::lora`]).
    path: Option<Arc<str>>,
}

impl Linear {
    pub fn load(vb: &Vb, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: vb.get("weight", &[out_dim, in_dim])?,
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

    /// This layer with its weights in `kind` (T5's float32 `wo`).
    pub fn into_kind(self, kind: tch::Kind) -> Self {
        Linear {
            weight: self.weight.to_kind(kind),
            bias: self.bias.map(|b| b.to_kind(kind)),
            path: self.path,
        }
    }

    /// The element type of its weights.
    pub fn kind(&self) -> tch::Kind {
        self.weight.kind()
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let y = xs.linear(&self.weight, self.bias.as_ref());
        match &self.path {
            Some(p) => lora::apply(p, xs, y, None),
            None => y,
        }
    }
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

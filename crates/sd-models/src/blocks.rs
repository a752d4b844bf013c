//! Convolutional blocks shared by the UNet and the VAE: resnet blocks,
//! down- and upsamplers.

use tch::Tensor;

use crate::error::Result;
use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::weights::Vb;

/// Shapes and norms of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub cin: i64,
    pub cout: i64,
    /// Width of the time embedding it is conditioned on (UNet), or none (VAE).
    pub temb: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale: f64,
}

/// diffusers' `ResnetBlock2D` (pre-norm, "default" time-embedding norm).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    pub fn load(vb: &Vb, s: ResnetSpec) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&vb.pp("norm1"), s.groups, s.cin, s.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), s.cin, s.cout, 3, 1, 1)?,
            time_emb_proj: match s.temb {
                Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), t, s.cout, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&vb.pp("norm2"), s.groups, s.cout, s.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), s.cout, s.cout, 3, 1, 1)?,
            conv_shortcut: if s.cin != s.cout {
                Some(Conv2d::load(
                    &vb.pp("conv_shortcut"),
                    s.cin,
                    s.cout,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            output_scale: s.output_scale,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(xs).silu());
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&t.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale == 1.0 {
            out
        } else {
            out / self.output_scale
        }
    }
}

/// A stride-2 3×3 convolution. With `padding = 0` (the VAE encoder) the input
/// is first padded by one on the right and bottom, as diffusers does.
pub struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    pub fn load(vb: &Vb, channels: i64, padding: i64) -> Result<Self> {
        Ok(Downsample {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling (to twice the size, or to the size of the
/// skip connection it meets) followed by a 3×3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(vb: &Vb, channels: i64) -> Result<Self> {
        Ok(Upsample {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = xs.size4().expect("upsample input is 4-d");
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = xs.upsample_nearest2d([oh, ow], None, None);
        self.conv.forward(&up)
    }
}

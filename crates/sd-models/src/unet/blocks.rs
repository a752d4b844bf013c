//! The UNet's down, mid and up blocks, built from its config in diffusers'
//! module layout (`down_blocks.{i}.resnets.{j}`, `mid_block`,
//! `up_blocks.{i}`): resnets, a cross-attention transformer after each in a
//! cross-attention block, a down- or upsampler.

use crate::blocks::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use crate::config::{UNetBlock, UNetConfig};
use crate::error::Result;
use crate::weights::{Vb, Weights};

use super::transformer::SpatialTransformer;

pub(super) struct DownBlock {
    pub(super) resnets: Vec<ResnetBlock>,
    pub(super) attentions: Vec<SpatialTransformer>,
    pub(super) downsample: Option<Downsample>,
}

pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock>,
    pub(super) attentions: Vec<SpatialTransformer>,
    pub(super) upsample: Option<Upsample>,
}

/// Builds the UNet's parts from its config and weights, in diffusers'
/// module layout (`down_blocks.{i}.resnets.{j}`, `mid_block`, `up_blocks.{i}`).
pub(super) struct UNetLoader<'a> {
    pub(super) vb: Vb<'a>,
    c: &'a UNetConfig,
    /// Width of the time embedding every resnet is conditioned on.
    pub(super) temb: i64,
}

/// A block's resnets and, in a cross-attention block, the transformer after each.
type BlockLayers = (Vec<ResnetBlock>, Vec<SpatialTransformer>);

impl<'a> UNetLoader<'a> {
    pub(super) fn new(weights: &'a Weights, c: &'a UNetConfig) -> Self {
        UNetLoader {
            vb: Vb::root(weights, ""),
            c,
            temb: 4 * c.block_out_channels[0],
        }
    }

    fn resnet(&self, cin: i64, cout: i64, output_scale: f64) -> ResnetSpec {
        ResnetSpec {
            cin,
            cout,
            temb: Some(self.temb),
            groups: self.c.norm_num_groups,
            eps: self.c.norm_eps,
            output_scale,
        }
    }

    /// Layer `j`'s resnet takes `resnet_in(j)` channels and gives `cout`.
    fn block_layers(
        &self,
        b: &Vb,
        spec: &UNetBlock,
        cout: i64,
        resnet_in: impl Fn(i64) -> i64,
    ) -> Result<BlockLayers> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..spec.layers {
            resnets.push(ResnetBlock::load(
                &b.pp("resnets").pp(j),
                self.resnet(resnet_in(j), cout, 1.0),
            )?);
            if spec.cross_attention {
                attentions.push(SpatialTransformer::load(
                    &b.pp("attentions").pp(j),
                    cout,
                    spec,
                    self.c,
                )?);
            }
        }
        Ok((resnets, attentions))
    }

    /// Each down block but the last ends in a downsampler.
    pub(super) fn down_blocks(&self, specs: &[UNetBlock]) -> Result<Vec<DownBlock>> {
        let ch = &self.c.block_out_channels;
        let n = ch.len();
        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, spec) in specs.iter().enumerate() {
            let b = self.vb.pp("down_blocks").pp(i);
            let cout = ch[i];
            let (resnets, attentions) =
                self.block_layers(&b, spec, cout, |j| if j == 0 { cin } else { cout })?;
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    &b.pp("downsamplers.0"),
                    cout,
                    self.c.downsample_padding.unwrap_or(1),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
            cin = cout;
        }
        Ok(down)
    }

    /// Resnet, cross-attention transformer, resnet at the narrowest width,
    /// with the last down block's attention settings.
    pub(super) fn mid_block(
        &self,
        last_down: &UNetBlock,
    ) -> Result<([ResnetBlock; 2], SpatialTransformer)> {
        let mid = self.vb.pp("mid_block");
        let last = self.c.block_out_channels[self.c.block_out_channels.len() - 1];
        let spec = UNetBlock {
            cross_attention: true,
            layers: 1,
            ..last_down.clone()
        };
        let scale = self.c.mid_block_scale_factor;
        let resnets = [
            ResnetBlock::load(&mid.pp("resnets.0"), self.resnet(last, last, scale))?,
            ResnetBlock::load(&mid.pp("resnets.1"), self.resnet(last, last, scale))?,
        ];
        let attention = SpatialTransformer::load(&mid.pp("attentions.0"), last, &spec, self.c)?;
        Ok((resnets, attention))
    }

    /// Up blocks run from the narrowest width back to the widest; each resnet
    /// takes the previous output concatenated with one skip connection, and
    /// each up block but the last ends in an upsampler.
    pub(super) fn up_blocks(&self, specs: &[UNetBlock]) -> Result<Vec<UpBlock>> {
        let rev: Vec<i64> = self.c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rev[0];
        for (i, spec) in specs.iter().enumerate() {
            let b = self.vb.pp("up_blocks").pp(i);
            let cout = rev[i];
            // The last resnet meets the skip from the wider block before it.
            let block_in = rev[(i + 1).min(n - 1)];
            let resnet_in = |j: i64| {
                let skip = if j == spec.layers - 1 { block_in } else { cout };
                let rin = if j == 0 { prev_out } else { cout };
                rin + skip
            };
            let (resnets, attentions) = self.block_layers(&b, spec, cout, resnet_in)?;
            let upsample = if i + 1 < n {
                Some(Upsample::load(&b.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = cout;
        }
        Ok(up)
    }
}

//! ControlNets of either kind behind one type: the UNet's
//! ([`ControlNet`], SD 1.x/2.x and SDXL) and FLUX.1's
//! ([`FluxControlNet`]), and what each adds to its network's forward.

use std::path::Path;

use tch::Tensor;

use crate::device::Placement;
use crate::error::Result;
use crate::flux_controlnet::{FluxControlNet, FluxResiduals};
use crate::unet::controlnet::ControlNet;
use crate::unet::Residuals;

/// A loaded ControlNet, for the network it steers.
pub enum ControlNetwork {
    Unet(Box<ControlNet>),
    Flux(Box<FluxControlNet>),
}

/// What ControlNets add to one forward (several summed), one row per
/// batch item.
#[derive(Debug)]
pub enum ControlResiduals {
    /// A UNet's: one per skip connection and one for the mid block.
    Unet(Residuals),
    /// FLUX's: one per ControlNet block.
    Flux(FluxResiduals),
}

/// The network a ControlNet is loaded for.
pub enum ControlBase {
    Unet(Box<crate::config::UNetConfig>),
    Flux(crate::flux::FluxConfig),
}

impl ControlNetwork {
    /// The ControlNet at `path`, for the network configured as `base`.
    pub fn load(path: &Path, base: &ControlBase, placement: Placement) -> Result<Self> {
        match base {
            ControlBase::Unet(c) => Ok(ControlNetwork::Unet(Box::new(ControlNet::load(
                path, c, placement,
            )?))),
            ControlBase::Flux(_) => Ok(ControlNetwork::Flux(Box::new(FluxControlNet::load(
                path, placement,
            )?))),
        }
    }

    /// Bytes its weights take in memory.
    pub fn bytes(&self) -> u64 {
        match self {
            ControlNetwork::Unet(n) => n.bytes(),
            ControlNetwork::Flux(n) => n.bytes(),
        }
    }

    /// The hint's embedding, made once per generation: a UNet ControlNet's
    /// of the hint image (B, 3, H, W) in 0..=1, a FLUX one's of the
    /// control image's latents (B, C, h, w).
    pub fn embed(&self, hint: &Tensor) -> Result<Tensor> {
        match self {
            ControlNetwork::Unet(n) => n.embed(hint),
            ControlNetwork::Flux(n) => n.embed(hint),
        }
    }

    /// A forward of zeros, for the cost model.
    pub fn probe(&self, rows: i64, side: i64, tokens: i64) -> Result<ControlResiduals> {
        match self {
            ControlNetwork::Unet(n) => n.probe(rows, side, tokens).map(ControlResiduals::Unet),
            ControlNetwork::Flux(n) => n.probe(rows, side, tokens).map(ControlResiduals::Flux),
        }
    }

    /// Control types of a union ControlNet (None: not a union).
    pub fn union_modes(&self) -> Option<i64> {
        match self {
            ControlNetwork::Unet(_) => None,
            ControlNetwork::Flux(n) => n.union_modes(),
        }
    }

    /// Whether the hint it embeds is the control image's VAE latents (FLUX)
    /// rather than the image itself.
    pub fn takes_latents(&self) -> bool {
        matches!(self, ControlNetwork::Flux(_))
    }
}

//! Model work shared by the services and the in-process benchmark pipeline:
//! guided UNet calls (several merged into one forward) and diffusers'
//! image postprocessing.

use sd_models::UNet;
use sd_proto::v1::RgbImage;
use tch::{Kind, Tensor};

use crate::ServiceError;

/// One Predict's tensors, checked.
pub struct Call {
    /// (B, C, h, w)
    pub latents: Tensor,
    /// (B,)
    pub timesteps: Tensor,
    /// (1 or B, tokens, dim)
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub guidance: f64,
}

impl Call {
    pub fn batch(&self) -> i64 {
        self.latents.size()[0]
    }

    /// UNet rows this call needs (twice its batch when guided).
    pub fn rows(&self) -> i64 {
        self.batch() * if self.uncond.is_some() { 2 } else { 1 }
    }

    /// Latent positions (height × width).
    pub fn positions(&self) -> u64 {
        let s = self.latents.size();
        (s[2] * s[3]).max(0) as u64
    }

    /// Calls merge when latents and text embeddings have the same shape past the batch.
    pub fn key(&self) -> (Vec<i64>, Vec<i64>) {
        (
            self.latents.size()[1..].to_vec(),
            self.cond.size()[1..].to_vec(),
        )
    }
}

/// Run several calls as one UNet forward (classifier-free guidance per
/// call: uncond + g · (cond − uncond)); outputs in call order, on the host.
/// On a GPU the forward runs asynchronously: copying the results back here
/// makes the caller's timing the forward's real time, and no gRPC I/O
/// thread later blocks on the device when it serialises a result.
pub fn forward_calls(unet: &UNet, calls: &[&Call]) -> sd_models::Result<Vec<Tensor>> {
    let mut xs = Vec::new();
    let mut ts = Vec::new();
    let mut ctxs = Vec::new();
    for c in calls {
        let b = c.batch();
        let expand = |t: &Tensor| t.expand([b, -1, -1], false);
        let t = c.timesteps.expand([b], false);
        if let Some(u) = &c.uncond {
            // diffusers' order within a call: [uncond, cond].
            xs.extend([c.latents.shallow_clone(), c.latents.shallow_clone()]);
            ts.extend([t.shallow_clone(), t]);
            ctxs.extend([expand(u), expand(&c.cond)]);
        } else {
            xs.push(c.latents.shallow_clone());
            ts.push(t);
            ctxs.push(expand(&c.cond));
        }
    }
    let out = unet.forward(
        &Tensor::cat(&xs, 0),
        &Tensor::cat(&ts, 0),
        &Tensor::cat(&ctxs, 0),
    )?;
    let mut results = Vec::with_capacity(calls.len());
    let mut offset = 0;
    for c in calls {
        let b = c.batch();
        let guided = if c.uncond.is_some() {
            let u = out.narrow(0, offset, b);
            let cond = out.narrow(0, offset + b, b);
            offset += 2 * b;
            &u + (&cond - &u) * c.guidance
        } else {
            offset += b;
            out.narrow(0, offset - b, b)
        };
        results.push(guided.f_to_device(tch::Device::Cpu)?);
    }
    Ok(results)
}

/// diffusers' postprocess: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded.
pub fn to_rgb8(pixels: &Tensor) -> Result<Vec<RgbImage>, ServiceError> {
    let (b, _, h, w) = pixels.size4()?;
    let rgb = (pixels.to_kind(Kind::Float) / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .to_device(tch::Device::Cpu)
        .permute([0, 2, 3, 1])
        .multiply_scalar(255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous();
    let per = (h * w * 3) as usize;
    let total = per * b as usize;
    let mut bytes = vec![0u8; total];
    rgb.f_copy_data_u8(&mut bytes, total)?;
    Ok(bytes
        .chunks_exact(per)
        .map(|c| RgbImage {
            width: w as u32,
            height: h as u32,
            rgb: c.to_vec().into(),
        })
        .collect())
}

//! What a Predict may carry, checked before any of it reaches the UNet:
//! shapes, sizes (latent sides bounded by the documented pixel side),
//! finite values, timesteps in the model's range, short ids.

use sd_proto::v1::{Dtype, Embedding, PredictRequest, Tensor as WireTensor};
use sd_service::{finite, from_wire, ServiceError};
use tch::Tensor;

/// Longest embedding id kept (the gateway's are 36 bytes): an id travels
/// back in the details of an embedding miss, so it must stay small.
pub const MAX_EMBEDDING_ID_BYTES: usize = 128;

/// Most tokens an embedding may have: 8 CLIP windows of 77 (room for long
/// prompts encoded in chunks); cross-attention's cost grows with them.
pub const MAX_TOKENS: i64 = 77 * 8;

/// The limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub latent_channels: i64,
    pub context_dim: i64,
    /// Latents per call.
    pub max_batch: i64,
    /// Largest latent side: `--max-side` pixels over the VAE's scale factor.
    pub max_latent_side: i64,
    /// The scheduler's training timesteps: timesteps lie in [0, this].
    pub max_timestep: f32,
    /// SDXL family: (pooled embedding width, time ids per latent).
    pub xl: Option<(i64, i64)>,
}

impl Bounds {
    /// The latents, (1..=max_batch, channels, 1..=side, 1..=side), finite.
    pub fn latents(&self, t: Option<&WireTensor>) -> Result<Tensor, ServiceError> {
        let latents = from_wire(t, "latents")?;
        let s = latents.size();
        let c = self.latent_channels;
        if s.len() != 4 || s[1] != c || s[0] < 1 || s[2] < 1 || s[3] < 1 {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("shape {s:?}, expected (batch, {c}, height, width)"),
            ));
        }
        if s[0] > self.max_batch {
            return Err(ServiceError::invalid(
                "latents",
                format_args!("batch {} exceeds {}", s[0], self.max_batch),
            ));
        }
        let side = self.max_latent_side;
        if s[2] > side || s[3] > side {
            return Err(ServiceError::invalid(
                "latents",
                format_args!(
                    "{}×{} latents exceed {side}×{side} (the largest image side over the VAE's scale factor)",
                    s[3], s[2]
                ),
            ));
        }
        finite(&latents, "latents")?;
        Ok(latents)
    }

    /// One timestep per latent, or one for all, each in [0, max_timestep].
    pub fn timesteps(&self, timesteps: &[f32], batch: i64) -> Result<Tensor, ServiceError> {
        if !(timesteps.len() == 1 || timesteps.len() as i64 == batch) {
            return Err(ServiceError::invalid(
                "timesteps",
                format_args!("{} values given, 1 or {batch} needed", timesteps.len()),
            ));
        }
        let max = self.max_timestep;
        if let Some(i) = timesteps.iter().position(|t| !(0.0..=max).contains(t)) {
            return Err(ServiceError::invalid(
                "timesteps",
                format_args!("value {i} is {}, expected 0 to {max}", timesteps[i]),
            ));
        }
        Ok(Tensor::from_slice(timesteps))
    }

    /// An embedding (1 or batch, 1..=MAX_TOKENS, context dim).
    pub fn embedding(&self, t: &Tensor, batch: i64, field: &str) -> Result<(), ServiceError> {
        let s = t.size();
        let dim = self.context_dim;
        if s.len() != 3 || !(s[0] == 1 || s[0] == batch) || s[1] < 1 || s[2] != dim {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected (1 or {batch}, tokens, {dim})"),
            ));
        }
        if s[1] > MAX_TOKENS {
            return Err(ServiceError::invalid(
                field,
                format_args!("{} tokens, at most {MAX_TOKENS}", s[1]),
            ));
        }
        Ok(())
    }
}

impl Bounds {
    /// SDXL: a pooled embedding (1 or batch, pooled width), finite; other
    /// models take none.
    pub fn pooled(
        &self,
        t: Option<&WireTensor>,
        batch: i64,
        field: &str,
    ) -> Result<Option<Tensor>, ServiceError> {
        let field = format!("{field}.pooled");
        match (self.xl, t) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(ServiceError::invalid(
                field,
                "this model takes none (not an SDXL-family model)",
            )),
            (Some(_), None) => Err(ServiceError::invalid(
                field,
                "missing: an SDXL-family model needs the pooled embedding",
            )),
            (Some(_), Some(w)) => {
                let t = from_wire(Some(w), &field)?;
                self.pooled_fits(&t, batch, &field)?;
                finite(&t, &field)?;
                Ok(Some(t))
            }
        }
    }

    /// A pooled embedding (kept or sent) fits a call of `batch`.
    pub fn pooled_fits(&self, t: &Tensor, batch: i64, field: &str) -> Result<(), ServiceError> {
        let dim = self.xl.map_or(0, |(d, _)| d);
        let s = t.size();
        if s.len() != 2 || !(s[0] == 1 || s[0] == batch) || s[1] != dim {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected (1 or {batch}, {dim})"),
            ));
        }
        Ok(())
    }

    /// SDXL: the time ids of each latent, (batch, time ids per latent),
    /// finite and within 0..=65536 (sizes and crops in pixels, scores).
    pub fn time_ids(
        &self,
        t: Option<&WireTensor>,
        batch: i64,
        field: &str,
    ) -> Result<Option<Tensor>, ServiceError> {
        let Some((_, n)) = self.xl else {
            return match t {
                None => Ok(None),
                Some(_) => Err(ServiceError::invalid(
                    field,
                    "this model takes none (not an SDXL-family model)",
                )),
            };
        };
        let Some(w) = t else { return Ok(None) };
        let t = from_wire(Some(w), field)?;
        let s = t.size();
        if s != [batch, n] {
            return Err(ServiceError::invalid(
                field,
                format_args!("shape {s:?}, expected ({batch}, {n})"),
            ));
        }
        finite(&t, field)?;
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        if lo < 0.0 || hi > 65536.0 {
            return Err(ServiceError::invalid(
                field,
                format_args!("values {lo}..={hi}, expected 0..=65536"),
            ));
        }
        Ok(Some(t.to_kind(tch::Kind::Float)))
    }
}

/// An embedding names a short id, or sends its tensor, or both.
pub fn embedding_id(e: &Embedding, field: &str) -> Result<(), ServiceError> {
    if e.id.len() > MAX_EMBEDDING_ID_BYTES {
        return Err(ServiceError::invalid(
            format!("{field}.id"),
            format_args!("{} bytes, at most {MAX_EMBEDDING_ID_BYTES}", e.id.len()),
        ));
    }
    if e.id.is_empty() && e.tensor.is_none() {
        return Err(ServiceError::invalid(field, "neither an id nor a tensor"));
    }
    Ok(())
}

pub fn guidance(scale: f32) -> Result<f64, ServiceError> {
    if !scale.is_finite() {
        return Err(ServiceError::invalid("guidance_scale", "must be finite"));
    }
    Ok(scale as f64)
}

/// The dtype to answer in: as asked, or (unspecified) the latents' own.
pub fn output_dtype(req: &PredictRequest) -> Result<Dtype, ServiceError> {
    match Dtype::try_from(req.output_dtype) {
        Ok(Dtype::Unspecified) => {
            Ok(Dtype::try_from(req.latents.as_ref().map_or(1, |l| l.dtype))
                .unwrap_or(Dtype::Float32))
        }
        Ok(d) => Ok(d),
        Err(_) => Err(ServiceError::invalid(
            "output_dtype",
            format_args!("unknown value {}", req.output_dtype),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_service::to_wire;

    const B: Bounds = Bounds {
        latent_channels: 4,
        context_dim: 8,
        max_batch: 2,
        max_latent_side: 16,
        max_timestep: 1000.0,
        xl: None,
    };

    fn wire(t: &Tensor) -> WireTensor {
        to_wire(t, Dtype::Float32).unwrap()
    }

    fn field_of(e: ServiceError) -> String {
        match e {
            ServiceError::InvalidField { field, .. } => field,
            e => panic!("not a field error: {e}"),
        }
    }

    #[test]
    fn latents_are_bounded_in_shape_side_and_value() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        assert!(B
            .latents(Some(&wire(&Tensor::zeros([2, 4, 16, 8], f))))
            .is_ok());
        for bad in [
            Tensor::zeros([3, 4, 8, 8], f),
            Tensor::zeros([1, 4, 17, 8], f),
            Tensor::zeros([1, 4, 8, 2048], f),
            Tensor::zeros([1, 3, 8, 8], f),
            Tensor::zeros([4, 8, 8], f),
            Tensor::zeros([1, 4, 8, 8], f).fill_(f64::NAN),
            Tensor::zeros([1, 4, 8, 8], f).fill_(f64::INFINITY),
        ] {
            let e = B.latents(Some(&wire(&bad))).expect_err("refused");
            assert_eq!(field_of(e), "latents", "{:?}", bad.size());
        }
        let half = Tensor::zeros([1, 4, 8, 8], f)
            .fill_(f64::NAN)
            .to_kind(tch::Kind::Half);
        let e = B
            .latents(Some(&to_wire(&half, Dtype::Float16).unwrap()))
            .expect_err("NaN in half precision refused");
        assert!(e.to_string().contains("NaN"), "{e}");
    }

    #[test]
    fn timesteps_lie_in_the_training_range() {
        assert!(B.timesteps(&[0.0, 999.5], 2).is_ok());
        assert!(B.timesteps(&[1000.0], 2).is_ok());
        for bad in [
            vec![-1.0],
            vec![1000.5],
            vec![f32::NAN],
            vec![1.0, 2.0, 3.0],
            vec![],
        ] {
            let e = B.timesteps(&bad, 2).expect_err("refused");
            assert_eq!(field_of(e), "timesteps", "{bad:?}");
        }
    }

    #[test]
    fn embeddings_are_bounded_in_tokens() {
        let f = (tch::Kind::Float, tch::Device::Cpu);
        assert!(B
            .embedding(&Tensor::zeros([1, 77, 8], f), 2, "cond")
            .is_ok());
        let long = Tensor::zeros([1, MAX_TOKENS + 1, 8], f);
        assert_eq!(field_of(B.embedding(&long, 2, "cond").unwrap_err()), "cond");
        let wide = Tensor::zeros([3, 77, 8], f);
        assert_eq!(
            field_of(B.embedding(&wide, 2, "uncond").unwrap_err()),
            "uncond"
        );
    }
}

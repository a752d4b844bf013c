//! Tensors between tch and the wire, checked before libtorch sees them.

use sd_proto::v1::{Dtype, Tensor as WireTensor};
use tch::{Kind, Tensor};

use crate::ServiceError;

/// A wire tensor as a CPU tch tensor (f32/f16/bf16 as sent), after checking
/// that its shape is sane (dimensions, strides) and its bytes fit it, so
/// libtorch never sees an unchecked shape. `field` names it in errors.
pub fn from_wire(t: Option<&WireTensor>, field: &str) -> Result<Tensor, ServiceError> {
    let t = t.ok_or_else(|| ServiceError::invalid(field, "missing"))?;
    sd_proto::wire::validate(t).map_err(|e| ServiceError::invalid(field, e))?;
    let kind = match Dtype::try_from(t.dtype) {
        Ok(Dtype::Float32) => Kind::Float,
        Ok(Dtype::Float16) => Kind::Half,
        Ok(Dtype::Bfloat16) => Kind::BFloat16,
        _ => {
            return Err(ServiceError::invalid(
                field,
                format_args!("unsupported dtype {}", t.dtype),
            ))
        }
    };
    Ok(Tensor::f_from_data_size(&t.data, &t.shape, kind)?)
}

/// Refuse NaN and infinite values in `t` (the networks would only spread
/// them through every later step).
pub fn finite(t: &Tensor, field: &str) -> Result<(), ServiceError> {
    if t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0 {
        return Ok(());
    }
    Err(ServiceError::invalid(field, "holds NaN or infinite values"))
}

/// The wire's element type for tensors of `kind` (float32 for any but
/// the two half precisions).
pub fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::Half => Dtype::Float16,
        Kind::BFloat16 => Dtype::Bfloat16,
        _ => Dtype::Float32,
    }
}

/// A tch tensor on the wire as `dtype` (unspecified: float32).
pub fn to_wire(t: &Tensor, dtype: Dtype) -> Result<WireTensor, ServiceError> {
    let (kind, dtype) = match dtype {
        Dtype::Float16 => (Kind::Half, Dtype::Float16),
        Dtype::Bfloat16 => (Kind::BFloat16, Dtype::Bfloat16),
        Dtype::Float32 | Dtype::Unspecified => (Kind::Float, Dtype::Float32),
    };
    let t = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_contiguous())?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(WireTensor {
        shape: t.size(),
        dtype: dtype as i32,
        data: data.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    fn wire(shape: Vec<i64>, dtype: i32, bytes: usize) -> WireTensor {
        WireTensor {
            shape,
            dtype,
            data: vec![0u8; bytes].into(),
        }
    }

    fn refusal(t: Option<&WireTensor>) -> Status {
        Status::from(from_wire(t, "latents").expect_err("refused"))
    }

    #[test]
    fn from_wire_refuses_bad_shapes_before_libtorch_sees_them() {
        let f32 = Dtype::Float32 as i32;
        for (t, words) in [
            (wire(vec![1, 4, 0, 1 << 62], f32, 0), "bad shape"),
            (wire(vec![1, -4], f32, 0), "negative"),
            (wire(vec![1; 9], f32, 4), "dimensions"),
            (wire(vec![2, 2], f32, 15), "bytes"),
            (wire(vec![2], 9, 8), "unsupported dtype"),
        ] {
            let s = refusal(Some(&t));
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert!(s.message().starts_with("latents: "), "{s:?}");
            assert!(s.message().contains(words), "{s:?}");
            let v = sd_proto::status::field_violations(&s);
            assert_eq!(v[0].field, "latents");
        }
        assert_eq!(refusal(None).message(), "latents: missing");
    }

    #[test]
    fn tensors_cross_the_wire_in_each_dtype() {
        let t = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 3.0]).view([2, 2]);
        for d in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
            let w = to_wire(&t, d).unwrap();
            assert_eq!(w.shape, vec![2, 2]);
            let back = from_wire(Some(&w), "t").unwrap().to_kind(Kind::Float);
            assert_eq!(
                Vec::<f32>::try_from(back.flatten(0, -1)).unwrap(),
                vec![0.5, -1.0, 2.0, 3.0]
            );
        }
    }
}

//! Tensors on the wire: `sd.v1.Tensor` holds row-major little-endian bytes of
//! float32, float16 or bfloat16 with a shape. [`HostTensor`] is the gateway's
//! view (f32 values in memory); conversions check that the byte length fits
//! the shape and dtype, so a bad message is an error, never a panic.

use half::{bf16, f16};

use crate::v1::{Dtype, Tensor};

/// Largest element count a single tensor may claim (2^31): well above any
/// SD tensor, and small enough that shape products cannot overflow.
pub const MAX_ELEMENTS: i64 = 1 << 31;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    Missing(&'static str),
    Shape(String),
    Dtype(i32),
    Length { expected: usize, actual: usize },
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Missing(what) => write!(f, "{what} is missing"),
            WireError::Shape(s) => write!(f, "bad shape: {s}"),
            WireError::Dtype(d) => write!(f, "unsupported dtype {d}"),
            WireError::Length { expected, actual } => {
                write!(
                    f,
                    "data has {actual} bytes, shape and dtype need {expected}"
                )
            }
        }
    }
}

impl std::error::Error for WireError {}

/// Element count of a shape, checked: no negative dims, no overflow.
pub fn numel(shape: &[i64]) -> Result<usize, WireError> {
    let mut n: i64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(WireError::Shape(format!(
                "{shape:?} has a negative dimension"
            )));
        }
        n = n.saturating_mul(d);
        if n > MAX_ELEMENTS {
            return Err(WireError::Shape(format!(
                "{shape:?} exceeds {MAX_ELEMENTS} elements"
            )));
        }
    }
    Ok(n as usize)
}

fn expected_len(shape: &[i64], elt: usize) -> Result<usize, WireError> {
    Ok(numel(shape)? * elt)
}

/// Bytes per element, or an error for an unknown dtype.
pub fn elt_size(dtype: i32) -> Result<usize, WireError> {
    match Dtype::try_from(dtype) {
        Ok(Dtype::Float32) => Ok(4),
        Ok(Dtype::Float16) | Ok(Dtype::Bfloat16) => Ok(2),
        _ => Err(WireError::Dtype(dtype)),
    }
}

/// Check that a wire tensor's bytes fit its shape and dtype.
pub fn validate(t: &Tensor) -> Result<(), WireError> {
    let expected = expected_len(&t.shape, elt_size(t.dtype)?)?;
    if t.data.len() != expected {
        return Err(WireError::Length {
            expected,
            actual: t.data.len(),
        });
    }
    Ok(())
}

/// A tensor in host memory as f32 values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<i64>, data: Vec<f32>) -> Result<Self, WireError> {
        let n = numel(&shape)?;
        if n != data.len() {
            return Err(WireError::Shape(format!(
                "{shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Encode as `dtype` (float16/bfloat16 halve the bytes).
    pub fn to_wire(&self, dtype: Dtype) -> Tensor {
        let data: Vec<u8> = match dtype {
            Dtype::Float16 => self
                .data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::Bfloat16 => self
                .data
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::Float32 | Dtype::Unspecified => {
                self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        };
        let dtype = if dtype == Dtype::Unspecified {
            Dtype::Float32
        } else {
            dtype
        };
        Tensor {
            shape: self.shape.clone(),
            dtype: dtype as i32,
            data: data.into(),
        }
    }

    /// Decode any wire dtype to f32 values.
    pub fn from_wire(t: &Tensor) -> Result<Self, WireError> {
        validate(t)?;
        let b = &t.data;
        let data: Vec<f32> = match Dtype::try_from(t.dtype) {
            Ok(Dtype::Float32) => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Ok(Dtype::Float16) => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Ok(Dtype::Bfloat16) => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => return Err(WireError::Dtype(t.dtype)),
        };
        Ok(HostTensor {
            shape: t.shape.clone(),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_dtype() {
        let t = HostTensor::new(vec![2, 3], vec![0.0, 1.0, -2.5, 3.25, 65504.0, -0.125]).unwrap();
        for d in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
            let w = t.to_wire(d);
            assert_eq!(w.data.len(), 6 * elt_size(d as i32).unwrap());
            let back = HostTensor::from_wire(&w).unwrap();
            // These values are exact in all three formats but 65504 in bf16.
            for (a, b) in back.data.iter().zip(&t.data) {
                assert!((a - b).abs() <= b.abs() * 4e-3, "{d:?}: {a} vs {b}");
            }
        }
        assert_eq!(
            HostTensor::from_wire(&t.to_wire(Dtype::Float32)).unwrap(),
            t
        );
    }

    #[test]
    fn rejects_lengths_shapes_and_dtypes_that_do_not_fit() {
        let mut w = HostTensor::new(vec![2, 2], vec![0.0; 4])
            .unwrap()
            .to_wire(Dtype::Float32);
        w.data = w.data.slice(..15);
        assert_eq!(
            HostTensor::from_wire(&w),
            Err(WireError::Length {
                expected: 16,
                actual: 15
            })
        );
        let bad = Tensor {
            shape: vec![-1, 4],
            dtype: Dtype::Float32 as i32,
            data: Default::default(),
        };
        assert!(matches!(
            HostTensor::from_wire(&bad),
            Err(WireError::Shape(_))
        ));
        let huge = Tensor {
            shape: vec![1 << 40, 1 << 40],
            dtype: Dtype::Float32 as i32,
            data: Default::default(),
        };
        assert!(matches!(
            HostTensor::from_wire(&huge),
            Err(WireError::Shape(_))
        ));
        let dt = Tensor {
            shape: vec![1],
            dtype: 77,
            data: vec![0u8; 4].into(),
        };
        assert_eq!(HostTensor::from_wire(&dt), Err(WireError::Dtype(77)));
    }
}

//! Tensors on the wire: `sd.v1.Tensor` holds row-major little-endian bytes of
//! float32, float16 or bfloat16 with a shape. [`HostTensor`] is the gateway's
//! view (f32 values in memory); conversions check that the byte length fits
//! the shape and dtype, so a bad message is an error, never a panic.

use half::{bf16, f16};

use crate::v1::{Dtype, Tensor};

/// Largest element count a single tensor may claim (2^31): well above any
/// SD tensor, and small enough that shape products cannot overflow.
pub const MAX_ELEMENTS: i64 = 1 << 31;

/// Most dimensions a tensor may have (SD tensors have at most 4).
pub const MAX_DIMS: usize = 8;

/// What is wrong with a wire tensor. Messages quote sizes, never the data
/// or an unbounded shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    Missing(&'static str),
    /// More than [`MAX_DIMS`] dimensions.
    TooManyDims(usize),
    /// A dimension below zero.
    NegativeDim(i64),
    /// The elements (or the strides a tensor library would compute from
    /// the shape) would exceed [`MAX_ELEMENTS`].
    TooLarge,
    /// Values do not fit the shape they claim.
    Count {
        expected: usize,
        actual: usize,
    },
    Dtype(i32),
    Length {
        expected: usize,
        actual: usize,
    },
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Missing(what) => write!(f, "{what} is missing"),
            WireError::TooManyDims(n) => {
                write!(f, "bad shape: {n} dimensions, at most {MAX_DIMS}")
            }
            WireError::NegativeDim(d) => write!(f, "bad shape: dimension {d} is negative"),
            WireError::TooLarge => write!(f, "bad shape: more than {MAX_ELEMENTS} elements"),
            WireError::Count { expected, actual } => {
                write!(f, "bad shape: it needs {expected} values, got {actual}")
            }
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

/// Element count of a shape, checked before any tensor library sees it: at
/// most [`MAX_DIMS`] dimensions, none negative, and the product of the
/// dimensions — with zeros counted as ones, as stride computations do — at
/// most [`MAX_ELEMENTS`]. (`[1, 4, 0, 2^62]` holds no element, yet its
/// strides overflow.)
pub fn numel(shape: &[i64]) -> Result<usize, WireError> {
    if shape.len() > MAX_DIMS {
        return Err(WireError::TooManyDims(shape.len()));
    }
    let mut n: i64 = 1;
    let mut strides: i64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(WireError::NegativeDim(d));
        }
        strides = strides.saturating_mul(d.max(1));
        if strides > MAX_ELEMENTS {
            return Err(WireError::TooLarge);
        }
        n *= d;
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
            return Err(WireError::Count {
                expected: n,
                actual: data.len(),
            });
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
        assert_eq!(HostTensor::from_wire(&bad), Err(WireError::NegativeDim(-1)));
        let huge = Tensor {
            shape: vec![1 << 40, 1 << 40],
            dtype: Dtype::Float32 as i32,
            data: Default::default(),
        };
        assert_eq!(HostTensor::from_wire(&huge), Err(WireError::TooLarge));
        // No element, but strides that overflow: refused before libtorch.
        let empty_but_huge = Tensor {
            shape: vec![1, 4, 0, 1 << 62],
            dtype: Dtype::Float32 as i32,
            data: Default::default(),
        };
        assert_eq!(validate(&empty_but_huge), Err(WireError::TooLarge));
        let many = Tensor {
            shape: vec![1; 100_000],
            dtype: Dtype::Float32 as i32,
            data: vec![0u8; 4].into(),
        };
        let e = validate(&many).unwrap_err();
        assert_eq!(e, WireError::TooManyDims(100_000));
        assert!(e.to_string().len() < 64, "{e}");
        let dt = Tensor {
            shape: vec![1],
            dtype: 77,
            data: vec![0u8; 4].into(),
        };
        assert_eq!(HostTensor::from_wire(&dt), Err(WireError::Dtype(77)));
    }
}

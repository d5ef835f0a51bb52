//! Tensors as they travel between processes: a dtype, a shape and raw
//! little-endian bytes, with no per-element encoding.

use bytes::Bytes;

use crate::error::{Error, Result};

// The wire carries the host's bytes as they are; every platform Omni
// builds for (x86_64, aarch64) is little-endian, and a big-endian host would
// need byte swaps that nothing here does.
#[cfg(target_endian = "big")]
compile_error!("omni-runtime's wire format is little-endian; big-endian hosts are not supported");

/// Element types a wire tensor can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    /// bool, one byte per element.
    Bool,
    /// u8.
    U8,
    /// i8.
    I8,
    /// i16.
    I16,
    /// i32.
    I32,
    /// i64.
    I64,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// f32.
    F32,
    /// f64.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::Bf16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The matching libtorch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            DType::Bool => tch::Kind::Bool,
            DType::U8 => tch::Kind::Uint8,
            DType::I8 => tch::Kind::Int8,
            DType::I16 => tch::Kind::Int16,
            DType::I32 => tch::Kind::Int,
            DType::I64 => tch::Kind::Int64,
            DType::F16 => tch::Kind::Half,
            DType::Bf16 => tch::Kind::BFloat16,
            DType::F32 => tch::Kind::Float,
            DType::F64 => tch::Kind::Double,
        }
    }

    /// The dtype of a libtorch kind, if the wire supports it.
    pub fn from_kind(kind: tch::Kind) -> Result<Self> {
        Ok(match kind {
            tch::Kind::Bool => DType::Bool,
            tch::Kind::Uint8 => DType::U8,
            tch::Kind::Int8 => DType::I8,
            tch::Kind::Int16 => DType::I16,
            tch::Kind::Int => DType::I32,
            tch::Kind::Int64 => DType::I64,
            tch::Kind::Half => DType::F16,
            tch::Kind::BFloat16 => DType::Bf16,
            tch::Kind::Float => DType::F32,
            tch::Kind::Double => DType::F64,
            other => {
                return Err(Error::Wire(format!(
                    "tensor kind {other:?} cannot travel on the wire"
                )))
            }
        })
    }
}

/// A tensor in host memory: `data` holds `shape.product() * dtype.size()`
/// little-endian bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// The raw bytes (may be a zero-copy view of a shared-memory mapping).
    pub data: Bytes,
}

impl HostTensor {
    /// Checks that `data` has exactly the bytes `dtype` and `shape` need.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Bytes) -> Result<Self> {
        let expected = byte_len(dtype, &shape)?;
        if expected != data.len() {
            return Err(Error::Wire(format!(
                "tensor of dtype {dtype:?} and shape {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(HostTensor { dtype, shape, data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Copies a libtorch tensor (any device, any layout) to host bytes.
    pub fn from_tch(t: &tch::Tensor) -> Result<Self> {
        let dtype = DType::from_kind(t.kind())?;
        let cpu = t
            .f_to_device(tch::Device::Cpu)
            .and_then(|c| c.f_contiguous())
            .map_err(|e| Error::Wire(format!("cannot bring tensor to host memory: {e}")))?;
        let shape: Vec<usize> = cpu.size().iter().map(|&d| d as usize).collect();
        let numel = cpu.numel();
        let mut buf = vec![0u8; numel * dtype.size()];
        cpu.f_copy_data_u8(&mut buf, numel)
            .map_err(|e| Error::Wire(format!("cannot copy tensor bytes: {e}")))?;
        HostTensor::new(dtype, shape, Bytes::from(buf))
    }

    /// A libtorch tensor on the CPU with a copy of these bytes.
    pub fn to_tch(&self) -> Result<tch::Tensor> {
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        tch::Tensor::f_from_data_size(&self.data, &shape, self.dtype.kind()).map_err(|e| {
            Error::Wire(format!(
                "cannot build tensor of shape {:?}: {e}",
                self.shape
            ))
        })
    }
}

/// Bytes a tensor of this dtype and shape occupies, with overflow checked
/// (shapes come from peers and must not be trusted).
pub fn byte_len(dtype: DType, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::Wire(format!(
                "tensor shape {shape:?} overflows the address space"
            ))
        })
}

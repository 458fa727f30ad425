//! Element types of KV tensors and queries. Scores always accumulate in f32.

use crate::error::{Error, Result};
use half::{bf16, f16};

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl DType {
    pub fn from_u32(v: u32, what: &str) -> Result<DType> {
        match v {
            0 => Ok(DType::F32),
            1 => Ok(DType::F16),
            2 => Ok(DType::Bf16),
            _ => Err(Error::invalid_arg(format!(
                "{what} = {v} is not a kvs_dtype; use KVS_DTYPE_F32 (0), KVS_DTYPE_F16 (1) or KVS_DTYPE_BF16 (2)"
            ))),
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// An element kvsieve can read as f32.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Call `$body` with `$T` bound to the Rust type of `$dtype`.
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::kernels::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::kernels::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::kernels::DType::Bf16 => {
                type $T = half::bf16;
                $body
            }
        }
    };
}

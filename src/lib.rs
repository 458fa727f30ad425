//! kvsieve: KV-cache sparsity for paged-attention serving engines.
//!
//! The crate decides which cached K/V entries each sequence keeps (`plan`, `kernels::select`),
//! scores them (`kernels::score`), packs the kept ones in place (`kernels::compact`) and reports
//! the blocks the engine may reuse. The C ABI in `ffi` wraps the same functions; `include/kvsieve.h`
//! is generated from it by cbindgen. This file only wires the modules together.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod ffi;
pub mod kernels;
pub mod plan;
pub mod status;
pub mod version;

pub use config::Config;
pub use error::{Error, Result};
pub use status::Status;

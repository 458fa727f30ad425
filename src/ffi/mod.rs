//! The C ABI (`include/kvsieve.h` is generated from these files by cbindgen).
//!
//! Conventions, enforced here and documented in the README:
//! - every fallible call returns `kvs_status` and runs inside `boundary::ffi_boundary`, which
//!   turns errors into a status plus a thread-local message and catches panics;
//! - pointers are checked by the `arg_*` macros before use; out-params are written last, only
//!   on success;
//! - handles are opaque `kvs_<thing>`, made by `kvs_<thing>_new`-style calls and released by
//!   `kvs_<thing>_free`, where free(NULL) does nothing.

#[macro_use]
mod boundary;
mod config;
mod info;
mod kernels;
mod plan;
mod regions;
#[cfg(feature = "cuda")]
mod self_check;

pub use boundary::last_error_message;
pub use config::*;
pub use info::*;
pub use kernels::*;
pub use plan::*;

//! Library and ABI version numbers.
//!
//! The literals are repeated here (not read from Cargo at build time) because cbindgen copies
//! them into `include/kvsieve.h` as macros; `tests/header.rs` checks that they equal Cargo.toml's
//! version so the two cannot drift.

/// Major version of the crate (semver).
pub const KVS_VERSION_MAJOR: u32 = 0;
/// Minor version of the crate (semver).
pub const KVS_VERSION_MINOR: u32 = 1;
/// Patch version of the crate (semver).
pub const KVS_VERSION_PATCH: u32 = 0;
/// ABI version: bumped whenever a function signature, struct layout or status meaning changes
/// in a way an already-compiled caller would notice. Additions keep it.
pub const KVS_ABI_VERSION: u32 = 5;

/// `"MAJOR.MINOR.PATCH"`, NUL-terminated for the C ABI.
pub(crate) const VERSION_CSTR: &std::ffi::CStr = c"0.1.0";

//! The CPU reference kernels (docs/design.md, "Layers"): score cached tokens, select what to keep, compact
//! the kept K/V in place. Each kernel has a naive twin in `reference`, written for clarity, that
//! the tests hold it against (and that the CUDA parity tests reuse).

pub mod compact;
pub mod dtype;
pub mod layout;
pub mod page_table;
#[doc(hidden)]
pub mod reference;
pub mod score;
pub mod select;

pub use dtype::DType;
pub use layout::{Device, KvCache, KvCacheDesc, Layout};

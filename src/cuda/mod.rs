//! The CUDA backend (feature `cuda`): the kernels of `kernels/kvsieve.cu`, compiled at run time
//! by NVRTC and launched through cudarc on the engine's stream. cudarc loads `libcuda` and
//! `libnvrtc` dynamically, so this module builds and the library loads where no CUDA exists;
//! every entry first checks that the libraries are present and turns absence into a status.

mod backend;
pub mod nvrtc;
mod ops;
pub mod source;

pub use backend::CudaBackend;
pub use ops::{QuestRowsDev, SeqArgs};

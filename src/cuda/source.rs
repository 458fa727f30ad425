//! The kernel source and its NVRTC compilation.

use crate::error::{Error, Result};
use crate::status::Status;

/// `kernels/kvsieve.cu`, embedded so the library needs no files at run time.
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/kvsieve.cu");

/// Every `extern "C" __global__` kernel the backend loads.
pub const KERNEL_NAMES: &[&str] = &[
    "kvs_compact_check",
    "kvs_compact_gather",
    "kvs_compact_scatter",
    "kvs_copy_released",
    "kvs_compact_dest_check",
    "kvs_compact_into",
    "kvs_row_check",
    "kvs_knorm",
    "kvs_snapkv_logits",
    "kvs_snapkv_softmax_stats",
    "kvs_snapkv_accumulate",
    "kvs_snapkv_pool",
    "kvs_quest_update",
    "kvs_quest_bound",
    "kvs_select_tokens",
    "kvs_csr_check",
    "kvs_csr_out_indptr",
    "kvs_select_blocks_csr",
    "kvs_row_header",
    "kvs_fill_i32",
];

/// Whether NVRTC can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC architecture name for a compute capability this build knows.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 8 => "compute_80", // PTX for sm_80 JIT-compiles on newer devices
        _ => {
            return Err(Error::unsupported(format!(
                "compute capability {major}.{minor} is below 8.0; kvsieve's CUDA kernels need Ampere or newer"
            )))
        }
    })
}

/// Compile the kernels to PTX for `arch` (e.g. "compute_90").
pub fn compile(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(Error::new(
            Status::NoCudaDriver,
            "libnvrtc could not be loaded; install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12` \
             and put its lib directory on LD_LIBRARY_PATH",
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| {
        Error::new(
            Status::CudaError,
            format!("NVRTC failed to compile kernels/kvsieve.cu for {arch}: {e:?}"),
        )
    })
}

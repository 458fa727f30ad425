//! The kernel source and its NVRTC compilation (`nvrtc` opens the NVRTC that matches the driver).

use super::nvrtc::Nvrtc;
use crate::error::{Error, Result};

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
    "kvs_quest_rows_check",
    "kvs_quest_select",
];

/// What the kernels are compiled to for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The device's own SASS (`sm_XY`, XY = compute capability x 10): loads on any driver that
    /// runs the device, no JIT.
    Sass(i32),
    /// PTX of an older architecture the NVRTC knows, JIT-compiled by the driver (a device newer
    /// than the NVRTC).
    Ptx(i32),
}

impl Target {
    /// NVRTC's `--gpu-architecture` value.
    pub fn arch(self) -> String {
        match self {
            Target::Sass(cc) => format!("sm_{cc}"),
            Target::Ptx(cc) => format!("compute_{cc}"),
        }
    }
}

/// The target for a device of compute capability `major.minor` given the architectures the
/// NVRTC supports (`cc x 10`): its own SASS when supported, else the newest older PTX.
pub fn target_for(major: i32, minor: i32, supported: &[i32]) -> Result<Target> {
    let cc = major * 10 + minor;
    if major < 8 {
        return Err(Error::unsupported(format!(
            "compute capability {major}.{minor} is below 8.0; kvsieve's CUDA kernels need Ampere or newer"
        )));
    }
    if supported.contains(&cc) {
        return Ok(Target::Sass(cc));
    }
    supported
        .iter()
        .copied()
        .filter(|&s| (80..cc).contains(&s))
        .max()
        .map(Target::Ptx)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "this NVRTC compiles for {supported:?} only, none of them for compute capability {major}.{minor}; \
                 install a newer NVRTC"
            ))
        })
}

/// Compile the kernels for `target` with `nvrtc`: the cubin (SASS) or the PTX text.
pub fn compile(nvrtc: &Nvrtc, target: Target) -> Result<Vec<u8>> {
    let options = vec![
        format!("--gpu-architecture={}", target.arch()),
        "--std=c++17".into(),
    ];
    nvrtc.compile(
        KERNEL_SOURCE,
        "kvsieve.cu",
        &options,
        matches!(target, Target::Sass(_)),
    )
}

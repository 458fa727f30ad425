//! Status codes returned by every fallible C ABI call.
//!
//! Numbers are fixed forever: a retired status keeps its number and is never reused, so a caller
//! compiled against an old header still reads every status correctly.

/// Outcome of a kvsieve call (`uint32_t` in C).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success; out-parameters were written.
    Ok = 0,
    /// A NULL pointer, a zero or mismatched size, or a value out of range was passed.
    InvalidArgument = 1,
    /// The config text is not valid TOML or has the wrong shape (unknown key, wrong type).
    ConfigParse = 2,
    /// The config parsed but a value or a combination of values is not allowed.
    ConfigInvalid = 3,
    /// A file could not be read.
    Io = 4,
    /// A Rust panic was caught at the ABI boundary; the handle involved should be dropped.
    Panic = 5,
    /// The feature this call needs (e.g. `cuda`) was not compiled into this build.
    NotCompiled = 6,
    /// The CUDA driver library (`libcuda.so`) or NVRTC could not be loaded.
    NoCudaDriver = 7,
    /// CUDA loaded but the requested device does not exist.
    NoDevice = 8,
    /// A CUDA driver, NVRTC or kernel launch call failed.
    CudaError = 9,
    /// The request is well-formed but not supported (layout, dtype, policy, device).
    Unsupported = 10,
    /// A caller-owned output buffer is too small; the message says how large it must be.
    BufferTooSmall = 11,
}

const ALL: [Status; 12] = [
    Status::Ok,
    Status::InvalidArgument,
    Status::ConfigParse,
    Status::ConfigInvalid,
    Status::Io,
    Status::Panic,
    Status::NotCompiled,
    Status::NoCudaDriver,
    Status::NoDevice,
    Status::CudaError,
    Status::Unsupported,
    Status::BufferTooSmall,
];

impl Status {
    /// Every status, in number order.
    pub fn all() -> &'static [Status] {
        &ALL
    }

    /// The status with this number, if there is one.
    pub fn from_u32(code: u32) -> Option<Status> {
        ALL.get(code as usize).copied()
    }

    /// The C name of the status, NUL-terminated.
    pub fn name(self) -> &'static std::ffi::CStr {
        match self {
            Status::Ok => c"KVS_STATUS_OK",
            Status::InvalidArgument => c"KVS_STATUS_INVALID_ARGUMENT",
            Status::ConfigParse => c"KVS_STATUS_CONFIG_PARSE",
            Status::ConfigInvalid => c"KVS_STATUS_CONFIG_INVALID",
            Status::Io => c"KVS_STATUS_IO",
            Status::Panic => c"KVS_STATUS_PANIC",
            Status::NotCompiled => c"KVS_STATUS_NOT_COMPILED",
            Status::NoCudaDriver => c"KVS_STATUS_NO_CUDA_DRIVER",
            Status::NoDevice => c"KVS_STATUS_NO_DEVICE",
            Status::CudaError => c"KVS_STATUS_CUDA_ERROR",
            Status::Unsupported => c"KVS_STATUS_UNSUPPORTED",
            Status::BufferTooSmall => c"KVS_STATUS_BUFFER_TOO_SMALL",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_and_fixed() {
        for (i, s) in Status::all().iter().enumerate() {
            assert_eq!(*s as u32, i as u32, "{s:?} moved");
            assert_eq!(Status::from_u32(i as u32), Some(*s));
        }
        assert_eq!(Status::from_u32(Status::all().len() as u32), None);
        // Spot-check numbers that callers may have hard-coded.
        assert_eq!(Status::InvalidArgument as u32, 1);
        assert_eq!(Status::Panic as u32, 5);
    }
}

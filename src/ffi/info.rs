//! Version and status introspection.

use super::boundary::{ffi_value_boundary, last_error_ptr};
use crate::status::Status;
use crate::version::{KVS_ABI_VERSION, VERSION_CSTR};
use std::ffi::c_char;

/// The library version, `"MAJOR.MINOR.PATCH"` (static storage; never free it).
#[no_mangle]
pub extern "C" fn kvs_version() -> *const c_char {
    ffi_value_boundary("kvs_version", c"".as_ptr(), || VERSION_CSTR.as_ptr())
}

/// The ABI version the library was built with; compare it with `KVS_ABI_VERSION` from the
/// header at start-up and refuse to run on a mismatch.
#[no_mangle]
pub extern "C" fn kvs_abi_version() -> u32 {
    ffi_value_boundary("kvs_abi_version", 0, || KVS_ABI_VERSION)
}

/// The name of a status (`"KVS_STATUS_OK"`, ...), or `"KVS_STATUS_UNKNOWN"` for a number this
/// build does not know (static storage; never free it).
#[no_mangle]
pub extern "C" fn kvs_status_str(status: u32) -> *const c_char {
    let unknown = c"KVS_STATUS_UNKNOWN".as_ptr();
    ffi_value_boundary("kvs_status_str", unknown, || {
        match Status::from_u32(status) {
            Some(s) => s.name().as_ptr(),
            None => unknown,
        }
    })
}

/// The message of the last failed kvsieve call on the calling thread, NUL-terminated, naming
/// the function, the argument or key and the fix; `""` when none has failed. The pointer stays
/// valid until the next failing call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn kvs_last_error() -> *const c_char {
    // Not through ffi_value_boundary: a panic there would overwrite the message being read.
    std::panic::catch_unwind(last_error_ptr).unwrap_or(c"".as_ptr())
}

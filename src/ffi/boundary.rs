//! The one place where Rust meets C: panic capture, last-error storage, argument checks.

use crate::error::{Error, Result};
use crate::status::Status;
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would truncate the C string silently; make them visible instead.
    let clean = CString::new(message.replace('\0', "\\0")).expect("NULs were replaced");
    // During thread teardown the slot may be gone; the status still tells what happened.
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = clean;
        }
    });
}

/// The message of the last failed call on this thread (empty when none failed).
pub fn last_error_message() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}

/// Pointer to this thread's last-error message, valid until the next failing call here. While
/// the thread is being torn down (its thread-locals gone) there is no message: `""`.
pub(super) fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR
        .try_with(|e| e.try_borrow().map(|m| m.as_ptr()).unwrap_or(c"".as_ptr()))
        .unwrap_or(c"".as_ptr())
}

/// Run `body` for the ABI function `name`: errors become their status and set the message,
/// a panic becomes `Status::Panic` and never unwinds into C.
pub(super) fn ffi_boundary(name: &str, body: impl FnOnce() -> Result<()>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.message));
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            set_last_error(&format!(
                "{name}: internal panic (a kvsieve bug, please report it): {what}"
            ));
            Status::Panic
        }
    }
}

/// The panic boundary of exports that return no status (`kvs_*_free`): a panic is recorded as
/// this thread's last error and never unwinds into C.
pub(super) fn ffi_void_boundary(name: &str, body: impl FnOnce()) {
    let _ = ffi_boundary(name, || {
        body();
        Ok(())
    });
}

/// The panic boundary of exports that return a value rather than a status: `fallback` when
/// `body` panics (the panic is recorded as this thread's last error).
pub(super) fn ffi_value_boundary<T>(name: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    let mut out = None;
    let _ = ffi_boundary(name, || {
        out = Some(body());
        Ok(())
    });
    out.unwrap_or(fallback)
}

/// Check that `ptr` is non-NULL and aligned for `T`; `name` is the C argument's name.
pub(super) fn check_ptr<T>(ptr: *const T, name: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::invalid_arg(format!("{name} is NULL")));
    }
    if (ptr as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::invalid_arg(format!(
            "{name} = {ptr:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// Check a `void *` that holds elements of `dtype`: non-NULL and aligned to the element size.
pub(super) fn check_typed_ptr(
    ptr: *const std::ffi::c_void,
    dtype: crate::kernels::DType,
    name: &str,
) -> Result<()> {
    check_ptr(ptr as *const u8, name)?;
    if ptr as usize % dtype.size() != 0 {
        return Err(Error::invalid_arg(format!(
            "{name} = {ptr:p} is not aligned to its {} elements",
            dtype.name()
        )));
    }
    Ok(())
}

/// Borrow `*ptr` after the NULL and alignment checks, or return `InvalidArgument` naming it.
macro_rules! arg_ref {
    ($ptr:expr, $name:literal) => {{
        let p = $ptr;
        $crate::ffi::boundary::check_ptr(p, $name)?;
        // SAFETY: non-NULL and aligned; the caller promises it points to a live value.
        unsafe { &*p }
    }};
}

/// A `(ptr, len)` pair as a slice: the pointer must be non-NULL (even for `len == 0`) and
/// aligned for the element type. Callers check `len` against the shapes they were given.
macro_rules! arg_slice {
    ($ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len as usize);
        $crate::ffi::boundary::check_ptr(p, $name)?;
        // SAFETY: non-NULL and aligned; the caller promises `n` readable elements.
        unsafe { std::slice::from_raw_parts(p, n) }
    }};
}

/// A `(ptr, len)` pair as a mutable slice, with the same checks as `arg_slice!`.
#[allow(unused_macros)] // used by the kernel entry points
macro_rules! arg_slice_mut {
    ($ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len as usize);
        $crate::ffi::boundary::check_ptr(p as *const _, $name)?;
        // SAFETY: non-NULL and aligned; the caller promises `n` writable elements it owns.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
    }};
}

/// Check an out-pointer up front, so a NULL is reported before any work is done.
macro_rules! arg_out {
    ($ptr:expr, $name:literal) => {{
        let p = $ptr;
        $crate::ffi::boundary::check_ptr(p as *const _, $name)?;
        p
    }};
}

/// A NUL-terminated C string argument as UTF-8.
pub(super) fn arg_cstr<'a>(ptr: *const std::ffi::c_char, name: &str) -> Result<&'a str> {
    check_ptr(ptr, name)?;
    // SAFETY: non-NULL; the caller promises a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map_err(|e| Error::invalid_arg(format!("{name} is not valid UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_a_status_and_a_message() {
        let s = ffi_boundary("kvs_test", || panic!("boom {}", 7));
        assert_eq!(s, Status::Panic);
        let m = last_error_message();
        assert!(m.contains("kvs_test") && m.contains("boom 7"), "{m}");
    }

    #[test]
    fn errors_keep_their_status_and_success_keeps_the_last_message() {
        let s = ffi_boundary("kvs_test", || Err(Error::invalid_arg("x is NULL")));
        assert_eq!(s, Status::InvalidArgument);
        assert_eq!(last_error_message(), "kvs_test: x is NULL");
        assert_eq!(ffi_boundary("kvs_ok", || Ok(())), Status::Ok);
        assert_eq!(last_error_message(), "kvs_test: x is NULL");
    }

    #[test]
    fn messages_are_per_thread() {
        let _ = ffi_boundary("kvs_main", || Err(Error::invalid_arg("main thread")));
        std::thread::spawn(|| {
            assert_eq!(last_error_message(), "");
            let _ = ffi_boundary("kvs_other", || Err(Error::invalid_arg("other thread")));
        })
        .join()
        .unwrap();
        assert_eq!(last_error_message(), "kvs_main: main thread");
    }

    #[test]
    fn exports_without_a_status_catch_panics_too() {
        ffi_void_boundary("kvs_thing_free", || panic!("in drop"));
        assert!(last_error_message().contains("kvs_thing_free"));
        assert_eq!(
            ffi_value_boundary("kvs_value", 7u32, || panic!("no value")),
            7
        );
        assert!(last_error_message().contains("kvs_value"));
        assert_eq!(ffi_value_boundary("kvs_value", 7u32, || 3), 3);
    }

    #[test]
    fn misaligned_and_null_pointers_are_refused() {
        let v = [0u32; 2];
        let odd = (v.as_ptr() as *const u8).wrapping_add(1) as *const u32;
        assert!(check_ptr(odd, "keep").unwrap_err().message.contains("keep"));
        assert!(check_ptr(std::ptr::null::<u32>(), "keep")
            .unwrap_err()
            .message
            .contains("keep is NULL"));
        assert!(check_ptr(v.as_ptr(), "keep").is_ok());
    }
}

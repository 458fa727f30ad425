//! NVRTC, loaded by kvsieve itself: the one that matches the driver.
//!
//! cudarc picks NVRTC's file name when it is built (`libnvrtc.so.12` for CUDA 12) and cannot
//! load a CUDA 13 stack's `libnvrtc.so.13`; and PTX from an NVRTC newer than the driver does not
//! load (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`). So kvsieve opens NVRTC here, newest major the
//! driver supports first, and compiles the kernels to the device's own SASS (a cubin), which the
//! driver loads without JIT-compiling PTX. The C API used is the same in NVRTC 12 and 13.
//!
//! Where it looks, in order: `$KVSIEVE_NVRTC` (paths or names separated by `:`; only those, when
//! set), else
//! `libnvrtc.so.<major>` for each major from the driver's down to 12, then `libnvrtc.so`, each by
//! the dynamic loader's search (`LD_LIBRARY_PATH`, the loader cache). Any NVRTC newer than the
//! driver is passed over. The vLLM plugin, when `KVSIEVE_NVRTC` is not set, sets it to the NVRTCs
//! of the Python environment (the `nvidia-cuda-nvrtc-cu12` / cu13 wheels torch depends on) followed
//! by those names.

use crate::error::{Error, Result};
use crate::status::Status;
use libloading::{Library, Symbol};
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// Oldest NVRTC major kvsieve looks for.
const OLDEST_MAJOR: i32 = 12;

type Prog = *mut c_void;
type NvrtcResult = c_int;

/// An opened NVRTC: its path as found, its version, and the library (with its builtins, when
/// they were loaded from its directory).
pub struct Nvrtc {
    lib: Library,
    _builtins: Option<Library>,
    pub path: String,
    pub version: (i32, i32),
}

/// The file names to try for a driver of CUDA major `driver_major` (None: no driver to ask).
pub fn candidates(driver_major: Option<i32>, env: Option<&str>) -> Vec<String> {
    if let Some(list) = env.filter(|p| !p.is_empty()) {
        return list
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
    }
    let newest = driver_major.unwrap_or(13).max(OLDEST_MAJOR);
    let mut out: Vec<String> = (OLDEST_MAJOR..=newest)
        .rev()
        .map(|m| format!("libnvrtc.so.{m}"))
        .collect();
    out.push("libnvrtc.so".into());
    out
}

impl Nvrtc {
    /// Open the first NVRTC of `candidates(driver_major, $KVSIEVE_NVRTC)` that loads and is not
    /// newer than the driver; the error lists what was tried and why each was passed over.
    pub fn open(driver_major: Option<i32>) -> Result<Nvrtc> {
        let env = std::env::var("KVSIEVE_NVRTC").ok();
        Nvrtc::open_among(&candidates(driver_major, env.as_deref()), driver_major)
    }

    /// `open` over the given file names or paths, in order.
    pub fn open_among(names: &[String], driver_major: Option<i32>) -> Result<Nvrtc> {
        let mut tried = Vec::new();
        for name in names {
            // SAFETY: loading NVRTC runs no code of ours; its initialisers are the vendor's.
            let lib = match unsafe { Library::new(name.as_str()) } {
                Ok(lib) => lib,
                Err(_) => {
                    tried.push(format!("{name} (not found)"));
                    continue;
                }
            };
            let mut nv = Nvrtc {
                lib,
                _builtins: None,
                path: name.clone(),
                version: (0, 0),
            };
            match nv.query_version() {
                Ok(v) => nv.version = v,
                Err(e) => {
                    tried.push(format!("{name} ({})", e.message));
                    continue;
                }
            }
            if let Some(d) = driver_major.filter(|&d| nv.version.0 > d) {
                tried.push(format!(
                    "{name} (NVRTC {}.{} is newer than the driver's CUDA {d}: its output would not load)",
                    nv.version.0, nv.version.1
                ));
                continue;
            }
            nv._builtins = nv.builtins_beside();
            return Ok(nv);
        }
        Err(Error::new(
            Status::NoCudaDriver,
            format!(
                "no usable NVRTC for a CUDA {} driver (tried {}); install the NVRTC of your CUDA version \
                 (`pip install nvidia-cuda-nvrtc-cu12`, or the cu13 wheel for a CUDA 13 driver) and put its lib \
                 directory on LD_LIBRARY_PATH, or set KVSIEVE_NVRTC to the libnvrtc.so.N file",
                driver_major.map_or("(unknown)".into(), |d| d.to_string()),
                tried.join("; ")
            ),
        ))
    }

    /// NVRTC opens `libnvrtc-builtins.so.M.m` by name when it compiles; a pip wheel's NVRTC
    /// (torch's) is not on the loader's path, so its builtins are loaded first from beside it
    /// (the loader then hands NVRTC the library already loaded under that name).
    fn builtins_beside(&self) -> Option<Library> {
        let dir = std::path::Path::new(&self.path).parent()?;
        if dir.as_os_str().is_empty() {
            return None; // found by name: its builtins are on the same search path
        }
        let file = dir.join(format!(
            "libnvrtc-builtins.so.{}.{}",
            self.version.0, self.version.1
        ));
        // SAFETY: NVRTC's own companion library; its initialisers are the vendor's.
        file.exists()
            .then(|| unsafe { Library::new(&file) }.ok())
            .flatten()
    }

    fn sym<T>(&self, name: &str) -> Result<Symbol<'_, T>> {
        // SAFETY: each symbol is looked up with the signature of NVRTC's C API (same in 12, 13).
        unsafe { self.lib.get::<T>(name.as_bytes()) }.map_err(|e| {
            Error::new(
                Status::NoCudaDriver,
                format!("{}: no {name} ({e})", self.path),
            )
        })
    }

    fn query_version(&self) -> Result<(i32, i32)> {
        let f = self
            .sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult>("nvrtcVersion")?;
        let (mut a, mut b) = (0, 0);
        // SAFETY: two writable ints.
        self.status("nvrtcVersion", unsafe { f(&mut a, &mut b) })?;
        Ok((a, b))
    }

    /// The architectures this NVRTC compiles for, as compute capabilities times 10 (90 = 9.0).
    pub fn supported_archs(&self) -> Result<Vec<i32>> {
        let num = self
            .sym::<unsafe extern "C" fn(*mut c_int) -> NvrtcResult>("nvrtcGetNumSupportedArchs")?;
        let get =
            self.sym::<unsafe extern "C" fn(*mut c_int) -> NvrtcResult>("nvrtcGetSupportedArchs")?;
        let mut n = 0;
        // SAFETY: a writable int, then a buffer of that many.
        self.status("nvrtcGetNumSupportedArchs", unsafe { num(&mut n) })?;
        let mut out = vec![0; n.max(0) as usize];
        self.status("nvrtcGetSupportedArchs", unsafe { get(out.as_mut_ptr()) })?;
        Ok(out)
    }

    fn status(&self, what: &str, r: NvrtcResult) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let text = self
            .sym::<unsafe extern "C" fn(NvrtcResult) -> *const c_char>("nvrtcGetErrorString")
            .ok()
            // SAFETY: NVRTC returns a static NUL-terminated string for any result.
            .map(|f| {
                unsafe { CStr::from_ptr(f(r)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        Err(Error::new(
            Status::CudaError,
            format!(
                "{what} failed with {r} {text} (NVRTC {}.{}, {})",
                self.version.0, self.version.1, self.path
            ),
        ))
    }

    /// Compile `src` with `options`; `cubin` true returns the SASS image (the options must name
    /// a real architecture, `sm_XX`), false the PTX text (NUL-terminated).
    pub fn compile(
        &self,
        src: &str,
        name: &str,
        options: &[String],
        cubin: bool,
    ) -> Result<Vec<u8>> {
        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> NvrtcResult;
        type Compile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> NvrtcResult;
        type Size = unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult;
        type Get = unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult;
        type Destroy = unsafe extern "C" fn(*mut Prog) -> NvrtcResult;
        let bad = |e| Error::invalid_arg(format!("kernel source or option holds a NUL: {e}"));
        let src_c = CString::new(src).map_err(bad)?;
        let name_c = CString::new(name).map_err(bad)?;
        let opts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<std::result::Result<_, _>>()
            .map_err(bad)?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let create = self.sym::<Create>("nvrtcCreateProgram")?;
        let compile = self.sym::<Compile>("nvrtcCompileProgram")?;
        let destroy = self.sym::<Destroy>("nvrtcDestroyProgram")?;
        let (size_name, get_name) = if cubin {
            ("nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        } else {
            ("nvrtcGetPTXSize", "nvrtcGetPTX")
        };
        let size = self.sym::<Size>(size_name)?;
        let get = self.sym::<Get>(get_name)?;
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: NUL-terminated source and name, no headers.
        self.status("nvrtcCreateProgram", unsafe {
            create(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        })?;
        let out = (|| {
            // SAFETY: a live program and `opts.len()` NUL-terminated options.
            let r = unsafe { compile(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
            if r != 0 {
                let log = self.log(prog).unwrap_or_default();
                return Err(Error::new(
                    Status::CudaError,
                    format!(
                        "NVRTC {}.{} ({}) failed to compile {name} with {options:?}: {}",
                        self.version.0,
                        self.version.1,
                        self.path,
                        log.trim()
                    ),
                ));
            }
            let mut n = 0usize;
            // SAFETY: a compiled program; then a buffer of the size it reported.
            self.status(size_name, unsafe { size(prog, &mut n) })?;
            let mut buf = vec![0u8; n];
            self.status(get_name, unsafe { get(prog, buf.as_mut_ptr().cast()) })?;
            Ok(buf)
        })();
        // SAFETY: the program made above, destroyed once.
        let _ = unsafe { destroy(&mut prog) };
        out
    }

    fn log(&self, prog: Prog) -> Result<String> {
        let size = self.sym::<unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult>(
            "nvrtcGetProgramLogSize",
        )?;
        let get = self
            .sym::<unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult>("nvrtcGetProgramLog")?;
        let mut n = 0usize;
        // SAFETY: a live program; a buffer of the size it reported.
        self.status("nvrtcGetProgramLogSize", unsafe { size(prog, &mut n) })?;
        let mut buf = vec![0u8; n.max(1)];
        self.status("nvrtcGetProgramLog", unsafe {
            get(prog, buf.as_mut_ptr().cast())
        })?;
        Ok(String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_major_is_tried_first_then_older_then_the_unversioned_name() {
        assert_eq!(
            candidates(Some(13), None),
            ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        );
        assert_eq!(
            candidates(Some(12), None),
            ["libnvrtc.so.12", "libnvrtc.so"]
        );
        // A future driver: every major down to 12.
        assert_eq!(candidates(Some(14), None)[0], "libnvrtc.so.14");
        // No driver (compiling only): the newest known first.
        assert_eq!(candidates(None, None)[0], "libnvrtc.so.13");
        // KVSIEVE_NVRTC names the one file to use.
        assert_eq!(
            candidates(Some(12), Some("/x/libnvrtc.so.13")),
            ["/x/libnvrtc.so.13"]
        );
        assert_eq!(candidates(Some(12), Some(""))[0], "libnvrtc.so.12");
    }
}

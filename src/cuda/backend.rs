//! The CUDA backend handle: context, the engine's stream, the loaded kernels, and a pooled
//! workspace that grows to the largest call and is then reused (no allocation in steady state).

use super::source;
use crate::error::{Error, Result};
use crate::status::Status;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

pub(crate) fn cuda_err(what: &str, e: DriverError) -> Error {
    Error::new(Status::CudaError, format!("{what}: {e:?}"))
}

pub struct CudaBackend {
    pub(super) stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    pub(super) state: Mutex<State>,
}

/// Calls that can be in flight between two synchronisations before the backend drains (waits
/// for them and records their outcome) by itself to reuse their error slots.
pub(super) const ERROR_SLOTS: usize = 256;

/// A caller's host out-param (`*num_released`, `*num_kept`): on this backend it is written when
/// the call's device-side checks are known to have passed, at `kvs_kernels_synchronize`.
pub(super) struct HostOut(pub(super) *mut u32);

// SAFETY: the caller keeps the pointer alive and unread until kvs_kernels_synchronize returns
// (documented on kvs_kernels_new_cuda); the backend writes it once, under its lock.
unsafe impl Send for HostOut {}

/// One call enqueued since the last drain: its entry point (for the report) and the host
/// out-param it writes on success.
pub(super) struct Call {
    pub(super) name: &'static str,
    pub(super) out: Option<(HostOut, u32)>,
}

/// Device memory the backend owns; guarded so calls from several threads serialise.
pub(super) struct State {
    /// Scratch for compaction (gathered tokens), SnapKV (logits, stats, sums), block selection.
    work: Option<CudaSlice<u8>>,
    /// One `[code, index]` slot per call since the last drain: a call's kernels stop on their own
    /// call's failure only, so one bad call never silences the calls after it.
    pub(super) errs: CudaSlice<u32>,
    /// The calls holding slots `0..calls.len()`, in order.
    pub(super) calls: Vec<Call>,
    /// Calls numbered before the last drain since the last synchronize (for the report).
    pub(super) drained: usize,
    /// Failures found by drains since the last synchronize, reported by it.
    pub(super) failed: Vec<String>,
    /// Per physical block: the epoch of the last compaction that saw it (duplicate check).
    marks: Option<CudaSlice<u32>>,
    pub(super) epoch: u32,
}

impl CudaBackend {
    /// Open device `ordinal` and compile the kernels for it. `stream` is the engine's `CUstream`
    /// (NULL: the device's default stream).
    pub fn new(ordinal: u32, stream: *mut c_void) -> Result<CudaBackend> {
        // SAFETY: only probes for the shared library; cudarc panics on first use without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::new(
                Status::NoCudaDriver,
                "libcuda.so could not be loaded: no NVIDIA driver on this machine; use kvs_kernels_new_cpu",
            ));
        }
        let count = CudaContext::device_count().map_err(|e| match e.0 {
            cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                Error::new(Status::NoDevice, "the CUDA driver reports no device")
            }
            _ => cuda_err("cuInit/cuDeviceGetCount", e),
        })?;
        if ordinal as i32 >= count {
            return Err(Error::new(
                Status::NoDevice,
                format!("CUDA device {ordinal} does not exist ({count} device(s) present)"),
            ));
        }
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| cuda_err("creating the CUDA context", e))?;
        // kvsieve passes raw device pointers that the engine owns; cudarc's per-allocation event
        // tracking would only add synchronisation.
        // SAFETY: called before any allocation or launch on this context by kvsieve.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("reading the compute capability", e))?;
        let ptx = source::compile(source::arch_for(major, minor)?)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| cuda_err("loading the compiled kernels", e))?;
        let mut funcs = HashMap::new();
        for &name in source::KERNEL_NAMES {
            let f = module.load_function(name).map_err(|e| cuda_err(name, e))?;
            funcs.insert(name, f);
        }
        let stream = if stream.is_null() {
            ctx.default_stream()
        } else {
            // SAFETY: the caller hands us a live stream of this device and keeps it alive while
            // the backend exists (documented on kvs_kernels_new_cuda).
            unsafe { ctx.wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream) }
        };
        let errs = stream
            .alloc_zeros::<u32>(2 * ERROR_SLOTS)
            .map_err(|e| cuda_err("allocating the error slots", e))?;
        Ok(CudaBackend {
            stream,
            funcs,
            state: Mutex::new(State {
                work: None,
                errs,
                calls: Vec::with_capacity(ERROR_SLOTS),
                drained: 0,
                failed: Vec::new(),
                marks: None,
                epoch: 0,
            }),
        })
    }

    pub(super) fn func(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} not loaded"))
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// A device scratch buffer of at least `bytes`, grown (never shrunk) as calls need.
    pub(super) fn work(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<u64> {
        let need = bytes.max(256);
        if self.work.as_ref().is_none_or(|w| w.len() < need) {
            self.work = None; // free before allocating the larger one
                              // SAFETY: scratch is fully written by a kernel before it is read.
            let w = unsafe { stream.alloc::<u8>(need) }
                .map_err(|e| cuda_err("growing the workspace", e))?;
            self.work = Some(w);
        }
        Ok(ptr(self.work.as_ref().expect("just allocated"), stream))
    }

    /// The duplicate-check marks for `num_blocks` blocks and this call's epoch.
    pub(super) fn marks(
        &mut self,
        stream: &Arc<CudaStream>,
        num_blocks: usize,
    ) -> Result<(u64, u32)> {
        if self.marks.as_ref().is_none_or(|m| m.len() < num_blocks) {
            self.marks = None;
            let m = stream
                .alloc_zeros::<u32>(num_blocks)
                .map_err(|e| cuda_err("allocating block marks", e))?;
            self.marks = Some(m);
            self.epoch = 0;
        }
        self.epoch = self.epoch.wrapping_add(1).max(1);
        Ok((
            ptr(self.marks.as_ref().expect("just allocated"), stream),
            self.epoch,
        ))
    }

    /// The error slot of the call being enqueued (the last one begun).
    pub(super) fn err_ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        let slot = self.calls.len().saturating_sub(1) as u64;
        ptr(&self.errs, stream) + slot * 8
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

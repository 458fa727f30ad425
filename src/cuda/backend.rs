//! The CUDA backend handle: context, the engine's stream, the loaded kernels, and a pooled
//! workspace that grows to the largest call and is then reused (no allocation in steady state).

use super::nvrtc::Nvrtc;
use super::source;
use crate::error::{Error, Result};
use crate::status::Status;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

pub(crate) fn cuda_err(what: &str, e: DriverError) -> Error {
    Error::new(Status::CudaError, format!("{what}: {e:?}"))
}

pub struct CudaBackend {
    pub(super) stream: Arc<CudaStream>,
    /// "CUDA device N (name, compute capability X.Y), driver CUDA A.B", for messages.
    description: String,
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

/// One call enqueued since the last drain: its entry point (for the report), the host out-param
/// it writes on success, and whether it failed on the host after it was begun (the caller got
/// that error; kernels it launched may still write its slot, so the slot stays taken).
pub(super) struct Call {
    name: &'static str,
    out: Option<(HostOut, u32)>,
    abandoned: bool,
}

/// The calls holding error slots `0..calls.len()` since the last drain, and what each owes its
/// caller at the next synchronize. Kept apart from the device state so its rules are tested
/// without a GPU: a call's out-param is written only if the call returned OK and its device
/// checks passed; a call that returned an error is neither reported again nor numbered.
#[derive(Default)]
pub(super) struct Ledger {
    calls: Vec<Call>,
    /// Calls numbered by drains since the last synchronize (the report numbers calls from it).
    numbered: usize,
    /// Failures found by drains since the last synchronize.
    failed: Vec<String>,
}

impl Ledger {
    pub(super) fn full(&self) -> bool {
        self.calls.len() == ERROR_SLOTS
    }

    pub(super) fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Take the next error slot for call `name`; returns the slot.
    pub(super) fn begin(&mut self, name: &'static str) -> usize {
        assert!(!self.full(), "drain before beginning a call");
        self.calls.push(Call {
            name,
            out: None,
            abandoned: false,
        });
        self.calls.len() - 1
    }

    /// The call just begun enqueued everything: at the synchronize that finds its checks passed,
    /// `*out.0 = out.1`.
    pub(super) fn enqueued(&mut self, out: Option<(HostOut, u32)>) {
        self.calls.last_mut().expect("a call was begun").out = out;
    }

    /// The call just begun failed on the host (its caller gets that error now).
    pub(super) fn abandon(&mut self) {
        let call = self.calls.last_mut().expect("a call was begun");
        call.abandoned = true;
        call.out = None;
    }

    /// Record the outcome of every call from its `[code, index]` words and free the slots.
    pub(super) fn settle(&mut self, words: &[u32]) {
        for (i, call) in self.calls.drain(..).enumerate() {
            if call.abandoned {
                continue;
            }
            self.numbered += 1;
            let (code, index) = (words[2 * i], words[2 * i + 1]);
            if code != 0 {
                let what = ERR_NAMES
                    .get(code as usize)
                    .copied()
                    .unwrap_or("unknown device error (index");
                self.failed.push(format!(
                    "call {} since the last synchronize ({}): {what} {index}); it wrote nothing",
                    self.numbered, call.name
                ));
            } else if let Some((HostOut(p), value)) = call.out {
                // SAFETY: the caller keeps the out-param alive until synchronize (documented).
                unsafe { *p = value };
            }
        }
    }

    /// The failures since the last synchronize; numbering starts again.
    pub(super) fn take_failed(&mut self) -> Vec<String> {
        self.numbered = 0;
        std::mem::take(&mut self.failed)
    }
}

/// What each device error code means (`ERR_*` in kernels/kvsieve.cu), before its index (the
/// block id itself for a repeat: the same whatever order the threads ran in).
const ERR_NAMES: [&str; 11] = [
    "",
    "a block id of the row is out of range (row index",
    "a block id appears twice in the row (block id",
    "a keep position is outside [protected_len, cached_len) (keep index",
    "a keep list is not strictly ascending (keep index",
    "indptr must start at 0, not decrease and end at nnz (indptr index",
    "a non-empty sequence's last_page_len is below 1 (sequence",
    "a dest block id is out of range (dest index",
    "a dest block id is in the row or twice in dest; pass fresh blocks (block id",
    "a Quest row's blocks are not in 1..=stride, its keep is below sink_blocks + 1, or its kept blocks \
     exceed out_stride (row",
    "a block id of a Quest row is out of range (row",
];

/// Device memory the backend owns; guarded so calls from several threads serialise.
pub(super) struct State {
    /// Scratch for compaction (gathered tokens), SnapKV (logits, stats, sums), block selection.
    work: Option<CudaSlice<u8>>,
    /// One `[code, index]` slot per call since the last drain: a call's kernels stop on their own
    /// call's failure only, so one bad call never silences the calls after it.
    pub(super) errs: CudaSlice<u32>,
    /// The calls holding those slots.
    pub(super) ledger: Ledger,
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
        let (dmaj, dmin) = driver_version()?;
        let description = format!(
            "CUDA device {ordinal} ({}, compute capability {major}.{minor}), driver CUDA {dmaj}.{dmin}",
            ctx.name().unwrap_or_else(|_| "name unknown".to_string())
        );
        let module = load_kernels(&ctx, &description, dmaj, major, minor)?;
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
            description,
            funcs,
            state: Mutex::new(State {
                work: None,
                errs,
                ledger: Ledger::default(),
                marks: None,
                epoch: 0,
            }),
        })
    }

    /// The stream the backend enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device and driver, as messages name them.
    pub fn description(&self) -> &str {
        &self.description
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

/// The driver's CUDA version as (major, minor), e.g. (12, 9).
pub fn driver_version() -> Result<(i32, i32)> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: a writable int; the driver library was found by the caller.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| cuda_err("cuDriverGetVersion", e))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Compile the kernels for the device with the NVRTC that matches the driver and load them;
/// every failure names the device, the driver, the NVRTC and what was loaded.
/// `device` is the backend's description (device, compute capability, driver), `driver_major`
/// the driver's CUDA major version.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    device: &str,
    driver_major: i32,
    major: i32,
    minor: i32,
) -> Result<Arc<CudaModule>> {
    let nvrtc = Nvrtc::open(Some(driver_major))?;
    let target = source::target_for(major, minor, &nvrtc.supported_archs()?)?;
    let image = source::compile(&nvrtc, target)?;
    let what = format!(
        "{device}, NVRTC {}.{} ({}), {}",
        nvrtc.version.0,
        nvrtc.version.1,
        nvrtc.path,
        target.arch()
    );
    let loaded = match target {
        source::Target::Sass(_) => Ptx::from_binary(image),
        source::Target::Ptx(_) => Ptx::from_src(
            String::from_utf8_lossy(&image)
                .trim_end_matches('\0')
                .to_string(),
        ),
    };
    ctx.load_module(loaded).map_err(|e| {
        Error::new(
            Status::CudaError,
            format!("loading kvsieve's kernels failed on {what}: {e:?}"),
        )
    })
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

    /// The device address of error slot `slot`.
    pub(super) fn err_ptr(&self, stream: &Arc<CudaStream>, slot: usize) -> u64 {
        ptr(&self.errs, stream) + slot as u64 * 8
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words of `n` slots, `failed` ones set to (code 3, index 7).
    fn words(n: usize, failed: &[usize]) -> Vec<u32> {
        let mut w = vec![0; 2 * n];
        for &i in failed {
            w[2 * i] = 3;
            w[2 * i + 1] = 7;
        }
        w
    }

    #[test]
    fn out_params_are_written_only_for_calls_that_returned_ok_and_passed() {
        let (mut a, mut b, mut c) = (11u32, 22u32, 33u32);
        let mut l = Ledger::default();
        l.begin("kvs_compact");
        l.enqueued(Some((HostOut(&mut a), 1)));
        // Begun, then a host-side failure (workspace growth, a launch error): the caller got
        // the error, so its out-param keeps what the caller put there, even though its slot
        // reads "passed".
        l.begin("kvs_compact");
        l.abandon();
        l.begin("kvs_select_blocks_row");
        l.enqueued(Some((HostOut(&mut b), 2)));
        l.begin("kvs_compact");
        l.enqueued(Some((HostOut(&mut c), 3)));
        l.settle(&words(4, &[3]));
        assert_eq!((a, b, c), (1, 2, 33));
        // The abandoned call is not numbered: the caller counts the calls that returned OK.
        let failed = l.take_failed();
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].starts_with("call 3 since the last synchronize (kvs_compact)"),
            "{}",
            failed[0]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn numbering_runs_across_drains_until_a_synchronize() {
        let mut l = Ledger::default();
        for _ in 0..ERROR_SLOTS {
            l.begin("kvs_score_knorm");
            l.enqueued(None);
        }
        assert!(l.full());
        l.settle(&words(ERROR_SLOTS, &[]));
        l.begin("kvs_score_knorm");
        l.abandon();
        l.begin("kvs_score_snapkv");
        l.enqueued(None);
        l.settle(&words(2, &[0, 1]));
        let failed = l.take_failed();
        assert_eq!(
            failed.len(),
            1,
            "an abandoned call is not reported twice: {failed:?}"
        );
        assert!(
            failed[0].starts_with(&format!("call {} since", ERROR_SLOTS + 1)),
            "{}",
            failed[0]
        );
        l.begin("kvs_score_knorm");
        l.enqueued(None);
        l.settle(&words(1, &[0]));
        assert!(
            l.take_failed()[0].starts_with("call 1 since"),
            "numbering restarts at synchronize"
        );
    }
}

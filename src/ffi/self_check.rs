//! The CUDA backend's start-up self-check: before `kvs_kernels_new_cuda` hands out a handle, a
//! small probe is scored (knorm, SnapKV), selected and compacted through the CUDA kernels on the
//! device and through the CPU reference kernels on a host copy, in every dtype and both
//! layouts, and the results compared: scores within 1e-3 relative, keep lists equal, K and V
//! bit for bit (the tolerances of tests/cuda_parity.rs). A wrong kernel on the user's GPU, a
//! driver or NVRTC that miscompiles, fails here, naming the call, dtype, layout, device and
//! driver, instead of corrupting caches later. It costs a few small launches.

use super::kernels::{
    kvs_compact, kvs_kernels_synchronize, kvs_score_knorm, kvs_score_snapkv, kvs_select_tokens,
    KvsKernels, SequenceDesc, SnapKvArgs, TokenSelectArgs,
};
use crate::error::{Error, Result};
use crate::kernels::{DType, KvCacheDesc, Layout};
use crate::status::Status;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use std::ffi::c_void;
use std::sync::Arc;

const BLOCKS: usize = 6;
const BLOCK_SIZE: usize = 16;
const HEADS: usize = 2;
const DIM: usize = 32;
const CACHED: usize = 90; // the last block partly filled
const PROTECTED: usize = BLOCK_SIZE; // one protected block
const SELECTED: usize = 40;
const SINKS: usize = 4;
const TAIL: usize = 8;
const WINDOW: usize = 3;
const Q_HEADS: usize = 4;
const ROW: [i32; BLOCKS] = [5, 3, 1, 0, 4, 2];

/// Deterministic values in (-1, 1) of each dtype (finite by construction).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32 // the high 32 bits: every sign and exponent pattern
    }
    fn words(&mut self, dtype: DType, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| match dtype {
                DType::F32 => (self.next() as f32 / u32::MAX as f32 * 2.0 - 1.0).to_bits(),
                // Exponents capped below 1.0: finite halves and bfloat16s, two per word.
                DType::F16 => self.next() & 0xbbff_bbff,
                DType::Bf16 => self.next() & 0xbf7f_bf7f,
            })
            .collect()
    }
}

struct Probe<'a> {
    gpu: &'a KvsKernels,
    cpu: &'a KvsKernels,
    stream: &'a Arc<CudaStream>,
    device: &'a str,
}

fn cuda(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::new(Status::CudaError, format!("{what}: {e:?}"))
}

impl Probe<'_> {
    fn up<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| cuda("self-check upload", e))
    }
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(|e| cuda("self-check allocation", e))
    }
    fn down<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        self.sync()?;
        self.stream
            .clone_dtoh(s)
            .map_err(|e| cuda("self-check download", e))
    }
    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(self.stream).0
    }
    fn sync(&self) -> Result<()> {
        // SAFETY: a live handle.
        status(
            unsafe { kvs_kernels_synchronize(self.gpu) },
            "kvs_kernels_synchronize",
        )
    }
    fn mismatch(&self, call: &str, layout: Layout, dtype: DType, what: String) -> Error {
        Error::new(
            Status::CudaError,
            format!(
                "kvsieve's CUDA self-check failed: {call} on a {layout:?} {} cache differs from the CPU reference \
                 ({what}) on {}; this device cannot run kvsieve's kernels correctly (serve without kvsieve: unset \
                 KVSIEVE_CONFIG, or use kvs_kernels_new_cpu) and report it with this message",
                dtype.name(),
                self.device
            ),
        )
    }

    /// One dtype and layout: knorm, selection, compaction and SnapKV, device against host.
    fn check(&self, layout: Layout, dtype: DType, rng: &mut Lcg) -> Result<()> {
        let words = (BLOCKS * BLOCK_SIZE * HEADS * DIM * dtype.size()).div_ceil(4);
        let (mut k, mut v) = (rng.words(dtype, words), rng.words(dtype, words));
        let (dk, dv) = (self.up(&k)?, self.up(&v)?);
        let desc = |k: *mut c_void, v: *mut c_void, device: u32| KvCacheDesc {
            k,
            v,
            dtype: dtype as u32,
            layout: layout as u32,
            device,
            num_blocks: BLOCKS as u32,
            block_size: BLOCK_SIZE as u32,
            num_kv_heads: HEADS as u32,
            head_dim: DIM as u32,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        };
        let hdesc = desc(k.as_mut_ptr().cast(), v.as_mut_ptr().cast(), 0);
        let ddesc = desc(
            self.ptr(&dk) as *mut c_void,
            self.ptr(&dv) as *mut c_void,
            1,
        );
        let drow = self.up(&ROW)?;
        let seq = |row: *const i32| SequenceDesc {
            row,
            row_len: BLOCKS as u32,
            cached_len: CACHED as u32,
            protected_len: PROTECTED as u32,
        };
        let (hseq, dseq) = (seq(ROW.as_ptr()), seq(self.ptr(&drow) as *const i32));

        // Key-norm scores.
        let n = HEADS * CACHED;
        let mut hscores = vec![0f32; n];
        let dscores = self.zeros::<f32>(n)?;
        // SAFETY: every pointer is a live buffer of the length passed, on the handle's device.
        unsafe {
            status(
                kvs_score_knorm(self.cpu, &hdesc, &hseq, hscores.as_mut_ptr(), n),
                "knorm (CPU)",
            )?;
            status(
                kvs_score_knorm(self.gpu, &ddesc, &dseq, self.ptr(&dscores) as *mut f32, n),
                "kvs_score_knorm",
            )?;
        }
        compare_scores(&self.down(&dscores)?, &hscores)
            .map_err(|w| self.mismatch("kvs_score_knorm", layout, dtype, w))?;

        // Selection from the same (host) scores on both sides: equal keep lists.
        let args = TokenSelectArgs {
            cached_len: CACHED as u32,
            protected_len: PROTECTED as u32,
            sink_tokens: SINKS as u32,
            protected_tail: TAIL as u32,
            selected: SELECTED as u32,
        };
        let m = HEADS * SELECTED;
        let mut hkeep = vec![0u32; m];
        let (dsame, dkeep) = (self.up(&hscores)?, self.zeros::<u32>(m)?);
        // SAFETY: as above.
        unsafe {
            let s = kvs_select_tokens(
                self.cpu,
                hscores.as_ptr(),
                n,
                HEADS as u32,
                &args,
                hkeep.as_mut_ptr(),
                m,
            );
            status(s, "select (CPU)")?;
            let s = kvs_select_tokens(
                self.gpu,
                self.ptr(&dsame) as *const f32,
                n,
                HEADS as u32,
                &args,
                self.ptr(&dkeep) as *mut u32,
                m,
            );
            status(s, "kvs_select_tokens")?;
        }
        let got = self.down(&dkeep)?;
        if let Some(i) = (0..m).find(|&i| got[i] != hkeep[i]) {
            let w = format!("keep[{i}]: device {}, CPU {}", got[i], hkeep[i]);
            return Err(self.mismatch("kvs_select_tokens", layout, dtype, w));
        }

        // Compaction with the CPU's keep list: K and V bit for bit.
        let dkeep = self.up(&hkeep)?;
        let mut hreleased = [0i32; BLOCKS];
        let dreleased = self.zeros::<i32>(BLOCKS)?;
        let (mut hn, mut dn) = (0u32, 0u32);
        // SAFETY: as above; `dn` outlives the synchronize below.
        unsafe {
            let s = kvs_compact(
                self.cpu,
                &hdesc,
                &hseq,
                hkeep.as_ptr(),
                m,
                SELECTED as u32,
                hreleased.as_mut_ptr(),
                BLOCKS,
                &mut hn,
            );
            status(s, "compact (CPU)")?;
            let s = kvs_compact(
                self.gpu,
                &ddesc,
                &dseq,
                self.ptr(&dkeep) as *const u32,
                m,
                SELECTED as u32,
                self.ptr(&dreleased) as *mut i32,
                BLOCKS,
                &mut dn,
            );
            status(s, "kvs_compact")?;
        }
        for (name, dev, host) in [("K", &dk, &k), ("V", &dv, &v)] {
            let got = self.down(dev)?;
            if let Some(i) = (0..got.len()).find(|&i| got[i] != host[i]) {
                let w = format!(
                    "{name} word {i}: device {:#010x}, CPU {:#010x}",
                    got[i], host[i]
                );
                return Err(self.mismatch("kvs_compact", layout, dtype, w));
            }
        }
        if dn != hn || self.down(&dreleased)?[..dn as usize] != hreleased[..hn as usize] {
            let w = format!("{dn} released blocks on the device, {hn} on the CPU");
            return Err(self.mismatch("kvs_compact", layout, dtype, w));
        }

        // SnapKV on the compacted cache, f32 queries.
        let q: Vec<f32> = (0..WINDOW * Q_HEADS * DIM)
            .map(|_| rng.next() as f32 / u32::MAX as f32 * 2.0 - 1.0)
            .collect();
        let dq = self.up(&q)?;
        let snap = |queries: *const c_void| SnapKvArgs {
            queries,
            queries_dtype: DType::F32 as u32,
            window: WINDOW as u32,
            num_q_heads: Q_HEADS as u32,
            pool_kernel: 5,
            pool: 0,
        };
        let dscores = self.zeros::<f32>(n)?;
        // SAFETY: as above.
        unsafe {
            let s = kvs_score_snapkv(
                self.cpu,
                &hdesc,
                &hseq,
                &snap(q.as_ptr().cast()),
                hscores.as_mut_ptr(),
                n,
            );
            status(s, "snapkv (CPU)")?;
            let s = kvs_score_snapkv(
                self.gpu,
                &ddesc,
                &dseq,
                &snap(self.ptr(&dq) as *const c_void),
                self.ptr(&dscores) as *mut f32,
                n,
            );
            status(s, "kvs_score_snapkv")?;
        }
        compare_scores(&self.down(&dscores)?, &hscores)
            .map_err(|w| self.mismatch("kvs_score_snapkv", layout, dtype, w))
    }
}

fn status(s: Status, call: &str) -> Result<()> {
    if s == Status::Ok {
        return Ok(());
    }
    Err(Error::new(
        Status::CudaError,
        format!(
            "kvsieve's CUDA self-check could not run {call}: {}",
            super::boundary::last_error_message()
        ),
    ))
}

/// The first score outside 1e-3 relative (what tests/cuda_parity.rs allows), as a message.
fn compare_scores(got: &[f32], want: &[f32]) -> std::result::Result<(), String> {
    match (0..want.len()).find(|&i| {
        let (a, b) = (got[i], want[i]);
        !((a - b).abs() <= 1e-3 * a.abs().max(b.abs()) + 1e-6 || (a.is_infinite() && a == b))
    }) {
        None => Ok(()),
        Some(i) => Err(format!(
            "head {} token {}: device {}, CPU {}",
            i / CACHED,
            i % CACHED,
            got[i],
            want[i]
        )),
    }
}

/// Run the probe on `gpu`, a fresh CUDA handle.
pub(super) fn self_check(gpu: &KvsKernels) -> Result<()> {
    let backend = gpu.cuda().expect("self_check is given CUDA handles only");
    let cpu = KvsKernels::cpu();
    let probe = Probe {
        gpu,
        cpu: &cpu,
        stream: backend.stream(),
        device: backend.description(),
    };
    let mut rng = Lcg(0x006b_7673_6965_7665);
    for layout in [Layout::Nhd, Layout::Hnd] {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            probe.check(layout, dtype, &mut rng)?;
        }
    }
    Ok(())
}

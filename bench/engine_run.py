"""One engine, one workload: the child process of `serve.py`.

Reads a JSON spec on stdin ({"engine": LLM kwargs, "requests": [[prompt ids, max tokens], ...]}),
serves every request at once (offline batch: all arrive at t=0) through vLLM's in-process
engine, and prints one line `RESULT{json}` with per-request timings, the output tokens, and a
per-step profile. A request may follow another (`[ids, max tokens, {"after": j, "extend": bool}]`):
it arrives when request `j` finishes, and its prompt is `ids`, or with `extend` j's prompt, j's
output, then `ids` (the next turn of a chat). kvsieve is on when KVSIEVE_CONFIG is set in the environment (the plugin reads
it at start, so each configuration gets its own process).

What it measures, and how:
- per request: time of the first output token (TTFT, from submission) and of every later one;
  TPOT = (last - first) / (tokens - 1), vLLM's benchmark definition; the prompt's length and
  how many of its tokens the prefix cache held (vLLM's `num_cached_tokens`).
- per step (scheduler hook): KV blocks in use after scheduling (peak = largest), requests
  running, prompt (prefill, including recompute after preemption) and decode tokens scheduled.
- where the time goes: wall time of steps that carry prompt tokens vs decode-only steps, the
  model forward (executor) vs the rest of the engine step, and kvsieve's own time (scoring,
  selection, compaction; block-list rewrites in the scheduler).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_init = time.perf_counter()
    llm = LLM(**spec["engine"])
    init_s = time.perf_counter() - t_init
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    sched, executor = core.scheduler, core.model_executor
    pool = sched.kv_cache_manager.block_pool
    total_blocks = pool.get_num_free_blocks()

    prof = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "prefill_step_s": 0.0, "decode_step_s": 0.0,
            "forward_s": 0.0, "schedule_s": 0.0, "prompt_tokens_computed": 0, "decode_tokens": 0,
            "preemptions": 0, "recomputed_tokens": 0, "peak_blocks": 0, "max_running": 0,
            "max_decode_batch": 0, "blocks_in_use_sum": 0, "running_sum": 0,
            "step_records": []}
    step_work = [[0, 0, 0, 0]]  # the last scheduled step's [prompt tokens, pairs, decodes, KV read]

    real_schedule = sched.schedule

    def schedule(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_schedule(*args, **kwargs)
        prof["schedule_s"] += time.perf_counter() - t0
        prompt = decode = pairs = decode_ctx = 0
        side = sched.__dict__.get("_kvsieve")
        offsets = side.reqs if side is not None else {}
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            before = req.num_computed_tokens - n  # schedule() already advanced it
            st = offsets.get(rid)
            cached = before - (st.offset if st is not None else 0)  # KV the step's attention reads
            if n == 1 and before >= req.num_tokens - 1 and before >= req.num_prompt_tokens:
                decode += 1
                decode_ctx += cached + 1
            else:
                prompt += n
                pairs += n * cached + n * (n + 1) // 2
        in_use = total_blocks - pool.get_num_free_blocks()
        prof["peak_blocks"] = max(prof["peak_blocks"], in_use)
        prof["blocks_in_use_sum"] += in_use
        prof["running_sum"] += len(sched.running)
        prof["max_running"] = max(prof["max_running"], len(sched.running))
        prof["max_decode_batch"] = max(prof["max_decode_batch"], decode)
        prof["prompt_tokens_computed"] += prompt
        prof["decode_tokens"] += decode
        step_work[0] = [prompt, pairs, decode, decode_ctx]
        return out

    real_preempt = sched._preempt_request

    def preempt(request, *args, **kwargs):
        prof["preemptions"] += 1
        prof["recomputed_tokens"] += request.num_computed_tokens
        return real_preempt(request, *args, **kwargs)

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                prof["forward_s"] += time.perf_counter() - t0
        return wrapper

    sched.schedule, sched._preempt_request = schedule, preempt
    executor.execute_model = timed(executor.execute_model)
    executor.sample_tokens = timed(executor.sample_tokens)

    requests = spec["requests"]
    followers: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        if len(r) > 2:
            followers.setdefault(int(r[2]["after"]), []).append(i)
    prompts: dict[int, list[int]] = {}
    submitted: dict[int, float] = {}
    cached_tokens: dict[int, int] = {}

    def submit(i: int, prompt: list[int], at: float) -> None:
        sp = SamplingParams(temperature=0.0, max_tokens=requests[i][1], ignore_eos=True, detokenize=False)
        prompts[i], submitted[i] = prompt, at
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), sp)

    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        if len(r) < 3:
            submit(i, r[0], 0.0)
    token_times: dict[str, list[float]] = {str(i): [] for i in range(len(requests))}
    tokens: dict[str, list[int]] = {}
    # Tokens to compute (recompute after preemption aside); a follower's prompt is known only when
    # it arrives, so this grows as they do.
    want = sum(len(p) + n for i, (p, n, *_) in enumerate(requests) if i in prompts) \
        + sum(n for i, (p, n, *_) in enumerate(requests) if i not in prompts)
    next_report = t0 + 10
    while engine.has_unfinished_requests() or len(prompts) < len(requests):
        s0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        prof["steps"] += 1
        kind = "prefill" if step_work[0][0] > 0 else "decode"
        prof[f"{kind}_steps"] += 1
        prof[f"{kind}_step_s"] += now - s0
        # [seconds, prompt tokens, query-key pairs of prompt tokens, decode tokens, KV they read]
        prof["step_records"].append([round(now - s0, 6), *step_work[0]])
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            i = int(o.request_id)
            times = token_times[o.request_id]
            times.extend([now - t0 - submitted[i]] * (len(ids) - len(times)))
            tokens[o.request_id] = ids
            cached_tokens[i] = max(cached_tokens.get(i, 0), o.num_cached_tokens or 0)
            if o.finished:
                for j in followers.get(i, []):
                    head = prompts[i] + ids if requests[j][2].get("extend") else []
                    submit(j, head + requests[j][0], now - t0)
                    want += len(prompts[j])
        if now >= next_report:  # serve.py relays these lines while the run goes on
            next_report = now + 10
            done = min(prof["prompt_tokens_computed"] - prof["recomputed_tokens"], sum(map(len, prompts.values()))) \
                + sum(len(t) for t in tokens.values())
            left = (now - t0) * (want - done) / max(done, 1)
            finished = sum(1 for i, (_, n, *_) in enumerate(requests) if len(tokens.get(str(i), [])) >= n)
            print(f"[progress] {now - t0:.0f} s: {finished}/{len(requests)} requests done, {done:,}/{want:,} tokens, "
                  f"~{left:.0f} s left", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    free_after = pool.get_num_free_blocks()

    kvsieve = None
    if os.environ.get("KVSIEVE_CONFIG"):
        from kvsieve_vllm.plugin import stats

        kvsieve = stats()
        for side in kvsieve.values():
            side.pop("per_request", None)
    print("RESULT" + json.dumps({
        "wall_s": wall, "init_s": init_s, "total_blocks": total_blocks, "free_after": free_after,
        "block_size": sched.kv_cache_manager.coordinator.single_type_managers[0].block_size,
        "token_times": [token_times[str(i)] for i in range(len(requests))],
        "tokens": [tokens.get(str(i), []) for i in range(len(requests))],
        "prompt_lens": [len(prompts[i]) for i in range(len(requests))],
        "cached_tokens": [cached_tokens.get(i, 0) for i in range(len(requests))],
        "profile": prof, "kvsieve": kvsieve,
    }))


if __name__ == "__main__":
    main()

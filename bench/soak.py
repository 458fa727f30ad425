"""Soak: vLLM's OpenAI server with kvsieve under bounded concurrent load for a fixed time, with
mixed prompt and output lengths, streamed and whole responses, clients that hang up
mid-stream, a KV space small enough to force preemption, and `[decode]` re-compression on.
With `--mix` (the documented run) 5 in 9 of the requests ask for their own budget or opt out
(`vllm_xargs`), and faults are injected throughout (`--faults`, KVSIEVE_FAULTS in the server:
by default every 40th event's scoring fails, every 55th compaction tears in the middle of its
layers and every 45th acknowledgement is lost after the worker installed its event).

Checks (exit 1 if any fails): no server error, every completed response valid (status 200, as
many token ids as asked, all in the vocabulary), no request takes longer than the longest a
request can take here (none spins), the server and its engine processes keep their resident
memory bounded, and once the load stops every request is gone and every KV block is back
(vllm:kv_cache_usage_perc 0). Writes the figures to a JSON file and prints a summary.

    .venv/bin/python bench/soak.py --minutes 10 --mix    # the documented soak (bench/README.md)
    .venv/bin/python bench/soak.py --minutes 10 --stock --out bench/results/soak-stock.json
    # bench/tests/test_soak.py runs a 40-second slice in CI
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import provenance  # noqa: E402
from openai_server import Server  # noqa: E402

DEFAULT_MODEL = HERE.parent / "models" / "byte-llama-5m"
CONFIG = """
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
sink_tokens = 4
recent_tokens = 32
window = 32
min_length = 256

[decode]
policy = "streaming"
budget_tokens = 384
interval = 64
"""
MAX_MODEL_LEN = 2048
VOCAB = 264  # byte-llama-5m: 256 bytes + specials
# Periodic faults for --mix (faults.py's `point=*N`: every N-th pass in the process).
MIX_FAULTS = "prepare_layer=*40,move_layer=*55,drop_ack=*45"
# What a request of the mix asks for itself, within the [requests] defaults.
OWN = [None, None, None, None, {"kvsieve_budget_ratio": 0.1}, {"kvsieve_budget_ratio": 0.5},
       {"kvsieve_budget_ratio": 1.0}, {"kvsieve_budget_tokens": 200}, {"kvsieve": "off"}]
# Longer than any request takes here (the longest answer at the slowest step seen): a request
# over it is stuck, not slow.
STUCK_S = 240


def server_args(kv_blocks: int) -> list[str]:
    return ["--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--block-size",
            "32", "--enforce-eager", "--seed", "0", "--max-num-batched-tokens", "512", "--max-num-seqs", "16",
            "--num-gpu-blocks-override", str(kv_blocks)]


class Load:
    """The client side: `concurrency` threads sending requests until the deadline."""

    def __init__(self, srv: Server, text: bytes, deadline: float, seed: int, own: bool = False):
        self.srv, self.text, self.deadline, self.seed, self.own = srv, text, deadline, seed, own
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "complete_ok": 0, "stream_ok": 0, "disconnected": 0, "invalid": 0,
                       "http_errors": 0, "exceptions": 0, "tokens": 0, "own_budget_or_off": 0}
        self.problems: list[str] = []
        self.slowest_s = 0.0

    def _note(self, key: str, n: int = 1, problem: str | None = None) -> None:
        with self.lock:
            self.counts[key] += n
            if problem and len(self.problems) < 20:
                self.problems.append(problem)

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        first = True
        while time.time() < self.deadline:
            if first:
                # Opening burst: every client starts with a short prompt and a long answer, so the
                # requests are admitted together (7-8 blocks each) and then outgrow the KV space
                # together (each reaches the [decode] budget plus one interval, 14 blocks): preemption
                # does not hang on how the random mix happens to overlap on a given machine.
                n, out, mode = rng.randint(200, 250), 400, "complete"
                first = False
            else:
                n = rng.choice([rng.randint(64, 256), rng.randint(256, 1024), rng.randint(1024, 1800)])
                out = min(rng.choice([16, 64, 128, 256, 400]), MAX_MODEL_LEN - n - 1)
                mode = rng.choices(["complete", "stream", "disconnect"], [0.6, 0.25, 0.15])[0]
            start = rng.randrange(0, len(self.text) - n)
            prompt = [256] + list(self.text[start:start + n - 1])
            xargs = rng.choice(OWN) if self.own else None
            extra = {"vllm_xargs": xargs} if xargs else {}
            self._note("requests")
            self._note("own_budget_or_off", int(bool(xargs)))
            began = time.time()
            try:
                if mode == "complete":
                    status, body = self.srv.complete(prompt, out, **extra)
                    if status != 200:
                        self._note("http_errors", problem=f"status {status}: {str(body)[:300]}")
                        continue
                    ids = body["choices"][0]["token_ids"]
                    self._check(ids, out, "complete")
                elif mode == "stream":
                    self._check(self.srv.stream(prompt, out, **extra), out, "stream")
                else:
                    self.srv.stream(prompt, out, stop_after=rng.randint(1, 8), **extra)
                    self._note("disconnected")
            except Exception as e:  # the server closing on us counts as an exception
                self._note("exceptions", problem=f"{mode}: {type(e).__name__}: {e}")
            finally:
                with self.lock:
                    self.slowest_s = max(self.slowest_s, time.time() - began)

    def _check(self, ids: list[int], want: int, mode: str) -> None:
        if len(ids) == want and all(0 <= t < VOCAB for t in ids):
            self._note(f"{mode}_ok")
            self._note("tokens", len(ids))
        else:
            self._note("invalid", problem=f"{mode}: {len(ids)} tokens for {want}, ids {ids[:8]}")


def kvsieve_summary(log: str) -> dict:
    """The last periodic kvsieve line of the engine log."""
    lines = re.findall(r"kvsieve: (\d+) compressions, (\d+) blocks released, kept ([\d.]+)% of (\d+) tokens, "
                       r"events not done: (.*)", log)
    if not lines:
        return {}
    c, b, kept, tok, failed = lines[-1]
    return {"compressions": int(c), "blocks_released": int(b), "kept_percent": float(kept), "tokens": int(tok),
            "events_not_done": failed.strip()}


def run(model: str, minutes: float, concurrency: int, kv_blocks: int, config: str | None, seed: int = 0,
        own: bool = False, faults: str | None = None) -> dict:
    text = (Path(model) / "val.txt").read_bytes()
    t0 = time.time()
    env = {"KVSIEVE_FAULTS": faults} if faults else None
    with Server(model, server_args(kv_blocks), config=config, env=env) as srv:
        started = time.time() - t0
        rss = [(0.0, srv.rss_bytes())]
        by_process = [(0.0, srv.rss_by_process())]
        m0 = srv.metrics()
        load = Load(srv, text, time.time() + minutes * 60, seed, own)
        threads = [threading.Thread(target=load.worker, args=(i,), daemon=True) for i in range(concurrency)]
        begin = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            if time.time() - begin >= len(rss) * 15:
                rss.append((round(time.time() - begin, 1), srv.rss_bytes()))
                by_process.append((rss[-1][0], srv.rss_by_process()))
                print(f"[soak] {rss[-1][0]:.0f}s: {load.counts['requests']} requests, "
                      f"RSS {rss[-1][1] / 2**20:.0f} MiB", flush=True)
        for t in threads:
            t.join()
        # Drain: aborted streams may still be finishing inside the engine.
        idle = None
        for _ in range(120):
            m = srv.metrics()
            if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
                idle = m
                break
            time.sleep(0.5)
        m = idle or srv.metrics()
        rss.append((round(time.time() - begin, 1), srv.rss_bytes()))
        by_process.append((rss[-1][0], srv.rss_by_process()))
        log = srv.log()
    warm = next((r for t, r in rss if t >= min(60.0, minutes * 30)), rss[-1][1])
    res = {
        "provenance": provenance.record(config_text=config, model=model),
        "model": str(model), "minutes": minutes, "concurrency": concurrency, "kv_blocks": kv_blocks,
        "config": config, "own_budgets": own, "faults": faults, "server_start_s": round(started, 1),
        "load_s": round(time.time() - begin, 1), "client": load.counts, "problems": load.problems,
        "slowest_request_s": round(load.slowest_s, 1),
        "kvsieve_series": {k: v for k, v in m.items() if k.startswith("vllm:kvsieve_")},
        "preemptions": m.get("vllm:num_preemptions_total", 0) - m0.get("vllm:num_preemptions_total", 0),
        "requests_finished_by_server": m.get("vllm:request_success_total", 0),
        "idle_at_end": idle is not None,
        "kv_cache_usage_at_end": m.get("vllm:kv_cache_usage_perc"),
        "rss_mib": {"start": round(rss[0][1] / 2**20), "warm": round(warm / 2**20),
                    "max": round(max(r for _, r in rss) / 2**20), "end": round(rss[-1][1] / 2**20)},
        "rss_samples": [(t, round(r / 2**20)) for t, r in rss],
        "rss_mib_by_process": [(t, {k: round(v / 2**20) for k, v in d.items()}) for t, d in by_process],
        "kvsieve": kvsieve_summary(log),
        # vLLM itself logs a warm-up traceback at WARNING level when the server has no tokenizer.
        "server_errors": [line for line in log.splitlines()
                          if (" ERROR " in line or "Traceback" in line) and " WARNING " not in line][:20],
    }
    res["checks"] = checks(res)
    return res


def checks(r: dict) -> dict:
    c = r["client"]
    out = {
        "no server error": not r["server_errors"],
        "no failed request": c["invalid"] == 0 and c["http_errors"] == 0 and c["exceptions"] == 0,
        "every block back": r["idle_at_end"] and r["kv_cache_usage_at_end"] == 0,
        f"no request stuck (slowest <= {STUCK_S} s)": r["slowest_request_s"] <= STUCK_S,
        "preemption happened": r["preemptions"] > 0,
        "resident memory bounded (end <= 1.15 x warm)": r["rss_mib"]["end"] <= 1.15 * r["rss_mib"]["warm"],
    }
    if r["config"] is not None:
        out["kvsieve compressed"] = r["kvsieve"].get("compressions", 0) > 0
        if r.get("faults"):
            out["injected faults seen and contained"] = r["kvsieve"].get("events_not_done") not in ("none", None)
        else:
            out["no kvsieve event failed"] = r["kvsieve"].get("events_not_done") in ("none", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a byte-level model dir with val.txt "
                    "(default: models/byte-llama-5m)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--kv-blocks", type=int, default=160, help="KV blocks of 32 tokens (small forces preemption)")
    ap.add_argument("--config", type=Path, help="kvsieve TOML (default: SnapKV 25%% + [decode] streaming)")
    ap.add_argument("--stock", action="store_true", help="stock vLLM, no kvsieve (the same load, for comparison)")
    ap.add_argument("--mix", action="store_true", help="requests asking for their own budgets or opting out, and "
                    f"faults injected throughout (--faults, default {MIX_FAULTS})")
    ap.add_argument("--faults", help="KVSIEVE_FAULTS for the server (faults.py's syntax)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not (Path(a.model) / "val.txt").exists():
        print(f"error: {a.model}/val.txt not found; --model must be a byte-level model directory with held-out "
              "text (models/byte-llama-5m)", file=sys.stderr)
        return 2
    config = None if a.stock else a.config.read_text() if a.config else CONFIG
    faults = None if a.stock else a.faults or (MIX_FAULTS if a.mix else None)
    res = run(a.model, a.minutes, a.concurrency, a.kv_blocks, config, a.seed, own=a.mix and not a.stock,
              faults=faults)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    c = res["client"]
    print(f"soak: {res['load_s']:.0f} s, {c['requests']} requests ({c['complete_ok']} whole + {c['stream_ok']} "
          f"streamed completed and valid, {c['disconnected']} clients hung up mid-stream), {c['tokens']} tokens, "
          f"{res['preemptions']:.0f} preemptions; RSS MiB start/warm/max/end {res['rss_mib']['start']}/"
          f"{res['rss_mib']['warm']}/{res['rss_mib']['max']}/{res['rss_mib']['end']}; kvsieve {res['kvsieve']}")
    for name, ok in res["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"written to {a.out}")
    return 0 if all(res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

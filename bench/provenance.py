"""How a result file was produced: the `provenance` object every JSON under bench/results/ carries.

    {"commit", "command", "config", "model", "machine", "date", "repeats"?, ...}

- `commit`: the checkout's HEAD, "+dirty" when the working tree differed from it.
- `command`: the command line, as a reader would retype it from the repository root.
- `config`: kvsieve's config text and, per phase, the parameters the library resolves from it
  with every default applied (`kvs_config_policy_params`), so a later change of a default (the
  SnapKV pool width went 7 -> 15 -> 31) cannot change what a file says it measured.
- `model`: name, and the SHA-256 of its weights (for a generated model: of the files written).
- `machine`: cores, CPU model and ISA (AVX2, AVX-512, AMX), memory, GPU (none here).
- `repeats`: for ratios, how many paired runs each ratio is the median of.

Files measured before this module existed carry a provenance recovered from the git history,
marked `"recovered": true` (`bench/provenance.py --recover`); `check()` is what the test holds
every file to.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REQUIRED = ("commit", "command", "config", "model", "machine", "date")
PHASES = {"sparsity": 0, "decode": 1, "prefill": 2}  # kvs_phase numbers of the config's sections


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    head = _git("rev-parse", "HEAD").strip()
    # Result files and plots a run writes do not make the code dirty.
    dirty = [line for line in _git("status", "--porcelain").splitlines() if "bench/results/" not in line]
    return head + ("+dirty" if dirty else "") if head else "unknown (not a git checkout)"


# The code a run started from: a long run (the accuracy suite takes over an hour) must not record
# a commit made while it ran. Taken when the run imports this module (the call at the end).
_AT_START: str | None = None


def start_commit() -> str:
    global _AT_START
    if _AT_START is None:
        _AT_START = commit()
    return _AT_START


def command(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else None
    if script is not None and script.is_file():
        try:
            argv[0] = str(script.relative_to(ROOT))
        except ValueError:
            pass
        argv.insert(0, ".venv/bin/python" if ".venv" in sys.executable else "python")
    lib = os.environ.get("KVSIEVE_LIB")
    env = f"KVSIEVE_LIB={os.path.relpath(lib, ROOT)} " if lib else ""
    return env + shlex.join(argv)


def effective_config(text: str | None) -> dict | None:
    """The config text and what the library makes of it, per configured phase."""
    if text is None:
        return None
    from kvsieve_vllm.lib import POLICY_NAMES, load

    cfg = load().config_from_str(text)
    phases = {}
    for name, phase in PHASES.items():
        p = cfg.params(phase)
        if p.policy == 0:
            continue
        phases[name] = {"policy": POLICY_NAMES.get(p.policy, str(p.policy)),
                        **{f: getattr(p, f) for f, _ in p._fields_ if f not in ("policy", "pool")},
                        "pool": "max" if p.pool == 0 else "avg"}
    return {"text": text, "resolved": phases}


_SUMS: dict = {}


def model_identity(path: str | Path | None, name: str | None = None) -> dict | None:
    """Name, directory and SHA-256 over the weight files (sorted by name), cached per file state."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf"))
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _SUMS:
        h = hashlib.sha256()
        for p in files:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        _SUMS[key] = h.hexdigest()
    try:
        where = str(path.resolve().relative_to(ROOT))
    except ValueError:
        where = str(path).replace(str(Path.home()), "~")
    return {"name": name or path.name, "dir": where, "weights_sha256": _SUMS[key],
            "weight_files": [p.name for p in files]}


def machine() -> dict:
    flags, cpu = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu, "isa": isa, "memory_gib": round(mem, 1) if mem else None,
            "gpu": None if not Path("/dev/nvidiactl").exists() else "present (not used by CPU runs)"}


def record(*, config_text: str | None = None, model: str | Path | None = None, model_name: str | None = None,
           repeats: int | None = None, argv: list[str] | None = None, **extra) -> dict:
    """The provenance object of a result written now."""
    out = {"commit": start_commit(), "command": command(argv), "config": effective_config(config_text),
           "model": model_identity(model, model_name), "machine": machine(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if repeats is not None:
        out["repeats"] = repeats
    out.update(extra)
    return out


def check(result: dict, name: str = "result") -> list[str]:
    """What a result file's provenance lacks (empty when complete)."""
    p = result.get("provenance")
    if not isinstance(p, dict):
        return [f"{name}: no top-level provenance object"]
    missing = [f"{name}: provenance.{k} missing" for k in REQUIRED if k not in p]
    if "machine" in p and not isinstance(p["machine"], dict):
        missing.append(f"{name}: provenance.machine is not an object")
    return missing


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Check (or print) the provenance of result files")
    ap.add_argument("files", nargs="*", type=Path)
    a = ap.parse_args(argv)
    files = a.files or sorted((HERE / "results").glob("*.json"))
    problems = [msg for f in files for msg in check(json.loads(f.read_text()), f.name)]
    print("\n".join(problems) or f"{len(files)} result files, each with its provenance")
    return 1 if problems else 0



# --- Provenance recovered for files measured before this module (bench/provenance.py --recover) ---

# The command bench/README.md gives for each file (run from the repository root, release library).
RECOVERED_COMMANDS = {
    "accuracy.json": "bench/accuracy.py; then --policies snapkv --budgets 0.1,0.25,0.5,0.75 --presses '' "
                     "--prefix-caching off,on --cached-budgets 0.1,0.25,0.5,0.75 --name accuracy-snapkv-p31 and "
                     "--report bench/results/accuracy.json --merge bench/results/accuracy-snapkv-p31.json",
    "accuracy-snapkv-p31.json": "bench/accuracy.py --policies snapkv --budgets 0.1,0.25,0.5,0.75 --presses '' "
                                "--prefix-caching off,on --cached-budgets 0.1,0.25,0.5,0.75 --name accuracy-snapkv-p31",
    "accuracy-slice.json": "bench/accuracy.py --suite slice --name accuracy-slice",
    "accuracy-prefix-on.json": "bench/accuracy.py --prefix-caching on --cached-budgets 0.1,0.25,0.5,0.75 --presses '' "
                               "--name accuracy-prefix-on",
    "accuracy-pool-sweep-25.json": "bench/accuracy.py --tasks niah_number,niah_uuid --lengths 2048 --samples 2 "
                                   "--budgets 0.25 (policies: the variants in the file; before haystacks alternated)",
    "accuracy-pool-sweep-10.json": "bench/accuracy.py --tasks niah_number,niah_word,niah_multikey,vt --lengths 2048 "
                                   "--samples 2 --budgets 0.1 (policies: the variants in the file)",
    "accuracy-chunks-512.json": "bench/accuracy.py --policies snapkv,snapkv_chunks,snapkv_knorm_chunks --budgets "
                                "0.25,0.5 --presses '' --prefix-caching off --chunk 512 --name accuracy-chunks-512",
    "accuracy-chunks-512-2x.json": "bench/accuracy.py --policies snapkv_chunks_2x --budgets 0.25 --presses '' "
                                   "--prefix-caching off --chunk 512 --name accuracy-chunks-512-2x",
    "long-answer.json": "bench/serve.py --workload long-answer --budgets 0.25,0.5 --no-agreement",
    "long-prompt-qa-chunks.json": "bench/serve.py --workload long-prompt-qa --config bench/configs/prefill-chunks-25.toml"
                                  " --no-agreement --name long-prompt-qa-chunks",
    "long-prompt-qa-end.json": "bench/serve.py --workload long-prompt-qa --config bench/configs/snapkv-25.toml "
                               "--no-agreement --name long-prompt-qa-end",
    "longer-than-kv.json": "bench/serve.py --workload qa --config bench/configs/longer-than-kv.toml --prompt-len "
                           "6000:8000 --requests 8 --kv-blocks 144 --max-batched-tokens 1024 --name longer-than-kv",
    "multi-turn.json": "bench/serve.py --workload multi-turn --budgets 0.25 --no-agreement",
    "multi-turn-cached.json": "bench/serve.py --workload multi-turn --budgets 0.25 --no-agreement --kv-requests 6 "
                              "--name multi-turn-cached",
    "shared-doc.json": "bench/serve.py --workload shared-doc --budgets 0.25 --no-agreement",
    "qa.json": "bench/serve.py --workload qa --budgets 0.25,0.5 --no-agreement",
    "qa-8.json": "bench/serve.py --workload qa --requests 8 --budgets 0.5 --no-agreement --name qa-8",
    "qa-chunks.json": "bench/serve.py --workload qa --config bench/configs/prefill-chunks-25.toml --no-agreement "
                      "--name qa-chunks",
    "qa-end.json": "bench/serve.py --workload qa --config bench/configs/snapkv-25.toml --no-agreement --name qa-end",
    "quality.json": "bench/quality.py",
    "soak.json": "bench/soak.py --minutes 10",
    "soak-stock.json": "bench/soak.py --minutes 10 --stock --out bench/results/soak-stock.json",
    "soak-mix.json": "bench/soak.py --minutes 10 --mix --out bench/results/soak-mix.json",
}
# The machine every run before 2026-12-02 17:00 UTC used (bench/README.md's header then).
EARLIER_MACHINE = {"cores": 2, "cpu": "AMD EPYC (the project's earlier 2-core VM)", "isa": ["avx2"],
                   "memory_gib": 24, "gpu": None}
# SnapKV's default pool width was 7, then 15 from 9b341f6, then 31 from e244629.
POOL_DEFAULTS = [("e244629", 31), ("9b341f6", 15)]


def _pool_default_at(rev: str) -> int:
    for since, pool in POOL_DEFAULTS:
        if subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", since, rev]).returncode == 0:
            return pool
    return 7


def _resolved_then(text: str | None, pool: int) -> dict | None:
    cfg = effective_config(text)
    if cfg is None:
        return None
    for phase in cfg["resolved"].values():
        if phase["policy"] == "snapkv" and "pool_kernel" not in text:
            phase["pool_kernel"] = pool
    cfg["defaults_then"] = {"pool_kernel": pool}
    return cfg


def _model_then(result: dict) -> dict | None:
    m = result.get("model")
    d = m.get("dir") if isinstance(m, dict) else m
    if not d:
        return None
    name = Path(str(d)).name
    for cand in (ROOT / "models" / name, ROOT / "build" / "models" / name, Path.home() / ".cache/kvsieve/models" / name):
        if cand.is_dir():
            return model_identity(cand, name) | {"checksum_taken": "now, of the same model (seeded or fetched "
                                                                   "by checksum; not recorded at the time)"}
    return {"name": name, "dir": str(d), "weights_sha256": None}


def recover(path: Path) -> dict:
    """A provenance for a file measured before this module, from the git history."""
    rel = str(path.resolve().relative_to(ROOT))
    rev, when = _git("log", "-1", "--format=%H %cI", "--", rel).split()
    pool = _pool_default_at(rev)
    result = json.loads(path.read_text())
    old = result.get("provenance") or {}
    if "kvsieve_config" in result:
        config = _resolved_then(result["kvsieve_config"], pool)
    elif "suite" in result:  # the accuracy suite: one config per run, written by accuracy.py
        config = {"runs": "bench/accuracy.py config_text() per run name", "defaults_then": {"pool_kernel": pool}}
    else:
        config = _resolved_then(result.get("config") if isinstance(result.get("config"), str) else None, pool) \
            or {"text": None, "defaults_then": {"pool_kernel": pool}}
    return {
        "recovered": True,
        "how": "recovered by bench/provenance.py --recover: commit = the commit that last wrote this file (the run "
               "used its working tree just before it was committed); command = the one bench/README.md gives; config "
               "= the file's own config resolved with the defaults of that commit",
        "commit": old.get("commit") or rev, "command": old.get("command") or RECOVERED_COMMANDS.get(path.name, "?"),
        "config": config, "model": _model_then(result) if not old.get("model") or isinstance(old["model"], str)
        else old["model"],
        "machine": EARLIER_MACHINE, "date": old.get("date") or when, "repeats": 1,
        **({"note": old["note"]} if old.get("note") else {}),
    }


def main_recover(files: list[str]) -> int:
    for f in map(Path, files):
        data = json.loads(f.read_text())
        if "provenance" in data and not check(data):
            continue
        data = {"provenance": recover(f), **{k: v for k, v in data.items() if k != "provenance"}}
        f.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recovered: {f.name}")
    return 0


start_commit()  # at import: runs import this module when they start

if __name__ == "__main__":
    if "--recover" in sys.argv:
        sys.exit(main_recover([x for x in sys.argv[1:] if x != "--recover"]))
    sys.exit(main())

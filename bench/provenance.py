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
    out = {"commit": commit(), "command": command(argv), "config": effective_config(config_text),
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


if __name__ == "__main__":
    sys.exit(main())

"""Child processes of the benchmarks: each engine or kvpress run gets its own interpreter (vLLM's
settings are fixed per process; kvpress pins an older transformers in its own site dir). The
parent writes a JSON spec to the child's stdin; the child prints one `RESULT{json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_SITE = ROOT / ".venv" / "kvpress-site"


def kvpress_env() -> dict:
    """The environment of a kvpress child: kvpress's site dir (scripts/setup.sh) ahead of the venv's."""
    if not (KVPRESS_SITE / "kvpress").is_dir():
        raise SystemExit(f"kvpress is not installed at {KVPRESS_SITE}; run scripts/setup.sh")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(KVPRESS_SITE), os.environ.get("PYTHONPATH", "")]))


def run(script: str | Path, spec: dict, env: dict, what: str, relay: Callable[[str], None] | None = None) -> dict:
    """Run `script` (a .py path, or Python source) on `spec` and return its RESULT. Each stderr
    line goes to `relay` as it comes (progress); a child that exits non-zero or prints no RESULT
    stops the parent with the end of its output."""
    argv = [sys.executable, str(script)] if str(script).endswith(".py") else [sys.executable, "-c", str(script)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        # Drain stdout from a thread while stderr is read here, so neither pipe fills and blocks the child.
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
        reader.start()
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for text in proc.stderr:
            err.write(text)
            if relay is not None:
                relay(text)
        proc.wait()
        reader.join()
        err.seek(0)
        stderr = err.read()
    stdout = "".join(out)
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-6000:]}")
    return json.loads(line[len("RESULT"):])

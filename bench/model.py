"""Seeded Llama-shaped models for the throughput benchmark and the demo: random weights, real
shapes. Quality is meaningless with random weights; what matters here is the work per token
(several layers, GQA, head_dim 64-128), which is what KV compression changes."""

from __future__ import annotations

import json
from pathlib import Path

# Named shapes. `bench-llama`: attention and KV traffic matter at 4k-8k tokens (4 layers, 8 query
# heads over 2 KV heads of 128: 8 KiB of float32 KV per token) while a 2-core CPU still prefills
# an 8k prompt in seconds.
SHAPES = {
    "bench-llama": dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                        max_position_embeddings=8448),
    "tiny-llama": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4352),
}


def generate(path: Path, shape: str = "bench-llama", seed: int = 0) -> Path:
    """Write the model (HF format, float32) to `path` unless the same shape and seed are there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    path = Path(path)
    stamp = path / "kvsieve-generated.json"
    want = {"shape": shape, "seed": seed, **SHAPES[shape]}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=1)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(want))
    return path


def shape_of(path: Path) -> dict:
    """The fields of a model directory's config.json the benchmark reports and sizes KV with."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {
        "layers": cfg["num_hidden_layers"], "q_heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"],
        "max_positions": cfg.get("max_position_embeddings"),
    }

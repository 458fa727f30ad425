"""Per-request control without an engine: parsing `extra_args`, the bounds the config's
`[requests]` section sets (enforced by the library), and vLLM's own `SamplingParams` refusing a
bad value with a `VLLMValidationError` naming the field once kvsieve's check is in place."""

from __future__ import annotations

import pytest

from kvsieve_vllm import request_options as ro
from kvsieve_vllm.lib import PHASE_DECODE, PHASE_PREFILL

CONFIG = """
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
[decode]
policy = "streaming"
budget_tokens = 512
interval = 64
[requests]
allow_opt_out = true
min_budget_ratio = 0.2
max_budget_ratio = 0.8
min_budget_tokens = 256
max_budget_tokens = 8192
"""


@pytest.fixture(scope="module")
def configs(lib):
    return ro.RequestConfigs(lib.config_from_str(CONFIG))


def test_parse_reads_kvsieve_keys_and_ignores_others():
    assert ro.parse(None) == ro.DEFAULT and ro.parse({}) == ro.DEFAULT
    assert ro.parse({"session_id": "x", "other": 3}) == ro.DEFAULT
    assert ro.parse({"kvsieve": "off"}) == ro.Options(opt_out=True)
    assert ro.parse({"kvsieve": False}) == ro.Options(opt_out=True)
    assert ro.parse({"kvsieve": "on"}) == ro.DEFAULT
    assert ro.parse({"kvsieve_budget_ratio": 0.5}) == ro.Options(budget_ratio=0.5)
    assert ro.parse({"kvsieve_budget_ratio": 1}) == ro.Options(budget_ratio=1.0)
    assert ro.parse({"kvsieve_budget_tokens": 1024}) == ro.Options(budget_tokens=1024)


@pytest.mark.parametrize("args,key,words", [
    ({"kvsieve": "maybe"}, "kvsieve", '"off"'),
    ({"kvsieve": 0}, "kvsieve", '"off"'),
    ({"kvsieve_budget": 0.5}, "kvsieve_budget", "not a kvsieve option"),
    ({"kvsieve_budget_ratio": "half"}, "kvsieve_budget_ratio", "0 < ratio <= 1"),
    ({"kvsieve_budget_ratio": 0}, "kvsieve_budget_ratio", "0 < ratio <= 1"),
    ({"kvsieve_budget_ratio": True}, "kvsieve_budget_ratio", "0 < ratio <= 1"),
    ({"kvsieve_budget_tokens": 12.5}, "kvsieve_budget_tokens", "whole number"),
    ({"kvsieve_budget_tokens": 2**40}, "kvsieve_budget_tokens", "whole number"),
    ({"kvsieve_budget_tokens": 512, "kvsieve_budget_ratio": 0.5}, "kvsieve_budget_ratio", "one budget"),
])
def test_parse_refuses_malformed_values_naming_the_key(args, key, words):
    with pytest.raises(ro.OptionError) as e:
        ro.parse(args)
    assert e.value.key == key
    assert key in str(e.value) and words in str(e.value) and "vllm_xargs" in str(e.value)


def test_bounds_come_from_the_config_and_a_budget_changes_every_phase(configs):
    base = configs.config
    assert configs.get(ro.DEFAULT) is base
    half = configs.get(ro.Options(budget_ratio=0.5))
    assert configs.get(ro.Options(budget_ratio=0.5)) is half, "derived configs are cached"
    # A 4000-token prompt keeps its own half, not the config's quarter (whole blocks of 16).
    assert half.plan(4000, 4000, 0, 16, PHASE_PREFILL).kept_tokens == 2000
    assert base.plan(4000, 4000, 0, 16, PHASE_PREFILL).kept_tokens == 1008
    # ... and decode re-compression keeps to it too (the config's decode budget is 512 tokens).
    assert half.params(PHASE_DECODE).budget_ratio == 0.5
    off = configs.get(ro.Options(opt_out=True))
    assert off.plan(100_000, 100_000, 0, 16, PHASE_PREFILL).released_blocks == 0
    for opts, key, bound in [(ro.Options(budget_ratio=0.1), "kvsieve_budget_ratio", "requests.min_budget_ratio = 0.2"),
                             (ro.Options(budget_ratio=0.9), "kvsieve_budget_ratio", "requests.max_budget_ratio = 0.8"),
                             (ro.Options(budget_tokens=100), "kvsieve_budget_tokens", "requests.min_budget_tokens = 256"),
                             (ro.Options(budget_tokens=9000), "kvsieve_budget_tokens", "requests.max_budget_tokens")]:
        with pytest.raises(ro.OptionError) as e:
            configs.get(opts)
        assert e.value.key == key and bound in str(e.value), str(e.value)


def test_opting_out_can_be_forbidden(lib):
    strict = ro.RequestConfigs(lib.config_from_str(CONFIG.replace("allow_opt_out = true", "allow_opt_out = false")))
    with pytest.raises(ro.OptionError) as e:
        strict.get(ro.Options(opt_out=True))
    assert e.value.key == "kvsieve" and "requests.allow_opt_out = false" in str(e.value)


def test_the_cache_of_derived_configs_is_bounded(configs, monkeypatch):
    monkeypatch.setattr(ro, "CACHE_LIMIT", 4)
    for i in range(10):
        configs.get(ro.Options(budget_tokens=300 + i))
    assert len(configs.cache) == 4


def test_sampling_params_refuses_a_bad_value_as_vllm_does_its_own(lib, monkeypatch, tmp_path):
    """What the OpenAI server runs when it turns `vllm_xargs` into SamplingParams: the error is
    vLLM's VLLMValidationError (a 400 there), naming kvsieve's field."""
    sp = pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed")
    from vllm.exceptions import VLLMValidationError

    from kvsieve_vllm import settings

    path = tmp_path / "kvsieve.toml"
    path.write_text(CONFIG)
    monkeypatch.setattr(settings, "_settings", settings.Settings(str(path)))
    monkeypatch.setattr(sp.SamplingParams, "_verify_extra_args",
                        ro.wrap_verify_extra_args(sp.SamplingParams._verify_extra_args))
    assert sp.SamplingParams(max_tokens=4, extra_args={"kvsieve_budget_ratio": 0.5}).extra_args
    assert sp.SamplingParams(max_tokens=4, extra_args={"kvsieve": "off"}).extra_args
    with pytest.raises(VLLMValidationError) as e:
        sp.SamplingParams(max_tokens=4, extra_args={"kvsieve_budget_ratio": 0.05})
    assert e.value.parameter == "kvsieve_budget_ratio" and e.value.value == 0.05
    assert "requests.min_budget_ratio = 0.2" in str(e.value)
    with pytest.raises(VLLMValidationError) as e:
        sp.SamplingParams(max_tokens=4, extra_args={"kvsieve_budgte_ratio": 0.5})
    assert e.value.parameter == "kvsieve_budgte_ratio"

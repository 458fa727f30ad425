"""The ctypes binding: versions, configs and plans, and errors that carry kvsieve's message."""

import pytest

from kvsieve_vllm.lib import PHASE_DECODE, POLICY_NAMES, KvsieveError, Library


def test_loads_and_reports_versions(lib):
    assert lib.version.count(".") == 2
    assert lib.path.name == "libkvsieve.so"


def test_missing_library_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIEVE_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(KvsieveError) as e:
        Library()
    assert e.value.status == "KVS_STATUS_IO"
    assert "KVSIEVE_LIB" in e.value.message and "nope.so" in e.value.message


def test_config_and_plan(lib, tmp_path):
    cfg = lib.config_from_str(
        '[sparsity]\npolicy = "snapkv"\nbudget_tokens = 1024\n[decode]\npolicy = "streaming"\ninterval = 128\n'
    )
    plan = cfg.plan(5000, 5000, 0, 16)
    assert (plan.kept_tokens, plan.released_blocks) == (1032, 248)
    p = cfg.params()
    assert POLICY_NAMES[p.policy] == "snapkv" and p.protected_tail == 64
    assert POLICY_NAMES[cfg.params(PHASE_DECODE).policy] == "streaming"
    path = tmp_path / "kvsieve.toml"
    path.write_text('[sparsity]\npolicy = "knorm"\nbudget_ratio = 0.25\n')
    assert lib.config_from_file(path).params().budget_ratio == 0.25


def test_bad_config_and_arguments_raise_with_the_library_message(lib, tmp_path):
    with pytest.raises(KvsieveError) as e:
        lib.config_from_str('[sparsity]\npolicy = "snapkv"\nbudget_ratio = 1.5\n')
    assert e.value.status == "KVS_STATUS_CONFIG_INVALID"
    assert "sparsity.budget_ratio = 1.5 (line 3)" in e.value.message
    with pytest.raises(KvsieveError) as e:
        lib.config_from_file(tmp_path / "missing.toml")
    assert e.value.status == "KVS_STATUS_IO" and "missing.toml" in e.value.message
    cfg = lib.config_from_str('[sparsity]\npolicy = "knorm"\nbudget_tokens = 100\n')
    with pytest.raises(KvsieveError) as e:
        cfg.plan(10, 20, 0, 16)
    assert e.value.status == "KVS_STATUS_INVALID_ARGUMENT" and "cached_len = 20" in e.value.message


def test_decode_snapkv_carries_its_scores_by_default(lib):
    cfg = lib.config_from_str('[sparsity]\npolicy = "snapkv"\nbudget_tokens = 256\n'
                              '[decode]\npolicy = "snapkv"\ninterval = 64\n')
    assert cfg.params(PHASE_DECODE).carry == 0.5 and cfg.params().carry == 0.0
    off = lib.config_from_str('[sparsity]\npolicy = "snapkv"\nbudget_tokens = 256\n'
                              '[decode]\npolicy = "snapkv"\ninterval = 64\ncarry = 0\n')
    assert off.params(PHASE_DECODE).carry == 0.0


def test_carry_folds_the_kept_tokens_scores_and_refuses_a_misfit():
    torch = pytest.importorskip("torch")
    from kvsieve_vllm import carry

    scores = torch.tensor([[1.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9]])
    prior = torch.tensor([[0.6, 0.6], [0.2, 2.0]])
    carry.fold(scores, prior, 1, 0.5)  # positions 1 and 2 lead after a protected token
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.3, 0.3, 0.3, 0.4], [0.5, 0.6, 1.0, 0.8, 0.9]]))
    keep = torch.tensor([[0, 4], [2, 3]], dtype=torch.int32)
    torch.testing.assert_close(carry.kept_scores(scores, keep), torch.tensor([[1.0, 0.4], [1.0, 0.8]]))
    with pytest.raises(ValueError, match="do not fit a cache of 2 heads x 5 tokens from position 4"):
        carry.fold(scores, prior, 4, 0.5)
    with pytest.raises(ValueError, match=r"carried scores \(1, 2\)"):
        carry.fold(scores, prior[:1], 0, 0.5)

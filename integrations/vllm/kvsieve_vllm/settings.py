"""The loaded library and validated config of this process (one per process, made at register)."""

from __future__ import annotations

from .checks import UnsupportedSetup
from .lib import PHASE_DECODE, PHASE_PREFILL, PHASE_PREFILL_CHUNK, POLICY_NAMES, load
from .request_options import RequestConfigs

PLUGIN_POLICIES = ("streaming", "knorm", "snapkv")


class Settings:
    """libkvsieve, the config at `path` and its per-phase policy parameters."""

    def __init__(self, path: str):
        self.path = path
        self.lib = load()
        self.config = self.lib.config_from_file(path)
        self.params = {p: self.config.params(p) for p in (PHASE_PREFILL, PHASE_DECODE, PHASE_PREFILL_CHUNK)}
        self.selection = POLICY_NAMES[self.config.selection().policy]  # "quest", or "none"
        policy = POLICY_NAMES[self.params[PHASE_PREFILL].policy]  # "none": selection only
        if policy not in PLUGIN_POLICIES + ("none",):
            raise UnsupportedSetup(f"{path}: sparsity.policy = {policy!r} is not driven by the vLLM plugin yet; "
                                   f"use one of {', '.join(PLUGIN_POLICIES)}")
        self.policy = {p: POLICY_NAMES[self.params[p].policy] for p in self.params}  # "none": phase not configured
        self.requests = RequestConfigs(self.config)  # per-request configs (SamplingParams.extra_args)


_settings: Settings | None = None


def settings() -> Settings:
    assert _settings is not None, "kvsieve_vllm.register() has not enabled kvsieve in this process"
    return _settings


def install(new: Settings) -> None:
    global _settings
    _settings = new

"""Per-request control: what a request asks kvsieve for through `SamplingParams.extra_args`
(the OpenAI API's `vllm_xargs`), checked where vLLM checks its own sampling parameters.

    {"kvsieve": "off"}                 no compression for this request (exact recall)
    {"kvsieve_budget_ratio": 0.5}      keep this fraction of the sequence
    {"kvsieve_budget_tokens": 4096}    keep this many tokens

The budget replaces the config's in every phase (prefill and decode re-compression). The
bounds are the config's `[requests]` section, enforced by the library
(`kvs_config_for_request`), so the API server and the engine apply one check. A bad value is
a `VLLMValidationError` raised while vLLM builds the request's `SamplingParams`: the OpenAI
server answers 400 naming the field, and the request never reaches the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

OPT = "kvsieve"
RATIO = "kvsieve_budget_ratio"
TOKENS = "kvsieve_budget_tokens"
KEYS = (OPT, RATIO, TOKENS)
MAX_TOKENS = 2**31 - 1  # int32 page tables
CACHE_LIMIT = 256  # derived configs kept per process (a few distinct budgets in practice)


class OptionError(ValueError):
    """A request's kvsieve option is malformed or outside the server's bounds."""

    def __init__(self, key: str, value, why: str):
        super().__init__(f"{key} = {value!r} (vllm_xargs / SamplingParams.extra_args): {why}")
        self.key, self.value = key, value


@dataclass(frozen=True)
class Options:
    """A request's own settings; the default asks for nothing (the config applies)."""

    opt_out: bool = False
    budget_tokens: int = 0
    budget_ratio: float = 0.0

    @property
    def default(self) -> bool:
        return self == DEFAULT


DEFAULT = Options()


def parse(extra_args) -> Options:
    """The kvsieve options in `extra_args` (other keys are not kvsieve's and are ignored).
    Raises OptionError for a malformed value or an unknown `kvsieve*` key (a typo must not
    silently serve the request with the default budget)."""
    if not extra_args or not isinstance(extra_args, dict):
        return DEFAULT
    for key in extra_args:
        if isinstance(key, str) and key.startswith(OPT) and key not in KEYS:
            raise OptionError(key, extra_args[key], f"not a kvsieve option; use one of {', '.join(KEYS)}")
    opt_out = False
    if OPT in extra_args:
        v = extra_args[OPT]
        if v == "off" or v is False:  # `is`: 0 == False, and 0 is not a valid value
            opt_out = True
        elif not (v == "on" or v is True):
            raise OptionError(OPT, v, '"off" turns compression off for this request ("on": the default)')
    tokens, ratio = 0, 0.0
    if TOKENS in extra_args:
        v = extra_args[TOKENS]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TOKENS:
            raise OptionError(TOKENS, v, f"a whole number of tokens, 1 to {MAX_TOKENS}")
        tokens = v
    if RATIO in extra_args:
        v = extra_args[RATIO]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise OptionError(RATIO, v, "a fraction of the sequence, 0 < ratio <= 1")
        ratio = float(v)
    if tokens and ratio:
        raise OptionError(RATIO, ratio, f"{TOKENS} is set too; ask for one budget")
    return Options(opt_out, tokens, ratio)


class RequestConfigs:
    """Configs derived per distinct `Options` from the process's config, bounded (LRU)."""

    def __init__(self, config) -> None:
        self.config = config
        self.cache: OrderedDict = OrderedDict()

    def get(self, opts: Options):
        """The config a request with `opts` is served with; OptionError outside the bounds."""
        if opts.default:
            return self.config
        cfg = self.cache.pop(opts, None)
        if cfg is None:
            from .lib import KvsieveError

            try:
                cfg = self.config.for_request(opts.opt_out, opts.budget_tokens, opts.budget_ratio)
            except KvsieveError as e:
                key = OPT if opts.opt_out else TOKENS if opts.budget_tokens else RATIO
                value = "off" if opts.opt_out else opts.budget_tokens or opts.budget_ratio
                raise OptionError(key, value, e.message) from None
        self.cache[opts] = cfg
        while len(self.cache) > CACHE_LIMIT:
            self.cache.popitem(last=False)
        return cfg


def check(extra_args) -> Options:
    """Parse and bound-check with this process's settings (raises OptionError)."""
    from .settings import settings

    opts = parse(extra_args)
    settings().requests.get(opts)
    return opts


def wrap_verify_extra_args(orig):
    """`SamplingParams._verify_extra_args`: vLLM's own checks, then kvsieve's options."""

    def _verify_extra_args(self, *args, **kwargs):
        ret = orig(self, *args, **kwargs)
        try:
            check(self.extra_args)
        except OptionError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter=e.key, value=e.value) from None
        return ret

    return _verify_extra_args

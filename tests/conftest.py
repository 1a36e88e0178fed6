"""Shared fixtures: tiny HF checkpoints built offline from family flavors, cached for the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Local ranks fork from the test process, which has imported megatron-core already (saves ~6 s per rank);
# the CLI keeps spawn, and the wrapper tests run the CLI as users do.
os.environ.setdefault("MEGATRON_PATCH_START_METHOD", "fork")


@pytest.fixture(scope="session")
def make_hf(tmp_path_factory):
    """make_hf(name, family="llama", seed=0, **config_overrides) -> path of a saved random HF checkpoint."""
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import make_hf_checkpoint

    cache: dict[str, str] = {}

    def build(name: str, family: str = "llama", seed: int = 0, flavor: str = "tiny", **overrides) -> str:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            config = {**get_family(family).flavor(flavor), **overrides}
            make_hf_checkpoint(path, config, seed=seed)
            cache[name] = str(path)
        return cache[name]

    return build

"""Our own legacy rank files load without importing megatron-core (its enum allow-list is only built for a pickle
that names globals: Megatron-LM's files with ``args``); such a file still gets the allow-list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOAD = """
import sys
from pathlib import Path
from megatron_patch.checkpoint.megatron import load_legacy_rank
model = load_legacy_rank(Path(sys.argv[1]), 0, 0, 1)
print(sorted(model), 'megatron.core' in sys.modules)
"""


def write_rank(iter_dir: Path, args=None) -> None:
    import torch

    from megatron_patch.checkpoint.megatron import save_legacy_rank

    save_legacy_rank(iter_dir, 0, 0, 1, {"embedding.word_embeddings.weight": torch.ones(4, 2)})
    if args is not None:  # what Megatron-LM stores beside the model
        path = next(iter_dir.rglob("model_optim_rng.pt"))
        payload = torch.load(path, weights_only=True)
        payload["args"] = args
        torch.save(payload, path)


def load_in_fresh_process(iter_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-c", LOAD, str(iter_dir)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_our_legacy_file_loads_without_importing_megatron_core(tmp_path):
    write_rank(tmp_path / "release")
    assert load_in_fresh_process(tmp_path / "release") == "['embedding.word_embeddings.weight'] False"


def test_a_megatron_lm_file_with_args_gets_the_allow_list(tmp_path):
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    # Megatron-LM's args hold megatron-core enums (--attention-backend): the allow-list is built for them.
    write_rank(tmp_path / "release", args=argparse.Namespace(num_layers=2, attention_backend=AttnBackend.auto))
    assert load_in_fresh_process(tmp_path / "release") == "['embedding.word_embeddings.weight'] True"


def test_args_of_plain_values_need_no_megatron_core(tmp_path):
    """hf2mcore's legacy files carry Megatron-LM's args of plain values: the namespace alone is allowed."""
    import argparse

    write_rank(tmp_path / "release", args=argparse.Namespace(num_layers=2))
    assert load_in_fresh_process(tmp_path / "release") == "['embedding.word_embeddings.weight'] False"

"""Checkpoints other Megatron tools open: Megatron-LM's ``args``, ``checkpoint_version`` and ``iteration`` in
common.pt of a torch_dist conversion and of a training save, read back by the Megatron-LM reader of this toolkit
(models/foreign.py, written against real Megatron-LM checkpoints) and, where installed, by Megatron-Bridge."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_patch.checkpoint.megatron_lm_args import CHECKPOINT_VERSION
from megatron_patch.checkpoint.trusted_load import check_torch_dist_checkpoint, megatron_lm_args_globals
from megatron_patch.models.checkpoint import Checkpoint
from megatron_patch.models.foreign import describe_foreign


def common_of(iter_dir: Path) -> dict:
    check_torch_dist_checkpoint(iter_dir)  # what our readers accept, weights_only included
    from megatron.core import dist_checkpointing

    with torch.serialization.safe_globals(megatron_lm_args_globals()):  # as Megatron-LM loads it
        return dist_checkpointing.load_common_state_dict(str(iter_dir))


@pytest.fixture(scope="module")
def converted(make_hf, tmp_path_factory):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    hf = make_hf("mlm_common", num_key_value_heads=2)
    out = tmp_path_factory.mktemp("mlm_common") / "mcore"
    hf_to_mcore(hf, out, tp=2)
    return hf, out / "release"


def test_conversion_records_megatron_lm_args(converted):
    hf, iter_dir = converted
    common = common_of(iter_dir)
    assert common["checkpoint_version"] == CHECKPOINT_VERSION and common["iteration"] == 0
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    arch = Checkpoint.open(iter_dir).spec.arch
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups, args.ffn_hidden_size,
            args.kv_channels) == (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
                                  arch.ffn_hidden_size, arch.head_dim)
    assert args.group_query_attention and args.swiglu and args.tensor_model_parallel_size == 2
    assert args.no_save_optim and args.no_save_rng  # Megatron-LM --load then reads weights only
    assert Path(args.tokenizer_model) == iter_dir.resolve() / "hf_assets" and Path(args.tokenizer_model).is_dir()
    # The Megatron-LM reader sees the same model as our own metadata says.
    meta, where = describe_foreign(iter_dir, "llama", hf)
    ours = Checkpoint.open(iter_dir).meta
    assert where.name == "common.pt"
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size",
                "make_vocab_size_divisible_by", "dtype"):
        assert meta[key] == ours[key], key


def test_legacy_rank_files_carry_the_args(make_hf, tmp_path):
    from megatron_patch.checkpoint.megatron import load_legacy_payload
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore

    hf = make_hf("mlm_common", num_key_value_heads=2)
    hf_to_mcore(hf, tmp_path / "legacy", tp=1, pp=2, fmt="legacy")
    iter_dir = tmp_path / "legacy" / "release"
    meta, where = describe_foreign(iter_dir, "llama", hf)  # Megatron-LM's reader: args from mp_rank_00_000
    assert where.name == "model_optim_rng.pt" and meta["pipeline_model_parallel_size"] == 2
    payload = load_legacy_payload(where, allowed_globals=tuple(megatron_lm_args_globals()))
    assert payload["checkpoint_version"] == CHECKPOINT_VERSION and payload["iteration"] == 0
    assert payload["args"].ckpt_format == "legacy" and not payload["args"].use_dist_ckpt
    assert Checkpoint.open(iter_dir).meta["format"] == "legacy"


def test_our_readers_ignore_the_args(converted, tmp_path):
    """mcore2hf through megatron-core's dist_checkpointing.load (which merges common.pt into the state) still loads
    strictly."""
    from megatron_patch.models.builder import build_model
    from megatron_patch.runtime import run_on_local_ranks

    _, iter_dir = converted
    assert run_on_local_ranks(_load_strict, 1, str(iter_dir), timeout=600) == [True]
    assert build_model  # imported for the worker's module


def _load_strict(iter_dir: str) -> bool:
    from megatron_patch.models.builder import build_model
    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1)
    ckpt = Checkpoint.open(iter_dir)
    model = build_model(ckpt.spec.arch, ckpt.spec.padded_vocab_size)
    ckpt.load_into(model)
    return True


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None, reason="megatron-bridge is not installed")
def test_megatron_bridge_loader_opens_a_conversion(converted):
    from megatron.bridge.training.model_load_save import load_megatron_model

    _, iter_dir = converted
    model = load_megatron_model(str(iter_dir), use_cpu_init=True, skip_temp_dist_context=False)
    assert model is not None
    assert torch  # the model's tensors are checked by Bridge's own strict load

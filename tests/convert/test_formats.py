"""Format details that the parity tests do not reach: TE key names in legacy files, dtype preservation."""

from __future__ import annotations

import torch

from megatron_patch.checkpoint.hf import HFCheckpointReader
from megatron_patch.checkpoint.megatron import load_legacy_payload
from megatron_patch.checkpoint.trusted_load import megatron_lm_args_globals
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.convert.mcore_to_hf import mcore_to_hf


def legacy_payload(path) -> dict:
    """A legacy rank file as Megatron-LM's loaders read it: tensors, plain data and the run's ``args``."""
    return load_legacy_payload(path, allowed_globals=tuple(megatron_lm_args_globals()))



def test_legacy_transformer_engine_names_round_trip(make_hf, tmp_path):
    hf_dir = make_hf("gqa_untied")
    hf_to_mcore(hf_dir, tmp_path / "te", tp=2, pp=1, fmt="legacy", transformer_impl="transformer_engine")
    shard = legacy_payload(tmp_path / "te" / "release" / "mp_rank_01" / "model_optim_rng.pt")["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shard
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in shard
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in shard)
    mcore_to_hf(tmp_path / "te", tmp_path / "back")
    original, back = HFCheckpointReader(hf_dir), HFCheckpointReader(tmp_path / "back")
    assert all(torch.equal(original.get(n), back.get(n)) for n in original.names())


def test_bf16_checkpoint_stays_bf16(tmp_path):
    from megatron_patch.models import get_family
    from megatron_patch.models.tiny import make_hf_checkpoint

    make_hf_checkpoint(tmp_path / "hf", get_family("llama").flavor("tiny"), dtype=torch.bfloat16, tokenizer=False)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", tp=2, pp=2, fmt="legacy")
    shard = legacy_payload(tmp_path / "mc" / "release" / "mp_rank_00_000" / "model_optim_rng.pt")["model"]
    assert all(t.dtype == torch.bfloat16 for t in shard.values())
    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    original, back = HFCheckpointReader(tmp_path / "hf"), HFCheckpointReader(tmp_path / "back")
    for name in original.names():
        assert back.dtype(name) == torch.bfloat16 and torch.equal(original.get(name), back.get(name))

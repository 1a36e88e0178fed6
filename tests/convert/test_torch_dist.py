"""The one-process torch_dist writer against megatron-core itself: for every family, the checkpoint holds exactly the
keys a GPTModel's ``sharded_state_dict`` asks for at TP x PP in {1,2}^2 (none missing, none unexpected), with the
same global shapes, and at TP=1 PP=1 exactly megatron-core's chunks. Loading and logits at every TP x PP are covered
by tests/convert/test_conversion.py and tests/models/test_family_parity.py."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_patch.checkpoint.megatron import find_iteration_dir
from megatron_patch.checkpoint.torch_dist_io import TorchDistReader
from megatron_patch.convert.hf_to_mcore import hf_to_mcore
from megatron_patch.models import get_family
from megatron_patch.runtime import run_on_local_ranks
from tests.reference import baichuan as baichuan_ref
from tests.reference import qwen_v1 as qwen_v1_ref
from tests.reference import save_hf_dir

# (family, flavor, HF config overrides): GQA, MHA + biases + tied embeddings, q/k norms, fused W_pack / c_attn,
# ALiBi + NormHead, and bloom's embedding norm, LayerNorm biases and plain GELU MLP.
VARIANTS = {
    "llama": ("llama", "tiny", {}),
    "llama-tied-bias": ("llama", "tiny", {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 48,
                                          "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                                          "vocab_size": 1000}),
    "qwen3": ("qwen", "tiny-qwen3", {}),
    "qwen1": ("qwen", "tiny-qwen1", {}),
    "baichuan2-13b": ("baichuan", "tiny-baichuan2-13b", {}),
    "bloom": ("bloom", "tiny", {}),
}

REMOTE_CODE = {"qwen1": qwen_v1_ref, "baichuan2-13b": baichuan_ref}


def _requested(iter_dirs: dict[str, str], tp: int, pp: int):
    """On each rank: {variant: (tensors {key: (global shape, dtype, [(offsets, sizes)])}, object keys)} that a
    GPTModel built for the checkpoint at TP x PP asks for (main replicas' chunks; replicas ask for the same)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.runtime import init_distributed

    init_distributed(tp, pp)
    out = {}
    for name, iter_dir in iter_dirs.items():
        plan = Checkpoint.open(iter_dir).spec
        config = transformer_config(plan.arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    perform_initialization=False)
        model = build_model(plan.arch, plan.padded_vocab_size, config=config)
        tensors, objects = {}, set()
        for value in nested_values(model.sharded_state_dict()):
            built = value.build() if isinstance(value, ShardedTensorFactory) else value
            for item in nested_values(built) if isinstance(built, (dict, list, tuple)) else [built]:
                if isinstance(item, ShardedObject):
                    objects.add(item.unique_key)
                elif isinstance(item, ShardedTensor):
                    chunk = (item.global_offset, (1,) * item.prepend_axis_num + tuple(item.local_shape))
                    shape, dtype, chunks = tensors.setdefault(item.key, (tuple(item.global_shape), item.dtype, []))
                    assert shape == tuple(item.global_shape), item.key
                    chunks.append(chunk)
                else:
                    raise AssertionError(f"unexpected sharded item {type(item)}")
        out[name] = (tensors, objects)
    return out


@pytest.fixture(scope="module")
def written(make_hf, tmp_path_factory):
    """{variant: iter_dir} of torch_dist checkpoints written by hf2mcore for TP=2 PP=2."""
    root = tmp_path_factory.mktemp("torch_dist")
    dirs = {}
    for name, (family, flavor, overrides) in VARIANTS.items():
        if name in REMOTE_CODE:  # transformers cannot build these: write their tiny checkpoints directly
            config = {**get_family(family).flavor(flavor), **overrides}
            hf_dir = save_hf_dir(root / f"hf-{name}", config, REMOTE_CODE[name].random_checkpoint(config, seed=0))
        else:
            hf_dir = make_hf(f"td-{name}", family=family, flavor=flavor, **overrides)
        hf_to_mcore(hf_dir, root / name, tp=2, pp=2, fmt="torch_dist")
        dirs[name] = str(find_iteration_dir(root / name))
    return dirs


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_keys_shapes_and_chunks_are_megatron_cores(written, tp, pp):
    results = run_on_local_ranks(_requested, tp * pp, written, tp, pp, env={"CUDA_VISIBLE_DEVICES": ""})
    for name, iter_dir in written.items():
        stored = FileSystemReader(iter_dir).read_metadata().state_dict_metadata
        tensors, objects = {}, set()
        for rank_result in results:
            rank_tensors, rank_objects = rank_result[name]
            objects |= rank_objects
            for key, (shape, dtype, chunks) in rank_tensors.items():
                tensors.setdefault(key, (shape, dtype, []))[2].extend(chunks)
        assert set(stored) == set(tensors) | objects, (name, set(stored) ^ (set(tensors) | objects))
        for key, (shape, dtype, chunks) in tensors.items():
            assert tuple(stored[key].size) == shape and stored[key].properties.dtype == dtype, (name, key)
            if (tp, pp) == (1, 1):  # the writer stores a TP=1 PP=1 save's chunks
                mine = sorted((tuple(c.offsets), tuple(c.sizes)) for c in stored[key].chunks)
                assert mine == sorted(chunks), (name, key)


def test_reader_returns_each_layer_of_a_stacked_key(written, make_hf):
    """TorchDistReader reads one layer's slice of a layer-stacked key (here llama's down_proj, stored as is)."""
    from megatron_patch.checkpoint.hf import HFCheckpointReader

    family, flavor, overrides = VARIANTS["llama"]
    hf = HFCheckpointReader(make_hf("td-llama", family=family, flavor=flavor, **overrides))
    reader = TorchDistReader(written["llama"])
    for layer in range(4):
        tensor = reader.full(f"decoder.layers.{layer}.mlp.linear_fc2.weight")
        assert torch.equal(tensor, hf.get(f"model.layers.{layer}.mlp.down_proj.weight")), layer
    meta = reader.meta("decoder.layers.3.mlp.linear_fc2.weight")
    assert (meta.shape, meta.dtype, meta.device.type) == (tensor.shape, tensor.dtype, "meta")


def test_reader_maps_the_records_it_wrote(written, make_hf, monkeypatch):
    """Every single-chunk tensor of a checkpoint hf2mcore wrote is a view of the mapped file (no copy), and equal
    to what the copying reader returns; only SwiGLU's two-chunk fc1 is assembled by copying."""
    from megatron_patch.checkpoint.hf import HFCheckpointReader

    family, flavor, overrides = VARIANTS["llama"]
    hf = HFCheckpointReader(make_hf("td-llama", family=family, flavor=flavor, **overrides))
    reader = TorchDistReader(written["llama"])
    mapped = {name: reader.full(name) for name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                                   "decoder.layers.2.mlp.linear_fc2.weight",
                                                   "decoder.layers.1.self_attention.linear_qkv.weight")}
    assert torch.equal(mapped["decoder.layers.2.mlp.linear_fc2.weight"], hf.get("model.layers.2.mlp.down_proj.weight"))
    monkeypatch.setattr(TorchDistReader, "_mapped", lambda *args: None)  # the copying reader
    for name, tensor in mapped.items():
        assert torch.equal(tensor, reader.full(name)), name
        assert tensor.untyped_storage().nbytes() > tensor.nbytes, name  # a view of the whole file's map

"""torch_dist checkpoints (megatron-core ``dist_checkpointing`` over torch DCP), written and read by one process.

A torch_dist checkpoint stores every parameter under its global (TP=1, PP=1) shape; a loading rank reads only the
part it owns, at whatever TP x PP it runs. So the converter needs no ranks and no model: it writes what a TP=1 PP=1
megatron-core GPTModel would save, streaming one parameter at a time from the memory-mapped HF shards, and reads
checkpoints back one parameter at a time. Neither direction imports megatron-core (its import alone costs several
seconds and a few hundred MB). Writing produces the files ``dcp.save`` with a one-file ``FileSystemWriter`` would,
directly (DCP's per-item machinery costs a copy of every view and a buffered second copy of every byte); reading
copies each stored record's bytes straight into the tensor it belongs to (DCP reads any record that is not a plain
tensor). The files are written and read by ``torch_dist_io``, imported only when a torch_dist checkpoint is: it
imports ``torch.distributed.checkpoint`` (half a second, and more at exit), which a legacy conversion never needs.

What megatron-core 0.16's ``GPTModel.sharded_state_dict`` holds (``tests/convert/test_torch_dist.py`` compares
this layout with it for every family at TP x PP in {1,2}^2):

- a parameter outside the decoder (embedding, its norm, final norm, output layer): key = its name, one chunk;
- a decoder-layer parameter: the layers stacked along a new leading axis under one key without the layer number
  (``decoder.layers.5.mlp.linear_fc2.weight`` -> ``decoder.layers.mlp.linear_fc2.weight``, global shape
  ``(num_layers, *shape)``, chunk offset ``(5, 0, ...)``); the pre-attention / pre-MLP norms under their Transformer
  Engine names (``...linear_qkv.layer_norm_weight``), which megatron-core's local spec maps them to;
- SwiGLU ``linear_fc1`` (weight and bias): two chunks per layer, the gate half and the up half;
- each linear module of a layer: an ``_extra_state`` object ``decoder.layers.<module>._extra_state/shard_<l>_<L>``
  holding ``[None]`` (what megatron-core's own linear layers return; it requests these keys at load);
- tied embeddings: no ``output_layer.weight`` key (megatron-core loads the output layer from the embedding);
- beside the DCP files: ``metadata.json`` (backend names and versions) and ``common.pt`` (non-tensor state:
  Megatron-LM's ``args``, ``checkpoint_version`` and ``iteration``, written by ``megatron_lm_args``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from ..mapping import EXPERT, Entry, Sharding, Split, is_expert_row, megatron_shape, te_name
from .formats import CheckpointFormat, register_format
from .megatron_lm_args import load_model_state

LAYERS = "decoder.layers."
EXPERTS = ".mlp.experts.local_experts."
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}
CONFIG_FILE, COMMON_FILE, DCP_METADATA = "metadata.json", "common.pt", ".metadata"
EXTRA_STATE_MARK = "._extra_state"  # in the key of every object a model checkpoint holds


def stacks_layers(arch) -> bool:
    """Whether megatron-core stacks the decoder layers under one key: not for a model mixing MoE and dense layers
    (its ``moe_layer_freq`` is a list, which makes the layers non-homogeneous: one key per layer)."""
    return getattr(arch, "moe_layers", None) is None


def sharded_key(global_name: str, stacked: bool = True) -> tuple[str, tuple[int, ...]]:
    """A parameter's key in megatron-core's sharded state dict and its index along the key's leading axes.

    ``decoder.layers.5.input_layernorm.weight`` -> (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``,
    (5,)); not ``stacked``: (``decoder.layers.5.self_attention.linear_qkv.layer_norm_weight``, ()). A routed
    expert's weight also loses its expert number to a leading axis (megatron-core's SequentialMLP):
    ``decoder.layers.5.mlp.experts.local_experts.3.linear_fc2.weight`` -> (``decoder.layers.mlp.experts.experts.
    linear_fc2.weight``, (5, 3)). A name outside the decoder layers is its own key (no index)."""
    if not global_name.startswith(LAYERS):
        return global_name, ()
    layer, _, rest = global_name[len(LAYERS):].partition(".")
    rest = te_name("." + rest)[1:]
    index = (int(layer),) if stacked else ()
    prefix = LAYERS if stacked else f"{LAYERS}{layer}."
    if ("." + rest).startswith(EXPERTS):
        expert, _, tail = rest[len(EXPERTS) - 1:].partition(".")
        return f"{prefix}mlp.experts.experts.{tail}", (*index, int(expert))
    return prefix + rest, index


def _extra_state_modules(sharding: Sharding) -> list[tuple[str, str]]:
    """(module, row kind) of the layer modules that are megatron-core linear layers (``self_attention.linear_qkv``,
    ``mlp.experts.local_experts.<e>.linear_fc1``, ...), in row order."""
    modules = []
    for row in sharding.rows:
        if row.megatron.startswith(LAYERS + "*."):
            module = row.megatron[len(LAYERS) + 2:].rpartition(".")[0]
            if module.rpartition(".")[2].startswith("linear_") and all(m != module for m, _ in modules):
                modules.append((module, row))
    return modules


def extra_state_keys(sharding: Sharding) -> list[str]:
    """The ``_extra_state`` object keys (``<key>/shard_<offsets>_<shape>``, dotted per axis) of every linear module
    of every layer, expert by expert for routed experts."""
    layers, experts = sharding.arch.num_layers, sharding.num_experts
    stacked = stacks_layers(sharding.arch)
    single = sharding.retarget(1, 1, 1)
    keys = []
    for layer in range(layers):
        for module, row in _extra_state_modules(sharding):
            if not single.row_on_layer(row, layer):
                continue
            key, index = sharded_key(f"{LAYERS}{layer}.{module.replace(EXPERT, '0')}._extra_state", stacked)
            shape = ((layers,) if stacked else ()) + ((experts,) if is_expert_row(row) else ())
            for expert in (range(experts) if is_expert_row(row) else [None]):
                offsets = index if expert is None else (*index[:-1], expert)
                if not shape:  # a per-layer key of a module that is not an expert: one object of shape (1,)
                    offsets, shape = (0,), (1,)
                keys.append(f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}")
    return keys


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a key: part ``part`` of ``parts`` (split along dim 0) of one entry's full tensor."""

    entry: Entry
    key: str
    global_shape: torch.Size
    offsets: torch.Size
    sizes: torch.Size
    part: int
    parts: int


def layout(sharding: Sharding) -> list[Chunk]:
    """Every tensor chunk a TP=1 PP=1 EP=1 megatron-core save of ``sharding``'s model holds, grouped by entry."""
    single = sharding.retarget(1, 1, 1)  # keeps the vocabulary padding of the requested TP (the stored global shapes)
    layers, experts = sharding.arch.num_layers, sharding.num_experts
    stacked = stacks_layers(sharding.arch)
    chunks = []
    for entry in single.stage_entries(0):
        key, index = sharded_key(entry.global_name, stacked)
        lead = ((layers,) if stacked and entry.layer is not None else ()) + \
            ((experts,) if entry.expert is not None else ())
        shape = megatron_shape(entry.global_name, sharding.arch, single.padded_vocab_size)
        parts = 2 if entry.row.split is Split.GATED else 1
        part_shape = (shape[0] // parts, *shape[1:])
        for part in range(parts):
            offsets = (part * part_shape[0],) + (0,) * (len(shape) - 1)
            chunks.append(Chunk(entry, key, torch.Size((*lead, *shape)), torch.Size((*index, *offsets)),
                                torch.Size((*(1,) * len(lead), *part_shape)), part, parts))
    return chunks


# --- the format -------------------------------------------------------------------------------------------------


@register_format("torch_dist")
class TorchDistFormat(CheckpointFormat):
    def write(self, sharding, source, iter_dir, *, dtype, transformer_impl, progress=None, megatron_lm=None):
        # megatron_lm: common.pt gets it from write_checkpoint_meta, as a training save's does
        """One process writes the whole checkpoint (its tensors are TP/PP-independent); ``transformer_impl`` does
        not matter: megatron-core's sharded state dict uses the Transformer Engine names for both specs."""
        from .torch_dist_io import write_torch_dist

        write_torch_dist(sharding, source, iter_dir, dtype, progress)

    def write_steps(self, sharding):
        return len(sharding.retarget(1, 1, 1).stage_entries(0))

    def open_reader(self, iter_dir, saved, transformer_impl):
        from .torch_dist_io import TorchDistReader

        reader = TorchDistReader(iter_dir)
        reader.check_matches(saved)
        return reader

    def export_dtype(self, saved_dtype):
        return saved_dtype  # as a model built with the checkpoint's dtype would load it

    def load_into_model(self, model, iter_dir, saved, target, tp_rank, pp_rank, transformer_impl, ep_rank=0):
        # Checked against the model built (a reward head, LoRA adapters), not the recorded configuration: DCP
        # refuses a shape the model does not have, and the strict load a missing or extra tensor.
        try:
            state = load_model_state(model.sharded_state_dict(), iter_dir)
        except CheckpointException as error:  # how DCP reports a damaged record (EOFError, a refused global,
            # PytorchStreamReader failed) on every rank; a BaseException
            raise CheckpointError(f"cannot read torch_dist checkpoint {iter_dir} (truncated, corrupt or holding "
                                  f"objects other than tensors): {' '.join(str(error).split())[:300]}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"torch_dist checkpoint {iter_dir} does not match the model: "
                                  f"{' '.join(str(error).split())[:300]}") from None

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

from ..errors import CheckpointError
from ..mapping import Entry, Sharding, Split, megatron_shape, te_name
from .formats import CheckpointFormat, register_format
from .megatron_lm_args import load_model_state
from .trusted_load import check_torch_dist_checkpoint

LAYERS = "decoder.layers."
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}
CONFIG_FILE, COMMON_FILE, DCP_METADATA = "metadata.json", "common.pt", ".metadata"


def sharded_key(global_name: str) -> tuple[str, int | None]:
    """``decoder.layers.5.input_layernorm.weight`` -> (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``,
    5); a name outside the decoder layers is its own key (layer None)."""
    if not global_name.startswith(LAYERS):
        return global_name, None
    layer, _, rest = global_name[len(LAYERS):].partition(".")
    return LAYERS + te_name("." + rest)[1:], int(layer)


def _extra_state_modules(sharding: Sharding) -> list[str]:
    """The layer modules that are megatron-core linear layers (``self_attention.linear_qkv``, ...), in row order."""
    modules = []
    for row in sharding.rows:
        if row.megatron.startswith(LAYERS + "*."):
            module = row.megatron[len(LAYERS) + 2:].rpartition(".")[0]
            if module.rpartition(".")[2].startswith("linear_") and module not in modules:
                modules.append(module)
    return modules


def extra_state_keys(sharding: Sharding) -> list[str]:
    layers = sharding.arch.num_layers
    return [f"{LAYERS}{module}._extra_state/shard_{layer}_{layers}"
            for layer in range(layers) for module in _extra_state_modules(sharding)]


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
    """Every tensor chunk a TP=1 PP=1 megatron-core save of ``sharding``'s model holds, grouped by entry."""
    single = sharding.retarget(1, 1)  # keeps the vocabulary padding of the requested TP (the stored global shapes)
    layers = sharding.arch.num_layers
    chunks = []
    for entry in single.stage_entries(0):
        key, layer = sharded_key(entry.global_name)
        shape = megatron_shape(entry.global_name, sharding.arch, single.padded_vocab_size)
        parts = 2 if entry.row.split is Split.GATED else 1
        part_shape = (shape[0] // parts, *shape[1:])
        for part in range(parts):
            offsets = (part * part_shape[0],) + (0,) * (len(shape) - 1)
            if layer is None:
                chunks.append(Chunk(entry, key, torch.Size(shape), torch.Size(offsets), torch.Size(part_shape),
                                    part, parts))
            else:
                chunks.append(Chunk(entry, key, torch.Size((layers, *shape)), torch.Size((layer, *offsets)),
                                    torch.Size((1, *part_shape)), part, parts))
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
        return len(sharding.retarget(1, 1).stage_entries(0))

    def open_reader(self, iter_dir, saved, transformer_impl):
        from .torch_dist_io import TorchDistReader

        reader = TorchDistReader(iter_dir)
        reader.check_matches(saved)
        return reader

    def export_dtype(self, saved_dtype):
        return saved_dtype  # as a model built with the checkpoint's dtype would load it

    def load_into_model(self, model, iter_dir, saved, target, tp_rank, pp_rank, transformer_impl):

        from .torch_dist_io import TorchDistReader

        check_torch_dist_checkpoint(iter_dir)  # megatron-core unpickles without restriction: vet the bytes first
        TorchDistReader(iter_dir).check_matches(saved)
        state = load_model_state(model.sharded_state_dict(), iter_dir)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"torch_dist checkpoint {iter_dir} does not match the model: "
                                  f"{' '.join(str(error).split())[:300]}") from None

"""Checkpoint storage shared by conversion, training, generation and RLHF.

``hf`` (HF directories: safetensors reading and streaming writes, assets, index), ``megatron`` (Megatron-LM's
layout: tracker, iteration directories, ``megatron_patch.json``, legacy rank files), ``atomic`` (outputs that
appear whole), ``formats`` (the registry of checkpoint formats: ``legacy``, ``torch_dist``), ``trusted_load``
(refuse pickles that would run code) and ``paths`` (input/output path rules). Knows no model family: it imports
``mapping`` (the split table and parameter names of stored shards), ``errors`` and nothing else of ours.
"""

from .trusted_load import check_torch_dist_checkpoint, read_dcp_metadata

__all__ = ["check_torch_dist_checkpoint", "read_dcp_metadata"]

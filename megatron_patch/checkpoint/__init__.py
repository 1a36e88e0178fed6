"""Checkpoint storage shared by conversion, training, generation and RLHF."""

from .trusted_load import check_torch_dist_checkpoint, read_dcp_metadata

__all__ = ["check_torch_dist_checkpoint", "read_dcp_metadata"]

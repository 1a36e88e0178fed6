"""HF <-> megatron-core tensor layouts: pure layout primitives (``layouts``), typed mapping rows (``rows``) and the
one sharding engine (``sharding``). Imports nothing of ours but ``errors``: models, checkpoint storage and the
converter build on it."""

from . import layouts
from .pieces import Pieces, export_pieces
from .rows import EXPERT, QKV, Direct, FusedQKV, GatedMLP, PerHeadQKV, Row, Split, is_expert_row, layer_names
from .sharding import SPLITS, Entry, Sharding, megatron_shape, merge_for_tp, split_for_tp, te_name

__all__ = ["EXPERT", "QKV", "SPLITS", "Direct", "Entry", "FusedQKV", "GatedMLP", "PerHeadQKV", "Pieces", "Row", "Sharding", "Split",
           "export_pieces", "is_expert_row", "layer_names", "layouts", "megatron_shape", "merge_for_tp", "split_for_tp", "te_name"]

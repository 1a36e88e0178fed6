"""KV-cache generation and sampling over the toolkit's megatron-core models."""

from .engine import GenerationEngine, GenerationError, mark_weights_loaded, weights_source
from .loader import LoadedModel, load_model
from .sampling import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p, select_next

__all__ = [
    "GenerationEngine",
    "GenerationError",
    "LoadedModel",
    "SamplingParams",
    "apply_repetition_penalty",
    "filter_top_k",
    "filter_top_p",
    "load_model",
    "mark_weights_loaded",
    "select_next",
    "weights_source",
]

"""A normalisation layer right after the word embedding (bloom's ``word_embeddings_layernorm``).

megatron-core's GPTModel builds its ``LanguageModelEmbedding`` itself (no spec slot), and at PP > 1 with tied
weights it has already wired the embedding into the shared-weight all-reduce by the time the constructor
returns. So instead of rebuilding the embedding, the built instance is upgraded to the subclass below
(``add_embedding_norm``), which adds one submodule and applies it to the embedding's output. The embedding
exists on the first pipeline stage only, so the norm does too.

Checkpoint name: ``embedding.word_embeddings_layernorm.{weight,bias}``. ``LanguageModelEmbedding`` uses
megatron-core's default ``sharded_state_dict``, which treats a plain child module's tensors as replicated
across TP (replica ids by TP/DP rank), which is what this norm is.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

from ..errors import UnsupportedModelError

NORM_NAME = "word_embeddings_layernorm"


class EmbeddingWithNorm(LanguageModelEmbedding):
    """``LanguageModelEmbedding`` followed by a LayerNorm/RMSNorm over the hidden dimension.

    The norm runs after megatron-core's embedding dropout (HF bloom has no embedding dropout; with
    ``hidden_dropout = 0`` the two orders are the same).
    """

    def forward(self, input_ids, position_ids, tokentype_ids=None):
        # (seq, batch, hidden) -> same shape; per-token, so sequence-parallel scattering does not matter.
        return getattr(self, NORM_NAME)(super().forward(input_ids, position_ids, tokentype_ids))


def make_norm(config) -> torch.nn.Module:
    """The norm ``config.normalization`` names, initialised to identity (weight 1, bias 0)."""
    kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
    if config.normalization not in kinds:
        raise UnsupportedModelError(f"embedding norm supports {', '.join(kinds)} (got {config.normalization})")
    norm = kinds[config.normalization](config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
    for param in norm.parameters():
        # Under sequence parallelism each TP rank sees different tokens: megatron-core all-reduces the grads of
        # parameters marked this way, as it does for its own norms.
        param.sequence_parallel = config.sequence_parallel
    return norm


def add_embedding_norm(embedding: LanguageModelEmbedding, config) -> EmbeddingWithNorm:
    """Upgrade a built ``LanguageModelEmbedding`` in place to ``EmbeddingWithNorm`` (adds the norm's parameters)."""
    if type(embedding) is not LanguageModelEmbedding:
        raise TypeError(f"expected megatron-core's LanguageModelEmbedding, got {type(embedding).__name__}")
    embedding.__class__ = EmbeddingWithNorm
    embedding.add_module(NORM_NAME, make_norm(config))
    return embedding

"""NormHead (Baichuan2): the output projection uses L2-normalised vocabulary rows.

Baichuan2's ``NormHead`` stores an unnormalised weight (vocab, hidden) and computes
``hidden @ normalize(weight, dim=1).T``. The checkpoint keeps the stored weight unchanged; the normalisation
happens in the forward pass, so training updates the raw weight exactly as Baichuan2 does.

Tensor parallelism: the output layer is vocab-parallel (each rank holds whole rows), and the norm is per row,
so each rank normalises its own rows with no communication. Padded vocabulary rows are zero and stay zero
(``F.normalize`` divides by ``max(norm, eps)``), so their logits stay 0 as without NormHead.

GPTModel builds its output ``ColumnParallelLinear`` itself (no spec slot); ``use_norm_head`` upgrades the
built instance to the subclass below, which adds no state.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear

from ..errors import ConfigError


class NormHeadColumnParallelLinear(ColumnParallelLinear):
    """Vocab-parallel output layer whose weight rows are L2-normalised before the matmul."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        weight = self.weight if weight is None else weight
        return super().forward(input_, F.normalize(weight, dim=-1), runtime_gather_output)


def use_norm_head(output_layer: ColumnParallelLinear, config) -> NormHeadColumnParallelLinear:
    """Upgrade GPTModel's built output layer in place to ``NormHeadColumnParallelLinear``."""
    if type(output_layer) is not ColumnParallelLinear:
        raise TypeError(f"expected megatron-core's ColumnParallelLinear, got {type(output_layer).__name__}")
    if config.gradient_accumulation_fusion:
        # The fused wgrad kernel accumulates into weight.main_grad of the tensor it is given, which would be the
        # normalised copy rather than the parameter.
        raise ConfigError("NormHead (Baichuan2) does not work with gradient accumulation fusion; "
                         "pass --no-gradient-accumulation-fusion")
    output_layer.__class__ = NormHeadColumnParallelLinear
    return output_layer

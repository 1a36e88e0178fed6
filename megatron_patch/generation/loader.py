"""Build a megatron-core model for generation on this rank and fill it from a megatron-patch checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import GenerationError, mark_weights_loaded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model stage with loaded weights and what generation needs to know about its checkpoint."""

    model: torch.nn.Module
    iter_dir: Path
    meta: dict
    vocab_size: int  # real tokens (HF vocabulary + extra tokens); the embedding may hold padding rows beyond
    max_sequence_length: int  # positions the model was built for (the family reads it from its HF config)

    @property
    def hf_config(self) -> dict:
        return self.meta["hf_config"]

    @property
    def assets_dir(self) -> Path:
        from ..checkpoint.megatron import ASSETS

        return self.iter_dir / ASSETS

    def eos_token_id(self):
        """EOS id(s) from the checkpoint's generation_config.json (as transformers reads it), else config.json."""
        import json

        generation_config = self.assets_dir / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            if eos is not None:
                return eos
        return self.hf_config.get("eos_token_id")


def load_model(checkpoint: str | os.PathLike, precision: str = "fp32", allow_non_finite: bool = False) -> LoadedModel:
    """Load a converted or trained checkpoint (torch_dist or legacy, saved at any TP x PP) into a model stage for
    the current TP x PP (x EP for a mixture of experts: this rank's experts). ``init_distributed`` must have run on
    every rank.
    NaN/Inf weights are refused (they would generate empty completions) unless ``allow_non_finite``."""
    from megatron.core import parallel_state

    from ..models.builder import build_model, transformer_config
    from ..models.checkpoint import Checkpoint
    from ..runtime.device import place_model

    if precision not in DTYPES:
        raise GenerationError(f"precision must be one of {', '.join(DTYPES)} (got {precision})")
    ckpt = Checkpoint.open(checkpoint)
    spec = ckpt.spec
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    spec.sharding(tp, pp)  # a one-line error when the model cannot be split so
    experts = ({"expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
                "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size()}
               if spec.arch.is_moe else {})
    spec.arch.check_expert_parallel(experts.get("expert_model_parallel_size", 1))
    if experts.get("expert_model_parallel_size", 1) > 1:
        # The ranks of an EP group generate different prompts: megatron-core's allgather dispatcher gathers equal
        # token counts only, the alltoall one exchanges each rank's counts first.
        experts["moe_token_dispatcher_type"] = "alltoall"
    config = transformer_config(spec.arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                params_dtype=DTYPES[precision], **experts)
    model = place_model(build_model(spec.arch, spec.padded_vocab_size, config=config, parallel_output=False,
                                    vocab_size=spec.vocab_size))
    ckpt.load_into(model, allow_non_finite)  # copied into the placed parameters
    mark_weights_loaded(model, str(ckpt.iter_dir))
    model.eval()
    return LoadedModel(model=model, iter_dir=ckpt.iter_dir, meta=ckpt.meta, vocab_size=spec.vocab_size,
                       max_sequence_length=spec.arch.max_position_embeddings)

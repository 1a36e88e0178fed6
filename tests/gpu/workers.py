"""Work run in a spawned rank by the GPU tests (module level, so ``spawn`` can import it)."""

from __future__ import annotations


def train_on_gpu(cfg: dict) -> dict:
    """Train; report the losses and where the model, its gradients buffer and the optimizer state live."""
    import torch

    from megatron_patch.training.arguments import TrainConfig
    from megatron_patch.training.loop import build_trainer, train

    trainer = build_trainer(TrainConfig.from_dict(cfg), quiet=True)
    try:
        history = train(trainer)
    finally:
        trainer.logger.close()
    params = list(trainer.trained.model.module.parameters())
    optimizers = getattr(trainer.trained.optimizer, "chained_optimizers", [trainer.trained.optimizer])
    states = [value for opt in optimizers for state in opt.optimizer.state.values() for value in state.values()
              if isinstance(value, torch.Tensor) and value.dim() > 0]  # Adam moments (not the 0-dim step)
    return {
        "losses": [loss for _, loss in history],
        "param_devices": sorted({p.device.type for p in params}),
        "grad_buffer_devices": sorted({p.main_grad.device.type for p in params if hasattr(p, "main_grad")}),
        "optimizer_state_devices": sorted({s.device.type for s in states}),
        "param_dtype": str(params[0].dtype),
    }


def logits_and_generation_on_gpu(ckpt: str, tokens: list[int], new_tokens: int) -> dict:
    """fp32 logits of ``tokens`` and a greedy continuation, with the model on the GPU."""
    import torch

    from megatron_patch.generation import GenerationEngine, SamplingParams, load_model
    from megatron_patch.models.inference import forward_logits
    from megatron_patch.runtime import init_distributed, local_device

    init_distributed(1, 1)
    loaded = load_model(ckpt, "fp32")
    logits = forward_logits(loaded.model, torch.tensor([tokens], device=local_device()))
    engine = GenerationEngine(loaded.model, loaded.vocab_size, None, loaded.max_sequence_length)
    completion = engine.generate([tokens], new_tokens, SamplingParams())[0]
    return {"logits": logits[..., : loaded.vocab_size].float().cpu(), "completion": completion,
            "model_device": next(loaded.model.parameters()).device.type}

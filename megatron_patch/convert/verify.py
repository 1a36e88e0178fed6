"""Numerical proof that a Megatron checkpoint computes the same logits as its HF original."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..checkpoint.checksums import verify_manifest
from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import Checkpoint
from ..runtime.progress import progress

FIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Megatron splits each layer across tensor-parallel ranks "
    "and the layers across pipeline stages; the logits must not change."
)


@dataclass
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    tokens: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (f"max_abs_diff={self.max_abs_diff:.3e} top1_agreement={self.top1_agreement * 100:.2f}% "
                f"tokens={self.tokens} tolerance={self.tolerance:.0e} {verdict}")


def fixed_tokens(hf_dir, vocab_size: int, length: int = 48, trust_remote_code: bool = False) -> torch.Tensor:
    """Token ids of FIXED_TEXT with the checkpoint's tokenizer; a deterministic id sequence if it has none."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code, local_files_only=True)
        ids = tokenizer(FIXED_TEXT)["input_ids"][:length]
    except (OSError, ValueError):
        ids = [(7 * i + 3) % vocab_size for i in range(length)]
    return torch.tensor([ids], dtype=torch.long)


def hf_logits(hf_dir, tokens: torch.Tensor, trust_remote_code: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     local_files_only=True)
    except ValueError as error:
        if trust_remote_code:
            raise
        # Baichuan and Qwen (v1) ship their modeling code with the checkpoint; transformers has no class for them.
        raise ConfigError(f"transformers has no built-in class for {hf_dir} ({str(error).split('.')[0]}); if the "
                         "directory ships its own modeling code, rerun with --trust-remote-code") from None
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(iter_dirs: list, tokens: torch.Tensor, tp: int, pp: int, ep: int = 1) -> list[torch.Tensor]:
    """Run each checkpoint at TP x PP (x EP: TP x PP x EP ranks, EP carved out of data parallelism; one set of
    local ranks, fp32); return the logits over the real vocabulary."""
    from ..runtime import run_on_local_ranks

    iter_dirs = [str(d) for d in iter_dirs]
    results = run_on_local_ranks(_megatron_logits_rank, tp * pp * ep, iter_dirs, tokens, tp, pp, ep,
                                 env={"CUDA_VISIBLE_DEVICES": ""})
    logits = next(r for r in results if r is not None)
    return [out[..., : Checkpoint.open(d).spec.vocab_size] for d, out in zip(iter_dirs, logits)]


def _megatron_logits_rank(iter_dirs, tokens, tp, pp, ep=1):
    from megatron.core import parallel_state

    from ..models.builder import build_model
    from ..models.inference import forward_logits
    from ..runtime import init_distributed, local_device, place_model
    init_distributed(tp, pp, expert_model_parallel_size=ep)
    tokens = tokens.to(local_device())
    outputs = []
    for iter_dir in iter_dirs:
        ckpt = Checkpoint.open(iter_dir)
        model = place_model(build_model(ckpt.spec.arch, ckpt.spec.padded_vocab_size, parallel_output=False))
        ckpt.load_into(model)
        model.eval()
        outputs.append(forward_logits(model, tokens))
    if (outputs[0] is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        return [out.float().cpu() for out in outputs]  # back to the host: compared there with the HF logits
    return None


def compare(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float) -> ParityReport:
    diff = (reference - candidate).abs().max().item()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return ParityReport(diff, agree, reference.shape[-2] * reference.shape[0], tolerance)


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, tp: int | None = None, pp: int | None = None,
           tolerance: float = 1e-4, trust_remote_code: bool = False, ep: int | None = None) -> ParityReport:
    """Everything checkable is checked before a rank is spawned or transformers is called (which, given a path that
    is not a directory, would look the name up on the Hugging Face hub)."""
    from pathlib import Path


    if not (Path(hf_dir) / "config.json").is_file():
        raise CheckpointError(f"--hf {hf_dir} is not a HF model directory (no config.json there)")
    for flag, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    verify_manifest(hf_dir)  # an HF directory this toolkit wrote (transformers reads it without a check)
    ckpt = Checkpoint.open(mcore_dir)
    tp, pp, ep = tp or ckpt.tp, pp or ckpt.pp, ep or ckpt.ep
    ckpt.sharding(tp, pp, ep)  # TP must divide the heads and groups, PP the layers, EP the experts: one line now
    tokens = fixed_tokens(hf_dir, ckpt.spec.arch.vocab_size, trust_remote_code=trust_remote_code)
    # HF, then Megatron at TP x PP; two steps of a minute each on a big model: one line when both are done (a line
    # per 30 s step in a log would only repeat the count).
    with progress(total=2, desc="verify: logits", unit="model", interval=math.inf) as bar:
        reference = hf_logits(hf_dir, tokens, trust_remote_code)
        bar.update(1)
        candidate = megatron_logits([ckpt.iter_dir], tokens, tp, pp, ep)[0]
        bar.update(1)
    extra = ckpt.spec.extra_vocab_size
    if extra and candidate.shape[-1] == reference.shape[-1] + extra:
        candidate = candidate[..., : reference.shape[-1]]  # new tokens have no HF counterpart; old ones must agree
    if reference.shape != candidate.shape:
        raise CheckpointError(f"HF logits {tuple(reference.shape)} and Megatron logits {tuple(candidate.shape)} differ "
                              "in shape: is this checkpoint converted from that HF directory?")
    return compare(reference, candidate, tolerance)

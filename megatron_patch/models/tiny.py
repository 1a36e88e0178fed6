"""Offline HF checkpoints for demos and tests: a family flavor with seeded random weights and a tokenizer trained
on the corpus the repo ships. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent.parent / "data" / "assets" / "tiny_corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: bos 1, eos 2 as in llama configs


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512, corpus: Path = CORPUS):
    """A byte-level BPE tokenizer trained on ``corpus``, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def make_hf_checkpoint(out_dir: str | os.PathLike, hf_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                       tokenizer: bool = True, max_shard_size: str | None = None):
    """Save a randomly initialised (seeded) HF model for ``hf_config`` to ``out_dir``; returns the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(hf_config)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Non-trivial norm weights, so a transposed or misplaced norm cannot hide behind all-ones.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2:][0]:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        train_tokenizer(out_dir, vocab_size=min(512, config.vocab_size))
    return model

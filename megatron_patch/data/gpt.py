"""Pretraining samples: megatron-core's GPTDataset over indexed datasets, blended by BlendedMegatronDatasetBuilder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class _DatasetTokenizer:
    """What GPTDataset reads from a tokenizer. Pretraining samples hold no padding, so there is no pad id
    (GPTDataset then uses its own out-of-vocabulary pad marker)."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset cache key
        return {"class": "megatron_patch.tokenizer", "eod": self.eod, "vocab_size": self.vocab_size}

    @property
    def pad(self) -> int:
        raise AttributeError("pretraining samples carry no padding")


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """``[W1] P1 [W2 P2 ...]`` (Megatron-LM's --data-path) -> (prefixes, weights or None); checks the files exist."""
    from megatron.core.datasets.utils import get_blend_from_list

    if len(data_path) > 1 and len(data_path) % 2 == 0:
        for weight in data_path[0::2]:
            try:
                float(weight)
            except ValueError:
                raise ConfigError(f"--data-path: '{weight}' should be a weight (use W1 PREFIX1 W2 PREFIX2 ...)") from None
    prefixes, weights = get_blend_from_list(data_path)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"--data-path: {prefix}{suffix} does not exist (run the preprocessing first)")
    return prefixes, weights


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int, eod: int, vocab_size: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None):
    """(train, valid, test) GPTDatasets (or blends of them); a split with no weight is None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parse_data_path(data_path),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=_DatasetTokenizer(eod, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention without a materialised mask
        mid_level_dataset_surplus=0.005,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()

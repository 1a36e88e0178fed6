"""Checkpoints this toolkit did not write: Megatron-LM (legacy ``mp_rank_*/model_optim_rng.pt`` with ``args``, or
torch_dist with ``common.pt`` / ``metadata.json``) and Megatron-Bridge (torch_dist with ``run_config.yaml``).

Their tensors are the ones megatron-core's GPTModel holds, as ours are; what they lack is our
``megatron_patch.json``. ``describe_foreign`` builds it: the model's shape, parallel sizes, vocabulary rows and
dtype from what the checkpoint records, the family from ``--model-name`` (or the HF config), and the HF config and
tokenizer from ``--hf-config DIR``. Every recorded shape fact must agree with the HF config; the tensors' shapes are
checked against it again before any conversion work.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..checkpoint.hf import read_config
from ..checkpoint.megatron import META, load_legacy_payload
from ..checkpoint.trusted_load import megatron_lm_args_globals
from ..errors import CheckpointError
from .registry import detect_family, get_family

RUN_CONFIG = "run_config.yaml"  # Megatron-Bridge
COMMON = "common.pt"  # Megatron-LM torch_dist: non-tensor state, including ``args``
EMBEDDING = "embedding.word_embeddings.weight"

# Recorded name -> ModelArch field, for the facts compared with the HF config (Megatron-LM args and Megatron-Bridge's
# model provider spell them the same way).
_SHAPE_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "head_dim",
}


def describe_foreign(iter_dir: Path, model_name: str | None, hf_config_dir: str | os.PathLike | None
                     ) -> tuple[dict, Path]:
    """(megatron_patch.json fields, the file they were read from) for a Megatron-LM or Megatron-Bridge iteration
    directory; raises a one-line CheckpointError naming what is missing."""
    iter_dir = Path(iter_dir)
    kind, where, record, stored = _recorded(iter_dir)
    if hf_config_dir is None:
        raise CheckpointError(f"{iter_dir} is a {kind} checkpoint without {META}: pass --hf-config DIR (the HF "
                              "config.json and tokenizer of the model it holds) and --model-name FAMILY if config.json "
                              "does not name the architecture")
    hf_config = read_config(hf_config_dir)
    family = get_family(model_name) if model_name else detect_family(hf_config)
    arch = family.arch_from_hf(hf_config)
    for recorded_name, field in _SHAPE_FIELDS.items():
        value = record.get(recorded_name)
        if value is not None and value != getattr(arch, field):
            raise CheckpointError(f"{where} records {recorded_name}={value}, but {Path(hf_config_dir) / 'config.json'} "
                                  f"gives {field}={getattr(arch, field)}: --hf-config is not this model's config")
    tied = record.get("tie_word_embeddings")
    if tied is not None and tied != arch.tie_word_embeddings:
        raise CheckpointError(f"{where} records tied embeddings={tied}, but {Path(hf_config_dir) / 'config.json'} "
                              f"says tie_word_embeddings={arch.tie_word_embeddings}")
    padded = stored["padded_vocab_size"]
    if padded < arch.vocab_size:
        raise CheckpointError(f"{where}: the checkpoint's {padded} vocabulary rows are fewer than the "
                              f"{arch.vocab_size} tokens of {Path(hf_config_dir) / 'config.json'}")
    meta = {
        "format": stored["format"],
        "family": family.name,
        "iteration": record.get("iteration", "release"),
        "tensor_model_parallel_size": record.get("tensor_model_parallel_size") or 1,
        "pipeline_model_parallel_size": record.get("pipeline_model_parallel_size") or 1,
        "transformer_impl": stored["transformer_impl"],
        "vocab_size": arch.vocab_size,
        "extra_vocab_size": 0,
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": record.get("make_vocab_size_divisible_by") or 128,
        "dtype": stored["dtype"],
        "hf_config": hf_config,
        "source": kind,
    }
    return meta, where


def _recorded(iter_dir: Path) -> tuple[str, Path, dict, dict]:
    """(kind, the file read, the recorded model facts, facts of the stored tensors)."""
    if (iter_dir / RUN_CONFIG).is_file():
        where = iter_dir / RUN_CONFIG
        return "Megatron-Bridge", where, _bridge_record(where), _torch_dist_facts(iter_dir)
    first = sorted(iter_dir.glob("mp_rank_00*/model_optim_rng.pt"))
    if first:  # mp_rank_00 (one stage) or mp_rank_00_000
        return "Megatron-LM", first[0], *_legacy_record_and_facts(first[0])
    if (iter_dir / ".metadata").is_file():
        where = iter_dir / COMMON
        if not where.is_file():
            raise CheckpointError(f"{iter_dir} is a torch_dist checkpoint without {META}, {RUN_CONFIG} or {COMMON}: "
                                  "nothing records which model it holds")
        return "Megatron-LM", where, _load_args(where, "torch_dist checkpoint"), _torch_dist_facts(iter_dir)
    raise CheckpointError(f"{iter_dir} holds no {META}, {RUN_CONFIG}, {COMMON} or mp_rank_*/model_optim_rng.pt: not a "
                          "Megatron checkpoint")


def _bridge_record(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} is not valid YAML ({' '.join(str(error).split())[:200]})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} has no 'model' section (the model provider's fields)")
    record = {name: model.get(name) for name in (*_SHAPE_FIELDS, "tensor_model_parallel_size",
                                                 "pipeline_model_parallel_size", "make_vocab_size_divisible_by")}
    if model.get("num_query_groups") is None:
        record["num_query_groups"] = model.get("num_attention_heads")
    if model.get("share_embeddings_and_output_weights") is not None:
        record["tie_word_embeddings"] = bool(model["share_embeddings_and_output_weights"])
    return record


def _load_args(path: Path, what: str) -> dict:
    """The recorded facts of a Megatron-LM file holding ``args`` (``common.pt`` or a legacy rank file)."""
    return _args_record(_payload_with_args(path, what))


def _payload_with_args(path: Path, what: str) -> dict:
    payload = load_legacy_payload(path, allowed_globals=tuple(megatron_lm_args_globals()))
    if not isinstance(payload.get("args"), argparse.Namespace):
        raise CheckpointError(f"{path} has no 'args' (the Megatron-LM run's arguments): cannot tell which model the "
                              f"{what} holds")
    return payload


def _args_record(payload: dict) -> dict:
    """Megatron-LM's argument names -> the recorded facts (``num_query_groups`` only counts with GQA on)."""
    raw = vars(payload["args"])
    record = {name: raw.get(name) for name in (*_SHAPE_FIELDS, "tensor_model_parallel_size",
                                               "pipeline_model_parallel_size", "make_vocab_size_divisible_by")}
    if not raw.get("group_query_attention"):
        record["num_query_groups"] = raw.get("num_attention_heads")
    if raw.get("untie_embeddings_and_output_weights") is not None:
        record["tie_word_embeddings"] = not raw["untie_embeddings_and_output_weights"]
    if isinstance(payload.get("iteration"), int):
        record["iteration"] = payload["iteration"]
    return record


def _legacy_record_and_facts(first: Path) -> tuple[dict, dict]:
    """From the first rank file (TP rank 0 of the first stage): the run's args and its word-embedding shard."""
    payload = _payload_with_args(first, "legacy checkpoint")
    record = _args_record(payload)
    state = payload.get("model")
    if not isinstance(state, dict) or EMBEDDING not in state:
        raise CheckpointError(f"{first} holds no 'model' with {EMBEDDING} (a Megatron-LM model saved with virtual "
                              "pipeline stages, or another model class?)")
    embedding = state[EMBEDDING]
    te = any(name.endswith(".linear_qkv.layer_norm_weight") for name in state)
    tp = record.get("tensor_model_parallel_size") or 1
    facts = {"format": "legacy", "padded_vocab_size": embedding.shape[0] * tp,
             "dtype": str(embedding.dtype).removeprefix("torch."),
             "transformer_impl": "transformer_engine" if te else "local"}
    return record, facts


def _torch_dist_facts(iter_dir: Path) -> dict:
    """Vocabulary rows and dtype of the stored word embedding (DCP metadata, read with the allow-list)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..checkpoint.trusted_load import read_dcp_metadata

    metadata = read_dcp_metadata(iter_dir / ".metadata")
    stored = metadata.state_dict_metadata.get(EMBEDDING)
    if not isinstance(stored, TensorStorageMetadata):
        raise CheckpointError(f"torch_dist checkpoint {iter_dir} holds no tensor '{EMBEDDING}'")
    return {"format": "torch_dist", "padded_vocab_size": int(stored.size[0]),
            "dtype": str(stored.properties.dtype).removeprefix("torch."), "transformer_impl": "local"}

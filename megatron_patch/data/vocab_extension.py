"""Vocabulary extension: teach a model's tokenizer a new language and give its new tokens sensible embeddings.

    python -m megatron_patch.data.vocab_extension --corpus new_lang.txt --load MODEL --save OUT \
        [--vocab-size 8000] [--model-type bpe|unigram]
    (toolkits/vocab_extension/run_vocab_extension.sh is the positional wrapper)

MODEL is a HF directory or a megatron-patch Megatron checkpoint (either format; OUT is then a Megatron checkpoint
with the same TP x PP and format). Steps:

1. ``train_sentencepiece``: a SentencePiece model on the user's corpus (the ``sentencepiece`` package).
2. The new pieces (those the model's tokenizer lacks) go into its tokenizer:
   * llama-style, with a SentencePiece ``tokenizer.model``: appended to the ModelProto (``merge_sentencepiece``)
     with scores below every existing piece, so the old merges keep their priority and text in the old language
     tokenizes as before; the HF fast tokenizer (``tokenizer.json``) is regenerated from the merged model.
   * a HF fast BPE tokenizer only (``tokenizer.json``, byte-level or metaspace): each new piece becomes a vocab
     entry reachable by merges appended after the existing ones (``extend_fast_tokenizer``); a piece whose halves
     are unknown brings those halves in too.
3. ``resize_hf``: the word embedding and output layer grow to the new vocabulary. Old rows are copied unchanged;
   the row of each new token is the mean of the old rows of the pieces the *old* tokenizer splits that token's
   text into (its own BPE model applied to the token string, byte fallback included). A new id that falls on an
   unused padding row of the old matrix overwrites that row. ``config.json``'s ``vocab_size`` is updated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from ..checkpoint.checksums import write_manifest
from ..errors import CheckpointError, ConfigError, DataError, run_reporting_errors
from ..runtime.progress import progress
from .tokenizers import check_no_custom_code

SP_MODEL = "tokenizer.model"
FAST_TOKENIZER = "tokenizer.json"
_NORMAL = 1  # sentencepiece_model_pb2.ModelProto.SentencePiece.Type.NORMAL


# --- 1. training -------------------------------------------------------------------------------------------------


def check_training_request(corpus: list[str | os.PathLike], vocab_size: int, model_type: str) -> None:
    """The SentencePiece flags, checked before any work."""
    for path in corpus:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"--model-type must be bpe or unigram (got {model_type})")
    if vocab_size < 2:
        raise ConfigError(f"--vocab-size must be >= 2 (got {vocab_size})")


def train_sentencepiece(corpus: list[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 0.9995) -> Path:
    """Train a SentencePiece model on ``corpus`` files; returns the ``.model`` path."""
    import sentencepiece as spm

    check_training_request(corpus, vocab_size, model_type)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in corpus), model_prefix=str(model_prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=False,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
        )
    except RuntimeError as error:
        # sentencepiece says "Vocabulary size too high (N). Please set it to a value <= M." for a small corpus.
        limit = re.search(r"Vocabulary size too high.*?<=\s*(\d+)", str(error))
        if limit is None:
            raise
        raise ConfigError(f"--vocab-size {vocab_size} is more pieces than SentencePiece can learn from the corpus "
                          f"(at most {limit.group(1)} there): pass --vocab-size {limit.group(1)} or less, or a "
                          "larger corpus") from None
    return Path(f"{model_prefix}.model")


def _load_proto(path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def new_pieces_of(trained_model: str | os.PathLike) -> list[str]:
    """The normal pieces of a trained SentencePiece model, in its own order (merge order for BPE)."""
    return [p.piece for p in _load_proto(trained_model).pieces if p.type == _NORMAL]


# --- 2a. llama-style sentencepiece tokenizers -------------------------------------------------------------------


def merge_sentencepiece(base_model: str | os.PathLike, pieces: list[str], out_model: str | os.PathLike) -> list[str]:
    """Append ``pieces`` missing from ``base_model`` to it; returns the pieces added (in id order).

    New pieces score below every existing one (in their given order), so the base model's merges keep priority.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = _load_proto(base_model)
    existing = {p.piece for p in proto.pieces}
    lowest = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
    added = []
    for piece in pieces:
        if piece in existing:
            continue
        entry = sentencepiece_model_pb2.ModelProto.SentencePiece(piece=piece, score=lowest - 1.0 - len(added),
                                                                  type=_NORMAL)
        proto.pieces.append(entry)
        existing.add(piece)
        added.append(piece)
    Path(out_model).write_bytes(proto.SerializeToString())
    return added


def _regenerate_fast_from_sentencepiece(tokenizer_dir: Path) -> None:
    """Rewrite ``tokenizer.json`` from ``tokenizer.model`` (transformers' llama converter), keeping the config."""
    from transformers import LlamaTokenizer

    (tokenizer_dir / FAST_TOKENIZER).unlink(missing_ok=True)
    LlamaTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tokenizer_dir))


# --- 2b. HF fast BPE tokenizers ---------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE vocabularies spell it with (GPT-2's table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _is_byte_level(spec: dict) -> bool:
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "ByteLevel" in text


def piece_to_model_string(piece: str, byte_level: bool) -> str:
    """A SentencePiece piece ('▁' = space) as the string a BPE model's vocabulary spells it."""
    if not byte_level:
        return piece
    table = _byte_level_alphabet()
    return "".join(table[b] for b in piece.replace("\u2581", " ").encode("utf-8"))


def extend_fast_tokenizer(tokenizer_dir: str | os.PathLike, pieces: list[str]) -> list[str]:
    """Add ``pieces`` to the BPE vocabulary of ``tokenizer_dir/tokenizer.json`` (in place); returns the added
    vocabulary strings in id order (halves brought in to make a piece reachable included)."""
    path = Path(tokenizer_dir) / FAST_TOKENIZER
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: only BPE fast tokenizers can be extended (this one is {model.get('type')})")
    byte_level = _is_byte_level(spec)
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    added: list[str] = []

    def add(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        next_id += 1
        added.append(token)

    def ensure(token: str) -> None:
        if token in vocab:
            return
        if len(token) == 1:  # a new base symbol (metaspace BPE; byte-level alphabets are complete)
            add(token)
            return
        # Prefer a split whose halves both exist, the longest left half first; else split off the last symbol.
        splits = [i for i in range(len(token) - 1, 0, -1) if token[:i] in vocab and token[i:] in vocab]
        cut = splits[0] if splits else len(token) - 1
        left, right = token[:cut], token[cut:]
        ensure(left)
        ensure(right)
        merges.append([left, right] if as_pairs else f"{left} {right}")
        add(token)

    for piece in pieces:
        ensure(piece_to_model_string(piece, byte_level))
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    return added


# --- tokenizer dispatch ------------------------------------------------------------------------------------------


def extend_tokenizer(old_dir: Path, new_dir: Path, trained_model: Path) -> int:
    """Write the extended tokenizer of ``old_dir`` into ``new_dir`` (which already holds a copy of its files);
    returns the number of vocabulary entries added."""
    pieces = new_pieces_of(trained_model)
    if (old_dir / SP_MODEL).is_file():
        added = merge_sentencepiece(old_dir / SP_MODEL, pieces, new_dir / SP_MODEL)
        _regenerate_fast_from_sentencepiece(new_dir)
        return len(added)
    if (old_dir / FAST_TOKENIZER).is_file():
        return len(extend_fast_tokenizer(new_dir, pieces))
    raise FileNotFoundError(f"{old_dir} has neither {SP_MODEL} nor {FAST_TOKENIZER}: no tokenizer to extend")


def _backend(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    check_no_custom_code(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    if not hasattr(tok, "backend_tokenizer"):
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} is not a fast (tokenizers) tokenizer")
    return tok


def sub_pieces(old_tokenizer_dir: Path, new_tokenizer_dir: Path) -> dict[int, list[int]]:
    """For every id of the new tokenizer beyond the old one: the old ids its vocabulary string splits into."""
    old, new = _backend(old_tokenizer_dir), _backend(new_tokenizer_dir)
    old_model = old.backend_tokenizer.model
    old_size = len(old)
    result = {}
    for token, token_id in new.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        if token_id < old_size:
            if old.convert_tokens_to_ids(token) != token_id:
                raise DataError(f"token {token!r} moved from id {old.convert_tokens_to_ids(token)} to {token_id}")
            continue
        ids = [t.id for t in old_model.tokenize(token)]
        if not ids:
            raise DataError(f"the old tokenizer cannot split new token {token!r}")
        result[token_id] = ids
    return result


# --- 3. weights --------------------------------------------------------------------------------------------------


def vocab_tensor_names(hf_config: dict) -> list[str]:
    """HF names of the tensors with one row per token (word embedding, untied output layer) for this family."""
    from ..mapping import Split
    from ..models import detect_family

    family = detect_family(hf_config)
    arch = family.arch_from_hf(hf_config)
    names = []
    for row in family.weight_mapping(arch):
        if row.split is Split.VOCAB:
            names += [n for n in row.hf_names if n not in names]
    return names


def resized(tensor: torch.Tensor, new_rows: dict[int, list[int]], vocab_size: int) -> torch.Tensor:
    """``tensor`` (rows, hidden) grown to ``vocab_size`` rows; row i for i in ``new_rows`` = mean of its old rows."""
    out = torch.zeros(max(vocab_size, tensor.shape[0]), *tensor.shape[1:], dtype=tensor.dtype)
    out[: tensor.shape[0]] = tensor
    for token_id, old_ids in new_rows.items():
        out[token_id] = tensor[old_ids].float().mean(dim=0).to(tensor.dtype)
    return out


def resize_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, new_rows: dict[int, list[int]],
              vocab_size: int) -> None:
    """Copy the HF model in ``hf_dir`` to ``out_dir`` (already holding the new tokenizer) with resized vocab rows."""
    from ..checkpoint.hf import HFCheckpointReader, ShardedSafetensorsWriter, read_config

    config = read_config(hf_dir)
    names = set(vocab_tensor_names(config))
    reader = HFCheckpointReader(hf_dir)
    writer = ShardedSafetensorsWriter(out_dir)
    tensors = list(reader.names())
    with progress(total=len(tensors), desc="vocab-extension: weights", unit="tensor") as bar:
        for name in tensors:
            tensor = reader.get(name)
            writer.add(name, resized(tensor, new_rows, vocab_size) if name in names else tensor)
            bar.update(1)
    writer.close()
    config["vocab_size"] = max(vocab_size, config["vocab_size"])
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- the whole tool ----------------------------------------------------------------------------------------------


def _copy_non_weights(src: Path, dst: Path) -> None:
    from ..checkpoint.hf import copy_assets

    copy_assets(src, dst)


def extend_hf(hf_dir: Path, out_dir: Path, trained_model: Path, overwrite: bool = False) -> dict:
    """HF directory -> HF directory with the extended tokenizer and resized embeddings."""
    from ..checkpoint.atomic import atomic_output_dir

    with atomic_output_dir(out_dir, overwrite) as temp:
        _copy_non_weights(hf_dir, temp)
        added = extend_tokenizer(hf_dir, temp, trained_model)
        rows = sub_pieces(hf_dir, temp)
        vocab_size = len(_backend(temp))
        resize_hf(hf_dir, temp, rows, vocab_size)
        write_manifest(temp)
    return {"added_tokens": added, "vocab_size": vocab_size}


def _check_hf_weights(hf_dir: Path) -> None:
    """Every tensor the model's config implies is there with its shape, before any work (the converter's check)."""
    from ..checkpoint.hf import read_config
    from ..convert.hf_to_mcore import make_plan

    plan = make_plan(read_config(hf_dir), tp=1, pp=1)
    plan.validate_hf(plan.open_hf(hf_dir))


def extend_megatron(checkpoint: Path, out_dir: Path, trained_model: Path, overwrite: bool = False) -> dict:
    """Megatron checkpoint -> Megatron checkpoint (same format, TP x PP): exported to HF, extended, converted back
    (the converter's round trip is bit-exact, so only the vocabulary rows change)."""
    from ..checkpoint.atomic import check_output_dir
    from ..checkpoint.megatron import find_iteration_dir, read_meta
    from ..convert.hf_to_mcore import hf_to_mcore
    from ..convert.mcore_to_hf import mcore_to_hf

    check_output_dir(out_dir, overwrite)
    meta = read_meta(find_iteration_dir(checkpoint))
    with tempfile.TemporaryDirectory(prefix="vocab-extension-") as work:
        hf_dir, extended = Path(work) / "hf", Path(work) / "hf-extended"
        mcore_to_hf(checkpoint, hf_dir)
        summary = extend_hf(hf_dir, extended, trained_model)
        hf_to_mcore(extended, out_dir, tp=meta["tensor_model_parallel_size"],
                    pp=meta["pipeline_model_parallel_size"], fmt=meta["format"],
                    transformer_impl=meta["transformer_impl"], family=meta["family"],
                    make_vocab_size_divisible_by=meta["make_vocab_size_divisible_by"], overwrite=overwrite)
    return summary


def extend_vocabulary(corpus: list[str | os.PathLike], load: str | os.PathLike, save: str | os.PathLike,
                      vocab_size: int = 8000, model_type: str = "bpe", character_coverage: float = 0.9995,
                      overwrite: bool = False) -> dict:
    """The whole tool: train SentencePiece on ``corpus``, extend the tokenizer of ``load`` (a HF directory or a
    Megatron checkpoint) and write the model with grown vocabulary rows to ``save`` (same kind as ``load``).

    Returns ``{"added_tokens", "vocab_size" (ids of the new tokenizer), "embedding_rows"}``.
    """
    from ..checkpoint.atomic import check_output_dir
    from ..checkpoint.megatron import META, TRACKER, find_iteration_dir, read_meta
    from ..checkpoint.paths import check_outputs

    check_training_request(corpus, vocab_size, model_type)
    check_outputs({"--save": save}, {"--load": load})
    for path in corpus:  # a corpus file inside --save would be deleted with it
        check_outputs({"--save": save}, {"--corpus": path})
    load, save = Path(load), Path(save)
    if not load.exists():
        raise FileNotFoundError(f"--load {load} does not exist")
    megatron = (load / TRACKER).is_file() or (load / META).is_file()
    if not megatron and not (load / "config.json").is_file():
        raise CheckpointError(f"--load {load} is neither a HF directory (config.json) nor a Megatron checkpoint")
    check_output_dir(save, overwrite)
    if not megatron:
        _check_hf_weights(load)
    with tempfile.TemporaryDirectory(prefix="spm-") as work:
        print(f"training a SentencePiece {model_type} model of {vocab_size} pieces on {len(corpus)} file(s)",
              file=sys.stderr, flush=True)
        trained = train_sentencepiece(corpus, Path(work) / "new", vocab_size, model_type, character_coverage)
        summary = (extend_megatron if megatron else extend_hf)(load, save, trained, overwrite)
    if megatron:
        summary["embedding_rows"] = read_meta(find_iteration_dir(save))["padded_vocab_size"]
    else:
        summary["embedding_rows"] = json.loads((save / "config.json").read_text())["vocab_size"]
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_patch.data.vocab_extension", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, help="text file(s) in the new language")
    p.add_argument("--load", required=True, help="HF model directory or Megatron checkpoint")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="pieces of the SentencePiece model trained on --corpus; those the tokenizer lacks are added "
                        "(default: 8000)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="SentencePiece model type (default: bpe)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the corpus characters SentencePiece must cover (default: 0.9995)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        summary = extend_vocabulary(args.corpus, args.load, args.save, args.vocab_size, args.model_type,
                                    args.character_coverage, args.overwrite)
        print(f"added {summary['added_tokens']} tokens to the tokenizer, which now has {summary['vocab_size']} ids; "
              f"the model has {summary['embedding_rows']} embedding rows (padding included); saved to {args.save}")

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())

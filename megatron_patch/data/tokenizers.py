"""Tokenizers the toolkit loads, by kind, behind one small interface.

Kinds (a registry; ``load_tokenizer`` picks one from the path when no kind is given):
  - ``hf``: a HuggingFace tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``), loaded offline.
  - ``sentencepiece``: a SentencePiece ``.model`` file.
  - ``qwen-tiktoken``: Qwen v1's ``qwen.tiktoken`` BPE ranks file, read without trusting remote code.

Every tokenizer exposes ``encode(text) -> list[int]``, ``decode(ids)``, ``eod`` (the id appended after each
document), ``pad`` and ``vocab_size`` (ids the tokenizer can produce, before any vocabulary padding).
"""

from __future__ import annotations

import abc
import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer as RustTokenizer

from ..errors import ConfigError, DataError


class Tokenizer(abc.ABC):
    """The interface the data pipeline and megatron-core's GPTDataset read (``eod``, ``pad``, ``vocab_size``)."""

    kind = "base"

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    @property
    @abc.abstractmethod
    def eod(self) -> int: ...

    @property
    def pad(self) -> int:
        return self.eod

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    def chat_template_ids(self, messages: list[dict]) -> tuple[list[int], list[bool]] | None:
        """(ids, is_response) for a chat, using the tokenizer's own chat template; None if it has none."""
        return None

    def worker_encoder(self) -> Callable[[str], list[int]]:
        """A picklable ``encode`` for tokenizer worker processes, giving the ids ``encode`` gives.

        By default the tokenizer itself; a kind whose library is heavy to import overrides it with a lighter
        equivalent, so a spawned worker starts in a fraction of a second.
        """
        return self.encode


def custom_tokenizer_code(path: str | os.PathLike) -> str | None:
    """The tokenizer class a HF directory asks to be loaded from its own Python files (``auto_map`` of
    ``tokenizer_config.json`` or ``config.json``, as transformers reads it with ``trust_remote_code``), or None."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            config = json.loads((Path(path) / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # absent or unreadable: the tokenizer's own load reports what is wrong with it
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if isinstance(auto_map, dict) and auto_map.get("AutoTokenizer"):
            entry = auto_map["AutoTokenizer"]
            classes = [c for c in (entry if isinstance(entry, list) else [entry]) if isinstance(c, str)]
            named = ", ".join(classes) if classes else repr(entry)
            return f"{name} auto_map: {named[:80]}"
    return None


def check_no_custom_code(path: str | os.PathLike) -> None:
    """Refuse a tokenizer that needs ``trust_remote_code``: this toolkit never runs code shipped with a model (there
    is no flag that allows it outside ``verify --trust-remote-code``); transformers would otherwise fail with a stack
    trace, or load ``tokenizer.json`` without the custom class and give other ids."""
    custom = custom_tokenizer_code(path)
    if custom is None:
        return
    spm = Path(path) / "tokenizer.model"
    way_out = (f"its {spm} may be used as a plain sentencepiece model (--tokenizer-model {spm} in training and "
               "preprocessing)" if spm.is_file() else
               "give a directory with a plain tokenizer.json, a sentencepiece tokenizer.model or qwen.tiktoken")
    raise DataError(f"the tokenizer in {path} needs its own Python code ({custom}), which this toolkit does not "
                    f"run (no flag enables it): {way_out}")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        check_no_custom_code(path)
        self.path = path
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as error:  # a missing, damaged or foreign tokenizer file
            raise DataError(f"cannot load the HF tokenizer in {path}: {' '.join(str(error).split())[:300]}") from None
        if self.tok.eos_token_id is None:
            raise DataError(f"the tokenizer in {path} has no eos token to mark document ends")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def worker_encoder(self) -> Callable[[str], list[int]]:
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer: the workers load it as it is
            return self.encode
        return RustEncoder(backend.to_str())

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    @property
    def eod(self) -> int:
        return int(self.tok.eos_token_id)

    @property
    def pad(self) -> int:
        return int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eod

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def chat_template_ids(self, messages):
        if not getattr(self.tok, "chat_template", None):
            return None
        # Render prefix by prefix: tokens added by an assistant turn are the response, the rest is prompt.
        ids: list[int] = []
        mask: list[bool] = []
        for end in range(1, len(messages) + 1):
            try:
                rendered = self.tok.apply_chat_template(messages[:end], tokenize=False)
            except TemplateError as error:  # incl. the sandbox's SecurityError: a template reaching for internals
                raise DataError(f"the chat template of the tokenizer in {self.path} cannot be rendered: "
                                f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
            full = self.tok.encode(rendered, add_special_tokens=False)
            if full[: len(ids)] != ids:
                raise DataError("the chat template does not render a conversation prefix-consistently")
            new = full[len(ids):]
            ids += new
            mask += [messages[end - 1].get("role") == "assistant"] * len(new)
        return ids, mask


class RustEncoder:
    """The Rust tokenizer inside a HF fast tokenizer, rebuilt from its serialised form: a worker that encodes with it
    imports ``tokenizers`` (0.3 s) instead of ``transformers`` (2 s), and skips the Python wrapper around each call
    (about 1.3x the tokens per CPU second, measured on the shipped corpus). The ids are ``encode``'s: same object."""

    def __init__(self, serialized: str):
        self.serialized = serialized
        self._tokenizer: RustTokenizer | None = None

    def __getstate__(self) -> dict:
        return {"serialized": self.serialized}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["serialized"])

    def __call__(self, text: str) -> list[int]:
        if self._tokenizer is None:
            self._tokenizer = RustTokenizer.from_str(self.serialized)
        return self._tokenizer.encode(text, add_special_tokens=False).ids


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._eod = self.sp.eos_id()
        if self._eod < 0:
            raise DataError(f"the sentencepiece model {path} has no eos piece to mark document ends")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self._eod

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


# Qwen v1 (qwen.tiktoken): the split pattern and special tokens of its tokenization_qwen.py, restated here so the
# file loads without trust_remote_code.
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


class QwenTiktokenTokenizer(Tokenizer):
    kind = "qwen-tiktoken"

    def __init__(self, path: str | os.PathLike):
        import tiktoken

        path = Path(path)
        if path.is_dir():
            path = path / "qwen.tiktoken"
        ranks = {}
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise DataError(f"{path}:{line_no}: not a '<base64 token> <rank>' line") from None
        start = len(ranks)
        special = {tok: start + i for i, tok in enumerate(_QWEN_SPECIAL)}
        self.enc = tiktoken.Encoding("qwen", pat_str=_QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        self._eod = special["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab


_KINDS: dict[str, Callable[[str], Tokenizer]] = {}


def register_tokenizer(kind: str, factory: Callable[[str], Tokenizer]) -> None:
    if kind in _KINDS:
        raise ValueError(f"tokenizer kind '{kind}' is registered twice")
    _KINDS[kind] = factory


register_tokenizer("hf", HFTokenizer)
register_tokenizer("sentencepiece", SentencePieceTokenizer)
register_tokenizer("qwen-tiktoken", QwenTiktokenTokenizer)


def tokenizer_kinds() -> list[str]:
    return sorted(_KINDS)


def detect_kind(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return "sentencepiece"
        if path.suffix == ".tiktoken":
            return "qwen-tiktoken"
    elif path.is_dir():
        if (path / "qwen.tiktoken").is_file() and not (path / "tokenizer.json").is_file():
            return "qwen-tiktoken"
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return "hf"
        if (path / "tokenizer.model").is_file():
            return "sentencepiece"
    else:
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    raise ConfigError(
        f"cannot tell what tokenizer {path} is: expected a HF tokenizer directory, a sentencepiece .model or "
        f"qwen.tiktoken (or pass the kind: {', '.join(tokenizer_kinds())})"
    )


def load_tokenizer(path: str | os.PathLike, kind: str | None = None) -> Tokenizer:
    """Load a tokenizer; ``kind`` is detected from ``path`` when omitted."""
    kind = kind or detect_kind(path)
    if kind not in _KINDS:
        raise ConfigError(f"unknown tokenizer kind '{kind}' (supported: {', '.join(tokenizer_kinds())})")
    path = Path(path)
    if kind == "sentencepiece" and path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise ConfigError(f"--tokenizer-type sentencepiece: {path} holds no tokenizer.model (a HF tokenizer "
                              "directory? leave --tokenizer-type out to detect it)")
        path = path / "tokenizer.model"
    if kind == "sentencepiece" and not path.is_file():
        raise ConfigError(f"--tokenizer-type sentencepiece: {path} is not a sentencepiece .model file")
    return _KINDS[kind](str(path))

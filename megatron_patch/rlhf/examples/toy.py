"""A toy preference task built by a program from the shipped corpus (no labels to download).

Every sentence of ``tiny_corpus.txt`` becomes a pair: the prompt is its first words, ``chosen`` the true rest of
the sentence, ``rejected`` the same number of words drawn at random from the corpus's vocabulary (word salad).
A model that has read the corpus (or a reward model trained on a few hundred pairs) tells them apart; a random
one does not. The last ``valid_fraction`` of the sentences are held out, so held-out accuracy is measured on
sentences never seen in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ...data.tokenizers import load_tokenizer
from ...generation import GenerationEngine, SamplingParams, load_model
from ...models.tiny import CORPUS
from ...runtime import init_distributed


def corpus_sentences(corpus: str | Path = CORPUS, min_words: int = 6) -> list[list[str]]:
    text = Path(corpus).read_text(encoding="utf-8")
    sentences = [s.split() for line in text.splitlines() for s in line.split(".")]
    return [words for words in sentences if len(words) >= min_words]


def make_toy_pairs(corpus: str | Path = CORPUS, prompt_words: int = 3, seed: int = 0) -> list[dict]:
    """One ``{"prompt", "chosen", "rejected"}`` per sentence (de-duplicated, in corpus order)."""
    sentences = corpus_sentences(corpus)
    vocabulary = sorted({word for words in sentences for word in words})
    rng = random.Random(seed)
    pairs, seen = [], set()
    for words in sentences:
        key = " ".join(words)
        if key in seen:
            continue
        seen.add(key)
        rest = words[prompt_words:]
        salad = [rng.choice(vocabulary) for _ in rest]
        pairs.append({"prompt": " ".join(words[:prompt_words]), "chosen": " " + " ".join(rest) + ".",
                      "rejected": " " + " ".join(salad) + "."})
    return pairs


def write_toy_preferences(out_dir: str | Path, valid_fraction: float = 0.1, limit: int | None = None,
                          seed: int = 0) -> tuple[str, str]:
    """Write ``train.jsonl`` and ``valid.jsonl`` under ``out_dir``; returns their paths."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    pairs = make_toy_pairs(seed=seed)[:limit]
    n_valid = max(1, int(len(pairs) * valid_fraction))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train.jsonl", pairs[:-n_valid]), ("valid.jsonl", pairs[-n_valid:])):
        path = out / name
        path.write_text("".join(json.dumps(pair) + "\n" for pair in part), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


def greedy_answers(checkpoint: str, prompts: list[str], max_new_tokens: int, stop_at_eos: bool = True):
    """``(tokenizer, token ids of the greedy answer to each prompt)`` of a checkpoint, with the generation engine on
    this rank (the process group must exist). Without ``stop_at_eos`` every answer runs ``max_new_tokens`` tokens."""
    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(str(loaded.assets_dir))
    engine = GenerationEngine(loaded.model, loaded.vocab_size, loaded.eos_token_id() if stop_at_eos else None,
                              loaded.max_sequence_length)
    return tokenizer, engine.generate([tokenizer.encode(p) for p in prompts], max_new_tokens, SamplingParams(top_k=1))


def greedy_continuation_accuracy(checkpoints: list[str], pairs_path: str | Path, max_new_tokens: int = 8,
                                 limit: int | None = None) -> list[dict]:
    """Greedy continuations of each held-out prompt against its true continuation (``chosen``), per checkpoint.

    Runs on one rank (it initialises the process group; call it through ``run_on_local_ranks``). For each
    checkpoint, the generation engine continues every prompt greedily for up to ``max_new_tokens`` tokens; the
    scores are ``token_accuracy`` (generated tokens equal to the true continuation's token at the same position,
    over the true continuation's first ``max_new_tokens`` tokens) and ``first_token_accuracy``. ``limit`` keeps
    the first prompts only.

    Returns:
        One ``{"token_accuracy", "first_token_accuracy", "prompts"}`` per checkpoint, in order.
    """
    records = [json.loads(line) for line in Path(pairs_path).read_text(encoding="utf-8").splitlines() if line]
    records = records[:limit]
    init_distributed(1, 1)
    scores = []
    for checkpoint in checkpoints:
        prompts = [r["prompt"] for r in records]
        tokenizer, outputs = greedy_answers(checkpoint, prompts, max_new_tokens, stop_at_eos=False)
        truths = [tokenizer.encode(r["chosen"])[:max_new_tokens] for r in records]
        right = sum(g == t for out, truth in zip(outputs, truths) for g, t in zip(out, truth))
        scores.append({"token_accuracy": right / sum(len(t) for t in truths),
                       "first_token_accuracy": sum(out[0] == t[0] for out, t in zip(outputs, truths)) / len(truths),
                       "prompts": len(truths)})
    return scores

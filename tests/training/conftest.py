"""A shared workspace for training tests: a tiny HF llama, its hf2mcore conversion and the shipped corpus as an
indexed dataset."""

from __future__ import annotations

import json

import pytest

from megatron_patch.models.tiny import CORPUS


def corpus_jsonl(path) -> str:
    with open(path, "w") as handle:
        for line in CORPUS.read_text().splitlines():
            if line.strip():
                handle.write(json.dumps({"text": line}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, make_hf):
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.data.indexed import build_indexed_dataset

    root = tmp_path_factory.mktemp("train_ws")
    hf = make_hf("train_tiny")
    ckpt = root / "mcore"
    hf_to_mcore(hf, ckpt)
    prefix = root / "corpus_text_document"
    build_indexed_dataset(corpus_jsonl(root / "corpus.jsonl"), prefix, hf, progress=False)
    return {"root": root, "hf": hf, "ckpt": str(ckpt), "data": str(prefix)}

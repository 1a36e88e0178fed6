"""jsonl -> indexed dataset: contents round-trip, errors name the line, tokenizer kinds load offline."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from megatron_patch.data.indexed import BadLineError, build_indexed_dataset
from megatron_patch.data.tokenizers import load_tokenizer
from megatron_patch.models.tiny import CORPUS, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path, vocab_size=300)
    return str(path)


def write_jsonl(path, texts, key="text", raw_lines=()):
    """One {key: text} line per text; ``raw_lines`` maps a 0-based line index to a literal line."""
    lines = [json.dumps({key: t}) for t in texts]
    for index, line in dict(raw_lines).items():
        lines.insert(index, line)
    with open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_with_eod(tmp_path, tokenizer_dir, workers):
    texts = [line for line in CORPUS.read_text().splitlines() if line.strip()][:150]
    src = write_jsonl(tmp_path / "in.jsonl", texts, key="content")
    summary = build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, json_key="content", workers=workers,
                                    chunk_bytes=400, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    expected = [tok.encode(t) + [tok.eod] for t in texts]
    assert read_documents(tmp_path / "out") == expected
    assert summary.documents == len(texts) and summary.tokens == sum(map(len, expected))
    assert not list(tmp_path.glob("*.tmp.*"))


def test_bad_line_named_or_skipped(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ["one", "two", "four"], raw_lines={2: '{"text": "three"', 4: '{"text": 5}'})
    with pytest.raises(BadLineError, match="line 3: not valid JSON"):
        build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, progress=False)
    assert not (tmp_path / "out.bin").exists() and not list(tmp_path.glob("out*"))
    summary = build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, skip_bad_lines=True, progress=False)
    assert summary.skipped_lines == 2 and summary.documents == 3
    assert len(read_documents(tmp_path / "out")) == 3


def test_empty_input_and_wrong_key(tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        build_indexed_dataset(tmp_path / "empty.jsonl", tmp_path / "out", tokenizer_dir, progress=False)
    src = write_jsonl(tmp_path / "in.jsonl", ["a", "b"], key="body")
    with pytest.raises(ValueError, match="--json-key 'text' is not in the documents.*body"):
        build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, progress=False)


def test_cli_summary(tmp_path, tokenizer_dir, capsys):
    from megatron_patch.data.preprocess import main

    src = write_jsonl(tmp_path / "in.jsonl", ["alpha beta", "gamma"])
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "c"), "--tokenizer", tokenizer_dir]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "tokens/s" in out and (tmp_path / "c_text_document.idx").is_file()
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "d"),
                 "--tokenizer", tokenizer_dir]) == 1


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                             eos_id=2, bos_id=1, unk_id=0, pad_id=3,
                                             minloglevel=2)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.kind == "sentencepiece" and tok.eod == 2 and tok.vocab_size == 120
    text = "The optimizer finds a simple rule."
    assert tok.decode(tok.encode(text)) == text


def test_qwen_tiktoken_without_remote_code(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the"]
    (tmp_path / "qwen.tiktoken").write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks)))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "qwen-tiktoken" and tok.eod == len(ranks)
    ids = tok.encode("the theory")
    assert ids[0] == 257 and tok.decode(ids) == "the theory"


def test_shell_wrapper(tmp_path, tokenizer_dir):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "toolkits" / "pretrain_data_preprocessing" / "run_make_pretraining_dataset.sh"
    src = write_jsonl(tmp_path / "in.jsonl", ["alpha", "beta"], raw_lines={1: "not json"})
    bad = subprocess.run(["bash", str(script), str(root), str(src), str(tmp_path / "o"), tokenizer_dir, "text", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "WORKERS must be a positive integer" in bad.stderr
    ok = subprocess.run(["bash", str(script), str(root), str(src), str(tmp_path / "o"), tokenizer_dir, "text", "1",
                         "true"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "2 documents" in ok.stdout and "skipped 1 bad lines" in ok.stdout


def test_non_utf8_line_is_a_bad_line(tmp_path, tokenizer_dir):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    with pytest.raises(BadLineError, match=r"in.jsonl: line 2: not valid UTF-8"):
        build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, progress=False)
    summary = build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, skip_bad_lines=True, progress=False)
    assert summary.skipped_lines == 1 and summary.documents == 2


def test_existing_dataset_needs_overwrite(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, progress=False)
    before = (tmp_path / "out.bin").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_indexed_dataset(write_jsonl(tmp_path / "b.jsonl", ["three"]), tmp_path / "out", tokenizer_dir,
                              progress=False)
    assert (tmp_path / "out.bin").read_bytes() == before
    build_indexed_dataset(tmp_path / "b.jsonl", tmp_path / "out", tokenizer_dir, progress=False, overwrite=True)
    assert len(read_documents(tmp_path / "out")) == 1


def test_output_prefix_under_a_file(tmp_path, tokenizer_dir):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        build_indexed_dataset(write_jsonl(tmp_path / "in.jsonl", ["one"]), tmp_path / "afile" / "out", tokenizer_dir,
                              progress=False)


def test_killed_worker_fails_instead_of_hanging(tmp_path, tokenizer_dir):
    import os
    import signal
    import threading
    import time

    import psutil

    from megatron_patch.data.indexed import WorkerDiedError

    src = write_jsonl(tmp_path / "in.jsonl", [f"document number {i}" for i in range(4000)])

    def kill_first_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = [p for p in psutil.Process().children() if "multiprocessing" in " ".join(p.cmdline())
                       and "resource_tracker" not in " ".join(p.cmdline())]
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    try:
        with pytest.raises(WorkerDiedError, match="worker died"):
            build_indexed_dataset(src, tmp_path / "out", tokenizer_dir, workers=2, chunk_bytes=64, progress=False)
    finally:
        killer.join()
    assert not list(tmp_path.glob("out*"))


def reference_dataset(path, prefix, tok):
    """What the one-document-at-a-time pipeline wrote: megatron-core's builder, ``encode`` + EOD per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_patch.data.indexed import token_dtype

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(tok.vocab_size))
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            continue  # the bad lines the tool skips
        if not isinstance(text, str):
            continue
        ids = tok.encode(text) if text else []
        if ids:
            builder.add_item(torch.tensor(ids + [tok.eod]))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


def sentencepiece_dir(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                             eos_id=2, bos_id=1, unk_id=0, pad_id=3, minloglevel=2)
    return str(tmp_path / "sp.model")


@pytest.mark.parametrize("workers,kind", [(1, "hf"), (2, "hf"), (2, "sentencepiece")])
def test_output_bytes_equal_the_per_document_reference(tmp_path, tokenizer_dir, workers, kind):
    texts = [line for line in CORPUS.read_text().splitlines() if line.strip()][:120]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[5:5] = ["", '{"text": ""}', "not json", '{"text": 7}', "   "]  # blank, empty document, bad lines
    lines.insert(40, json.dumps({"text": " ".join(texts)}))  # one line longer than a chunk
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines))  # the last line has no newline
    tok_path = tokenizer_dir if kind == "hf" else sentencepiece_dir(tmp_path)
    summary = build_indexed_dataset(src, tmp_path / "ours", tok_path, workers=workers, chunk_bytes=300,
                                    skip_bad_lines=True, progress=False)
    reference_dataset(src, tmp_path / "ref", load_tokenizer(tok_path))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes(), suffix
    assert summary.skipped_lines == 2 and summary.empty_documents == 1 and summary.documents == len(texts) + 1


def test_chunks_cover_every_line_once(tmp_path):
    from megatron_patch.data.encode_worker import read_chunks

    lines = [b"x" * n for n in (0, 3, 700, 1, 0, 50)] + [b"tail"]
    (tmp_path / "f").write_bytes(b"\n".join(lines))
    for size in (1, 7, 64, 10_000):
        chunks = list(read_chunks(tmp_path / "f", size))
        assert b"".join(data for _, data in chunks) == (tmp_path / "f").read_bytes()
        assert all(data.endswith(b"\n") for _, data in chunks[:-1])
        starts = [1]
        for _, data in chunks[:-1]:
            starts.append(starts[-1] + data.count(b"\n"))
        assert [first for first, _ in chunks] == starts

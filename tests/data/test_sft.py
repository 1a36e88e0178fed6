"""SFT samples: loss on response tokens only; packing keeps samples apart (same per-token loss as unpacked)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_patch.data.sft import SFTDataset
from megatron_patch.data.tokenizers import load_tokenizer
from megatron_patch.models.tiny import train_tokenizer
from megatron_patch.runtime import run_on_local_ranks

RECORDS = [
    {"instruction": "Repeat.", "input": "a small map", "output": "a small map"},
    {"instruction": "Say hello.", "output": "hello there"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the night train"},
                  {"role": "user", "content": "more"}, {"role": "assistant", "content": "a box of letters"}]},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_tok")
    train_tokenizer(path, vocab_size=400)
    return path


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def response_text(tokenizer, item) -> list[str]:
    labels, mask = item["labels"], item["loss_mask"].bool()
    return tokenizer.decode(labels[mask].tolist())


def test_loss_only_on_responses(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    data = SFTDataset(write(tmp_path / "a.jsonl", RECORDS[:2]), tok, 96)
    texts = sorted(response_text(tok, data[i]) for i in range(len(data)))
    assert texts == sorted(["a small map</s>", "hello there</s>"])


def test_chat_template_marks_assistant_turns(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    hf.chat_template = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
    hf.save_pretrained(tmp_path / "chat")
    tok = load_tokenizer(tmp_path / "chat")
    data = SFTDataset(write(tmp_path / "c.jsonl", RECORDS[2:]), tok, 96)
    assert response_text(tok, data[0]) == "<s>assistant: the night train</s><s>assistant: a box of letters</s></s>"


def test_packing_attention_and_positions(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    path = write(tmp_path / "p.jsonl", RECORDS[:2])
    packed = SFTDataset(path, tok, 200, packing=True)
    assert len(packed) == 1
    item = packed[0]
    mask = item["attention_mask"][0]
    lengths = [len(s[0]) - 1 for s in packed.sequences[0]]
    first, second = lengths
    assert item["position_ids"][first].item() == 0 and item["position_ids"][first - 1].item() == first - 1
    assert mask[first + 1, first - 1]  # the second sample cannot see the first
    assert not mask[first + 1, first] and mask[first, first + 1]  # causal within the sample


def per_token_loss_worker(ckpt: str, samples: list[dict]) -> list:
    from megatron_patch.models.builder import build_model
    from megatron_patch.models.checkpoint import Checkpoint
    from megatron_patch.runtime import init_distributed

    checkpoint = Checkpoint.open(ckpt)
    init_distributed(1, 1)
    model = build_model(checkpoint.spec.arch, checkpoint.spec.padded_vocab_size)
    checkpoint.load_into(model)
    out = []
    with torch.no_grad():
        for s in samples:
            mask = s["attention_mask"][None] if "attention_mask" in s else None
            loss = model(s["tokens"][None], s["position_ids"][None], mask, labels=s["labels"][None])
            out.append(loss[0].numpy())
    return out


def test_packed_loss_equals_unpacked(tmp_path, workspace):
    tok = load_tokenizer(workspace["hf"])
    path = write(tmp_path / "p.jsonl", RECORDS)
    packed = SFTDataset(path, tok, 256, packing=True)
    single = SFTDataset(path, tok, 256, packing=False)
    assert len(packed) == 1 and len(single) == 3
    losses = run_on_local_ranks(per_token_loss_worker, 1, workspace["ckpt"], [packed[0]] + [single[i] for i in range(3)],
                                timeout=300)[0]
    packed_loss, singles = losses[0], losses[1:]
    start = 0
    for (ids, _), loss in zip(packed.sequences[0], singles):
        n = len(ids) - 1
        diff = abs(packed_loss[start:start + n] - loss[:n]).max()
        assert diff < 1e-4, diff
        start += n

"""Vocabulary extension on tiny models: a llama-style SentencePiece tokenizer and a byte-level HF fast tokenizer,
a HF directory and a Megatron checkpoint.

Checks: old ids and their rows are unchanged; each new row is the mean of the rows of the old pieces its token
splits into; logits of text made of old tokens do not change; text in the new language takes fewer tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch.data import vocab_extension as ev
from megatron_patch.models import get_family
from megatron_patch.models.tiny import CORPUS, make_hf_checkpoint

# A made-up corpus in a language the base tokenizers never saw (they fall back to bytes for every character).
WORDS = ["你好", "世界", "模型", "训练", "数据", "语言", "分词", "向量", "学习", "并行", "张量", "流水线", "检查点",
         "生成", "推理", "词表", "扩展", "嵌入", "矩阵", "梯度"]
NEW_TEXT = "你好世界，模型训练数据。张量并行的检查点生成推理。"
OLD_TEXT = "The tokenizer builds a long sentence after a long day."


def _write_corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = ["".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "。" for _ in range(1500)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _llama_sp_model(root: Path) -> str:
    """A llama-style HF directory: SentencePiece BPE tokenizer (byte fallback) + tiny llama of the same vocab."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = root / "llama-sp"
    out.mkdir()
    spm.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(root / "base"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.model").write_bytes((root / "base.model").read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    config = {**get_family("llama").flavor("tiny"), "vocab_size": len(tokenizer), "num_hidden_layers": 2}
    make_hf_checkpoint(out, config, seed=1, tokenizer=False)
    return str(out)


@pytest.fixture(scope="module")
def extended(tmp_path_factory, make_hf):
    """{case: (old HF dir, extended HF dir, summary)} for both tokenizer kinds; plus the Megatron round."""
    from megatron_patch.convert.hf_to_mcore import hf_to_mcore
    from megatron_patch.convert.mcore_to_hf import mcore_to_hf

    root = tmp_path_factory.mktemp("vocab")
    trained = ev.train_sentencepiece([_write_corpus(root / "corpus.txt")], root / "new", vocab_size=120)
    cases = {"sentencepiece": _llama_sp_model(root), "byte_level": make_hf("gqa_untied")}
    out = {}
    for case, hf_dir in cases.items():
        save = root / f"{case}-extended"
        out[case] = (hf_dir, str(save), ev.extend_hf(Path(hf_dir), save, trained))
    # The Megatron path: legacy TP=2 checkpoint of the sentencepiece model, extended, exported back to HF.
    mcore = root / "mcore"
    hf_to_mcore(cases["sentencepiece"], mcore, tp=2, fmt="legacy")
    ev.extend_megatron(mcore, root / "mcore-extended", trained)
    mcore_to_hf(root / "mcore-extended", root / "mcore-extended-hf")
    out["megatron"] = (str(mcore), str(root / "mcore-extended"), str(root / "mcore-extended-hf"))
    return out


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


CASES = ["sentencepiece", "byte_level"]


@pytest.mark.parametrize("case", CASES)
def test_old_ids_and_rows_are_unchanged(extended, case):
    old_dir, new_dir, summary = extended[case]
    old_tok, new_tok = _tokenizer(old_dir), _tokenizer(new_dir)
    assert summary["added_tokens"] > 0 and len(new_tok) == summary["vocab_size"] > len(old_tok)
    for token, token_id in old_tok.get_vocab().items():
        assert new_tok.convert_tokens_to_ids(token) == token_id
    assert new_tok.encode(OLD_TEXT) == old_tok.encode(OLD_TEXT)
    old_w, new_w = load_file(f"{old_dir}/model.safetensors"), load_file(f"{new_dir}/model.safetensors")
    assert json.loads(Path(new_dir, "config.json").read_text())["vocab_size"] == new_w["model.embed_tokens.weight"].shape[0]
    for name, tensor in old_w.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(new_w[name][: len(old_tok)], tensor[: len(old_tok)]), name
        else:
            assert torch.equal(new_w[name], tensor), name


@pytest.mark.parametrize("case", CASES)
def test_new_rows_are_the_mean_of_their_old_pieces(extended, case):
    old_dir, new_dir, _ = extended[case]
    old_tok, new_tok = _tokenizer(old_dir), _tokenizer(new_dir)
    old_w, new_w = load_file(f"{old_dir}/model.safetensors"), load_file(f"{new_dir}/model.safetensors")
    new_ids = [i for i in new_tok.encode(NEW_TEXT, add_special_tokens=False) if i >= len(old_tok)]
    assert new_ids, "the new-language text uses no new token"
    for token_id in set(new_ids):
        text = new_tok.decode([token_id])
        old_ids = old_tok.encode(text, add_special_tokens=False)
        if old_tok.convert_ids_to_tokens(old_ids[0]) == "\u2581" and not new_tok.convert_ids_to_tokens(token_id).startswith("\u2581"):
            old_ids = old_ids[1:]  # llama-style tokenizers prefix a space the token itself does not carry
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = old_w[name][old_ids].mean(dim=0)
            assert torch.equal(new_w[name][token_id], expected), (name, token_id, text)


@pytest.mark.parametrize("case", CASES)
def test_logits_of_old_text_are_unchanged(extended, case):
    from transformers import AutoModelForCausalLM

    old_dir, new_dir, _ = extended[case]
    ids = torch.tensor([_tokenizer(old_dir).encode(OLD_TEXT)])
    old_vocab = len(_tokenizer(old_dir))
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32)(ids).logits[..., :old_vocab]
        after = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(after[..., :old_vocab], before, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_new_language_takes_fewer_tokens(extended, case):
    old_dir, new_dir, _ = extended[case]
    before = len(_tokenizer(old_dir).encode(NEW_TEXT, add_special_tokens=False))
    after = len(_tokenizer(new_dir).encode(NEW_TEXT, add_special_tokens=False))
    assert after < before / 2, (before, after)
    assert _tokenizer(new_dir).decode(_tokenizer(new_dir).encode(NEW_TEXT, add_special_tokens=False)) == NEW_TEXT


def test_megatron_checkpoint_gets_the_same_extension(extended):
    _, hf_extended, _ = extended["sentencepiece"]
    mcore, mcore_extended, exported = extended["megatron"]
    meta = json.loads((Path(mcore_extended) / "release" / "megatron_patch.json").read_text())
    assert meta["format"] == "legacy" and meta["tensor_model_parallel_size"] == 2
    assert meta["vocab_size"] == len(_tokenizer(hf_extended))
    reference, got = load_file(f"{hf_extended}/model.safetensors"), load_file(f"{exported}/model.safetensors")
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), name
    assert _tokenizer(exported).encode(NEW_TEXT) == _tokenizer(hf_extended).encode(NEW_TEXT)


def test_command_line_extends_a_hf_directory_and_refuses_bad_input(extended, tmp_path, capsys):
    old_dir, reference_dir, _ = extended["byte_level"]
    corpus = _write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    assert ev.main(["--corpus", str(corpus), "--load", old_dir, "--save", str(out), "--vocab-size", "120"]) == 0
    assert _tokenizer(out).encode(NEW_TEXT) == _tokenizer(reference_dir).encode(NEW_TEXT)
    assert load_file(f"{out}/model.safetensors").keys() == load_file(f"{reference_dir}/model.safetensors").keys()
    summary = capsys.readouterr().out.strip().splitlines()[-1]  # says which count is the tokenizer's
    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    assert "tokens to the tokenizer, which now has" in summary and f"the model has {rows} embedding rows" in summary
    assert ev.main(["--corpus", str(corpus), "--load", old_dir, "--save", str(out), "--vocab-size", "120"]) == 1
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert ev.main(["--corpus", str(corpus), "--load", old_dir, "--save", str(out), "--vocab-size", "120",
                    "--overwrite"]) == 0  # the flag the error names exists
    capsys.readouterr()
    assert ev.main(["--corpus", str(tmp_path / "missing.txt"), "--load", old_dir, "--save", str(tmp_path / "o2")]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("args,message", [
    (["CORPUS"], "expected 5 or 6 arguments, got 1"),
    (["/nonexistent.txt", "LOAD", "SAVE", "100"], "CORPUS file '/nonexistent.txt' does not exist"),
    (["CORPUS", "LOAD", "SAVE", "many"], "VOCAB_SIZE must be an integer (got 'many')"),
    (["CORPUS", "LOAD", "SAVE", "100", "wordpiece"], "MODEL_TYPE must be bpe or unigram"),
])
def test_shell_wrapper_validates_its_arguments(extended, tmp_path, args, message):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    corpus = _write_corpus(tmp_path / "corpus.txt")
    names = {"CORPUS": str(corpus), "LOAD": extended["byte_level"][0], "SAVE": str(tmp_path / "out")}
    argv = [str(root), *(names.get(a, a) for a in args)] if len(args) > 1 else [str(root)]
    result = subprocess.run(["bash", str(root / "toolkits/vocab_extension/run_vocab_extension.sh"), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_vocab_size_errors_are_ours(extended, tmp_path, capsys):
    old_dir = extended["byte_level"][0]
    corpus = _write_corpus(tmp_path / "corpus.txt")
    common = ["--corpus", str(corpus), "--load", old_dir, "--save", str(tmp_path / "out")]
    assert ev.main([*common, "--vocab-size", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: --vocab-size must be >= 2 (got 1)"
    assert ev.main([*common, "--vocab-size", "100000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --vocab-size 100000 is more pieces than SentencePiece can learn from the "
                              "corpus (at most "), err
    assert "Vocabulary size too high" not in "\n".join(err)
    assert not (tmp_path / "out").exists()



def test_hf_model_with_a_missing_tensor_is_refused_before_work(extended, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    old_dir = Path(extended["byte_level"][0])
    broken = tmp_path / "broken"
    shutil.copytree(old_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("model.layers.0.mlp.down_proj.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    corpus = _write_corpus(tmp_path / "corpus.txt")
    assert ev.main(["--corpus", str(corpus), "--load", str(broken), "--save", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the HF checkpoint has no tensor 'model.layers.0.mlp.down_proj.weight'")
    assert not (tmp_path / "out").exists()

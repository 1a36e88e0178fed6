"""Programmatic rewards: the built-in verifiers, user functions ``py:FILE:FUNC`` (with the prompt line's extra
fields), and the one-line refusal of everything a user function can get wrong."""

from __future__ import annotations

import pytest

from megatron_patch.errors import ConfigError, DataError
from megatron_patch.rlhf.ppo.rewards import Sample, build_reward, digit_match_score, final_number


def _sample(response: str, answer="15703", line=3, **fields) -> Sample:
    return Sample("### Instruction:\n30751\n", response, [1, 2], [5, 6, 2], {"answer": answer, **fields}, line)


def test_verifiers():
    exact = build_reward("exact_match", None, 8)
    assert exact(_sample(" 15703 "), "p.jsonl") == 1.0 and exact(_sample("15704"), "p.jsonl") == 0.0
    assert exact.needs == ("answer",) and exact.match(_sample("15703"))
    assert digit_match_score("15703", "15703") == 1.0
    assert digit_match_score("15700", "15703") == pytest.approx(0.8)
    assert digit_match_score("157031", "15703") == pytest.approx(5 / 6)  # an extra digit costs like a wrong one
    assert digit_match_score("", "15703") == 0.0
    numeric = build_reward("numeric", None, 8)
    assert numeric(_sample("3 + 4 = 7, so the answer is 12.50", answer="12.5"), "p") == 1.0
    assert numeric(_sample("no number here", answer="3"), "p") == 0.0
    assert final_number("1,234 apples") == 1234.0 and final_number("x = -2") == -2.0


def _user_file(tmp_path, body: str, name: str = "my_reward.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_user_function_gets_prompt_response_and_fields(tmp_path):
    path = _user_file(tmp_path, "def score(prompt, response, answer, difficulty=None):\n"
                                "    return float(response == answer) + (0.5 if difficulty == 'hard' else 0.0)\n")
    reward = build_reward(f"py:{path}:score", None, 8)
    assert reward(_sample("15703", difficulty="hard", source="x"), "p.jsonl") == 1.5  # 'source' is not a parameter
    assert reward(_sample("1"), "p.jsonl") == 0.0
    any_keys = _user_file(tmp_path, "def f(**kw):\n    return len(kw)\n")
    kwargs = build_reward(f"py:{any_keys}:f", None, 8)
    assert kwargs(_sample("1", extra=1), "p.jsonl") == 4  # prompt, response, answer, extra


@pytest.mark.parametrize("case", ["no_file", "no_function", "syntax", "malformed"])
def test_user_function_refused_at_build(tmp_path, case):
    good = _user_file(tmp_path, "def score(prompt, response):\n    return 1.0\n")
    spec, expected = {
        "no_file": (f"py:{tmp_path}/none.py:score", "does not exist"),
        "no_function": (f"py:{good}:other", "has no function 'other'"),
        "syntax": (f"py:{_user_file(tmp_path, 'def (:', 'broken.py')}:score", "raised SyntaxError"),
        "malformed": ("py:score", "expected py:FILE:FUNC"),
    }[case]
    with pytest.raises(ConfigError) as error:
        build_reward(spec, None, 8)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("body,expected", [
    ("def score(prompt, response, answer):\n    raise KeyError('oops\\nsecond line')\n", "raised KeyError"),
    ("def score(prompt, response):\n    return float('nan')\n", "returned nan: a reward must be a finite number"),
    ("def score(prompt, response):\n    return 'good'\n", "returned 'good'"),
    ("def score(prompt, response):\n    return None\n", "returned None"),
    ("def score(prompt):\n    return 1.0\n", "raised TypeError"),
], ids=["raises", "nan", "string", "none", "signature"])
def test_user_function_failure_is_one_line_naming_function_and_line(tmp_path, body, expected):
    path = _user_file(tmp_path, body)
    reward = build_reward(f"py:{path}:score", None, 8)
    with pytest.raises(DataError) as error:
        reward(_sample("15703", line=7), "prompts.jsonl")
    message = str(error.value)
    assert f"--reward py:{path}:score on prompts.jsonl line 7" in message and expected in message
    assert "\n" not in message


def test_unknown_builtin_lists_the_names():
    with pytest.raises(ConfigError, match="exact_match"):
        build_reward("exact", None, 8)

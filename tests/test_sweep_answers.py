"""Answers checked at planning (issue 28 item 2): an answer whose first token does not start a
word after a prompt ending without a space (`Paris`, not ` Paris`), or one of several tokens,
gets ONE warning per sweep (several models included) naming the rows and what is scored, before
any weights load; `prompts.answers: first_token` silences it; the config hash does not change.

Which answers are warned of is checked against the tokenizer itself (SmolLM2-135M's, no
weights): the answer's first token alone against the token that follows the prompt when the
prompt and the answer are tokenized together as a reader would write them (with a space)."""

from __future__ import annotations

import pytest

from patchscope_core.models import model_info
from sweeps.cli import main
from sweeps.run.driver import plan
from tests.configs import changed, write_yaml

PROMPT = "The capital of France is"
PAIRS = [  # same token count clean / corrupted on SmolLM2
    {"clean": PROMPT, "corrupted": "The capital of Italy is", "answer": "Paris", "wrong_answer": "Rome"},
    {"clean": PROMPT, "corrupted": "The capital of Spain is", "answer": " Paris", "wrong_answer": " Madrid"},
    {"clean": PROMPT, "corrupted": "The capital of Japan is", "answer": " Parisians", "wrong_answer": " Tokyo"},
]
PATCHING = {
    "name": "answers",
    "kind": "activation_patching",
    "models": ["smollm2-135m"],
    "prompts": {
        "rows": PAIRS,
        "clean_column": "clean",
        "corrupted_column": "corrupted",
        "answer_column": "answer",
        "wrong_answer_column": "wrong_answer",
    },
    "patching": {"sites": ["blocks.{layer}.hook_resid_pre"], "layers": [0], "positions": [-1]},
    "output": {"wandb": {"mode": "disabled"}},
}
FACTS = {
    "name": "answers-trace",
    "kind": "causal_trace",
    "models": ["smollm2-135m", "tiny-llama"],
    "prompts": {
        "rows": [{"prompt": "Paris is the capital of", "subject": "Paris", "answer": "France"}],
        "subject_column": "subject",
        "answer_column": "answer",
    },
    "trace": {"sites": ["resid_post"], "layers": [0], "positions": [-1]},
    "output": {"wandb": {"mode": "disabled"}},
}


def dry_run(tmp_path, cfg: dict, capsys, **changes) -> tuple[str, str]:
    cfg = changed(cfg, **changes)
    cfg["output"]["dir"] = str(tmp_path / "out")
    assert main(["sweep", str(write_yaml(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 0
    got = capsys.readouterr()
    return got.out, got.err


def scored_as_written(tok, prompt: str, answer: str) -> bool:
    """The tokenizer's own view: the answer's tokens alone equal those that follow the prompt
    when prompt and answer are tokenized as one text, a space between."""
    alone = tok(answer, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    joint = tok(prompt + " " + answer.lstrip(" "), add_special_tokens=False)["input_ids"]
    return len(alone) == 1 and joint[n:] == alone


def test_answers_not_scored_as_written_get_one_warning_naming_rows(tmp_path, capsys, no_weights):
    tok = model_info("smollm2-135m").tokenizer
    out, err = dry_run(tmp_path, PATCHING, capsys)
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("warning: prompts.answers: ")
    for i, pair in enumerate(PAIRS, 1):
        for key in ("answer", "wrong_answer"):
            named = f"prompts.rows row {i} {key}_column {pair[key]!r}" in line
            assert named == (not scored_as_written(tok, pair["clean"], pair[key])), (i, key, line)
    assert "prompts.rows row 1 wrong_answer_column 'Rome'" in line  # logit_diff reads the wrong answer
    assert "does not start a word" in line and "2 tokens [' Paris', 'ians']" in line  # why, per row
    assert "logit_diff compares the answer's first token with the wrong answer's first token" in line
    assert "set prompts.answers: first_token" in line
    before = plan(str(tmp_path / "c.yaml")).config_hash
    capsys.readouterr()
    again, err = dry_run(tmp_path, PATCHING, capsys, prompts__answers="first_token")
    assert "warning" not in err and again == out
    assert plan(str(tmp_path / "c.yaml")).config_hash == before  # a warning's setting: the results' hash stays
    _, err = dry_run(tmp_path, PATCHING, capsys, patching__metric="prob")  # no measure reads the wrong answer
    assert "prob is the probability of the answer's first token" in err and "wrong_answer_column" not in err
    _, err = dry_run(tmp_path, PATCHING, capsys, patching__metric="kl")  # no measure reads an answer
    assert "warning" not in err


def test_several_models_one_warning_and_the_trace_says_what_it_traces(tmp_path, capsys, no_weights):
    _, err = dry_run(tmp_path, FACTS, capsys)
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, err
    assert "prompts.rows row 1 answer_column 'France' (its first token 'France' does not start a word" in lines[0]
    assert "p_clean, p_corrupt and p_restored are the probability of the answer's first token" in lines[0]
    fixed = [{**FACTS["prompts"]["rows"][0], "answer": " France"}]
    _, err = dry_run(tmp_path, FACTS, capsys, models=["smollm2-135m"], prompts__rows=fixed)
    assert "warning" not in err


@pytest.mark.parametrize("value", ["first_tokens", True])
def test_answers_takes_checked_or_first_token(tmp_path, capsys, no_weights, value):
    cfg = changed(PATCHING, prompts__answers=value)
    cfg["output"]["dir"] = str(tmp_path / "out")
    assert main(["sweep", str(write_yaml(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: prompts.answers: ")

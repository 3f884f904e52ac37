"""Bad input fails early, names the field, and loads no weights; the CLI's JSON output."""

from __future__ import annotations

import json
import re

import pytest
import torch

from patchscope_core import (
    Affine,
    Decoding,
    Patchscope,
    PatchscopeEngine,
    PatchscopeError,
    Source,
    Target,
    UnknownModelError,
    model_info,
    resolve,
)
from sweeps.cli import main


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "empty model name"),
        ("no such model", "unknown model"),
        ("/nonexistent/dir/", "no config.json"),
        ("some-org/not-on-this-machine", "cannot load"),  # a hub name; tests run offline
    ],
)
def test_unknown_model_names_the_field_and_the_aliases(no_weights, name, fragment):
    with pytest.raises(UnknownModelError) as err:
        model_info(name)
    msg = str(err.value)
    assert msg.startswith("model:") and fragment in msg
    assert "smollm2-135m" in msg and "tiny-gpt2" in msg


def spec(**changes):
    s = dict(src="Paris is", sl=1, sp=-1, tgt="The capital city of x is", tl=1, tp=(-1,), n=4)
    s.update(changes)
    return Patchscope(Source(s["src"], s["sl"], s["sp"]), Target(s["tgt"], s["tl"], s["tp"]), max_new_tokens=s["n"])


@pytest.mark.parametrize(
    "bad, field, fragment",
    [
        (dict(sl=4), "source.layer", "out of range 0 .. 3"),
        (dict(sl=-1), "source.layer", "out of range 0 .. 3"),
        (dict(tl=7), "target.layer", "out of range 0 .. 3"),
        (dict(sp=9), "source.position", "out of range"),
        (dict(sp=-4), "source.position", "allowed -3 .. 2"),
        (dict(tp=(0, 40)), "target.positions", "out of range"),
        (dict(tp=()), "target.positions", "at least one"),
        (dict(src=""), "source.prompt", "empty prompt"),
        (dict(tgt="   "), "target.prompt", "empty prompt"),
        (dict(n=0), "max_new_tokens", ">= 1"),
        (dict(tgt="x " * 600), "target.prompt", "602 tokens exceed tiny-llama's context of 512 tokens"),
        (dict(src="x " * 600), "source.prompt", "602 tokens exceed tiny-llama's context of 512 tokens"),
        (dict(n=600), "max_new_tokens", "prompt tokens + 600 new tokens exceed tiny-llama's context of 512 tokens"),
    ],
)
def test_bad_patchscope_names_the_field(no_weights, bad, field, fragment):
    info = model_info("tiny-llama")
    with pytest.raises(PatchscopeError) as err:
        resolve(spec(**bad), info, info)
    assert str(err.value).startswith(field + ":") and fragment in str(err.value)


def test_mapping_shapes_are_checked_against_both_models(no_weights, tmp_path):
    info = model_info("tiny-llama")
    bad = Patchscope(Source("Paris", 1), Target("x", 1), mapping=Affine(W=torch.zeros(64, 32)))
    with pytest.raises(
        PatchscopeError, match=r"mapping: W has shape \(64, 32\) but must be \[d_target, d_source\] = \[64, 64\]"
    ):
        resolve(bad, info, info)
    with pytest.raises(PatchscopeError, match="mapping.b"):
        Affine(W=torch.zeros(64, 64), b=torch.zeros(3))
    with pytest.raises(PatchscopeError, match="mapping.path"):
        Affine.from_file(tmp_path / "missing.safetensors")
    torch.save({"W": torch.eye(64), "b": torch.ones(64)}, tmp_path / "map.pt")
    loaded = Affine.from_file(tmp_path / "map.pt")
    assert torch.equal(loaded(torch.zeros(2, 64)), torch.ones(2, 64))


def test_engine_validates_every_patchscope_before_any_forward_pass(tiny_models, monkeypatch):
    engine = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    monkeypatch.setattr(engine, "extract_sources", lambda *a, **k: pytest.fail("ran before validating"))
    with pytest.raises(PatchscopeError, match=r"^patchscopes\[1\]\.target\.layer: 9 is out of range"):
        engine.run([spec(), spec(tl=9)])
    with pytest.raises(PatchscopeError, match="^batch_size"):
        engine.run([spec()], batch_size=0)


def test_decoding_options_are_checked():
    with pytest.raises(PatchscopeError, match="decoding.seed"):
        Decoding(do_sample=True)
    with pytest.raises(PatchscopeError, match="decoding.temperature"):
        Decoding(do_sample=True, seed=1, temperature=0)


def inspect_args(**over):
    args = {
        "--model": "tiny-llama",
        "--source-prompt": "Paris is the capital",
        "--source-layer": "2",
        "--source-position": "-1",
        "--target-prompt": "The capital city of x is",
        "--target-layer": "1",
        "--max-new-tokens": "5",
    }
    args.update(over)
    return ["inspect", *[x for kv in args.items() for x in kv]]


def test_cli_inspect_rejects_bad_input_before_loading(no_weights, capsys):
    assert main(inspect_args(**{"--source-layer": "12"})) == 2
    assert "source.layer: 12 is out of range 0 .. 3" in capsys.readouterr().err
    assert main(inspect_args(**{"--target-prompt": ""})) == 2
    assert "target.prompt: empty prompt" in capsys.readouterr().err


def test_cli_inspect_prints_the_top_k_it_names(capsys):
    """`first-token top-10` lists ten entries (it listed five), the same as --json's top tokens."""
    assert main(inspect_args()) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("first-token top-"))
    k = int(line.split(":")[0].removeprefix("first-token top-"))
    assert main(inspect_args() + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert k == len(record["top_token_ids"]) == 10
    assert len(re.findall(r"['\"] -?\d+\.\d\d(?:, |$)", line)) == k  # one "'token' logprob" entry per token


def test_cli_inspect_json(capsys):
    assert main(inspect_args() + ["--target-position", "0", "-2", "--json", "--no-stop-at-eos"]) == 0
    out = json.loads(capsys.readouterr().out)
    n_target = len(out["target_token_ids"])
    assert out["target_positions"] == [0, n_target - 2]
    assert out["source_position"] == len(out["source_token_ids"]) - 1
    assert len(out["generated_token_ids"]) == 5 and isinstance(out["generated_text"], str)
    assert len(out["top_logprobs"]) == len(out["top_token_ids"]) == 10


def test_cli_exit_2_only_for_bad_input_other_errors_keep_their_traceback(monkeypatch, capsys):
    """A ValueError from inside the computation (here: torch's) is a bug, not bad input."""
    import patchscope_core

    def broken(*args, **kwargs):
        return torch.zeros(2, 3) @ torch.zeros(4, 5)  # RuntimeError from torch

    def value_error(*args, **kwargs):
        raise ValueError("something deep inside went wrong")

    monkeypatch.setattr(patchscope_core, "load_model", broken)
    with pytest.raises(RuntimeError):
        main(inspect_args())
    monkeypatch.setattr(patchscope_core, "load_model", value_error)
    with pytest.raises(ValueError, match="deep inside"):
        main(inspect_args())
    assert main(inspect_args(**{"--source-layer": "12"})) == 2  # bad input: one line, exit 2
    assert capsys.readouterr().err.count("\n") == 1

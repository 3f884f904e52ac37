"""`patchscope intervene`: one prompt, one intervention, generation and answer scores as JSON."""

from __future__ import annotations

import json

import pytest
import torch

from sweeps.cli import main

PROMPT = "The quick brown fox jumps over"


def args(**over) -> list[str]:
    a = {
        "--model": "tiny-llama",
        "--prompt": PROMPT,
        "--site": "blocks.1.attn.hook_z",
        "--kind": "zero",
        "--max-new-tokens": "5",
    }
    a.update(over)
    out = ["intervene"]
    for k, v in a.items():
        out += [k, *v] if isinstance(v, list) else [k, v]
    return out


def test_json_has_generation_answer_scores_and_the_clean_baseline(tiny_models, capsys):
    assert main(args(**{"--head": "2", "--answer": " lazy dog", "--json": [], "--no-stop-at-eos": []})) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "prompt_token_ids",
        "generated_token_ids",
        "generated_text",
        "clean_generated_token_ids",
        "answer_token_ids",
        "answer_logprobs",
        "answer_logprob",
        "clean_answer_logprob",
        "top_token_ids",
        "top_logprobs",
        "p_answer",
        "p_answer_clean",
    ):
        assert key in out, key
    assert len(out["generated_token_ids"]) == len(out["clean_generated_token_ids"]) == 5
    assert len(out["answer_logprobs"]) == len(out["answer_token_ids"]) > 0
    assert out["answer_logprob"] == pytest.approx(sum(out["answer_logprobs"]))
    assert out["interventions"] == [
        {"site": "blocks.1.attn.hook_z", "head": [2], "neuron": [], "kind": "zero", "positions": "all"}
    ]
    # the reference: the bridge's own hook zeroing head 2 at every position, teacher-forced
    model = tiny_models["tiny-llama"]
    ids = torch.tensor([out["prompt_token_ids"] + out["answer_token_ids"]])

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 2] = 0
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(out["prompt_token_ids"])
    want = [float(lp[n - 1 + j, t]) for j, t in enumerate(out["answer_token_ids"])]
    assert out["answer_logprobs"] == pytest.approx(want, abs=1e-4)
    assert out["answer_logprob"] != pytest.approx(out["clean_answer_logprob"], abs=1e-6)


def test_vector_file_and_reference_prompts(tiny_models, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"vector": torch.ones(64)}, str(tmp_path / "v.safetensors"))
    assert (
        main(
            args(
                **{
                    "--site": "blocks.2.hook_resid_post",
                    "--kind": "add",
                    "--vector": str(tmp_path / "v.safetensors"),
                    "--alpha": "4",
                    "--positions": "generated",
                    "--json": [],
                }
            )
        )
        == 0
    )
    added = json.loads(capsys.readouterr().out)
    assert added["generated_token_ids"][0] == added["clean_generated_token_ids"][0]  # generated positions only
    (tmp_path / "refs.txt").write_text("Paris is the capital of France.\n\nWater is a liquid.\n")
    assert (
        main(
            args(
                **{
                    "--site": "hook_embed",
                    "--kind": "noise",
                    "--reference-prompts": str(tmp_path / "refs.txt"),
                    "--noise-scale": "3",
                    "--seed": "1",
                    "--positions": ["1", "2"],
                    "--json": [],
                }
            )
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["interventions"][0]["positions"] == "1,2"


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"--site": "blocks.1.hook_foo"},
            "run.interventions[0].site: unknown site 'blocks.1.hook_foo'; valid sites: hook_embed",
        ),
        ({"--head": "7"}, "head: 7 is out of range 0 .. 3"),
        ({"--kind": "add"}, "add needs a vector"),
        ({"--kind": "zero", "--alpha": "2"}, "--alpha: not used by --kind zero"),
        (
            {"--kind": "noise", "--noise-scale": "-1", "--reference-prompts": "MISSING"},
            "--reference-prompts: no such file",
        ),
        ({"--answer": ""}, "run.answer: empty answer"),
        ({"--positions": ["3", "x"]}, "--positions: expected integers"),
        ({"--positions": "40"}, "run.interventions[0].positions: 40 is out of range"),
        ({"--vector": "MISSING.pt", "--kind": "add"}, "--vector: no such file"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_before_any_weights(no_weights, capsys, over, message):
    assert main(args(**over)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_vector_of_the_wrong_width_or_a_pickle_is_refused(no_weights, tmp_path, capsys):
    torch.save(torch.ones(32), tmp_path / "narrow.pt")
    assert (
        main(args(**{"--kind": "add", "--vector": str(tmp_path / "narrow.pt"), "--site": "blocks.1.hook_resid_post"}))
        == 2
    )
    assert "shape [32] does not fit blocks.1.hook_resid_post" in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("not a tensor")
    assert main(args(**{"--kind": "add", "--vector": str(tmp_path / "text.pt")})) == 2
    err = capsys.readouterr().err
    assert "--vector: cannot read" in err and "weights_only=False" not in err

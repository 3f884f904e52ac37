"""The defects found by trying the tool as a new researcher would (issue 19, section 4), one test
each: the documented layer convention (docs/conventions.md) against Hugging Face's hidden
states, relative model directories beside the config, clean output names for local models,
`patchscope report` listing a steering table as a table, `tokenize` on a loaded model, short
reprs, and a warning for a bridge handed to the engine with hooks attached."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from patchscope_core import Engine, PatchscopeEngine, PatchscopeError, model_info, tokenize
from sweeps import cli
from sweeps.sinks.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the documented layer convention


def test_layer_l_is_hf_hidden_states_l_plus_1_except_the_last_which_hf_norms(tiny_models):
    """What the docs say (docs/conventions.md, the layer bullet) is what the model does: the
    tool's layer l (read as a Patchscope reads its source) is hidden_states[l + 1] for
    l < n_layers - 1; the last is the residual stream before the final norm, and Hugging Face's
    last hidden state is that stream normed."""
    from patchscope_core.models.sites import Site, resid_post, resolve_site

    bridge = tiny_models["tiny-llama"]
    engine = Engine(bridge, name="tiny-llama")
    ids = tokenize(engine.info, "The Eiffel Tower is in Paris")
    with torch.no_grad():
        hf = bridge.original_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = engine.info.n_layers
    tool = [engine.reader.values(resolve_site(Site(resid_post(l)), engine.info), ids) for l in range(n)]
    for l in range(n - 1):
        assert torch.allclose(tool[l], hf[l + 1][0], atol=1e-5), l
    assert not torch.allclose(tool[-1], hf[n][0], atol=1e-3), "HF's last hidden state is normed"
    with torch.no_grad():
        assert torch.allclose(bridge.original_model.model.norm(tool[-1]), hf[n][0], atol=1e-5)

    conventions = (ROOT / "docs" / "conventions.md").read_text()
    bullet = re.search(r"- \*\*Layer `l`\*\*.*?(?=\n- )", conventions, re.S).group(0)
    assert "hidden_states[l+1]` for every layer but the last" in bullet, bullet
    assert "final" in bullet and "before that norm" in bullet, bullet


# ---------------------------------------------------------------- local model directories


@pytest.fixture(scope="module")
def local_model_config(tmp_path_factory):
    """A config directory holding a local Hugging Face model directory (a random Qwen2, as a
    researcher builds one) that the config names by a relative path, and a current directory
    elsewhere."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from patchscope_core.models.loading import _load_tokenizer, _tiny_tokenizer_dir

    root = tmp_path_factory.mktemp("byom")
    model_dir = root / "study" / "tiny-qwen2"
    tok = _load_tokenizer(str(_tiny_tokenizer_dir()))
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = {
        "name": "byom",
        "models": ["./tiny-qwen2"],
        "source": {"prompts": ["Paris", "Water"], "layers": [1, 3], "positions": [-1]},
        "target": {"prompt": "x is", "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": 2},
        "execution": {"workers": 1, "batch_size": 4},
        "output": {"dir": str(root / "out"), "wandb": {"mode": "disabled"}},
    }
    config = root / "study" / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (root / "elsewhere").mkdir()
    return root, config


def test_a_relative_model_directory_is_found_beside_the_config(local_model_config, monkeypatch, capsys):
    root, config = local_model_config
    monkeypatch.chdir(root / "elsewhere")  # ./tiny-qwen2 is not here: only beside the config
    assert cli.main(["sweep", str(config), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{root / 'study' / 'tiny-qwen2'}: 4 layers" in out, out
    # as before, a directory found from the current directory wins, under the name as written
    monkeypatch.chdir(root / "study")
    assert cli.main(["sweep", "sweep.yaml", "--dry-run"]) == 0
    assert "  ./tiny-qwen2: 4 layers" in capsys.readouterr().out


def test_a_local_model_gives_clean_output_names(local_model_config, monkeypatch, capsys):
    root, config = local_model_config
    monkeypatch.chdir(root / "study")
    assert cli.main(["sweep", "sweep.yaml"]) == 0, capsys.readouterr().err
    out = root / "out"
    assert len(ResultStore(out).read()) == 4
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert names == ["heatmap_tiny-qwen2_prompt_x_layer.png"], names

    from sweeps.pictures import safe_name

    assert safe_name("./tiny-qwen2") == safe_name("/data/models/tiny-qwen2") == "tiny-qwen2"
    assert safe_name("~/models/tiny-qwen2/") == safe_name("../tiny-qwen2") == "tiny-qwen2"
    assert safe_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB_SmolLM2-135M"  # a hub name keeps its owner


# ---------------------------------------------------------------- patchscope report


def test_report_lists_the_steering_csv_as_a_table(tmp_path, capsys):
    cfg = {
        "name": "tiny-steer",
        "kind": "intervention",
        "models": ["tiny-llama"],
        "prompts": {"rows": [{"prompt": "I think this movie is"}]},
        "intervention": {
            "site": "blocks.{layer}.hook_resid_post",
            "layers": [1],
            "positions": "all",
            "kind": "add",
            "alpha": [2],
            "positive": ["good, great"],
            "negative": ["bad, awful"],
        },
        "generation": {"max_new_tokens": 2},
        "execution": {"workers": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    config = tmp_path / "steer.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli.main(["sweep", str(config)]) == 0
    steering = tmp_path / "out" / "steering_tiny-llama.csv"
    assert f"table:    {steering}" in capsys.readouterr().out  # what the sweep says
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"table:    {steering}" in lines and f"table:    {tmp_path / 'out' / 'results.csv'}" in lines
    assert all(line.endswith(".png") for line in lines if line.startswith("picture:")), lines


# ---------------------------------------------------------------- the Python API


def test_tokenize_takes_a_loaded_model_or_says_what_it_wants(tiny_models):
    bridge = tiny_models["tiny-llama"]
    ids = tokenize(bridge, "The Eiffel Tower")
    assert (
        ids
        == tokenize(model_info("tiny-llama"), "The Eiffel Tower")
        == tuple(bridge.to_tokens("The Eiffel Tower")[0].tolist())
    )
    gpt2 = tiny_models["tiny-gpt2"]
    assert tokenize(gpt2, "x y") == tuple(gpt2.to_tokens("x y")[0].tolist())
    with pytest.raises(
        PatchscopeError,
        match=r"^info: tokenize takes a ModelInfo \(model_info\(name\)\) or a loaded "
        r"model \(load_model\(name\)\), got str$",
    ):
        tokenize("tiny-llama", "x")


def test_the_engine_and_model_info_have_short_useful_reprs(tiny_models):
    info = model_info("tiny-llama")
    text = repr(info)
    assert text == (
        "ModelInfo('tiny-llama': 4 layers, d_model 64, 4 heads (2 kv) x d_head 16, d_mlp 128, n_ctx 512, "
        f"{type(info.tokenizer).__name__}, BOS prepended)"
    )
    engine = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    assert repr(engine) == "<PatchscopeEngine tiny-llama: 4 layers, d_model 64, on cpu, float32; greedy, top_k 10>"
    two = PatchscopeEngine(
        tiny_models["tiny-llama"], tiny_models["tiny-gpt2"], name="tiny-llama", source_name="tiny-gpt2"
    )
    assert repr(two).endswith("; source tiny-gpt2 (4 layers)>") and "\n" not in repr(two)


def test_a_bridge_with_hooks_attached_is_warned_about(tiny_models):
    bridge = tiny_models["tiny-llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a bridge without hooks
        Engine(bridge, name="tiny-llama")
    try:
        bridge.add_hook("blocks.1.hook_resid_post", lambda x, hook: x)
        with pytest.warns(
            UserWarning,
            match=r"^model: the bridge has hooks attached \(blocks\.1\.hook_resid_post\); "
            r"hooks added to the bridge .* do not act inside the engine's runs",
        ):
            Engine(bridge, name="tiny-llama")
        with pytest.warns(UserWarning, match=r"^source_model: the bridge has hooks attached"):
            PatchscopeEngine(tiny_models["tiny-gpt2"], bridge, name="tiny-gpt2", source_name="tiny-llama")
    finally:
        bridge.reset_hooks()
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        with pytest.warns(UserWarning, match=r"blocks\.0\.hook_resid_post"):
            Engine(bridge, name="tiny-llama")

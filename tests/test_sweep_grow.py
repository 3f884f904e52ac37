"""A sweep grows (issue 19): a changed config in the same output.dir computes only the cells it
does not find, the report shows the current config's cells, the manifest keeps the config
history, and a changed model (one weight rewritten) reuses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps import cli
from sweeps.sinks.store import ResultStore
from tests.configs import write_yaml

pytestmark = pytest.mark.ray


def local_model(path: Path) -> Path:
    from patchscope_core.models.loading import _tiny_hf_model

    hf, tok = _tiny_hf_model("tiny-llama")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write(tmp_path: Path, model: Path, layers) -> Path:
    cfg = {
        "name": "grow",
        "models": [str(model)],
        "source": {"prompts": ["Paris", "The quick brown fox"], "layers": layers, "positions": [-1]},
        "target": {"prompt": "Tell me about x", "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": 2},
        "execution": {"workers": 2, "batch_size": 1},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    return write_yaml(cfg, tmp_path / "grow.yaml")


def test_a_grown_sweep_computes_only_new_cells_and_a_changed_model_reuses_nothing(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    import sweeps.grid

    model = local_model(tmp_path / "model")
    submitted = []
    real_payload = sweeps.grid.Task.payload
    monkeypatch.setattr(sweeps.grid.Task, "payload", lambda self: submitted.append(self) or real_payload(self))
    sent = lambda: [c.cell_id for t in submitted for c in t.cells]  # noqa: E731
    out = tmp_path / "out"

    assert cli.main(["sweep", str(write(tmp_path, model, [1]))]) == 0  # 2 prompts x 1 layer
    first = set(ResultStore(out).read()["cell_id"])
    assert len(first) == 2 and len(sent()) == 2
    capsys.readouterr()

    # add a layer: the dry run says what is stored and reused, the run computes the 2 new cells
    grown = write(tmp_path, model, [1, 2])
    assert cli.main(["sweep", str(grown), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 of these cells already stored, 2 to run in 2 tasks" in printed
    assert "stored: 2 cells in" in printed and "2 reused by this config" in printed
    submitted.clear()
    assert cli.main(["sweep", str(grown)]) == 0
    assert "4 cells; 2 already stored" in capsys.readouterr().out
    assert len(sent()) == 2 and not set(sent()) & first
    assert len(ResultStore(out).read()) == 4

    # shrink it: nothing to compute; the report and the stored view hold the current cells only,
    # the older ones stay on disk and the manifest keeps every config
    submitted.clear()
    assert cli.main(["sweep", str(write(tmp_path, model, [2]))]) == 0
    assert sent() == []
    current = ResultStore(out).read()
    assert len(current) == 2 and set(current["source_layer"]) == {2}
    assert len(ResultStore(out).read(current=False)) == 4
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert "2 cells stored of 2" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["history"]) == 2 and manifest["config"]["source"]["layers"] == [2]

    # rewrite one weight of the model: every cell of the config is computed again
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[name][0, 0] += 0.5
    save_file(state, weights, metadata={"format": "pt"})
    submitted.clear()
    assert cli.main(["sweep", str(write(tmp_path, model, [1, 2]))]) == 0
    assert len(sent()) == 4  # nothing reused: the weights key changed
    df = ResultStore(out).read()
    assert len(df) == 4 and df["model_key"].nunique() == 1
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(f).num_rows for f in ResultStore(out).files()) == 8  # the stale rows stay on disk

"""A sweep kind added in one file (this one), registered here, run end to end: config errors,
`--dry-run`, an in-process sweep (grid -> payload -> worker -> rows -> store), resume with 0
recomputed, and `patchscope report`. The toy kind `word_lens` reads each word's last state at
each layer and asks the target prompt to continue it (the engine's Patchscope operation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from patchscope_core import Patchscope, Source, Target, tokenize
from sweeps.config import Layers, Strict
from sweeps.config.models import ModelPlan, checked_layers, model_info_for
from sweeps.kinds import KINDS, register
from sweeps.kinds.base import KindDefaults, Schema, digest, generation_key, run_columns

COLUMNS = ("cell_id", "model", "word", "layer")


class WordLensConfig(Strict):
    words: list[str]
    layers: Layers = "all"
    target_prompt: str = "x ->"


@dataclass(frozen=True)
class WordCell:
    model: str
    word: str
    layer: int
    key: str
    KIND = "word_lens"

    @property
    def cell_id(self) -> str:
        return digest(["word_lens", self.model, self.word, self.layer, self.key])

    @property
    def group(self) -> str:
        return self.word

    def params(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "model": self.model, "word": self.word, "layer": self.layer}


class WordLens(KindDefaults):
    name = "word_lens"
    sections = {"word_lens": WordLensConfig}
    operation = "patchscope"
    schema = Schema(COLUMNS, ("generated_text",), COLUMNS + ("generated_text",), ())
    marks = frozenset({"word"})
    order = ("model", "word", "layer")

    def check_config(self, config) -> None:
        if not all(w.strip() for w in config.word_lens.words):
            raise ValueError("word_lens.words: an empty word")

    def load_rows(self, config, base):
        return list(dict.fromkeys(config.word_lens.words))

    def check(self, config, rows, base):
        plans = {}
        for i, name in enumerate(config.models):
            info = model_info_for(name, f"models[{i}]")
            plan = ModelPlan(info, checked_layers(config.word_lens.layers, info, "word_lens.layers"), None)
            plan.n_tokens.update({w: len(tokenize(info, w, "word_lens.words")) for w in rows})
            plans[name] = plan
        return plans

    def science(self, science, config, rows, context):
        return science

    def group_sizes(self, config, rows, plans, context):
        for model in config.models:
            for _ in rows:
                yield model, len(plans[model].source_layers)

    def cells(self, config, rows, plans, context):
        for model in config.models:
            for word in rows:
                for layer in plans[model].source_layers:
                    yield WordCell(model, word, layer, generation_key(config))

    def payload(self, task):
        target = task.context
        return {
            "kind": self.operation,
            "patchscopes": [
                Patchscope(
                    Source(c.word, c.layer, -1, model=c.model),
                    Target(target, c.layer, (-1,), model=c.model),
                    max_new_tokens=2,
                ).to_dict()
                for c in task.cells
            ],
        }

    def to_rows(self, task, output):
        return [
            {**c.params(), "generated_text": r["generated_text"], **run_columns(output, r)}
            for c, r in zip(task.cells, output["records"], strict=True)
        ]

    def context(self, config, rows, base):
        return config.word_lens.target_prompt

    def describe(self, config, plan, context):
        return f"layers {plan.source_layers} (word lens)"

    def report(self, out_dir: Path, df, settings: dict | None = None):
        path = out_dir / "word_lens.csv"
        df.pivot_table(index="word", columns="layer", values="generated_text", aggfunc="first").to_csv(path)
        return {"word_lens": path}

    def summary(self, df):
        return "== word lens\n" + "\n".join(
            f"  {r.word} layer {r.layer}: {r.generated_text!r}" for r in df.itertuples()
        )


@pytest.fixture
def toy():
    kind = register(WordLens())
    yield kind
    del KINDS[kind.name]


def write(tmp_path: Path, **section) -> Path:
    cfg = {
        "name": "toy",
        "kind": "word_lens",
        "models": ["tiny-llama"],
        "word_lens": {"words": ["Paris", "Water"], "layers": [1, 3], **section},
        "execution": {"workers": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_toy_kind_is_checked_like_every_kind(toy, tmp_path, capsys, no_weights):
    from sweeps.cli import main

    assert main(["sweep", str(write(tmp_path, layers=[9])), "--dry-run"]) == 2
    assert "error: word_lens.layers: 9 is out of range" in capsys.readouterr().err
    assert main(["sweep", str(write(tmp_path, colour="red")), "--dry-run"]) == 2
    assert "error: word_lens.colour: unknown key 'colour'" in capsys.readouterr().err


def test_the_toy_kind_runs_end_to_end_and_resumes(toy, tmp_path, capsys, monkeypatch):
    from patchscope_core import PatchscopeEngine, load_model
    from sweeps.cli import main
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = write(tmp_path)
    assert main(["sweep", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep toy (word_lens): 4 cells in 2 tasks" in out and "layers [1, 3] (word lens) = 4 cells" in out
    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    assert run_in_process(config, engine, tmp_path / "out") == 4
    assert run_in_process(config, engine, tmp_path / "out") == 0  # resume: nothing recomputed
    df = ResultStore(tmp_path / "out").read()
    assert sorted(zip(df["word"], df["layer"])) == [("Paris", 1), ("Paris", 3), ("Water", 1), ("Water", 3)]
    # the engine's own Patchscope, computed outside the sweep, for one cell
    spec = Patchscope(
        Source("Water", 3, -1, model="tiny-llama"), Target("x ->", 3, (-1,), model="tiny-llama"), max_new_tokens=2
    )
    (direct,) = engine.run([spec])
    assert df.set_index(["word", "layer"]).loc[("Water", 3), "generated_text"] == direct.generated_text
    assert main(["report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "== word lens" in out and "4 cells stored of 4" in out
    assert (tmp_path / "out" / "results.csv").is_file() and (tmp_path / "out" / "word_lens.csv").is_file()

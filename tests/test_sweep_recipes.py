"""Recipe sweeps (`kind: recipe`): config errors before any load, the example configs' grids,
every recipe through the sweep's own grid, worker and records on tiny models, the pictures
drawn from stored results, the summaries' numbers against hand-computed values, and one
recipe end to end on the local Ray cluster (cells equal to the in-process recipe, W&B, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from patchscope_core import PatchscopeEngine
from patchscope_core.recipes import TokenIdentity, corpus_windows, pydoc_text, run_recipe
from sweeps import cli
from sweeps.grid import iter_cells, iter_tasks
from sweeps.kinds.recipe.attribute_extraction import attribute_summary
from sweeps.kinds.recipe.multi_hop import multihop_summary
from sweeps.records import records
from sweeps.run.driver import plan
from sweeps.sinks.report import write_report
from sweeps.sinks.store import ResultStore
from tests.configs import changed, write_yaml
from tests.test_sweep_ray import read_offline_run
from workers.actor import run_task

EXAMPLES = Path(__file__).resolve().parent.parent / "sweeps" / "examples"
LRE = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "lre"
TOKEN_IDENTITY = {
    "name": "tiny-token-identity",
    "kind": "recipe",
    "models": ["tiny-llama"],
    "recipe": {
        "name": "token_identity",
        "layers": "all",
        "words": 16,
        "windows": 3,
        "positions": 2,
        "min_context": 4,
        "fit_windows": 12,
    },
    "execution": {"workers": 2, "batch_size": 12},
    "output": {"wandb": {"project": "patchscope-tests", "mode": "offline"}},
}
CHAINS = (
    "first_hop,bridge,second_hop,answer\n"
    "the company that created Xbox,Microsoft,Who is the CEO of,Satya Nadella\n"
    "the country of the Colosseum,Italy,The capital city of,Rome\n"
)
ENTITIES = "entity,description\nParis,capital of France\nToyota,Japanese car maker\nWater,a liquid\n"
RECIPES = {
    "attribute_extraction": {
        "name": "attribute_extraction",
        "data": str(LRE),
        "relations": ["country_capital_city", "substance_phase"],
        "subjects": 2,
        "contexts": 2,
        "source_layers": [1, 3],
        "target_layers": [0, 2],
    },
    "entity_description": {
        "name": "entity_description",
        "file": "entities.csv",
        "source_template": "Tell me about {entity}",
        "layers": "all",
    },
    "multi_hop": {"name": "multi_hop", "file": "chains.csv", "source_layers": [0, 2], "target_layers": [1, 3]},
    "cross_model": {
        "name": "cross_model",
        "source_model": "tiny-gpt2",
        "source_layers": [1, 3],
        "target_layers": [0, 2],
        "words": 16,
        "windows": 3,
        "fit_windows": 12,
    },
}


def write(tmp_path: Path, cfg: dict, section: dict | None = None, **changes) -> Path:
    cfg = changed({**cfg, "recipe": section} if section is not None else cfg, **changes)
    (tmp_path / "chains.csv").write_text(CHAINS)
    (tmp_path / "entities.csv").write_text(ENTITIES)
    cfg["output"]["dir"] = str(tmp_path / "out")
    return write_yaml(cfg, tmp_path / f"{cfg['name']}.yaml")


# ---------------------------------------------------------------- config errors, before anything loads


@pytest.mark.parametrize(
    "recipe, changes, message",
    [
        (
            None,
            {"recipe__name": "lens"},
            "recipe.name: unknown recipe 'lens' (allowed: token_identity, attribute_extraction",
        ),
        (None, {"recipe__name": None}, "recipe.name: missing (allowed: token_identity"),
        (
            None,
            {"recipe__colour": 1},
            "recipe.colour: unknown key 'colour' (allowed: seed, corpus, words, windows, fit_windows, name, layers",
        ),
        (None, {"recipe__layers": [9]}, "recipe.layers: 9 is out of range 0 .. 3 for tiny-llama"),
        (
            None,
            {"recipe__positions": 400},
            "recipe.positions (window 1): 400 positions from position 4 on do not fit a window of",
        ),
        (None, {"recipe__fit_windows": 1}, "recipe.fit_windows: 1 windows give"),
        (None, {"recipe__windows": 10000}, "recipe.corpus: "),
        (None, {"recipe__corpus": "nowhere.txt"}, "recipe.corpus: no such file 'nowhere.txt'"),
        (None, {"recipe": None}, "recipe: a recipe sweep needs a recipe section"),
        (
            None,
            {"kind": "patchscope", "source": {"prompts": ["a b"]}, "target": {"prompt": "c x"}},
            "recipe: not used by a patchscope sweep",
        ),
        (
            RECIPES["attribute_extraction"],
            {"recipe__relations": ["capitals"]},
            "recipe.relations: no relation 'capitals'",
        ),
        (RECIPES["attribute_extraction"], {"recipe__data": "nowhere"}, "recipe.data: no such directory 'nowhere'"),
        (RECIPES["entity_description"], {"recipe__file": "missing.csv"}, "recipe.file: no such file 'missing.csv'"),
        (RECIPES["entity_description"], {"recipe__target_layers": [7]}, "recipe.target_layers: 7 is out of range"),
        (
            RECIPES["multi_hop"],
            {"recipe__hop1_template": "{subject} is"},
            "recipe.hop1_template: a template may use {first_hop}",
        ),
        (
            RECIPES["cross_model"],
            {"recipe__source_model": "no such model"},
            "recipe.source_model: unknown model 'no such model'",
        ),
    ],
)
def test_config_errors_name_the_field_before_any_load(
    tmp_path, capsys, no_weights, monkeypatch, recipe, changes, message
):
    import sweeps.run.driver

    monkeypatch.setattr(
        sweeps.run.driver, "connect", lambda *a, **k: pytest.fail("Ray started before the config error")
    )
    assert cli.main(["sweep", str(write(tmp_path, TOKEN_IDENTITY, recipe, **changes)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "\n" == err[-1] and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.smollm2
def test_attribute_extraction_reads_the_shipped_relations_without_data(tmp_path, monkeypatch, no_weights):
    monkeypatch.chdir(tmp_path)
    cfg = dict(TOKEN_IDENTITY, name="tiny-shipped-lre", generation={"max_new_tokens": 6})
    section = changed(RECIPES["attribute_extraction"], data=None, relations=["product_by_company"], contexts=1)
    p = plan(str(write(tmp_path, cfg, section)))
    assert len(p.rows) == 2 and {r["relation"] for r in p.rows} == {"product_by_company"}
    assert p.n_cells == 2 * (2 * 2 + 1)  # subjects x ((l, l*) + question)


@pytest.mark.parametrize(
    "example, cells",
    [
        ("recipe_token_identity.yaml", 40 * 5 * 30 * 3),  # windows x positions x layers x (Patchscope + 2 lenses)
        ("recipe_attribute_extraction.yaml", 3 * 20 * (10 * 10 + 1)),  # relations x subjects x ((l, l*) + question)
        ("recipe_entity_description.yaml", 24 * 30),  # entities x layers (l* = l)
        ("recipe_cross_model.yaml", 100 * 6 * 6),  # windows x (l, l*)
        ("recipe_multi_hop.yaml", 30 * (3 + 2 * 10 * 10)),  # chains x (hop1, hop2, vanilla + CoT grid + control grid)
    ],
)
def test_the_example_configs_are_valid_and_count_their_grids(example, cells, monkeypatch, no_weights, tmp_path):
    monkeypatch.chdir(tmp_path)  # the files an example names are found beside it, from anywhere
    assert plan(str(EXAMPLES / example)).n_cells == cells


# ---------------------------------------------------------------- every recipe through the sweep's grid, worker and records


def run_in_process(config: Path, engine) -> pd.DataFrame:
    """The sweep's own path without Ray: grid -> task payloads -> the worker's run_task -> records."""
    p = plan(str(config))
    cfg, rows, plans, n_cells, context = p.config, p.rows, p.models, p.n_cells, p.context
    out = []
    for task in iter_tasks(iter_cells(cfg, rows, plans, context=context), cfg.execution.batch_rows, context):
        out += records(task, run_task(engine, task.payload(), cfg.execution.batch_rows))
    assert len(out) == n_cells and len({r["cell_id"] for r in out}) == n_cells
    return pd.DataFrame(out)


@pytest.mark.parametrize("name", ["attribute_extraction", "entity_description", "multi_hop", "cross_model"])
def test_each_recipe_runs_through_the_sweep_path_and_draws_its_picture(tmp_path, tiny_models, name):
    cfg = dict(TOKEN_IDENTITY, name=f"tiny-{name}", generation={"max_new_tokens": 6})
    engine = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    df = run_in_process(write(tmp_path, cfg, RECIPES[name]), engine)
    assert set(df["recipe"]) == {name} and df["score"].between(0, 1).all()
    (tmp_path / "out").mkdir()
    paths = write_report(tmp_path / "out", df)
    assert (tmp_path / "out" / f"recipe_tiny-llama_{name}.png").stat().st_size > 5000
    assert paths["table"].is_file()
    if name == "attribute_extraction":  # 2 relations x 2 subjects x 2 contexts, a question per subject
        assert len(df) == 8 * 4 + 4 and set(df["relation"]) == {"country_capital_city", "substance_phase"}
        summary = pd.read_csv(tmp_path / "out" / "recipe_tiny-llama_attribute_extraction.csv")
        assert list(summary["facts"]) == [4, 4] and list(summary["subjects"]) == [2, 2]
    elif name == "multi_hop":
        assert sorted(df["role"].value_counts().items()) == [
            ("control", 8),
            ("hop1", 2),
            ("hop2", 2),
            ("patchscope", 8),
            ("vanilla", 2),
        ]
    elif name == "cross_model":  # tiny-gpt2's states read, tiny-llama patched
        assert set(df["source_model"]) == {"tiny-gpt2"} and len(df) == 3 * 4 and df["surprisal"].notna().all()
    else:
        assert len(df) == 3 * 4 and df["control_score"].notna().all()


# ---------------------------------------------------------------- the summaries, by hand


def test_attribute_summary_by_hand():
    """Two facts of one relation on a 2 x 2 grid (l, l*): subject A (known: its question is
    right) is right at (0, 0) only; subject B (unknown) at (1, 1) only; the control is right once,
    for B at (0, 0)."""
    grid = [
        (row, subj, l, lt, float((row, l, lt) in {(0, 0, 0), (1, 1, 1)}), float((row, l, lt) == (1, 0, 0)))
        for row, subj in ((0, "A"), (1, "B"))
        for l in (0, 1)
        for lt in (0, 1)
    ]
    df = pd.DataFrame(
        [
            {
                "relation": "r",
                "role": "patchscope",
                "row": r,
                "subject": s,
                "source_layer": l,
                "target_layer": lt,
                "score": sc,
                "control_score": c,
            }
            for r, s, l, lt, sc, c in grid
        ]
        + [
            {"relation": "r", "role": "question", "row": 0, "subject": "A", "score": 1.0, "control_score": 0.0},
            {"relation": "r", "role": "question", "row": 1, "subject": "B", "score": 0.0, "control_score": 1.0},
        ]
    )
    (s,) = attribute_summary(df).to_dict("records")
    # cells: (0,0) 1/2, (0,1) 0, (1,0) 0, (1,1) 1/2: the first best is (0, 0)
    assert (s["best_l"], s["best_l_star"], s["best_cell"]) == (0, 0, 0.5)
    # a fact right at some l* of layer l: l=0 {A}, l=1 {B}: 1/2 each; some l of l*: the same
    assert (s["best_source_layer"], s["best_source_layer_any_l_star"]) == (0, 0.5)
    assert (s["best_target_layer"], s["best_target_layer_any_l"]) == (0, 0.5)
    assert (s["any_cell"], s["any_cell_known"], s["any_cell_unknown"], s["known_facts"]) == (1.0, 1.0, 1.0, 1)
    assert (s["known_subjects"], s["control_best_cell"], s["control_any_cell"], s["question_control"]) == (
        0.5,
        0.5,
        0.5,
        0.5,
    )


def test_multihop_summary_by_hand():
    """Three chains: 0 and 2 right hop by hop, 1 only at hop 1; vanilla right for chain 0; the CoT
    Patchscope on a 1 x 2 grid right for chain 0 at l* = 1 and for chain 1 everywhere; the control
    right for chain 2 at l* = 0."""
    rows = []
    for row, (h1, h2, v) in enumerate([(1, 1, 1), (1, 0, 0), (1, 1, 0)]):
        rows += [
            {"row": row, "role": role, "score": float(x)} for role, x in (("hop1", h1), ("hop2", h2), ("vanilla", v))
        ]
    for row, scores, control in ((0, (0, 1), (0, 0)), (1, (1, 1), (0, 0)), (2, (0, 0), (1, 0))):
        for lt in (0, 1):
            rows.append(
                {"row": row, "role": "patchscope", "source_layer": 0, "target_layer": lt, "score": float(scores[lt])}
            )
            rows.append(
                {"row": row, "role": "control", "source_layer": 0, "target_layer": lt, "score": float(control[lt])}
            )
    s = multihop_summary(pd.DataFrame(rows))[0].iloc[0].to_dict()
    assert (s["chains"], s["hop1_right"], s["hop2_right"], s["right_hop_by_hop"]) == (3, 3, 2, 2)
    assert s["vanilla_all"] == pytest.approx(1 / 3) and s["vanilla_on_right"] == 0.5
    assert s["patchscope_any_cell_on_right"] == 0.5 and s["patchscope_any_cell_all"] == pytest.approx(2 / 3)
    assert (s["patchscope_best_cell_on_right"], s["best_l"], s["best_l_star"]) == (0.5, 0, 1)
    assert s["control_any_cell_on_right"] == 0.5 and s["control_any_cell_all"] == pytest.approx(1 / 3)
    assert s["control_best_cell_on_right"] == 0.5  # (0, 0): chains 0 and 2 score 0 and 1


# ---------------------------------------------------------------- end to end on Ray


def test_a_recipe_sweep_on_ray_equals_the_recipe_in_process_and_resumes(ray_cluster, tmp_path, tiny_models, capsys):
    config = write(tmp_path, TOKEN_IDENTITY)
    assert cli.main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    df = ResultStore(out).read()
    assert len(df) == 3 * 2 * 4 * 3 and df["cell_id"].is_unique
    evaluated, fit = corpus_windows(pydoc_text(), 16, 3, 12, 0)
    engine = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    want = run_recipe(
        engine, TokenIdentity(layers=(0, 1, 2, 3), positions=2, min_context=4), [{"text": w} for w in evaluated], fit
    )
    got = {(r["row"], r["method"], r["source_layer"], r["source_position"]): r for r in df.to_dict("records")}
    assert len(got) == len(want)
    for probe, o in want:
        r = got[(probe.row, probe.method, probe.source.layer, probe.source.position)]
        assert (r["predicted_token_id"], r["expected_token_id"], r["score"]) == (
            o["predicted_token_id"],
            o["expected_token_id"],
            o["score"],
        )
        assert r["surprisal"] == pytest.approx(o["surprisal"], abs=1e-4)
    assert (out / "recipe_tiny-llama_token_identity.png").stat().st_size > 5000
    summary = pd.read_csv(out / "recipe_tiny-llama_token_identity.csv")
    assert set(summary["method"]) == {"patchscope", "logit_lens", "tuned_lens"} and set(summary["positions"]) == {6}
    wb = read_offline_run(out)
    (final,) = [h for h in wb["history"] if "results" in h]
    assert (
        "heatmap/recipe_tiny-llama_token_identity" in final and "table/recipe_tiny-llama_token_identity_table" in final
    )
    assert len(wb["table"](final["results"])) == len(df)
    capsys.readouterr()
    files = {f.name: f.stat().st_mtime_ns for f in ResultStore(out).files()}
    assert cli.main(["sweep", str(config)]) == 0
    assert f"{len(df)} already stored" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in ResultStore(out).files()} == files
    (out / "recipe_tiny-llama_token_identity.png").unlink()
    assert cli.main(["report", str(out)]) == 0  # the picture again, from the stored results alone
    assert "tiny-llama token_identity" in capsys.readouterr().out
    assert (out / "recipe_tiny-llama_token_identity.png").stat().st_size > 5000
    assert json.loads((out / "manifest.json").read_text())["config"]["recipe"]["name"] == "token_identity"

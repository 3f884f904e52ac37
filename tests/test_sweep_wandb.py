"""W&B dashboards (issue 28): each sweep read back from its offline W&B run files (the binary run
log, as tests/test_sweep_ray.py reads it, and the table files it points to).

Per kind, on tiny models, in process: one run per model in the sweep's group; the run's summary
holds the kind's summary figures, each recomputed here from the stored rows
(`ResultStore(...).read()`) with pandas and numpy; every CSV table the report wrote is a W&B
table with the same rows; the curves are line plots whose points are recomputed from the rows;
the store is an artifact by reference whose paths and MD5 checksums are the files' own; the
config holds the kind's own sections. Then the run's life across invocations: an interrupted
sweep continues the same run id and ends finished; a rerun with nothing to compute updates it
to the current (shrunk) config; `--restart` starts a new run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sweeps.cli import main
from sweeps.sinks.store import ResultStore
from tests.configs import write_yaml
from tests.test_sweep_ray import read_wandb_records

# ---------------------------------------------------------------- reading every offline run of a sweep dir


def read_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """One offline run directory: its run record, merged config and summary, history rows, exit
    code, whether it was marked preempting, its artifacts' manifests, and a table reader."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    records = read_wandb_records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read_wandb_records(log)
    out: dict = {
        "dir": run_dir,
        "config": {},
        "summary": {},
        "history": [],
        "artifacts": [],
        "preempting": False,
        "removed": set(),
    }
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
            for i in r.summary.remove:  # offline the summary starts empty: W&B applies these on syncing
                out["removed"].add(i.key or "/".join(i.nested_key))
                out["summary"].pop(i.key or "/".join(i.nested_key), None)
        elif kind == "history":
            row: dict = {}
            for item in r.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "artifact":
            a = r.artifact
            out["artifacts"].append(
                {"name": a.name, "type": a.type, "files": {e.path: (e.ref, e.digest) for e in a.manifest.contents}}
            )
        elif kind == "preempting":
            out["preempting"] = True
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code

    def table(path: str) -> pd.DataFrame:
        t = json.loads((run_dir / "files" / path).read_text())
        return pd.DataFrame(t["data"], columns=t["columns"])

    out["table"] = table
    return out


def runs_of(out_dir: Path) -> dict[str, list[dict]]:
    """{run id: its offline directories, oldest first}."""
    runs: dict[str, list[dict]] = {}
    for d in sorted((out_dir / "wandb").glob("offline-run-*")):
        r = read_run(d)
        runs.setdefault(r["run"].run_id, []).append(r)
    return runs


def final(run: dict) -> dict:
    """The run's last history row holding the final `results` table, with every key logged at it."""
    (row,) = [h for h in run["history"] if "results/path" in h]
    return row


def logged_tables(run: dict, prefix: str) -> dict[str, pd.DataFrame]:
    row = final(run)
    return {
        k[: -len("/path")][len(prefix) :]: run["table"](v)
        for k, v in row.items()
        if k.startswith(prefix) and k.endswith("/path")
    }


def run_ids(out_dir: Path) -> dict[str, str]:
    """{model: run id} of output.dir/wandb_runs.json."""
    return {m: v["id"] for m, v in json.loads((out_dir / "wandb_runs.json").read_text()).items()}


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


# ---------------------------------------------------------------- the sweeps

PAIRS = [
    {"clean": "The fox jumps over the", "corrupted": "The fix jumps over the", "answer": " dog", "wrong": " cat"},
    {"clean": "A fox sat on the", "corrupted": "A fix sat on the", "answer": " mat", "wrong": " rug"},
]
PAIR_PROMPTS = {
    "rows": PAIRS,
    "clean_column": "clean",
    "corrupted_column": "corrupted",
    "answer_column": "answer",
    "wrong_answer_column": "wrong",
}
FACTS = [
    {"prompt": "Paris is the capital of France", "subject": "Paris", "answer": " and"},
    {"prompt": "The Eiffel Tower is in Paris", "subject": "Eiffel Tower", "answer": " and"},
    {"prompt": "Water is a liquid and", "subject": "Water", "answer": " it"},
]
FACT_PROMPTS = {
    "file": "facts.jsonl",
    "prompt_column": "prompt",
    "subject_column": "subject",
    "answer_column": "answer",
}

SWEEPS = {
    "patchscope": {
        "models": ["tiny-llama", "tiny-gpt2"],
        "source": {
            "file": "entities.jsonl",
            "prompt_column": "entity",
            "reference_columns": ["answer"],
            "layers": [0, 1, 2],
            "positions": [-1],
        },
        "target": {"prompt": "x is a", "positions": [-1]},
        "generation": {"max_new_tokens": 4},
    },
    "activation_patching": {
        "kind": "activation_patching",
        "prompts": PAIR_PROMPTS,
        "patching": {
            "sites": ["blocks.{layer}.hook_resid_pre", "blocks.{layer}.attn.hook_z"],
            "layers": [0, 1],
            "positions": [-1, 2],
            "heads": [0, 1],
        },
    },
    "attribution_patching": {
        "kind": "attribution_patching",
        "prompts": PAIR_PROMPTS,
        "attribution": {
            "sites": ["blocks.{layer}.attn.hook_z", "blocks.{layer}.hook_mlp_out"],
            "layers": [0, 1],
            "method": ["atp"],
            "verify": {"top_k": 3, "random": 4, "positions": "all"},
        },
    },
    "causal_trace": {
        "kind": "causal_trace",
        "prompts": FACT_PROMPTS,
        "trace": {"sites": ["resid_post", "mlp_out"], "layers": "all", "positions": "all", "samples": 2, "seed": 1},
    },
    "knockout": {
        "kind": "intervention",
        "prompts": FACT_PROMPTS,
        "intervention": {
            "site": "blocks.{layer}.attn",
            "layers": [1, 2],
            "kind": "knockout",
            "from": "last",
            "to": ["subject", "last"],
            "window": 3,
        },
        "generation": {"max_new_tokens": 1},
    },
    "head_ablation": {
        "kind": "intervention",
        "prompts": {k: v for k, v in FACT_PROMPTS.items() if k != "subject_column"},
        "intervention": {
            "site": "blocks.{layer}.attn.hook_z",
            "layers": [1, 3],
            "heads": "all",
            "positions": "all",
            "kind": "zero",
        },
        "generation": {"max_new_tokens": 1},
    },
    "token_identity": {
        "kind": "recipe",
        "recipe": {
            "name": "token_identity",
            "layers": "all",
            "words": 16,
            "windows": 3,
            "positions": 2,
            "min_context": 4,
            "fit_windows": 12,
        },
    },
    "feature_explanation": {  # MLP neurons' output directions: no file needed
        "kind": "feature_explanation",
        "features": {"neurons": {"layers": [1], "ids": "0:3"}},
        "explanation": {"templates": ["cat -> cat\nX ->"], "scales": [1, 8], "max_new_tokens": 3},
    },
}
ENTITIES = [
    {"entity": "Paris", "answer": "city"},  # a word, and single letters a random model's text
    {"entity": "The quick brown fox", "answer": "e"},  # names now and then: shares between 0 and 1
    {"entity": "Python", "answer": "a"},
]


def write(tmp_path: Path, name: str, **changes) -> Path:
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    (tmp_path / "entities.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ENTITIES))
    cfg = {
        "name": f"wb-{name.replace('_', '-')}",
        "models": ["tiny-llama"],
        **SWEEPS[name],
        "execution": {"workers": 1, "backend": "local", "batch_size": 8},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"project": "patchscope-tests", "mode": "offline"}},
    }
    cfg.update(changes)
    return write_yaml(cfg, tmp_path / f"{name}.yaml")


# ---------------------------------------------------------------- the summary figures, recomputed from the rows


def _at(v) -> bool:
    return v is not None and v == v


def expected_figures(name: str, df: pd.DataFrame) -> dict:
    """One model's headline numbers from its stored rows, computed here with pandas and numpy."""
    out: dict = {}
    if name == "patchscope":
        hit = np.array([a.strip().lower() in t.lower() for a, t in zip(df["ref_answer"], df["generated_text"])])
        by_layer = pd.Series(hit, index=df.index).groupby(df["source_layer"]).mean()
        out["share_naming_answer"] = hit.mean()
        out["best_layer_answer"] = int(by_layer.idxmax())
        out["best_layer_share_answer"] = by_layer.max()
    elif name == "activation_patching":
        for site, g in df.groupby("site"):
            cells = {}
            for r in g.itertuples():
                key = (r.layer, r.position if _at(r.position) else None, r.head if _at(r.head) else None)
                cells.setdefault(key, []).append(r.recovered)
            (layer, position, head), best = max(((k, np.nanmean(v)) for k, v in cells.items()), key=lambda kv: kv[1])
            out[f"{site}/max_recovered"] = best
            out[f"{site}/max_recovered_layer"] = layer
            out[f"{site}/max_recovered_position"] = position
            if head is not None:
                out[f"{site}/max_recovered_head"] = head
                out[f"{site}/top_head"] = f"L{int(layer)}H{int(head)}"
    elif name == "attribution_patching":
        for (site, method), g in df[df["exact"].notna()].groupby(["site", "method"]):
            out[f"{site}/{method}/pearson"] = np.corrcoef(g["estimate"].astype(float), g["exact"].astype(float))[0, 1]
    elif name == "causal_trace":
        facts = df.drop_duplicates("row")
        out["p_clean"], out["p_corrupt"] = facts["p_clean"].mean(), facts["p_corrupt"].mean()
        last = df.groupby("row")["position"].transform(lambda p: p[df.loc[p.index, "is_subject"]].max())
        at_last = df[df["position"] == last]
        for site, g in at_last.groupby("site"):
            means = g.groupby("layer")["indirect_effect"].mean()
            out[f"{site}/last_subject_peak"] = means.max()
            out[f"{site}/last_subject_peak_layer"] = int(means.idxmax())
    elif name == "head_ablation":
        means = df.groupby(["site", "layer", "head"])["delta_logprob"].mean()
        (site, layer, head), best = max(means.items(), key=lambda kv: abs(kv[1]))
        out["largest_effect"] = out["top_head_delta_logprob"] = best
        out["largest_effect_at"] = out["top_head"] = f"{site} L{layer}H{head} zero"
    elif name == "token_identity":
        for method, g in df.groupby("method"):
            by_layer = g.groupby("source_layer")["score"].mean()
            out[f"token_identity/{method}/precision_at_1"] = by_layer.max()
            out[f"token_identity/{method}/best_layer"] = int(by_layer.index[int(np.argmax(by_layer.to_numpy()))])
    elif name == "feature_explanation":  # the chosen explanations, per source (the control beside the neurons)
        chosen = df[df["chosen"].astype(bool)]
        assert set(chosen["source"]) == {"neuron", "control"}
        for source, g in chosen.groupby("source"):
            for m in ("self_similarity", "entropy", "relevancy", "matches_logit_lens"):
                out[f"{source}/{m}"] = g[m].astype(float).sum() / len(g)
    elif name == "knockout":
        for edges, g in df.groupby("knockout"):
            means = g.groupby("layer")["p_change_pct"].mean()
            out[f"knockout/{edges}/largest_drop_pct"] = means.min()
            out[f"knockout/{edges}/largest_drop_layer"] = int(means.idxmin())
    return out


def expected_curves(name: str, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The points of the line plots each kind logs, from the rows: {name: (x, series) -> y}."""
    if name == "patchscope":
        hit = [a.strip().lower() in t.lower() for a, t in zip(df["ref_answer"], df["generated_text"])]
        g = df.assign(hit=hit).groupby(["source_layer", "source_position"])["hit"].mean()
        return {"match_answer_by_layer": g}
    if name == "knockout":
        return {"knockout": df.groupby(["layer", "knockout"])["p_change_pct"].mean()}
    if name == "causal_trace":  # of ROME's lines, the last subject token's (each fact's last is_subject position)
        last = df.groupby("row")["position"].transform(lambda p: p[df.loc[p.index, "is_subject"]].max())
        at_last = df[df["position"] == last].assign(group="last subject token")
        return {
            f"trace_{site}": g.groupby(["layer", "group"])["indirect_effect"].mean()
            for site, g in at_last.groupby("site")
        }
    return {}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_each_kind_s_run_holds_its_figures_tables_curves_and_store(tmp_path, name):
    from sweeps.sinks.report import write_report

    config = write(tmp_path, name)
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    df = ResultStore(out).read()
    models = list(dict.fromkeys(df["model"]))
    ids = run_ids(out)
    runs = runs_of(out)
    assert sorted(ids) == sorted(models) and sorted(runs) == sorted(ids.values()), "one run per model"
    made = write_report(out)  # the report's files again, as the sweep's end wrote them
    csvs = {k: p for k, p in made.items() if k != "table" and p.suffix == ".csv"}
    assert csvs or name == "causal_trace", "the kind writes tables: the check below could not fail"
    for model in models:
        (run,) = runs[ids[model]]
        assert run.get("exit_code") == 0 and run["run"].run_group == f"wb-{name.replace('_', '-')}"
        mine = df[df["model"] == model]

        # the summary: the counts and the kind's figures, recomputed from the stored rows
        want = expected_figures(name, mine)
        assert want, "no figure to compare: the check could not fail"
        for key, value in want.items():
            got = run["summary"].get(key)
            if isinstance(value, str) or value is None:
                assert got == value, (key, got, value)
            else:
                assert got == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
        assert run["summary"]["cells_done"] == len(df)

        # the results table: this model's cells; every CSV table of the report, its rows for this model
        assert set(run["table"](final(run)["results/path"])["cell_id"]) == set(mine["cell_id"])
        tables = logged_tables(run, "table/")
        for key, path in csvs.items():
            csv = pd.read_csv(path)
            if "model" in csv.columns:
                csv = csv[csv["model"] == model].reset_index(drop=True)
            elif model not in key and any(m in key for m in models):
                assert key not in tables, f"{key} (another model's) logged in {model}'s run"
                continue
            assert key in tables, f"{path.name} is written but not logged"
            pd.testing.assert_frame_equal(
                tables[key].astype(str), csv.astype(str).reset_index(drop=True), check_dtype=False
            )

        # the line plots: W&B custom charts whose points are the means of the rows
        curves = logged_tables(run, "curve/")
        for key, series in expected_curves(name, mine).items():
            got = curves[f"{key}_table"]
            x, s = series.index.names
            got = got.assign(**{s: got[s].astype(str)}).set_index([x, s]).iloc[:, 0]
            want = dict(series.rename(index=str, level=s).items())
            assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6), key
            assert len(got) == len(want) or name == "causal_trace", key  # a trace has more groups than this one

        # the store as an artifact by reference: every Parquet file, its path and its own checksum
        (artifact,) = [a for a in run["artifacts"] if a["type"] == "sweep-results"]
        files = [*ResultStore(out).files(), out / "manifest.json", out / "cells.parquet"]
        assert sorted(artifact["files"]) == sorted(str(f.relative_to(out)) for f in files)
        for f in files:
            ref, digest = artifact["files"][str(f.relative_to(out))]
            assert ref == f.resolve().as_uri() and digest == md5_b64(f)

        # the config: the kind's own sections, no other kind's, its model
        cfg = run["config"]
        assert cfg["model"] == model and cfg["name"] == f"wb-{name.replace('_', '-')}"
        others = {"source", "target", "patching", "attribution", "trace", "intervention", "recipe", "prompts"}
        others |= {"features", "explanation"}
        own = set(SWEEPS[name]) - {"kind", "models", "generation"}
        assert own <= set(cfg) and not (others - own) & set(cfg), sorted(cfg)
        if name in ("activation_patching", "attribution_patching", "causal_trace"):
            assert "generation" not in cfg, "a kind that generates nothing logs no generation defaults"


# ---------------------------------------------------------------- one run across invocations


def test_an_interrupted_sweep_is_one_run_resumed_updated_and_restarted(tmp_path, monkeypatch, capsys):
    import sweeps.sinks.store

    config = write(
        tmp_path,
        "patchscope",
        models=["tiny-llama"],
        execution={"workers": 1, "backend": "local", "batch_size": 1, "batches_per_task": 1},
    )
    real_write = sweeps.sinks.store.ResultStore.write
    writes = []

    def stop_after_two(self, task_id, records):
        new = real_write(self, task_id, records)
        writes.append(new)
        if len(writes) == 2:
            raise KeyboardInterrupt  # Ctrl-C once two tasks are stored
        return new

    monkeypatch.setattr(sweeps.sinks.store.ResultStore, "write", stop_after_two)
    assert main(["sweep", str(config)]) == 130
    monkeypatch.setattr(sweeps.sinks.store.ResultStore, "write", real_write)
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    (run_id,) = run_ids(out).values()
    runs = runs_of(out)
    assert list(runs) == [run_id], "the rerun continued the interrupted run, not a new one"
    stopped, resumed = runs[run_id]
    assert stopped["preempting"] and stopped["exit_code"] != 0
    assert resumed["run"].resume and resumed["exit_code"] == 0
    steps = [[h["_step"] for h in r["history"]] for r in (stopped, resumed)]
    assert steps[0] and max(steps[0]) < min(steps[1]), "the resumed history goes on after the stopped one's"
    assert len(resumed["table"](final(resumed)["results/path"])) == 9 == resumed["summary"]["cells_done"]

    # shrink the sweep: nothing to compute, and the run still shows the current cells
    shrunk = write(
        tmp_path,
        "patchscope",
        models=["tiny-llama"],
        source={**SWEEPS["patchscope"]["source"], "layers": [0]},
    )
    assert main(["sweep", str(shrunk)]) == 0
    assert "0 to run" in capsys.readouterr().out
    runs = runs_of(out)
    assert list(runs) == [run_id] and len(runs[run_id]) == 3
    last = runs[run_id][-1]
    assert min(h["_step"] for h in last["history"]) > max(h["_step"] for h in resumed["history"])
    current = ResultStore(out).read()
    assert len(current) == 3 and last["exit_code"] == 0
    assert set(last["table"](final(last)["results/path"])["cell_id"]) == set(current["cell_id"])
    assert last["summary"]["cells_total"] == 3 and last["config"]["source"]["layers"] == [0]
    assert last["summary"]["share_naming_answer"] == pytest.approx(
        expected_figures("patchscope", current)["share_naming_answer"]
    )

    # --restart: a new run
    assert main(["sweep", str(shrunk), "--restart"]) == 0
    (new_id,) = run_ids(out).values()
    assert new_id != run_id and set(runs_of(out)) == {run_id, new_id}


def test_a_figure_the_current_config_no_longer_has_leaves_the_run_s_summary(tmp_path, capsys):
    config = write(tmp_path, "activation_patching")
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    (run_id,) = run_ids(out).values()
    (first,) = runs_of(out)[run_id]
    assert first["summary"]["attn.hook_z/top_head"] and "hook_resid_pre/max_recovered" in first["summary"]
    patching = {**SWEEPS["activation_patching"]["patching"], "sites": ["blocks.{layer}.hook_resid_pre"]}
    assert main(["sweep", str(write(tmp_path, "activation_patching", patching=patching))]) == 0
    assert "0 to run" in capsys.readouterr().out
    _, last = runs_of(out)[run_id]
    want = expected_figures("activation_patching", ResultStore(out).read())
    assert want and all(k.startswith("hook_resid_pre/") for k in want)
    figures = {k for k in last["summary"] if "/" in k and not k.startswith(("_", "cells/", "results/", "table/"))}
    figures = {k for k in figures if not k.startswith(("heatmap/", "curve/"))}
    assert figures == set(want)
    gone = {k for k in first["summary"] if k.startswith("attn.hook_z/")}
    assert gone and last["removed"] == gone, "the head site's figures, gone from the config, leave the summary"

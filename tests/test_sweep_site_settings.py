"""Per-site positions and heads (issue 28 item 1): in the pair kinds and `kind: intervention`,
`sites` may mix plain names with mappings `{site: ..., positions: ..., heads: ...}`, so ONE sweep
runs the residual stream by position and the heads over all positions. Its cells are exactly
the cells of the sweeps written the old way, one per setting (the same ids: a store of either
serves the other), and a mixed activation-patching sweep stores the values those sweeps store.
Configs written the old way keep their ids (tests/test_golden.py pins them)."""

from __future__ import annotations

import pandas as pd
import pytest

from sweeps.cli import main
from sweeps.grid import iter_cells
from sweeps.run.driver import plan
from tests.configs import changed, write_yaml
from tests.test_sweep_activation_patching import PROMPTS
from tests.test_sweep_studies import ABLATION
from tests.test_sweep_studies import write as write_study

PATCHING = {
    "name": "mixed",
    "kind": "activation_patching",
    "models": ["tiny-llama"],
    "prompts": PROMPTS,
    "patching": {"layers": [0, 2], "heads": [0, 1]},
    "execution": {"workers": 1, "batch_size": 8},
    "output": {"wandb": {"mode": "disabled"}},
}
ATTRIBUTION = {
    "name": "mixed-atp",
    "kind": "attribution_patching",
    "models": ["tiny-llama"],
    "prompts": PROMPTS,
    "attribution": {"layers": [1, 3], "method": ["atp", "atp_star"]},
    "execution": {"workers": 1, "batch_size": 8},
    "output": {"wandb": {"mode": "disabled"}},
}
MIXED = [
    {"site": "blocks.{layer}.hook_resid_pre", "positions": "each"},
    {"site": "z", "positions": "all", "heads": "all"},
]


def config(tmp_path, base: dict, name: str, **changes):
    cfg = changed(base, **changes)
    cfg["name"] = name
    cfg["output"]["dir"] = str(tmp_path / name)
    return write_yaml(cfg, tmp_path / f"{name}.yaml")


def cells(path) -> list:
    p = plan(str(path))
    return list(iter_cells(p.config, p.rows, p.models, context=p.context))


def ids(path) -> list[str]:
    return [c.cell_id for c in cells(path)]


def test_patching_one_sweep_is_the_old_way_sweeps_cells(tmp_path, no_weights):
    mixed = ids(config(tmp_path, PATCHING, "mixed", patching__sites=MIXED))
    by_position = ids(config(tmp_path, PATCHING, "resid", patching__sites=["blocks.{layer}.hook_resid_pre"]))
    heads = ids(
        config(
            tmp_path,
            PATCHING,
            "heads",
            patching__sites=["blocks.{layer}.attn.hook_z"],
            patching__positions="all",
            patching__heads="all",
        )
    )
    assert sorted(mixed) == sorted(by_position + heads) and len(set(mixed)) == len(mixed)
    assert len(heads) == 2 * 2 * 4  # 2 pairs x 2 layers x every query head (the site's own heads: all)
    plain = ids(config(tmp_path, PATCHING, "plain", patching__sites=["hook_resid_pre"], patching__positions="each"))
    assert plain == by_position  # a mapping that gives nothing of its own is the plain site


def test_a_mixed_patching_sweep_stores_the_old_way_sweeps_values(tmp_path, tiny_models, capsys):
    from patchscope_core import Engine
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    paths = {
        "mixed": config(tmp_path, PATCHING, "mixed", patching__sites=MIXED),
        "resid": config(tmp_path, PATCHING, "resid", patching__sites=["hook_resid_pre"]),
        "heads": config(
            tmp_path,
            PATCHING,
            "heads",
            patching__sites=["attn.hook_z"],
            patching__positions="all",
            patching__heads="all",
        ),
    }
    for name, path in paths.items():
        assert run_in_process(path, engine, tmp_path / name) > 0
    stored = {name: ResultStore(tmp_path / name).read().set_index("cell_id") for name in paths}
    old = pd.concat([stored["resid"], stored["heads"]])
    mixed = stored["mixed"].loc[old.index]
    for column in ("patched", "clean_value", "corrupted_value"):
        assert mixed[column].to_numpy() == pytest.approx(old[column].to_numpy(), abs=1e-5), column
    assert main(["report", str(tmp_path / "mixed")]) == 0
    out = tmp_path / "mixed"
    assert list(out.glob("*hook_resid_pre_layer_position.png")) and list(out.glob("*attn.hook_z_layer_head.png"))


def test_attribution_sites_take_their_own_positions_and_heads(tmp_path, no_weights):
    every = cells(config(tmp_path, ATTRIBUTION, "every", attribution__sites=["z", "mlp_out"]))
    own = [{"site": "z", "positions": "all", "heads": [0, 2]}, "mlp_out"]
    mixed = ids(config(tmp_path, ATTRIBUTION, "own", attribution__sites=own))
    want = [
        c.cell_id
        for c in every
        if c.site == "hook_mlp_out" or (c.position is None and c.unit in (0, 2))  # z: summed, heads 0 and 2
    ]
    assert sorted(mixed) == sorted(want) and len(want) < len(every)


def test_intervention_sites_take_their_own_positions_and_heads(tmp_path, no_weights):
    own = [{"site": "blocks.{layer}.hook_resid_post", "positions": [-1]}, {"site": "z", "heads": [0]}]
    mixed = ids(write_study(tmp_path, ABLATION, intervention__site=own, intervention__heads="all"))
    resid = ids(
        write_study(
            tmp_path,
            ABLATION,
            intervention__site="blocks.{layer}.hook_resid_post",
            intervention__positions=[-1],
            intervention__heads=None,
        )
    )
    heads = ids(
        write_study(tmp_path, ABLATION, intervention__site="blocks.{layer}.attn.hook_z", intervention__heads=[0])
    )
    assert sorted(mixed) == sorted(resid + heads) and len(set(mixed)) == len(mixed)


@pytest.mark.parametrize(
    "base,changes,message",
    [
        (
            PATCHING,
            {"patching__sites": [{"site": "z"}, "blocks.{layer}.attn.hook_z"]},
            "patching.sites: blocks.{layer}.attn.hook_z named twice",
        ),
        (
            PATCHING,
            {"patching__sites": [{"site": "resid_pre", "positions": [99]}]},
            "patching.sites[0].positions: 99 is out of range",
        ),
        (
            ATTRIBUTION,
            {"attribution__sites": [{"site": "z", "positions": [1]}]},
            "attribution.sites[0].positions: expected each (every position and their sum) or all",
        ),
        (
            ATTRIBUTION,
            {"attribution__sites": [{"site": "mlp_out", "heads": [1]}]},
            "attribution.sites[0].heads: hook_mlp_out has no heads",
        ),
        (
            PATCHING,
            {"patching__sites": [{"site": "z", "head": 1}]},
            "error: patching.sites[0].head: unknown key 'head' (allowed: site, positions, heads)\n",
        ),
        (
            PATCHING,
            {"patching__sites": [{"positions": "all"}]},
            "error: patching.sites[0].site: Field required\n",
        ),
    ],
)
def test_bad_site_settings_are_refused(tmp_path, capsys, no_weights, base, changes, message):
    assert main(["sweep", str(config(tmp_path, base, "bad", **changes)), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_intervention_heads_on_a_site_without_heads_are_refused(tmp_path, capsys, no_weights):
    path = write_study(tmp_path, ABLATION, intervention__site=[{"site": "resid_post", "heads": [0]}])
    assert cli_main(path) == 2
    assert "intervention.site[0].heads: blocks.{layer}.hook_resid_post has no heads" in capsys.readouterr().err


def cli_main(path) -> int:
    return main(["sweep", str(path), "--dry-run"])

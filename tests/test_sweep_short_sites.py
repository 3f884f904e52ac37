"""TransformerLens's short site names (issue 28 item 6): `resid_pre`, `attn_out`, `z`, ... as
`get_act_name` takes them (`transformer_lens.utils` before 4.x, `transformer_lens.utilities` now), with the layer from the sweep's layers, are
accepted wherever a sweep names its sites (the pair kinds' `sites`, `intervention.site`): each
cell's hook is `get_act_name(name, layer)` itself, and the cells (their ids) are those of the
same config written with full hook names. A short name that carries a layer, or names no site,
is refused before any weights load."""

from __future__ import annotations

import pytest
from transformer_lens.utilities import get_act_name

from sweeps.cli import main
from sweeps.grid import iter_cells
from sweeps.run.driver import plan
from tests.configs import changed, write_yaml
from tests.test_sweep_activation_patching import PROMPTS
from tests.test_sweep_studies import ABLATION
from tests.test_sweep_studies import write as write_study

PATCHING = {
    "name": "short",
    "kind": "activation_patching",
    "models": ["tiny-llama"],
    "prompts": PROMPTS,
    "patching": {"layers": [0, 2], "positions": [-1], "heads": [1]},
    "output": {"wandb": {"mode": "disabled"}},
}
PAIR_SHORT = ["resid_pre", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v"]


def cells(path) -> list:
    p = plan(str(path))
    return list(iter_cells(p.config, p.rows, p.models, context=p.context))


def pair_cells(tmp_path, sites: list[str], name: str) -> list:
    cfg = changed(PATCHING, patching__sites=sites)
    cfg["output"]["dir"] = str(tmp_path / "out")
    return cells(write_yaml(cfg, tmp_path / f"{name}.yaml"))


def _template(name: str) -> str:
    return get_act_name(name, 0).replace("blocks.0.", "blocks.{layer}.")


def test_pair_kinds_take_short_names_as_get_act_name_expands_them(tmp_path, no_weights):
    short = pair_cells(tmp_path, PAIR_SHORT, "short")
    named = {_template(s).removeprefix("blocks.{layer}."): s for s in PAIR_SHORT}  # the cell's site -> its short name
    assert {c.site for c in short} == set(named) and len(named) == len(PAIR_SHORT)
    for c in short:  # each cell's hook, as TransformerLens names it
        assert f"blocks.{c.layer}.{c.site}" == get_act_name(named[c.site], c.layer)
    full = pair_cells(tmp_path, [_template(s) for s in PAIR_SHORT], "full")
    assert [c.cell_id for c in short] == [c.cell_id for c in full]  # the same cells, the same ids


@pytest.mark.parametrize("site", ["z", ["resid_post", "mlp_out", "post"]])
def test_intervention_site_takes_short_names(tmp_path, no_weights, site):
    changes = {"intervention__heads": None} if site != "z" else {}
    short = cells(write_study(tmp_path, ABLATION, intervention__site=site, **changes))
    names = [site] if isinstance(site, str) else site
    assert {c.site for c in short} == {get_act_name(n, layer) for n in names for layer in (1, 3)}
    full = [_template(n) for n in names]
    written = cells(write_study(tmp_path, ABLATION, intervention__site=full if len(full) > 1 else full[0], **changes))
    assert [c.cell_id for c in short] == [c.cell_id for c in written]


@pytest.mark.parametrize(
    "site,message",
    [
        ("k6", "patching.sites: 'k6' names a layer; give the short name alone ('k'), the layers come from"),
        ("pattern", "patching.sites[0]: unknown site 'blocks.{layer}.attn.hook_pattern'; valid sites:"),
    ],
)
def test_a_short_name_with_a_layer_or_no_site_is_refused(tmp_path, capsys, no_weights, site, message):
    cfg = changed(PATCHING, patching__sites=[site])
    cfg["output"]["dir"] = str(tmp_path / "out")
    assert main(["sweep", str(write_yaml(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")

"""`patchscope report DIR` on a store whose Parquet files lack a column its report reads (issue 28
item 9): for every kind, each column the report reads is dropped from every result file in turn,
and the report either still runs (the column is optional) or stops with exit 2 and one line that
names a result file and the missing column, never a traceback. The stores: the golden run
directories (patchscope, intervention, causal_trace, recipe), the two pair kinds' sweeps and a
feature explanation of a small sparsify SAE on tiny-llama."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sweeps.cli import main
from sweeps.kinds import KINDS
from sweeps.kinds.base import report_columns
from sweeps.sinks.columns import kind_of_store, store_columns
from sweeps.sinks.store import ResultStore

GOLDEN = Path(__file__).resolve().parent / "golden" / "stores"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """{kind: a finished run directory}."""
    from patchscope_core import Engine
    from tests import test_sweep_activation_patching as ap
    from tests import test_sweep_attribution_patching as atp
    from tests import test_sweep_feature_explanation as fe
    from tests.configs import write_yaml
    from tests.golden.common import run_in_process

    out = {k: GOLDEN / k / "out" for k in ("patchscope", "intervention", "causal_trace", "recipe")}
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    for module, kind in ((ap, "activation_patching"), (atp, "attribution_patching")):
        tmp = tmp_path_factory.mktemp(kind)
        assert run_in_process(module.write(tmp), engine, tmp / "out") > 0
        out[kind] = tmp / "out"
    tmp = tmp_path_factory.mktemp("feature_explanation")  # an SAE saved by sparsify, as that kind's tests do
    cfg = fe.base(tmp, fe.save_sae(tmp), output={"dir": str(tmp / "out"), "wandb": {"mode": "disabled"}})
    assert run_in_process(write_yaml(cfg, tmp / "sweep.yaml"), engine, tmp / "out") > 0
    out["feature_explanation"] = tmp / "out"
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_store_lacking_a_column_the_report_reads_is_named_not_a_traceback(kind, stores, tmp_path, capsys):
    source = stores[kind]
    names = store_columns(ResultStore(source))
    assert kind_of_store(ResultStore(source).manifest() or {}, names) == kind
    needed = [c for c in report_columns(KINDS[kind], names) if c != "cell_id"]
    refused = []
    for column in needed:
        copy = tmp_path / column
        shutil.copytree(source, copy)
        for f in (copy / "results").glob("*.parquet"):
            table = pq.read_table(f)
            if column in table.column_names:
                pq.write_table(table.drop_columns([column]), f)
        capsys.readouterr()
        code = main(["report", str(copy)])  # any exception but exit 2 fails the test
        err = capsys.readouterr().err.strip().splitlines()
        if code == 0:
            continue
        assert code == 2, (column, err)
        assert len(err) == 1 and err[0].startswith(f"error: dir: {copy / 'results'}/task-"), (column, err)
        assert f"lacks the column(s) {column} of a {kind} sweep's results" in err[0], (column, err)
        refused.append(column)
    assert "model" in refused and set(KINDS[kind].marks) <= set(refused)  # some columns are needed

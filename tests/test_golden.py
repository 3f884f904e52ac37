"""No behaviour change across a restructure: what tests/golden/ pinned at the code before it.

For every example config (sweeps/examples/*.yaml): the config hash, the cell count, the first
cell ids and a digest of all of them, the first tasks' payloads and the `--dry-run` text are
byte-identical. For one tiny run directory per sweep kind, written before (tests/golden/stores/,
by tests/golden/make_golden.py): the current code resumes it with 0 cells recomputed and leaves
its rows as they are, and a fresh run of the same config gives the same rows (run columns aside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.golden import common

GOLDEN = Path(__file__).resolve().parent / "golden"
PINNED = json.loads((GOLDEN / "examples.json").read_text())


def test_every_example_config_is_pinned():
    assert sorted(PINNED) == sorted(p.name for p in common.EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("example", sorted(PINNED))
def test_example_hash_cells_payloads_and_dry_run_are_unchanged(example, monkeypatch, no_weights):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    got = common.pin_example(common.EXAMPLES / example)
    want = PINNED[example]
    for key in ("config_hash", "n_cells", "first_ids", "ids_digest", "payload_digests", "dry_run"):
        assert got[key] == want[key], f"{example}: {key} changed"


@pytest.fixture(scope="module")
def engine():
    from patchscope_core import PatchscopeEngine, load_model

    return PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")


@pytest.mark.parametrize("kind", sorted(common.RUNS))
def test_a_run_written_before_resumes_with_nothing_recomputed_and_the_same_rows(kind, tmp_path, engine):
    from sweeps.sinks.store import ResultStore

    run = tmp_path / kind
    shutil.copytree(GOLDEN / "stores" / kind, run)
    before = common.stable(ResultStore(run / "out").read())
    assert before, "the golden store holds rows"
    assert common.run_in_process(run / "sweep.yaml", engine, run / "out") == 0
    assert common.stable(ResultStore(run / "out").read()) == before

    fresh = tmp_path / "fresh"
    assert common.run_in_process(run / "sweep.yaml", engine, fresh) == len(before)
    got = common.stable(ResultStore(fresh).read())
    # columns added since the store was written (steering norms) are new, not changed
    added = {k for r in got for k in r} - {k for r in before for k in r}
    assert added <= common.ADDED_COLUMNS, added
    assert common.same_rows([{k: v for k, v in r.items() if k not in added} for r in got], before) == []

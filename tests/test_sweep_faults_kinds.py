"""Faults at scale, on every sweep kind: a sweep long enough that the fault lands mid-run (more
tasks than workers x max_in_flight_per_worker, some stored and some not), with tasks that hold
several groups where the kind packs them; one fault per kind here, rotating over an actor
killed, the driver killed, Ctrl-C and a result file cut short (every fault x every kind:
benchmarks/fault_matrix.py, its table in docs/errors.md). After the same command runs again,
every cell is stored once and the rows equal a clean run's.
"""

from __future__ import annotations

import pytest

from sweeps import cli
from sweeps.kinds import KINDS
from tests import fault_kinds
from tests.test_sweep_faults import deadline

pytestmark = pytest.mark.ray

# one fault per kind; each fault on at least one kind, the driver killed on a pair kind
FAULT = {
    "patchscope": "actor",
    "intervention": "interrupt",
    "causal_trace": "truncate",
    "recipe": "driver",
    "activation_patching": "driver",
    "attribution_patching": "actor",
    "feature_explanation": "interrupt",
}
PACKS = {k for k, v in KINDS.items() if v.packs}


def test_every_kind_has_a_fault():
    assert set(FAULT) == set(KINDS), "a sweep kind without a fault test: add it to FAULT and tests/fault_kinds.py"
    assert set(FAULT.values()) == set(fault_kinds.FAULTS)


@pytest.mark.parametrize("kind", sorted(FAULT))
def test_a_fault_mid_run_then_resume_stores_every_cell_once(ray_cluster, tmp_path, kind, capsys):
    fault = FAULT[kind]
    clean = fault_kinds.clean_run(kind, tmp_path / "clean")
    config = fault_kinds.write(kind, tmp_path / "plan", tmp_path / "plan-out")
    ex = fault_kinds.dump(config)["execution"]
    planned = fault_kinds.cluster_tasks(config)
    assert planned > ex["workers"] * ex["max_in_flight_per_worker"], "too short a sweep for a fault mid-run"

    def resume(path) -> int:
        with deadline(240):
            return cli.main(["sweep", str(path)])

    res = fault_kinds.run_fault(
        kind, fault, tmp_path, ray_cluster.get_runtime_context().gcs_address, clean, resume=resume
    )
    log = res.log[-4000:]
    print({k: v for k, v in vars(res).items() if k not in ("log", "differences")})
    assert 0 < res.stored_at_fault < res.expected, f"the fault did not land mid-run: {res}"
    want_rc = {"actor": 0, "truncate": 0, "interrupt": 130, "driver": -9}[fault]
    assert res.fault_rc == want_rc, log
    assert res.resume_rc == 0, log
    assert res.stored == res.expected, f"{res.stored} of {res.expected} cells stored"
    assert res.read_unique, "ResultStore.read() does not hold each cell once"
    if not res.part_files:  # no merge (fewer than COMPACT_EVERY task files a run): no crash between one and its removal
        assert res.duplicates == 0, f"{res.duplicates} cells stored twice"
    assert res.equal_to_clean, res.differences[:10]
    assert res.tasks >= planned
    if kind in PACKS:
        assert res.max_groups_per_task > 1, "no task held cells of several groups"

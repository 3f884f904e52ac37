"""The store's set of cell ids (`sweeps.sinks.cell_ids.CellIdSet`: 64-bit keys in a sorted array,
other ids in plain sets) behaves as a Python set of the same strings: membership one by one and
vectorized, length, updates while a sweep runs, the count another set lacks, and the keys are
`int(id, 16)`."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa

from sweeps.sinks.cell_ids import CellIdSet, keys_of


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest()[:16] for i in range(n)]


def test_keys_are_the_ids_as_hex_numbers_and_other_ids_are_kept_as_text():
    ids = [*_ids(50), "0000000000000000", "ffffffffffffffff", "ABCDEF0123456789", "c1", "0123456789abcdef0"]
    keys, other = keys_of(pa.chunked_array([pa.array(ids[:20]), pa.array(ids[20:])]))
    hexed = [i for i in ids if len(i) == 16 and all(c in "0123456789abcdef" for c in i)]
    assert [int(k) for k in keys] == [int(i, 16) for i in hexed]
    assert other == ["ABCDEF0123456789", "c1", "0123456789abcdef0"]


def test_a_cell_id_set_answers_as_a_python_set_of_the_same_ids():
    rng = random.Random(0)
    every = [*_ids(3000), "c1", "c2", "Paris", ""]
    files = [rng.sample(every, 900) for _ in range(4)]  # overlapping files, as a store's parts
    ids = CellIdSet()
    for f in files:
        ids.add_column(pa.array(f, pa.string()))
    ref = set().union(*files)
    assert len(ids) == len(ref) and bool(ids) and ids == ref and set(ids) == ref
    assert [c in ids for c in every] == [c in ref for c in every]
    new = rng.sample([c for c in every if c not in ref], 50) + ["a-new-id"]  # written while a sweep runs
    ids.update(new)
    ref |= set(new)
    assert len(ids) == len(ref) and ids == ref
    column = pa.array(every + ["a-new-id"], pa.string())
    assert ids.contains_many(column).tolist() == [c in ref for c in every + ["a-new-id"]]
    assert [c in ids for c in every] == [c in ref for c in every]
    other = CellIdSet()
    other.add_column(pa.array(every[::3], pa.string()))
    assert other.count_not_in(ids) == len(set(every[::3]) - ref)


def test_an_empty_set_is_empty():
    ids = CellIdSet()
    assert not ids and len(ids) == 0 and ids == set() and "0123456789abcdef" not in ids
    assert ids.contains_many(pa.array(_ids(3))).tolist() == [False] * 3
    assert np.asarray(ids.contains_many(pa.array([], pa.string()))).size == 0

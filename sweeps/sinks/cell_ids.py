"""The set of stored cell ids, sized for 10^7 cells: what resume matches the grid against
(`ResultStore.stored_cell_ids`, `grid.count_todo`) and what the store checks before it writes.

A cell id is 16 hex digits (`kinds.base.digest`), so it is held as one 64-bit integer in a sorted
numpy array (8 bytes, where a Python string in a set takes about 100): 10^7 stored ids take 80 MB.
Ids read from the store's files arrive as Arrow columns and are converted without a Python
object per id; ids of any other form (a test's `c1`) and the ids written while a sweep runs are
kept in plain sets beside the array. Membership of one id, of a column of ids (`contains_many`,
vectorized), the count and the ids themselves (for comparisons) are what the store needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

HEX16 = re.compile(r"[0-9a-f]{16}")
_NIBBLE = np.zeros(256, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def keys_of(column) -> tuple[np.ndarray, list[str]]:
    """The 64-bit keys of an Arrow string column's 16-hex-digit ids (in order), and its other
    ids as strings (nulls dropped)."""
    _, keys, other = _split(column)
    return keys, other


def _split(column) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(which ids are 16 hex digits, their keys, the other ids as strings) of an Arrow column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    column = column.cast(pa.string())
    ok = pc.fill_null(pc.match_substring_regex(column, "^[0-9a-f]{16}$"), False)
    hexed = ok.to_numpy(zero_copy_only=False)
    other = [s for s in column.filter(pc.invert(ok)).to_pylist() if s is not None]
    if not hexed.any():
        return hexed, np.empty(0, np.uint64), other
    fixed = column.filter(ok).cast(pa.binary()).cast(pa.binary(16))
    raw = np.frombuffer(fixed.buffers()[1], np.uint8, count=16 * len(fixed), offset=16 * fixed.offset)
    nibbles = _NIBBLE[raw].reshape(-1, 16)
    octets = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # 8 bytes an id, most significant first
    return hexed, np.ascontiguousarray(octets).view(">u8").ravel().astype(np.uint64), other


def id_numbers(column) -> np.ndarray:
    """Every id of an Arrow string column (no nulls) as a 64-bit number, in order: a 16-hex-digit
    id its value, any other id the first 8 bytes of its sha256 (what W&B's sample orders by)."""
    import hashlib

    hexed, keys, other = _split(column)
    out = np.empty(len(hexed), np.uint64)
    out[hexed] = keys
    if other:
        out[~hexed] = [int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "big") for c in other]
    return out


def _isin(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which `keys` are in `sorted_keys`; the queries are sorted first, so the binary searches walk
    the array in order (random lookups in 80 MB miss the cache: 10x slower)."""
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), bool)
    order = np.argsort(keys, kind="stable")
    i = np.minimum(sorted_keys.searchsorted(keys[order]), len(sorted_keys) - 1)
    out = np.empty(len(keys), bool)
    out[order] = sorted_keys[i] == keys[order]
    return out


def _unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys (a sort and a comparison: np.unique hashes, 4x slower at 10^7)."""
    keys = np.sort(keys)
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys


class CellIdSet:
    """A set of cell ids: the stored ones as a sorted uint64 array, the rest in Python sets."""

    def __init__(self) -> None:
        self._sorted = np.empty(0, np.uint64)
        self._parts: list[np.ndarray] = []  # read, not merged into _sorted yet
        self._added: set[int] = set()  # keys of hex ids added one by one (a running sweep's)
        self._other: set[str] = set()  # ids of any other form

    def add_column(self, column) -> None:
        """Add an Arrow column of ids (a result file's `cell_id`)."""
        keys, other = keys_of(column)
        if len(keys):
            self._parts.append(keys)
        self._other.update(other)

    def update(self, ids: Iterable[str]) -> None:
        """Add ids one by one (a running sweep's: kept in a set beside the sorted array, whose
        re-sorting would cost the whole array at every task)."""
        for cid in ids:
            if HEX16.fullmatch(cid):
                self._added.add(int(cid, 16))
            else:
                self._other.add(cid)

    def _keys(self) -> np.ndarray:
        if self._parts:
            self._sorted = _unique(np.concatenate([self._sorted, *self._parts]))
            self._parts = []
        return self._sorted

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, str):
            return False
        if not HEX16.fullmatch(cid):
            return cid in self._other
        key = int(cid, 16)
        if key in self._added:
            return True
        keys = self._keys()
        i = int(keys.searchsorted(np.uint64(key)))
        return i < len(keys) and int(keys[i]) == key

    def contains_many(self, column) -> np.ndarray:
        """For each id of an Arrow string column (no nulls), whether it is in the set."""
        hexed, keys, other = _split(column)
        out = np.zeros(len(hexed), bool)
        if len(keys):
            found = _isin(keys, self._keys())
            if self._added:  # a look-up per queried id, not a copy of every id added so far
                added = self._added
                found |= np.fromiter((k in added for k in keys.tolist()), bool, len(keys))
            out[hexed] = found
        if other:
            out[~hexed] = [cid in self._other for cid in other]
        return out

    def _all_keys(self) -> np.ndarray:
        keys = self._keys()
        if self._added:
            keys = np.union1d(keys, np.fromiter(self._added, np.uint64, len(self._added)))
        return keys

    def __bool__(self) -> bool:
        return bool(len(self._sorted) or self._parts or self._added or self._other)

    def __len__(self) -> int:
        return len(self._all_keys()) + len(self._other)

    def count_not_in(self, other: CellIdSet) -> int:
        """How many of these ids `other` lacks."""
        keys = self._all_keys()
        return int((~_isin(keys, other._all_keys())).sum()) + len(self._other - other._other)

    def __iter__(self) -> Iterator[str]:
        yield from (f"{int(k):016x}" for k in self._all_keys())
        yield from self._other

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (set, frozenset, CellIdSet)):
            return len(self) == len(other) and all(cid in self for cid in other)
        return NotImplemented

    __hash__ = None  # mutable, as a set

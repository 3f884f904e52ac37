"""The record of truth of a sweep: Parquet files under output.dir/results/ and a manifest.

- One file per finished task (`task-<task_id>.parquet`), written under a temporary name,
  flushed to disk (fsync) and renamed into place, so a file is either complete or absent (a
  crash leaves at most a `.tmp-*` file, removed at the next start). Few, large files at scale:
  every `COMPACT_EVERY` task files a run has written are merged into one `part-*.parquet` (from
  the tables still in memory, written the same atomic way) and then removed, so a sweep of
  millions of cells leaves hundreds of files, not tens of thousands; a crash between the two
  leaves some rows twice, which reading counts once, as always.
- `manifest.json`: the current config, its hash, the grid size, each model's weights key and
  the history of the configs run into this directory. `results/` is a cache: a changed config
  computes only the cells it does not find (a cell's id hashes every setting that decides its
  result; the model's weights key, `patchscope_core.models.model_fingerprint`, is stored beside
  it as `model_key`, so a changed model reuses nothing). `cells.parquet` lists the current
  config's cell ids: what `read` returns (older cells stay on disk for a later config).
- Resume reads the stored `cell_id`s. `write` drops every cell already stored, so a cell is
  stored exactly once even if Ray ran its task twice; reading counts each `cell_id` once
  whatever the files hold. Rows written before weights keys existed count as the models of the
  config they were written under, and only while that config is the one run.
- A file that cannot be read (zero length, truncated, not Parquet) is moved aside to
  `results/damaged/` with a warning; its cells are then missing, so the next run computes them.
- `lock()`: one sweep at a time per output.dir (an flock on `sweep.lock`, which names the
  holder; the kernel drops it when the process dies, so a crashed driver leaves nothing stuck).
- `check()`: what a run would refuse (a directory that cannot be written, a damaged manifest),
  found without writing anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..records import as_table
from .cell_ids import CellIdSet

RESULTS = "results"
DAMAGED = "damaged"
MANIFEST = "manifest.json"
CELLS = "cells.parquet"
LOCK = "sweep.lock"
COMPACT_EVERY = 64  # task files merged into one part file
_VIRTUAL = ("/proc", "/sys", "/dev")  # kernel file systems: nothing can be stored there


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` so that it is complete or absent: a temporary file, fsync, rename, fsync
    of the directory (the rename itself reaches the disk)."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_writable(out_dir: Path) -> None:
    """output.dir must be a directory this process can create files in, or one it can create.
    Probes with an anonymous temporary file, which leaves nothing behind."""
    path = Path(os.path.abspath(out_dir))
    existing = path
    while not os.path.exists(existing):
        existing = existing.parent
    where = "" if existing == path else f" (the nearest existing part of {path})"
    if not existing.is_dir():
        raise ConfigError(f"output.dir: {existing} is a file, not a directory{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        virtual = any(str(existing) == v or str(existing).startswith(v + "/") for v in _VIRTUAL)
        why = "a kernel file system, not storage" if virtual else exc.strerror or type(exc).__name__
        raise ConfigError(f"output.dir: cannot write in {existing}{where}: {why}") from None


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: {info.get('command', '')}"
    ).rstrip(": ")


def _renamed(df):
    """A file's rows with the column names of today (`SweepKind.renamed`: a file written before a
    rename keeps the old names on disk)."""
    from ..kinds import KINDS

    for kind in KINDS.values():
        old = {a: b for a, b in kind.renamed.items() if a in df.columns and b not in df.columns}
        if old:
            df = df.rename(columns=old)
    return df


def _keys_of(table, keys: dict[str, str | None]):
    """Each row's weights key by its `model` column (`keys`: {model: key}), an Arrow string array
    (null where the model has no key), computed column-wise."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    models = table.column("model") if "model" in table.column_names else pa.nulls(n, pa.string())
    out = pa.nulls(n, pa.string())
    for m, k in keys.items():
        if k is not None:
            out = pc.if_else(pc.equal(models, m), pa.scalar(k, pa.string()), out)
    return out


class ResultStore:
    def __init__(
        self,
        out_dir: str | Path,
        read_only: bool = False,
        keys: dict[str, str] | None = None,
        config_hash: str | None = None,
    ) -> None:
        self.dir = Path(out_dir)
        self.read_only = read_only  # a damaged file is then skipped, not moved (--dry-run)
        self.results_dir = self.dir / RESULTS
        self.manifest_path = self.dir / MANIFEST
        self.cells_path = self.dir / CELLS
        self.lock_path = self.dir / LOCK
        # {model: weights key} of the run; None: every stored row counts (a reader of the
        # manifest's own keys, or a test's bare store)
        self.keys = keys
        self.config_hash = config_hash
        self._stored: CellIdSet | None = None
        self._every = CellIdSet()  # ids stored for other weights only (stored_cell_ids, stored_count)
        self._recent: list[tuple[Path, Any]] = []  # (task file, its table) written since the last compaction

    # ------------------------------------------------------------ checks (write nothing)

    def check(self, config_hash: str, restart: bool = False) -> None:
        """Raise ConfigError for what a run of this config would refuse; writes nothing."""
        check_writable(self.dir)
        self.manifest()

    def _untagged(self) -> dict[str, str]:
        """The weights keys that rows without a model_key column stand for: those of the config
        they were written under, while it is the config run (see the module docstring)."""
        old = self.manifest() or {}
        if "untagged_keys" in old:
            return old["untagged_keys"]
        if "model_keys" not in old and old.get("config_hash") == self.config_hash and self.keys:
            return dict(self.keys)  # a store of an earlier version, resumed with its own config
        return {}

    def holder(self) -> dict[str, Any] | None:
        """Who is running a sweep into this directory now (None: nobody); the lock is only
        tested, never kept."""
        try:
            fh = open(self.lock_path)
        except OSError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_holder(fh)
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None

    def busy_message(self, info: dict[str, Any]) -> str:
        return (
            f"output.dir: another sweep is running into {self.dir} ({_holder_text(info)}); "
            "wait for it to finish (or stop it), or choose another output.dir"
        )

    @staticmethod
    def _read_holder(fh) -> dict[str, Any]:
        fh.seek(0)
        try:
            return json.loads(fh.read() or "{}")
        except ValueError:
            return {}

    # ------------------------------------------------------------ the lock

    @contextlib.contextmanager
    def lock(self):
        """Hold output.dir for the duration of a run. A second sweep into the same directory
        fails here with a message naming the holder. flock locks belong to the open file: the
        kernel releases them when the process ends, however it ends."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fh = open(self.lock_path, "a+")
        except OSError as exc:
            raise ConfigError(f"output.dir: cannot open {self.lock_path} ({exc.strerror})") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self._read_holder(fh)
            fh.close()
            raise ConfigError(self.busy_message(info)) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            fh.close()
            raise ConfigError(
                f"output.dir: cannot lock {self.lock_path} ({exc.strerror}); "
                "use a directory on a file system with locks"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "command": " ".join(["patchscope", *sys.argv[1:]]),
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(me))
        fh.flush()
        os.fsync(fh.fileno())
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()  # while still holding it: a stale name would mislead a reader
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------ opening

    def open(
        self,
        config_dump: dict[str, Any],
        config_hash: str,
        cells_total: int,
        restart: bool = False,
        cells: Iterable[str] | None = None,
    ) -> int:
        """Prepare the directory for a run of this config (`cells`: its cell ids, an Arrow string
        array or any iterable, what `read` returns from now on); returns how many of the stored
        cells it reuses."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if restart:
            self.clear()
        self.check(config_hash)
        self.config_hash = config_hash
        old = self.manifest() or {}
        untagged = self._untagged()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.results_dir.glob(".tmp-*"):
            tmp.unlink()  # a write interrupted before its rename
        history = list(old.get("history", []))
        if old.get("config_hash") and old.get("config_hash") != config_hash:
            history.append({k: old.get(k) for k in ("config_hash", "config", "cells_total", "model_keys", "updated")})
        manifest = {
            "name": config_dump.get("name"),
            "config_hash": config_hash,
            "config": config_dump,
            "cells_total": cells_total,
            "model_keys": self.keys,
            "untagged_keys": untagged,
            "history": history,
            "created": old.get("created", _now()),
            "updated": _now(),
        }
        if cells is not None:
            if not isinstance(cells, (pa.Array, pa.ChunkedArray)):
                cells = pa.array(list(cells), pa.string())
            ids = pa.table({"cell_id": cells})
            _atomic_write(self.cells_path, lambda fh: pq.write_table(ids, fh))
        elif self.cells_path.exists():
            self.cells_path.unlink()
        text = json.dumps(manifest, indent=2, default=str).encode()
        _atomic_write(self.manifest_path, lambda fh: fh.write(text))
        self._stored = None
        return len(self.stored_cell_ids())

    def clear(self) -> None:
        """Forget every stored result (--restart)."""
        if self.results_dir.exists():
            shutil.rmtree(self.results_dir)
        for path in (self.manifest_path, self.cells_path):
            if path.exists():
                path.unlink()
        self._stored, self._every = CellIdSet(), CellIdSet()

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(
                f"output.dir: {self.manifest_path} is damaged ({type(exc).__name__}); "
                "move it away to resume, or run with --restart"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"output.dir: {self.manifest_path} is damaged (a JSON {type(data).__name__}, not an "
                "object); move it away to resume, or run with --restart"
            )
        return data

    # ------------------------------------------------------------ reading

    def files(self) -> list[Path]:
        if not self.results_dir.is_dir():
            return []
        return sorted([*self.results_dir.glob("part-*.parquet"), *self.results_dir.glob("task-*.parquet")])

    def _table(self, path: Path, columns: list[str] | None = None):
        """The Parquet table in `path`, or None after moving a damaged file aside."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=columns)
            if "cell_id" not in table.column_names:
                raise ValueError("no cell_id column")
            return table
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            self._set_aside(path, exc)
            return None

    def _set_aside(self, path: Path, exc: BaseException) -> None:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._stored = None
        if self.read_only:
            print(
                f"warning: {path} is damaged ({why}): a run would move it aside and compute its cells again",
                file=sys.stderr,
            )
            return
        target = self.results_dir / DAMAGED / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                target = target.with_name(f"{path.stem}-{uuid.uuid4().hex[:8]}{path.suffix}")
            os.replace(path, target)
            done = f"moved to {target.parent}/; its cells will be computed again by the next run"
        except OSError as move_exc:
            done = f"left in place ({move_exc.strerror}) and skipped"
        print(f"warning: {path} is damaged ({why}): {done}", file=sys.stderr)

    def _key_columns(self, path: Path) -> list[str]:
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(path).names)
        except Exception:  # noqa: BLE001 - _table moves a damaged file aside
            names = set()
        return ["cell_id"] + [c for c in ("model", "model_key") if c in names]

    def _keep_mask(self, table, untagged: dict[str, str]):
        """Which rows of a table hold this run's weights, as an Arrow boolean array (None: all of
        them), computed column-wise: a store of millions of rows is matched without a Python
        object per row; `untagged`: what `_untagged` says, read once per pass over the files."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.keys is None:
            return None
        if "model_key" in table.column_names:
            have = table.column("model_key")
        else:  # rows written before weights keys: the key of the config they were written under
            have = _keys_of(table, untagged)
        return pc.fill_null(pc.equal(have.cast(pa.string()), _keys_of(table, self.keys)), False)

    def stored_cell_ids(self) -> CellIdSet:
        """The ids of the stored cells this run may reuse (its models' weights), read from the id
        columns alone into a `CellIdSet` (64-bit keys: 10^7 ids in 80 MB)."""
        if self._stored is None:
            import pyarrow.compute as pc

            stored = CellIdSet()
            other = CellIdSet()  # stored for other weights only (what stored_count adds)
            untagged = self._untagged() if self.keys is not None else {}
            for f in self.files():
                table = self._table(f, self._key_columns(f))
                if table is None:
                    continue
                ids, keep = table.column("cell_id"), self._keep_mask(table, untagged)
                if keep is None or pc.all(keep).as_py():
                    stored.add_column(ids)
                else:
                    stored.add_column(ids.filter(keep))
                    other.add_column(ids.filter(pc.invert(keep)))
            self._stored, self._every = stored, other
        return self._stored

    def stored_count(self) -> int:
        """Every cell stored in the directory, whatever config or weights it was computed for
        (read in the same pass as `stored_cell_ids`)."""
        stored = self.stored_cell_ids()
        return len(stored) + self._every.count_not_in(stored)

    def current_count(self) -> int:
        """How many cells of the config run last are stored with its models' weights (what
        `read()` would return, counted from the id columns alone)."""
        if self.keys is None:
            self.keys = (self.manifest() or {}).get("model_keys")
            self.config_hash = self.config_hash or (self.manifest() or {}).get("config_hash")
            self._stored = None
        stored = self.stored_cell_ids()
        cells = self.current_cells()
        if cells is None:
            return len(stored)
        return int(stored.contains_many(cells).sum())

    def current_cells(self):
        """The cell ids of the config run last, as an Arrow array (None: not recorded, every
        stored cell counts); matched as `CellIdSet`s, never a Python set of millions."""
        import pyarrow.parquet as pq

        if not self.cells_path.is_file():
            return None
        return pq.read_table(self.cells_path).column("cell_id")

    def current_set(self) -> CellIdSet | None:
        """`current_cells` as a `CellIdSet` (None: not recorded), built once per read of the
        files: matching each file against it costs a sort of that file's ids, where
        `pyarrow.compute.is_in` would hash every current id again for every file."""
        cells = self.current_cells()
        if cells is None:
            return None
        out = CellIdSet()
        out.add_column(cells)
        return out

    def current_rows(self, table, untagged: dict[str, str], cells: CellIdSet | None):
        """The rows of one result file's table that `read()` returns: those of this run's weights
        (`untagged`: what `_untagged` says) and of the cells `current_set` gave (None: any)."""
        import pyarrow as pa

        keep = self._keep_mask(table, untagged)
        if keep is not None:
            table = table.filter(keep)
        if cells is not None and "cell_id" in table.column_names and table.num_rows:
            mask = cells.contains_many(table["cell_id"])
            if not mask.all():
                table = table.filter(pa.array(mask))
        return table

    def read(self, current: bool = True):
        """The stored cells as one pandas DataFrame, each cell_id once (empty when nothing is
        stored): with `current`, only the cells of the config run last computed with its
        models' weights; else every stored cell."""
        import pandas as pd

        if current and self.keys is None:
            self.keys = (self.manifest() or {}).get("model_keys")
            self.config_hash = self.config_hash or (self.manifest() or {}).get("config_hash")
            self._stored = None
        frames = []
        untagged = self._untagged() if current and self.keys is not None else {}
        cells = self.current_set() if current else None
        for t in (self._table(f) for f in self.files()):
            if t is None:
                continue
            frames.append(_renamed((self.current_rows(t, untagged, cells) if current else t).to_pandas()))
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True).drop_duplicates("cell_id", keep="first")
        return df.reset_index(drop=True)

    # ------------------------------------------------------------ writing

    def write(self, task_id: str, rows) -> Any:
        """Store the rows (a pyarrow Table, or dicts) of cells not stored yet, in one new file;
        returns those rows as a Table (none: an empty one). Matched a column at a time: a driver
        stores thousands of cheap cells a second."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = as_table(rows)
        if not table.num_rows:
            return table
        stored = self.stored_cell_ids()
        ids = table.column("cell_id").cast(pa.string())
        keep = ~stored.contains_many(ids)
        seen: set[str] = set()
        for i, cid in enumerate(ids.to_pylist()):  # a cell twice in one task: its first row
            if keep[i]:
                keep[i] = cid not in seen
                seen.add(cid)
        if not keep.any():
            return table.slice(0, 0)
        if not keep.all():
            table = table.filter(pa.array(keep))
        if self.keys is not None:
            key = _keys_of(table, self.keys)
            table = table.drop_columns([c for c in ("model_key",) if c in table.column_names])
            table = table.append_column(
                "model_key", key if not pc.all(pc.is_null(key)).as_py() else pa.nulls(table.num_rows)
            )
        self.results_dir.mkdir(parents=True, exist_ok=True)
        final = self.results_dir / f"task-{task_id}.parquet"
        if final.exists():  # same task id, other cells: cannot happen for a fixed grid, but never overwrite
            final = self.results_dir / f"task-{task_id}-{uuid.uuid4().hex[:8]}.parquet"
        _atomic_write(final, lambda fh: pq.write_table(table, fh))
        stored.update(seen)
        self._recent.append((final, table))
        if len(self._recent) >= COMPACT_EVERY:
            self.compact()
        return table

    def compact(self) -> None:
        """Merge the task files this store wrote since the last compaction into one part file
        (from their tables in memory), then remove them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(self._recent) < 2:
            self._recent = []
            return
        try:  # a column with ints in one task and floats in another becomes floats
            merged = pa.concat_tables([t for _, t in self._recent], promote_options="permissive")
        except pa.ArrowException:  # types that do not merge: the task files stay as they are
            self._recent = []
            return
        part = self.results_dir / f"part-{uuid.uuid4().hex[:16]}.parquet"
        _atomic_write(part, lambda fh: pq.write_table(merged, fh))
        for path, _ in self._recent:
            path.unlink(missing_ok=True)
        _fsync_dir(self.results_dir)
        self._recent = []

"""Some columns of a store's rows, read with pyarrow: what the report and W&B read at the end of a
sweep and `patchscope report` reads, where every column of every row (token-id and top-k lists,
generations the pictures never show) would cost memory and time that grow with the sweep.

`read_columns` returns the rows `ResultStore.read()` returns (the config run last, its cells
once each, computed with its models' weights; a damaged file moved aside), with only the columns
asked for: each file is read with `pyarrow.parquet.read_table(path, columns=...)`. Lists of token
ids can arrive as text (`records.token_text`) and top_logprobs as its first value
(`top1_logprob`), converted by Arrow before pandas sees them. `store_columns` lists the
columns the files hold (their schemas only), `kind_of_store` the sweep's kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..kinds import KINDS, kind_of
from ..records import arrow_token_text, arrow_top1_logprob
from .cell_ids import id_numbers
from .store import ResultStore


def _renames() -> dict[str, str]:
    """Old column name -> today's (every kind's `renamed`)."""
    return {old: new for kind in KINDS.values() for old, new in kind.renamed.items()}


def _schema_names(store: ResultStore, path) -> list[str] | None:
    """The column names of one result file (its footer only); None after moving a damaged file aside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError, ValueError) as exc:  # what the store sets aside on reading
        store._set_aside(path, exc)
        return None


def store_columns(store: ResultStore) -> list[str]:
    """Every column the store's files hold, in first-seen order, by today's names."""
    renames = _renames()
    names: dict[str, None] = {}
    for f in store.files():
        have = _schema_names(store, f) or []
        for c in have:
            new = renames.get(c)
            names[new if new is not None and new not in have else c] = None
    return list(names)


def kind_of_store(manifest: dict, columns) -> str:
    """The sweep's kind: the manifest's config says it; else the stored columns."""
    config = manifest.get("config")
    kind = config.get("kind") if isinstance(config, dict) else None
    return kind if kind in KINDS else kind_of(columns)


def read_columns(
    store: ResultStore,
    columns: Iterable[str],
    tokens: Sequence[str] = (),
    cells: Iterable[str] | None = None,
) -> Any:
    """The store's current rows (as `ResultStore.read()` chooses them) with only `columns` (and
    cell_id), as a pandas DataFrame; a column a file lacks is left out of its rows (null where
    other files have it). `tokens`: token-id list columns to give as text; top_logprobs, when
    asked for, arrives as top1_logprob. `cells`: only these cell ids (W&B's sample)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = list(dict.fromkeys(["cell_id", *columns]))
    if store.keys is None:  # as read() does: the manifest's weights keys and config
        manifest = store.manifest() or {}
        store.keys = manifest.get("model_keys")
        store.config_hash = store.config_hash or manifest.get("config_hash")
    untagged = store._untagged() if store.keys is not None else {}
    renames = _renames()
    only = None if cells is None else pa.array(list(cells), pa.string())
    current = store.current_set()
    frames = []
    for f in store.files():
        have = _schema_names(store, f)
        if have is None:
            continue
        on_disk: dict[str, str] = {}  # today's name -> the file's
        for c in wanted:
            old = [o for o, n in renames.items() if n == c and o in have]
            if c in have or old:
                on_disk[c] = c if c in have else old[0]
        keys = [c for c in ("model", "model_key") if c in have]  # which rows hold this run's weights
        table = store._table(f, list(dict.fromkeys([*on_disk.values(), *keys])))
        if table is None:
            continue
        table = store.current_rows(table, untagged, current)
        if only is not None and "cell_id" in table.column_names:
            table = table.filter(pc.is_in(table["cell_id"], value_set=only.cast(table["cell_id"].type)))
        if not table.num_rows:
            continue
        table = table.rename_columns([{v: k for k, v in on_disk.items()}.get(c, c) for c in table.column_names])
        for c in tokens:
            if c in table.column_names:
                table = table.set_column(table.column_names.index(c), c, arrow_token_text(table[c]))
        if "top_logprobs" in table.column_names:
            i = table.column_names.index("top_logprobs")
            table = table.set_column(i, "top1_logprob", arrow_top1_logprob(table["top_logprobs"]))
        drop = [c for c in keys if c not in wanted]
        frames.append(table.drop_columns(drop))
    if not frames:
        return pd.DataFrame()
    return _one_frame(frames)


def _one_frame(tables):
    """The files' tables as one pandas DataFrame, each cell_id once (its first row): concatenated
    and de-duplicated by Arrow, turned into pandas once (a frame per file, concatenated, copied
    every row twice more: at 10^6 rows, most of the report's memory). Tables whose column types
    do not merge (an int column of one file that is text in another) go through pandas as before."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True).drop_duplicates("cell_id", keep="first")
        return df.reset_index(drop=True)
    _, first = np.unique(id_numbers(table.column("cell_id")), return_index=True)
    if len(first) < table.num_rows:
        table = table.take(np.sort(first))
    return table.to_pandas()

"""`kind: patchscope` (the default): a Patchscope grid, sections `source` and `target`.

A `Cell` is one point of model x (source prompt, target prompt) row x source layer x source
position x target layer x target position; a task holds cells of one model across many source
prompts (`packs`: up to batches_per_task forward batches, `sweeps.grid`), and the worker extracts
each source prompt's hidden states once per task, all layers in one forward pass. Rows come from `source.prompts` or `source.file` (with `target.prompt` or a per-row
`target.prompt_column`); every prompt is checked against each model's context and positions.
The report draws source prompt x source layer (and source x target layer) heatmaps, coloured by
the share of generations containing the row's reference value, else the first token's
log-probability; past the readable size (`pictures.READABLE_ROWS` source prompts) the means per
layer and position with 95% intervals, the top prompts and a sample of generations instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from patchscope_core import Patchscope, PatchscopeError, Source, Target, tokenize
from patchscope_core.models.tokens import context_problem, resolve_position, tokenize_many

from .. import pictures
from ..config import ConfigError, Layers, Positions, Strict, TargetLayers, TargetPositions
from ..config.files import checked_columns, locate, read_table, ref_value
from ..config.models import ModelPlan, checked_layers, model_info_for
from .base import Curve, KindDefaults, Schema, check_generates, generation_key, run_column_lists, run_columns


class SourceConfig(Strict):
    prompts: list[str] | None = None
    file: str | None = Field(None, description="CSV, TSV or JSONL; one row per (source, target) pair")
    prompt_column: str = "prompt"
    reference_columns: list[str] | None = Field(
        None, description="file columns carried into the results as ref_<name> (default: every other column)"
    )
    layers: Layers = "all"
    positions: Positions = [-1]

    @field_validator("prompts", mode="after")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("empty list of prompts")
            for p in v:
                if not p.strip():
                    raise ValueError("empty prompt")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SourceConfig:
        if (self.prompts is None) == (self.file is None):
            raise ValueError("give exactly one of source.prompts or source.file")
        return self


class TargetConfig(Strict):
    prompt: str | None = None
    prompt_column: str | None = Field(None, description="per-row target prompt, a column of source.file")
    layers: TargetLayers = "same"
    positions: TargetPositions = [-1]

    @model_validator(mode="after")
    def _one_prompt(self) -> TargetConfig:
        if (self.prompt is None) == (self.prompt_column is None):
            raise ValueError("give exactly one of target.prompt or target.prompt_column")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("target.prompt: empty prompt")
        return self


@dataclass(frozen=True)
class Row:
    """One (source prompt, target prompt) pair with its reference values."""

    source_prompt: str
    target_prompt: str
    refs: tuple[tuple[str, Any], ...] = ()
    where: str = "source.prompts"  # for error messages
    index: int = 0  # position in source.prompts or source.file (orders tables and pictures)


# A cell's parameters, in this order (ref_<name> columns follow); the first columns of every row.
PARAM_COLUMNS = (
    "cell_id",
    "model",
    "source_prompt",
    "source_layer",
    "source_position",
    "target_prompt",
    "target_layer",
    "target_position",
    "row",
)
# What the engine produced for a cell.
RESULT_COLUMNS = (
    "source_position_abs",
    "target_position_abs",
    "source_token_ids",
    "target_token_ids",
    "generated_token_ids",
    "generated_text",
    "top_token_ids",
    "top_logprobs",
    "max_new_tokens",
)
# What a person reads (W&B tables, results.csv), in this order; ref_<name> and match_<name> follow.
TABLE_COLUMNS = (
    "cell_id",
    "model",
    "source_prompt",
    "source_layer",
    "source_position",
    "target_layer",
    "target_position",
    "generated_text",
    "top1_logprob",
    "target_prompt",
    "generated_token_ids",
)
# Token-id lists, shown as space-separated text in tables.
TOKEN_COLUMNS = ("generated_token_ids", "source_token_ids", "target_token_ids")


def _id_parts(model: str, source_prompt: str, target_prompt: str, refs, generation_key: str) -> tuple[str, str, str]:
    """The JSON fragments of a cell id that do not depend on layers and positions."""
    head = f"[{json.dumps(model)}, {json.dumps(source_prompt)}, "
    tail = f"{json.dumps([list(r) for r in refs], default=str)}, {json.dumps(generation_key)}]"
    return head, json.dumps(target_prompt), tail


def _cell_digest(parts: tuple[str, str, str], layer: int, position: int, t_layer: int, t_position: int) -> str:
    """A cell's id: the digest of the JSON list [model, source prompt, source layer, source
    position, target prompt, target layer, target position, refs, generation key], written
    from fragments so that a grid encodes each prompt once (the text json.dumps gives the list)."""
    head, target, tail = parts
    text = f"{head}{layer}, {position}, {target}, {t_layer}, {t_position}, {tail}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    model: str
    source_prompt: str
    source_layer: int
    source_position: int  # as asked for (e.g. -1); results also carry the absolute index
    target_prompt: str
    target_layer: int
    target_position: int
    row: int = 0  # the input row (source.prompts / source.file) it came from; not part of the id
    refs: tuple[tuple[str, Any], ...] = ()
    generation_key: str = ""  # digest of the generation settings
    max_new_tokens: int = 20  # part of the generation settings (so of the id through generation_key)
    KIND = "patchscope"

    @cached_property
    def cell_id(self) -> str:
        parts = _id_parts(self.model, self.source_prompt, self.target_prompt, self.refs, self.generation_key)
        return _cell_digest(parts, self.source_layer, self.source_position, self.target_layer, self.target_position)

    def params(self) -> dict[str, Any]:
        """The cell's columns of a result row."""
        out = {k: getattr(self, k) for k in PARAM_COLUMNS[1:]}
        out = {"cell_id": self.cell_id, **out}
        out.update({f"ref_{k}": v for k, v in self.refs})
        return out

    @property
    def group(self) -> str:
        return self.source_prompt

    def patchscope(self, max_new_tokens: int) -> Patchscope:
        return Patchscope(
            source=Source(self.source_prompt, self.source_layer, self.source_position, model=self.model),
            target=Target(self.target_prompt, self.target_layer, (self.target_position,), model=self.model),
            max_new_tokens=max_new_tokens,
        )


# ---------------------------------------------------------------- rows and checks


def load_patchscope_rows(config, base: Path | None = None) -> list[Row]:
    """The (source, target) pairs of the sweep, from source.prompts or source.file (a relative
    file is read from the current directory, or else from `base`, the config's directory)."""
    src, tgt = config.source, config.target
    if src.prompts is not None:
        return [Row(p, tgt.prompt, (), f"source.prompts[{i}]", i) for i, p in enumerate(src.prompts)]
    path = locate(src.file, base, "source.file")
    table = read_table(path)
    if not table:
        raise ConfigError(f"source.file: {path} has no rows")
    refs = checked_columns(
        list(table[0]),
        (("source.prompt_column", src.prompt_column), ("target.prompt_column", tgt.prompt_column)),
        src.reference_columns,
        "source.reference_columns",
        path,
    )
    rows = []
    for i, rec in enumerate(table):
        where = f"source.file row {i + 1}"
        s = rec.get(src.prompt_column)
        t = rec.get(tgt.prompt_column) if tgt.prompt_column else tgt.prompt
        for field_name, v in (("source.prompt_column", s), ("target.prompt_column", t)):
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{field_name}: {where} has an empty or missing prompt ({v!r})")
        rows.append(Row(s, t, tuple((c, ref_value(rec.get(c))) for c in refs), where, i))
    return rows


def _prompt_field(config, row: Row, role: str) -> str:
    """Where a row's source or target prompt was given, as the start of an error message."""
    if role == "target":
        return "target.prompt" if config.target.prompt is not None else f"target.prompt_column: {row.where}"
    return row.where if config.source.prompts is not None else f"source.prompt_column: {row.where}"


def _check_context(config, info, row: Row, role: str, n: int) -> None:
    """A source prompt must fit the model's context; a target prompt with max_new_tokens too."""
    new = config.generation.max_new_tokens if role == "target" else 0
    problem = context_problem(n, new, info)
    if problem:
        prompt = row.target_prompt if role == "target" else row.source_prompt
        why = ", the new ones from generation.max_new_tokens" if n <= info.n_ctx else ""
        raise ConfigError(f"{_prompt_field(config, row, role)}: {problem}{why} ({role} prompt {prompt[:40]!r})")


def _check_rows(config, plan: ModelPlan, rows: list[Row], name: str) -> None:
    """Every prompt's token count, context and positions on one model (filling plan.n_tokens)."""
    info = plan.info
    distinct = [p for p in dict.fromkeys(p for r in rows for p in (r.source_prompt, r.target_prompt)) if p.strip()]
    for chunk in range(0, len(distinct), 10_000):  # the tokenizer's batch path, in bounded pieces
        part = distinct[chunk : chunk + 10_000]
        plan.n_tokens.update(zip(part, map(len, tokenize_many(info, part))))
    for row in rows:
        for prompt, role, positions in (
            (row.source_prompt, "source", config.source.positions),
            (row.target_prompt, "target", config.target.positions),
        ):
            if prompt in plan.n_tokens:
                n = plan.n_tokens[prompt]
            else:  # an empty prompt: tokenize names the field
                n = len(tokenize(info, prompt, f"{role}.prompt"))
                plan.n_tokens[prompt] = n
            _check_context(config, info, row, role, n)
            if positions == "all":
                continue
            for p in positions:
                try:
                    resolve_position(p, n, f"{role}.positions")
                except PatchscopeError as exc:
                    raise ConfigError(f"{exc} ({role} prompt {prompt[:60]!r} of {row.where}, on {name})") from None


def check_patchscopes(config, rows: list[Row]) -> dict[str, ModelPlan]:
    """Layers against each model's config, positions against each tokenized prompt, prompt
    lengths and max_new_tokens against each model's context; reads configs and tokenizers only."""
    plans = {}
    for i, name in enumerate(config.models):
        info = model_info_for(name, f"models[{i}]")
        if info.n_ctx and config.generation.max_new_tokens >= info.n_ctx:
            raise ConfigError(
                f"generation.max_new_tokens: {config.generation.max_new_tokens} does not fit {name}'s "
                f"context of {info.n_ctx} tokens (prompt tokens + new tokens must be at most {info.n_ctx})"
            )
        try:
            source = checked_layers(config.source.layers, info, "source.layers")
            target = (
                None if config.target.layers == "same" else checked_layers(config.target.layers, info, "target.layers")
            )
            plan = ModelPlan(info, source, target)
            _check_rows(config, plan, rows, name)
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None
        plans[name] = plan
    return plans


# ---------------------------------------------------------------- the grid


def _by_source(rows: list[Row]) -> list[list[Row]]:
    """Distinct rows (the same source, target and references twice is one row) grouped by
    source prompt, groups in first-seen order (one task group each)."""
    seen: set = set()
    groups: dict[str, list[Row]] = {}
    for row in rows:
        key = (row.source_prompt, row.target_prompt, row.refs)
        if key not in seen:
            seen.add(key)
            groups.setdefault(row.source_prompt, []).append(row)
    return list(groups.values())


def _row_axes(config, plan: ModelPlan, row: Row) -> tuple[list[int], list[int], list[int | None]]:
    """Source layers, source positions and target layers (None: the source layer) of one row."""
    positions = config.source.positions
    if positions == "all":
        positions = list(range(plan.n_tokens[row.source_prompt]))
    return plan.source_layers, positions, plan.target_layers or [None]


def _walk(config, rows: list[Row], plans: dict[str, ModelPlan]) -> Iterator[tuple]:
    """(cell_id, model, row, source layer, source position, target layer, target position) of
    every cell, in the grid's order; the cells of one model and source prompt come together."""
    gen = generation_key(config)
    for model in config.models:
        plan = plans[model]
        for group in _by_source(rows):
            for row in group:
                parts = _id_parts(model, row.source_prompt, row.target_prompt, row.refs, gen)
                layers, positions, t_layers = _row_axes(config, plan, row)
                for layer in layers:
                    for pos in positions:
                        for t_layer in (layer,) if t_layers == [None] else t_layers:
                            for t_pos in config.target.positions:
                                yield (
                                    _cell_digest(parts, layer, pos, t_layer, t_pos),
                                    model,
                                    row,
                                    layer,
                                    pos,
                                    t_layer,
                                    t_pos,
                                )


def _ordered(df):
    """Rows in input order (source.prompts / source.file), then layers and positions."""
    keys = ["model", "row"] if "row" in df.columns else ["model"]
    keys += ["source_prompt", "source_layer", "source_position", "target_layer", "target_position"]
    return df.sort_values(keys, kind="stable")


def metric_of(df) -> tuple[str, str]:
    matches = [c for c in df.columns if c.startswith("match_")]
    if matches:
        return matches[0], f"share of generations containing the row's {matches[0][6:]}"
    return "top1_logprob", "log-probability of the first generated token"


def _heatmaps(out_dir: Path, model: str, mdf, metric: str, label: str) -> dict[str, Path]:
    """Per layer and position the mean over source prompts with its 95% interval (a table, always);
    up to the readable size (`pictures.READABLE_ROWS` source prompts) source prompt x source layer
    (annotated when each square holds one cell), past it the means as lines with their bands, the
    top prompts' heatmap and a sample of generations; with several target layers per source
    layer, source layer x target layer."""
    out = {}
    stem = pictures.safe_name(model, "model")
    prompts = list(dict.fromkeys(mdf["source_prompt"]))
    means = pictures.means_by(mdf, ["source_layer", "source_position"], "source_prompt", metric)
    out[f"{stem}_by_layer_table"] = out_dir / f"means_{stem}_by_layer.csv"
    means.rename(columns={"n": "prompts"}).to_csv(out[f"{stem}_by_layer_table"], index=False)
    if pictures.readable(len(prompts)):
        out.update(_prompt_heatmap(out_dir, model, mdf, metric, label, prompts, f"{stem}_prompt_x_layer", ""))
    else:
        averaged = mdf.duplicated(["source_prompt", "source_layer", "source_position"]).any()
        positions = list(dict.fromkeys(mdf["source_position"]))
        out[f"{stem}_by_layer"] = pictures.draw_means(
            means,
            "source_layer",
            "source_position",
            metric,
            f"{model}: {label}, mean over {len(prompts)} source prompts"
            + (f" at source position {positions[0]}" if len(positions) == 1 else "")
            + (" (each prompt's target layers / positions averaged first)" if averaged else "")
            + " with a 95% interval (normal approximation)",
            out_dir / f"means_{stem}_by_layer.png",
        )
        top = pictures.top_rows(mdf, "source_prompt", metric)
        best = mdf[mdf["source_prompt"].isin(top)]
        out.update(
            _prompt_heatmap(
                out_dir,
                model,
                best,
                metric,
                label,
                top,
                f"{stem}_top_prompts",
                f"the {len(top)} of {len(prompts)} source prompts of highest mean {metric}; ",
                notes=False,
            )
        )
        columns = ["row", "source_prompt", "target_prompt", "source_layer", "source_position", "target_layer"]
        columns += ["target_position", *sorted(c for c in mdf.columns if c.startswith("ref_")), "generated_text"]
        columns = [c for c in dict.fromkeys([*columns, metric]) if c in mdf.columns]
        rank = {p: i for i, p in enumerate(top)}
        best = best.iloc[sorted(range(len(best)), key=lambda i: rank[best["source_prompt"].iloc[i]])]
        out[f"{stem}_top_prompts_table"] = out_dir / f"top_{stem}_prompts.csv"
        best[columns].to_csv(out[f"{stem}_top_prompts_table"], index=False)
        out[f"{stem}_generations_sample"] = out_dir / f"generations_{stem}_sample.csv"
        pictures.sample(mdf)[columns].to_csv(out[f"{stem}_generations_sample"], index=False)
    if mdf.groupby("source_layer")["target_layer"].nunique().max() > 1:
        st = mdf.pivot_table(index="source_layer", columns="target_layer", values=metric, aggfunc="mean")
        key = f"{stem}_source_x_target_layer"
        out[key] = pictures.heatmap(
            st.to_numpy(dtype=float),
            [str(i) for i in st.index],
            list(st.columns),
            f"{model}: {label} (mean over prompts)",
            "target layer",
            "source layer",
            metric,
            out_dir / f"heatmap_{key}.png",
        )
    return out


def _prompt_heatmap(
    out_dir: Path, model: str, mdf, metric: str, label: str, prompts: list, key: str, what: str, notes: bool = True
):
    """Source prompt (in the order of `prompts`) x source layer, annotated (with `notes`) when each
    square holds one cell."""
    pivot = mdf.pivot_table(index="source_prompt", columns="source_layer", values=metric, aggfunc="mean")
    pivot = pivot.reindex(prompts)
    one_each = not mdf.duplicated(["source_prompt", "source_layer"]).any()
    squares = None
    if one_each and notes:
        text = mdf.set_index(["source_prompt", "source_layer"])["generated_text"]
        squares = [[pictures.note(text.get((p, l), "")) for l in pivot.columns] for p in pivot.index]
    path = pictures.heatmap(
        pivot.to_numpy(dtype=float),
        list(pivot.index),
        list(pivot.columns),
        f"{model}: {what}{label}" + ("" if one_each else " (mean over positions / target layers)"),
        "source layer",
        "source prompt",
        metric,
        out_dir / f"heatmap_{key}.png",
        squares,
    )
    return {key: path}


class PatchscopeKind(KindDefaults):
    name = "patchscope"
    sections = {"source": SourceConfig, "target": TargetConfig}
    packs = True  # its cells batch together whatever their group: tasks span many groups
    operation = "patchscope"
    schema = Schema(
        PARAM_COLUMNS,
        RESULT_COLUMNS,
        TABLE_COLUMNS,
        TOKEN_COLUMNS,
        needs=(  # what the report and summary read (with the ref_ columns: match_)
            "source_prompt",
            "source_layer",
            "source_position",
            "target_layer",
            "target_position",
            "generated_text",
        ),
        optional=("row", "target_prompt", "top1_logprob"),  # top1_logprob: from top_logprobs
    )
    marks = frozenset()  # what no other kind's rows are
    order = ("model", "row", "source_prompt", "source_layer", "source_position", "target_layer", "target_position")

    def check_config(self, config) -> None:
        check_generates(config, self.name)
        if config.target.prompt_column is not None and config.source.file is None:
            raise ValueError("target.prompt_column: needs source.file (its rows pair each source with its target)")
        if config.source.reference_columns is not None and config.source.file is None:
            raise ValueError("source.reference_columns: needs source.file")

    def load_rows(self, config, base: Path | None) -> list[Row]:
        return load_patchscope_rows(config, base)

    def check(self, config, rows: list[Row], base: Path | None) -> dict[str, ModelPlan]:
        return check_patchscopes(config, rows)

    def science(self, science: dict[str, Any], config, rows: list[Row], context: Any) -> dict[str, Any]:
        science.pop("kind")  # hashes of patchscope sweeps stay what they were
        science["source"].pop("file", None)  # the rows stand for the file's content
        science["rows"] = [[r.source_prompt, r.target_prompt, [list(x) for x in r.refs]] for r in rows]
        return science

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        for model in config.models:
            plan = plans[model]
            for group in _by_source(rows):
                n = 0
                for row in group:
                    layers, positions, t_layers = _row_axes(config, plan, row)
                    n += len(layers) * len(positions) * len(t_layers) * len(config.target.positions)
                yield model, n

    def cells(self, config, rows, plans, context) -> Iterator[Cell]:
        gen, max_new = generation_key(config), config.generation.max_new_tokens
        for cid, model, row, layer, pos, t_layer, t_pos in _walk(config, rows, plans):
            cell = Cell(
                model,
                row.source_prompt,
                layer,
                pos,
                row.target_prompt,
                t_layer,
                t_pos,
                row.index,
                row.refs,
                gen,
                max_new,
            )
            cell.__dict__["cell_id"] = cid  # computed above: fill the cached property
            yield cell

    def cell_ids(self, config, rows, plans, context) -> Iterator[str]:
        return (w[0] for w in _walk(config, rows, plans))

    def payload(self, task) -> dict[str, Any]:
        # Patchscope.to_columns' plain data, written directly (no object per cell: a driver sends
        # thousands of cheap cells a second); a test checks both give the same
        cells = task.cells
        models = [c.model for c in cells]
        return {
            "kind": self.operation,
            "patchscope_columns": {
                "source_prompt": [c.source_prompt for c in cells],
                "source_layer": [c.source_layer for c in cells],
                "source_position": [c.source_position for c in cells],
                "source_model": models,
                "target_prompt": [c.target_prompt for c in cells],
                "target_layer": [c.target_layer for c in cells],
                "target_positions": [[c.target_position] for c in cells],
                "target_model": models,
                "max_new_tokens": [c.max_new_tokens for c in cells],
            },
        }

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for cell, rec in zip(task.cells, output["records"], strict=True):
            row = cell.params()
            row.update(
                source_position_abs=rec["source_position"],
                target_position_abs=rec["target_positions"][0],
                **{c: rec[c] for c in RESULT_COLUMNS[2:]},
            )
            row.update(run_columns(output, rec))
            rows.append(row)
        return rows

    def to_table(self, task, output: dict[str, Any]):
        """`to_rows` a column at a time (no dict per cell: a driver stores thousands of cheap
        cells a second); a test checks both give the same table."""
        import pyarrow as pa

        cells, recs = task.cells, output["records"]
        if len(cells) != len(recs):
            raise ValueError(f"task {task.task_id}: {len(cells)} cells, {len(recs)} records")
        columns: dict[str, Any] = {"cell_id": [c.cell_id for c in cells]}
        for name in PARAM_COLUMNS[1:]:
            columns[name] = [getattr(c, name) for c in cells]
        for name in dict.fromkeys(k for c in cells for k, _ in c.refs):
            columns[f"ref_{name}"] = [dict(c.refs).get(name) for c in cells]
        columns["source_position_abs"] = [r["source_position"] for r in recs]
        columns["target_position_abs"] = [r["target_positions"][0] for r in recs]
        for name in RESULT_COLUMNS[2:]:
            columns[name] = [r[name] for r in recs]
        columns.update(run_column_lists(output, recs))
        return pa.table(columns)

    def describe(self, config, plan: ModelPlan, context) -> str:
        tl = "same as source" if plan.target_layers is None else plan.target_layers
        return (
            f"source layers {plan.source_layers} x source positions {config.source.positions} x target layers {tl} "
            f"x target positions {config.target.positions}"
        )

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        metric, label = metric_of(df)
        out: dict[str, Path] = {}
        for model, mdf in df.groupby("model", sort=False):
            out.update(_heatmaps(out_dir, model, mdf, metric, label))
        return out

    def summary(self, df, width: int = 28, max_rows: int = 40) -> str:
        """Generated text per source prompt (rows) and source layer (columns)."""
        df = _ordered(df)
        lines = []
        for model, mdf in df.groupby("model", sort=False):
            first = mdf.sort_values(["target_layer", "source_position", "target_position"]).drop_duplicates(
                ["source_prompt", "source_layer"]
            )
            pivot = first.pivot(index="source_prompt", columns="source_layer", values="generated_text")
            pivot = pivot.reindex(list(dict.fromkeys(mdf["source_prompt"])))
            lines.append(f"== {model}: generated text by source prompt (rows) and source layer (columns)")
            for prompt in list(pivot.index)[:max_rows]:
                lines.append(f"{pictures.short(prompt, 24)}")
                for layer in pivot.columns:
                    lines.append(f"    layer {layer:>3}: {pictures.short(pivot.loc[prompt, layer] or '', 70)!r}")
            if len(pivot.index) > max_rows:
                lines.append(f"... {len(pivot.index) - max_rows} more prompts in results.csv")
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """Per reference column <ref>: the share of generations that name it over every cell
        (`share_naming_<ref>`) and the source layer where that share is highest
        (`best_layer_<ref>`, `best_layer_share_<ref>`); without references the mean log-probability
        of the first generated token (`mean_top1_logprob`)."""
        out: dict[str, Any] = {}
        matches = [c for c in df.columns if c.startswith("match_")]
        for c in matches:
            values = df[c].astype(float)
            by_layer = values.groupby(df["source_layer"]).mean().dropna()
            out[f"share_naming_{c[6:]}"] = float(values.mean())
            if len(by_layer):
                out[f"best_layer_{c[6:]}"] = int(by_layer.idxmax())
                out[f"best_layer_share_{c[6:]}"] = float(by_layer.max())
        if not matches and "top1_logprob" in df:
            out["mean_top1_logprob"] = float(df["top1_logprob"].astype(float).mean())
        return out

    def curves(self, df) -> dict[str, Curve]:
        """The report's measure (the share naming the first reference, else the first token's
        log-probability) by source layer: the mean over source prompts, one line per source position."""
        metric, label = metric_of(df)
        if metric not in df:
            return {}
        means = pictures.means_by(df, ["source_layer", "source_position"], "source_prompt", metric)
        frame = means[["source_layer", "source_position", "mean"]].rename(columns={"mean": metric})
        return {
            f"{metric}_by_layer": Curve(frame, "source_layer", metric, "source_position", f"{label} by source layer")
        }


KIND = PatchscopeKind()

"""The `prompts` section and its rows, shared by the kinds that run prompts one by one
(`intervention`, `causal_trace`): a file (CSV, TSV or JSONL) or inline rows, with a prompt,
answer, subject and reference columns; and what their checks and grids share (each model's
layers and token counts, the task groups of distinct rows)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from patchscope_core import tokenize
from patchscope_core.models.tokens import context_problem

from ..config import ConfigError, Strict
from ..config.files import checked_columns, locate, read_table, ref_value
from ..config.models import ModelPlan, checked_layers, model_info_for


class PromptsConfig(Strict):
    """The prompts of intervention and causal-trace sweeps: a file (CSV, TSV or JSONL) or rows."""

    file: str | None = None
    rows: list[dict[str, Any]] | None = None
    prompt_column: str = "prompt"
    answer_column: str | None = Field(None, description="the answer whose log-probability is scored")
    subject_column: str | None = Field(None, description="causal_trace: the tokens that get corrupted")
    reference_columns: list[str] | None = Field(None, description="carried into the results as ref_<name>")
    clean_column: str | None = Field(None, description="activation_patching: the clean prompt")
    corrupted_column: str | None = Field(None, description="activation_patching: the corrupted prompt")
    wrong_answer_column: str | None = Field(None, description="activation_patching: the wrong answer (logit_diff)")
    answers: Literal["checked", "first_token"] = Field(
        "checked",
        description="checked: warn once when an answer's first token does not start a word or it has several "
        "tokens; first_token: it is meant (only the first token is scored where a measure reads one)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if (self.file is None) == (self.rows is None):
            raise ValueError("prompts: give exactly one of prompts.file or prompts.rows")
        if self.rows is not None and not self.rows:
            raise ValueError("prompts.rows: empty list of rows")
        return self


PAIR_COLUMNS = ("clean_column", "corrupted_column", "wrong_answer_column")
COLUMN_FIELDS = ("prompt_column", "answer_column", "subject_column", *PAIR_COLUMNS)


def named_columns(pc: PromptsConfig, used: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(field, column) of every column the `prompts` section names: those the kind reads
    (`used`) and any other the config sets, so a column the file lacks is refused wherever it is
    written rather than ignored."""
    return [(f"prompts.{n}", getattr(pc, n)) for n in COLUMN_FIELDS if n in used or n in pc.model_fields_set]


def table_of(pc: PromptsConfig, base: Path | None) -> tuple[list[dict[str, Any]], str, Any]:
    """(the rows, where a row is (prompts.file or prompts.rows), what holds the columns (the file's
    path, or prompts.rows)) of the `prompts` section."""
    if pc.file is None:
        return pc.rows, "prompts.rows", "prompts.rows"
    path = locate(pc.file, base, "prompts.file")
    table = read_table(path, "prompts.file")
    if not table:
        raise ConfigError(f"prompts.file: {path} has no rows")
    return table, "prompts.file", path


@dataclass(frozen=True)
class PromptRow:
    """One prompt of an intervention or causal-trace sweep, with its answer, subject and references."""

    prompt: str
    answer: str | None = None
    subject: str | None = None
    refs: tuple[tuple[str, Any], ...] = ()
    where: str = "prompts.rows"
    index: int = 0


def load_prompt_rows(config, base: Path | None = None) -> list[PromptRow]:
    """The prompts of the sweep, from prompts.file or prompts.rows."""
    pc = config.prompts
    table, where, holder = table_of(pc, base)
    names = ("prompt_column", "answer_column", "subject_column")
    refs = checked_columns(
        list(dict.fromkeys(c for rec in table for c in rec)),
        named_columns(pc, names),
        pc.reference_columns,
        "prompts.reference_columns",
        holder,
    )
    rows = []
    for i, rec in enumerate(table):
        at = f"{where} row {i + 1}"
        values = {}
        for name in names:
            col = getattr(pc, name)
            v = rec.get(col) if col is not None else None
            if col is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"prompts.{name}: {at} has an empty or missing {col} ({v!r})")
            values[name] = v
        rows.append(
            PromptRow(
                values["prompt_column"],
                values["answer_column"],
                values["subject_column"],
                tuple((c, ref_value(rec.get(c))) for c in refs),
                at,
                i,
            )
        )
    return rows


def prompt_rows_science(science: dict[str, Any], rows: list[PromptRow], context: Any) -> dict[str, Any]:
    """What a prompts sweep's hash covers beyond its sections: the rows (for the file) and the context."""
    science["prompts"].pop("file", None)
    science["prompts"].pop("answers", None)  # a warning's setting, not the results'
    for key in PAIR_COLUMNS:  # activation_patching's columns: unset in these kinds, out of their hash
        if science["prompts"].get(key) is None:
            science["prompts"].pop(key, None)
    science["rows"] = [[r.prompt, r.answer, r.subject, [list(x) for x in r.refs]] for r in rows]
    science["context"] = context
    return science


def model_plans(config, rows: list[PromptRow], section: str) -> Iterator[tuple[str, ModelPlan]]:
    """(model, its plan): `section`.layers checked against it and every prompt's token count."""
    for i, name in enumerate(config.models):
        info = model_info_for(name, f"models[{i}]")
        plan = ModelPlan(info, checked_layers(getattr(config, section).layers, info, f"{section}.layers"), None)
        yield name, plan


def count_tokens(plan: ModelPlan, rows: list[PromptRow], new_tokens: int = 0) -> None:
    """Every prompt's token count; a prompt longer than the model's context is an error naming
    the row, and one that leaves no room for `new_tokens` names generation.max_new_tokens."""
    info = plan.info
    for row in rows:
        n = len(tokenize(info, row.prompt, f"prompts.prompt_column ({row.where})"))
        plan.n_tokens[row.prompt] = n
        problem = context_problem(n, 0, info)
        if problem:
            raise ConfigError(f"prompts.prompt_column: {row.where}: {problem} (prompt {row.prompt[:40]!r})")
        problem = context_problem(n, new_tokens, info)
        if problem:
            raise ConfigError(
                f"generation.max_new_tokens: {problem} ({row.where}); give a smaller max_new_tokens or shorter prompts"
            )


def fact_key(prompt: str, subject: str | None, answer: str | None) -> str:
    """A causal trace's task group: one fact."""
    return json.dumps([prompt, subject, answer])


def study_groups(config, rows: list[PromptRow], by_fact: bool) -> Iterator[tuple[str, list[PromptRow]]]:
    """(model, the distinct rows of one prompt, or of one fact), in first-seen order."""
    groups: dict[str, dict] = {}
    for row in rows:
        key = fact_key(row.prompt, row.subject, row.answer) if by_fact else row.prompt
        groups.setdefault(key, {}).setdefault((row.answer, row.subject, row.refs), row)
    for model in config.models:
        for group in groups.values():
            yield model, list(group.values())

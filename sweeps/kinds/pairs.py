"""What the two pair kinds (`activation_patching`, `attribution_patching`) share, from the
config to their cells; not a kind itself (no `KIND`: `sweeps.kinds.KINDS` does not list it).

- config: the `prompts` columns a pair needs (`check_pair_columns`), the type of a setting
  given as one value or a list (`choices`), the sites and layers their own sections start with
  (`PairSites`: a site is a hook name, a TransformerLens short name, or a `SiteSpec` mapping
  with its own positions and heads);
- rows: the pairs, from `prompts.file` or `prompts.rows` (`load_pairs`, one `PairRow` each);
- checks: one pair against one model (`check_pair_row`: same token count, answers that
  tokenize), its clean token count noted in the model's plan;
- identity: what a config hash covers of the prompts (`pair_science`: the pairs, not the file);
- the kind object: `PairKind`, what both kinds' objects do alike (the columns checked, the
  pairs loaded, each model checked pair by pair, the hash, a task of whole pairs);
- grid and records: a cell's pair and place (`PairCell`: model, pair, site, layer, position;
  its id and task group, its pair as the worker reads it, the token at its position) and the
  parameter columns every pair kind's rows start with (`PAIR_PARAMS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, field_validator

from patchscope_core import PatchscopeError
from patchscope_core.methods.patching import Pair, check_pair
from patchscope_core.models.sites import site_template

from ..config import ConfigError, Layers, Strict
from ..config.fields import site_entries
from ..config.files import checked_columns
from ..config.models import ModelPlan
from .answers import check_pairs
from .base import KindDefaults, digest
from .prompts import model_plans, named_columns, table_of


def one_or_list(value: Any, allowed: tuple[str, ...]) -> list[str]:
    """A setting given as one of `allowed` or a list of them, as a list without repeats."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or any(v not in allowed for v in values):
        raise ValueError(f"expected {' | '.join(allowed)} or a list of them, got {value!r}")
    return list(dict.fromkeys(values))


def choices(allowed: tuple[str, ...]) -> Any:
    """The type of a setting given as one of `allowed` or a list of them (`one_or_list`); the
    default stays as written."""
    return Annotated[Any, AfterValidator(lambda v: one_or_list(v, allowed))]


def positions_value(v: Any) -> Any:
    """`positions`: each, all, or a non-empty list of integer positions (one integer: a list)."""
    if v in ("each", "all"):
        return v
    v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(v, list) or not v or any(isinstance(p, bool) or not isinstance(p, int) for p in v):
        raise ValueError(f"expected each, all or a non-empty list of integer positions, got {v!r}")
    return list(dict.fromkeys(v))


def heads_value(v: Any) -> Any:
    """`heads`: all, or a non-empty list of integer heads (one integer: a list)."""
    if v == "all":
        return v
    v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(v, list) or not v or any(isinstance(h, bool) or not isinstance(h, int) for h in v):
        raise ValueError(f"expected all or a non-empty list of integer heads, got {v!r}")
    return list(dict.fromkeys(v))


class SiteSpec(Strict):
    """One site with its own positions and heads (`sites: [{site: ..., positions: each}]`); a
    setting left out is the section's."""

    site: str = Field(description="a TransformerLens hook name, blocks.{layer}.<hook>, or a short name (z)")
    positions: Any = Field(None, description="each | all | a list; none: the section's positions")
    heads: Any = Field(None, description="head sites: all or a list; none: the section's heads")

    @field_validator("site", mode="after")
    @classmethod
    def _short_name(cls, v: str) -> str:
        return site_template(v, "")

    @field_validator("positions", mode="after")
    @classmethod
    def _positions(cls, v):
        return None if v is None else positions_value(v)

    @field_validator("heads", mode="after")
    @classmethod
    def _heads(cls, v):
        return None if v is None else heads_value(v)


class PairSites(Strict):
    """Where a pair kind acts: the first fields of its section (`patching`, `attribution`). A site
    is a hook name (the section's positions and heads) or a mapping with its own (`SiteSpec`)."""

    SECTION: ClassVar[str] = "sites"  # the section's key: what errors name
    sites: list[str | SiteSpec] = Field(
        ...,
        min_length=1,
        description="TransformerLens hook names, blocks.{layer}.<hook>, short names (z, resid_pre), or "
        "{site, positions, heads} mappings",
    )
    layers: Layers = "all"

    @field_validator("sites", mode="before")
    @classmethod
    def _entries(cls, v: Any) -> Any:
        return site_entries(v, SiteSpec, f"{cls.SECTION}.sites")

    @field_validator("sites", mode="after")
    @classmethod
    def _short_names(cls, v: list) -> list:
        """TransformerLens's short names (get_act_name's) as the templates they name; a site named
        twice where any site is a mapping is refused (its cells would repeat)."""
        v = [site_template(s, "") if isinstance(s, str) else s for s in v]
        if any(isinstance(s, SiteSpec) for s in v):
            names = [s if isinstance(s, str) else s.site for s in v]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{', '.join(twice)} named twice: give each site once, with its positions and heads")
        return v

    def site_names(self) -> list[str]:
        """Every site's hook name or template, in order."""
        return [s if isinstance(s, str) else s.site for s in self.sites]


def check_pair_columns(config, kind: str) -> None:
    """The `prompts` columns a pair needs."""
    for col in ("clean_column", "corrupted_column", "answer_column"):
        if getattr(config.prompts, col) is None:
            raise ValueError(f"prompts.{col}: an {kind} sweep needs it")


class PairTexts:
    """The four texts of a pair, on a row and on a cell alike."""

    def texts(self) -> list:
        """[clean, corrupted, answer, wrong_answer]: what names the pair (its group, its seed, the hash)."""
        return [self.clean, self.corrupted, self.answer, self.wrong_answer]

    def pair_payload(self) -> dict[str, Any]:
        """The pair as the worker reads it."""
        return {
            "clean": self.clean,
            "corrupted": self.corrupted,
            "answer": self.answer,
            "wrong_answer": self.wrong_answer,
        }


@dataclass(frozen=True)
class PairRow(PairTexts):
    clean: str
    corrupted: str
    answer: str
    wrong_answer: str | None
    where: str
    index: int

    def pair(self) -> Pair:
        return Pair(self.clean, self.corrupted, self.answer, self.wrong_answer)


def load_pairs(config, base: Path | None) -> list[PairRow]:
    """The pairs, from prompts.file or prompts.rows, every column the section names present (those
    a pair reads non-empty)."""
    pc = config.prompts
    table, where, holder = table_of(pc, base)
    names = ("clean_column", "corrupted_column", "answer_column", "wrong_answer_column")
    checked_columns(
        list(dict.fromkeys(c for rec in table for c in rec)),
        named_columns(pc, names),
        pc.reference_columns or [],
        "prompts.reference_columns",
        holder,
    )
    rows = []
    for i, rec in enumerate(table):
        at = f"{where} row {i + 1}"
        values = []
        for name in names:
            col = getattr(pc, name)
            v = rec.get(col) if col is not None else None
            if col is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"prompts.{name}: {at} has an empty or missing {col} ({v!r})")
            values.append(v)
        clean, corrupted, answer, wrong = values
        if wrong is not None and wrong == answer:
            raise ConfigError(f"prompts.wrong_answer_column: {at} has the wrong answer equal to the answer {answer!r}")
        rows.append(PairRow(clean, corrupted, answer, wrong, at, i))
    return rows


def check_pair_row(plan: ModelPlan, row: PairRow, metrics: list[str]) -> None:
    """One pair against one model (same token count, answers that tokenize), its clean token count
    noted in the plan."""
    if "logit_diff" in metrics and row.wrong_answer is None:
        raise ConfigError(f"prompts.wrong_answer_column: metric logit_diff needs a wrong answer ({row.where})")
    try:
        checked = check_pair(row.pair(), plan.info, metrics, f"prompts ({row.where})")
    except PatchscopeError as exc:
        msg = str(exc)
        if "same number of tokens" in msg:
            raise ConfigError(f"prompts.corrupted_column: {msg}") from None
        raise ConfigError(f"prompts.answer_column: {msg}") from None
    plan.n_tokens[row.clean] = len(checked.clean_ids)


def pair_science(science: dict[str, Any], rows: list[PairRow]) -> dict[str, Any]:
    """What a pair kind's config hash covers of its prompts: the pairs themselves, not the file
    that held them."""
    science["prompts"].pop("file", None)
    science["prompts"].pop("answers", None)  # a warning's setting, not the results'
    science["rows"] = [r.texts() for r in rows]
    return science


# The parameter columns every pair kind's rows start with (its own follow).
PAIR_PARAMS = (
    "cell_id",
    "model",
    "row",
    "clean",
    "corrupted",
    "answer",
    "wrong_answer",
    "site",
    "layer",
    "position",
    "token",
)


@dataclass(frozen=True)
class PairCell(PairTexts):
    """The first fields of a pair kind's cell: the model, the pair, the site, layer and position;
    a kind's cell adds its own fields and the class attributes `KIND` and `ID_FIELDS` (its own
    fields that decide the result)."""

    ID_FIELDS: ClassVar[tuple[str, ...]]

    model: str
    row: int
    clean: str
    corrupted: str
    answer: str
    wrong_answer: str | None
    site: str  # a PATCH_SITES name: hook_resid_pre, attn.hook_z, ...
    layer: int
    position: int | None  # absolute (BOS counted); None: every position (the kind says how)

    @classmethod
    def at(cls, model: str, row: PairRow, site: str, layer: int, position: int | None, *rest: Any):
        """The cell of `row` on `model` at (site, layer, position); `rest`: the kind's own fields."""
        return cls(
            model, row.index, row.clean, row.corrupted, row.answer, row.wrong_answer, site, layer, position, *rest
        )

    @property
    def cell_id(self) -> str:
        """Its kind, model, pair, site, layer and position, then its `ID_FIELDS`."""
        own = [getattr(self, f) for f in self.ID_FIELDS]
        return digest([self.KIND, self.model, *self.texts(), self.site, self.layer, self.position, *own])

    @property
    def group(self) -> str:
        """The task group: the pair (a kind that batches pairs says otherwise)."""
        return json.dumps(self.texts())

    def token_in(self, rec: dict[str, Any]) -> str | None:
        """The token at the cell's position in the worker's record (None: every position)."""
        return None if self.position is None else rec["tokens"][self.position]


class PairKind(KindDefaults):
    """What the pair kinds' objects share: the `prompts` columns checked, the pairs as rows, each
    model's plan from its own section's layers, checked pair by pair (`check_model`), the pairs in
    the hash, and a task of whole pairs."""

    section: ClassVar[str]  # the kind's own section (`patching`, `attribution`): its layers, its errors
    one_task = True  # a task holds whole pairs: their clean and corrupted runs are shared

    def check_config(self, config) -> None:
        check_pair_columns(config, self.name)

    def load_rows(self, config, base: Path | None) -> list[PairRow]:
        return load_pairs(config, base)

    def check(self, config, rows: list[PairRow], base: Path | None) -> dict[str, ModelPlan]:
        plans = {}
        for name, plan in model_plans(config, rows, self.section):
            self.check_model(config, name, plan, rows)
            plans[name] = plan
        check_pairs(config, plans, rows, self.metrics(config))
        return plans

    def metrics(self, config) -> list[str]:
        """The metrics the sweep computes (what the answers warning says is scored)."""
        raise NotImplementedError

    def check_model(self, config, name: str, plan: ModelPlan, rows: list[PairRow]) -> None:
        """The kind's section and every pair against one model (`check_pair_row`: noting each
        pair's clean token count in `plan`); a ConfigError naming the field."""
        raise NotImplementedError

    def science(self, science, config, rows, context):
        return pair_science(science, rows)

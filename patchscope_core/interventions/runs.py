"""An intervention run: a prompt, the interventions on it, and what to generate or score.

`Intervention(site, kind, positions)` says what is done where and when; `InterventionRun` is a
prompt with interventions, the tokens to generate and an optional answer to score.
`resolve_run` checks a run against its model before any weights load (token ids, context,
every site, every kind at its positions: `Kind.resolve`) and gives the `ResolvedRun` the engine
runs. `run_to_dict` / `run_from_dict` are the plain data a sweep's workers receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base.errors import PatchscopeError
from ..models.info import ModelInfo
from ..models.sites import ResolvedSite, Site, resolve_site
from ..models.tokens import tokenize
from .kinds import Kind, Positions
from .registry import KINDS, kind_values, make_kind


@dataclass(frozen=True)
class Intervention:
    """Do `kind` at `site` at `positions` (default: every prompt position and generated token)."""

    site: Site
    kind: Kind
    positions: Positions = Positions(prompt=True, generated=True)

    def __post_init__(self) -> None:
        if isinstance(self.site, str):
            object.__setattr__(self, "site", Site(self.site))
        object.__setattr__(self, "positions", Positions.parse(self.positions))


@dataclass(frozen=True)
class InterventionRun:
    """A prompt run with interventions: what it generates (max_new_tokens, 0 for none) and,
    with an answer, the answer's teacher-forced log-probability."""

    prompt: str
    interventions: tuple[Intervention, ...] = ()
    answer: str | None = None
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))


@dataclass(frozen=True)
class ResolvedIntervention:
    intervention: Intervention
    site: ResolvedSite
    positions: Positions  # absolute (a knockout's: its queries)
    edges: Any = None  # a knockout's blocked edges on this prompt (knockout.Edges)


@dataclass(frozen=True)
class ResolvedRun:
    """A run checked against its model: token ids and absolute positions."""

    run: Any  # the InterventionRun (or Patchscope) it came from
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    interventions: tuple[ResolvedIntervention, ...]
    max_new_tokens: int


def resolve_run(run: InterventionRun, info: ModelInfo, field_name: str = "run") -> ResolvedRun:
    """Validate a run against the model; raises PatchscopeError naming the field."""
    n = run.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PatchscopeError(f"{field_name}.max_new_tokens: expected an integer >= 0, got {n!r}")
    prompt = tokenize(info, run.prompt, f"{field_name}.prompt")
    answer: tuple[int, ...] = ()
    if run.answer is not None:
        if not isinstance(run.answer, str) or not run.answer:
            raise PatchscopeError(f"{field_name}.answer: empty answer")
        answer = tuple(info.tokenizer(run.answer, add_special_tokens=False)["input_ids"])
        if not answer:
            raise PatchscopeError(f"{field_name}.answer: {run.answer!r} has no tokens")
    if info.n_ctx and len(prompt) > info.n_ctx:
        raise PatchscopeError(
            f"{field_name}.prompt: {len(prompt)} tokens exceed {info.name}'s context of {info.n_ctx} tokens"
        )
    if len(prompt) + max(n, len(answer)) > info.n_ctx:
        raise PatchscopeError(
            f"{field_name}.max_new_tokens: {len(prompt)} prompt tokens + {max(n, len(answer))} more exceed "
            f"{info.name}'s context of {info.n_ctx} tokens"
        )
    resolved = []
    for i, iv in enumerate(run.interventions):
        where = f"{field_name}.interventions[{i}]"
        if not isinstance(iv.kind, Kind):
            raise PatchscopeError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {iv.kind!r}")
        attention_kinds = ", ".join(k for k, c in KINDS.items() if c.edits_attention)
        site = resolve_site(iv.site, info, f"{where}.site")
        if (site.side == "attention") != iv.kind.edits_attention:
            raise PatchscopeError(
                f"{where}.site: {iv.kind.name} acts on "
                + (
                    "blocks.{l}.attn (attention edges)"
                    if iv.kind.edits_attention
                    else f"a value, not on {iv.site.hook}; only {attention_kinds} acts on blocks.{{l}}.attn"
                )
            )
        positions, edges = iv.kind.resolve(site, info, run.prompt, len(prompt), iv.positions, iv.site.layer, where)
        resolved.append(ResolvedIntervention(iv, site, positions, edges))
    return ResolvedRun(run, prompt, answer, tuple(resolved), n)


def run_to_dict(run: InterventionRun) -> dict[str, Any]:
    """Plain data of a run (what travels to a sweep's workers)."""
    return {
        "prompt": run.prompt,
        "answer": run.answer,
        "max_new_tokens": run.max_new_tokens,
        "interventions": [
            {
                "site": iv.site.hook,
                "head": list(iv.site.head),
                "neuron": list(iv.site.neuron),
                "kind": iv.kind.name,
                "values": kind_values(iv.kind),
                "positions": {
                    "indices": list(iv.positions.indices),
                    "prompt": iv.positions.prompt,
                    "generated": iv.positions.generated,
                },
            }
            for iv in run.interventions
        ],
    }


def run_from_dict(data: dict[str, Any]) -> InterventionRun:
    ivs = [
        Intervention(
            Site(d["site"], head=tuple(d["head"]), neuron=tuple(d["neuron"])),
            make_kind(d["kind"], d["values"]),
            Positions(tuple(d["positions"]["indices"]), d["positions"]["prompt"], d["positions"]["generated"]),
        )
        for d in data["interventions"]
    ]
    return InterventionRun(data["prompt"], tuple(ivs), data["answer"], data["max_new_tokens"])

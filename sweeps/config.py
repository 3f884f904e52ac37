"""The sweep config: a YAML file validated with pydantic before anything runs.

`kind` says what the sweep runs: `patchscope` (the default; sections `source` and `target`),
`intervention` (`prompts` and `intervention`: ablation, steering and patching grids at
TransformerLens sites), `causal_trace` (`prompts` and `trace`: ROME's causal tracing) or `recipe`
(`recipe`: one of the paper's named Patchscopes, `patchscope_core.recipes`).

Three stages, all before any weights load:
1. here, `load_config(path)`: UTF-8, YAML syntax (a key given twice is refused), types (unknown
   keys rejected, layer specs parsed);
2. `sweeps.rows.load_rows(config)`: the prompts, from the config or the files it names;
3. `sweeps.plan`: every setting against each model's config and tokenizer (layer ranges,
   positions, sites, prompt + max_new_tokens against the context; no weights are read).
Every error is a `ConfigError` whose message starts with the field, e.g.
`source.layers: 31 is out of range 0 .. 29 for smollm2-135m (...)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patchscope_core import InputError


class ConfigError(InputError):
    """A sweep config that cannot run; the message starts with the field it is about."""


# ---------------------------------------------------------------- layer specs

_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")


def _parse_layers(value: Any, allow_same: bool) -> str | list[int]:
    """'all', 'same' (targets), 'start:stop:step' (kept as text until the model is known), an
    int, or a list of ints. Ranges are checked later, against each model."""
    if isinstance(value, bool):
        raise ValueError(f"expected 'all', 'start:stop:step' or a list of layers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text == "all" or (allow_same and text == "same"):
            return text
        m = _SLICE.match(text)
        if not m:
            allowed = "'same', 'all'" if allow_same else "'all'"
            raise ValueError(f"expected {allowed}, 'start:stop:step' or a list of layers, got {value!r}")
        start, stop, step = (int(g) if g else None for g in m.groups())
        if any(x is not None and x < 0 for x in (start, stop)):
            raise ValueError(f"{value!r}: start and stop must be >= 0")
        if step is not None and step < 1:
            raise ValueError(f"{value!r}: step must be >= 1")
        return text
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty list of layers")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected integer layers, got {v!r}")
            out.append(v)
        return out
    raise ValueError(f"expected 'all', 'start:stop:step' or a list of layers, got {value!r}")


def expand_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """The layers a parsed spec names for a model with n_layers blocks (unchecked: the caller
    checks each against the model so the error can name the model)."""
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        start, stop, step = (int(g) if g else None for g in _SLICE.match(spec).groups())
        start = 0 if start is None else start
        stop = n_layers if stop is None else stop
        out = list(range(start, stop, step or 1))
        if not out:
            raise ValueError(f"{spec!r} names no layer")
        return out  # a stop past the last layer is caught by the range check, naming the layer
    return list(dict.fromkeys(spec))


def _parse_positions(value: Any, allow_all: bool) -> str | list[int]:
    if isinstance(value, bool):
        raise ValueError(f"expected a list of token positions, got {value!r}")
    if isinstance(value, int):
        return [value]
    if allow_all and value == "all":
        return "all"
    if isinstance(value, (list, tuple)) and value:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected integer positions, got {v!r}")
        return list(dict.fromkeys(value))
    allowed = "'all' or " if allow_all else ""
    raise ValueError(f"expected {allowed}a non-empty list of integer positions, got {value!r}")


# ---------------------------------------------------------------- the config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    prompts: list[str] | None = None
    file: str | None = Field(None, description="CSV, TSV or JSONL; one row per (source, target) pair")
    prompt_column: str = "prompt"
    reference_columns: list[str] | None = Field(
        None, description="file columns carried into the results as ref_<name> (default: every other column)"
    )
    layers: Any = "all"
    positions: Any = [-1]

    @field_validator("layers", mode="after")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _parse_layers(v, allow_same=False)

    @field_validator("positions", mode="after")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        return _parse_positions(v, allow_all=True)

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
    def _one_source(self) -> "SourceConfig":
        if (self.prompts is None) == (self.file is None):
            raise ValueError("give exactly one of source.prompts or source.file")
        return self


class TargetConfig(_Strict):
    prompt: str | None = None
    prompt_column: str | None = Field(None, description="per-row target prompt, a column of source.file")
    layers: Any = "same"
    positions: Any = [-1]

    @field_validator("layers", mode="after")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _parse_layers(v, allow_same=True)

    @field_validator("positions", mode="after")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        return _parse_positions(v, allow_all=False)

    @model_validator(mode="after")
    def _one_prompt(self) -> "TargetConfig":
        if (self.prompt is None) == (self.prompt_column is None):
            raise ValueError("give exactly one of target.prompt or target.prompt_column")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("target.prompt: empty prompt")
        return self


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(20, ge=1)
    stop_at_eos: bool = True
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    top_logprobs: int = Field(10, ge=1, description="how many first-token log-probabilities to keep")

    @model_validator(mode="after")
    def _seed(self) -> "GenerationConfig":
        if self.do_sample and self.seed is None:
            raise ValueError("generation.seed: sampling needs an explicit seed so results can be reproduced")
        return self

    def decoding(self):
        from patchscope_core import Decoding

        return Decoding(
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop_at_eos=self.stop_at_eos,
        )


class ExecutionConfig(_Strict):
    workers: int = Field(2, ge=1, description="Ray actors per model, each holding the model for its lifetime")
    batch_size: int = Field(16, ge=1, description="cells per task (and per generate batch)")
    batch_tokens: int | None = Field(None, ge=1, description="a generate batch holds at most this many tokens "
                                                             "(rows x longest prompt + new tokens); default: no limit")
    gpus_per_worker: float = Field(0, ge=0, description="0: CPU; fractional shares a GPU; >1 spreads the model")
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="CPUs (and torch threads) per worker; auto: a local sweep shares the machine's cores "
                            "among the workers, a sweep that joins a cluster asks 1")

    @field_validator("cpus_per_worker", mode="after")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        if v != "auto" and v <= 0:
            raise ValueError(f"expected 'auto' or a number > 0, got {v!r}")
        return v

    def resolved(self, local: bool) -> "ExecutionConfig":
        """These settings with cpus_per_worker a number: auto gives each of a local sweep's
        workers its share of this machine's cores (at least 1), and 1 on a cluster joined."""
        if self.cpus_per_worker != "auto":
            return self
        import os

        cpus = float(max(1, (os.cpu_count() or 1) // self.workers) if local else 1)
        return self.model_copy(update={"cpus_per_worker": cpus})
    max_in_flight_per_worker: int = Field(2, ge=1, description="tasks queued on one actor at once (back-pressure)")
    device_map: str | None = Field(None, description="accelerate device map; default 'auto' when gpus_per_worker > 1")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_restarts: int = Field(2, ge=-1, description="Ray actor restarts after a crash (-1: forever)")
    max_task_retries: int = Field(2, ge=-1, description="Ray retries of a task whose actor died (-1: forever)")
    placement_timeout_s: float = Field(
        600, gt=0, description="seconds a worker may take to be placed and load its model before it is reported "
                               "and its work goes to the others; with no worker placed by then the sweep stops")
    max_cells: int = Field(10_000_000, ge=1, description="refuse a grid of more cells than this")


class WandbConfig(_Strict):
    project: str = "patchscope-sweeps"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="default runs/<name>")
    wandb: WandbConfig = WandbConfig()


class PromptsConfig(_Strict):
    """The prompts of intervention and causal-trace sweeps: a file (CSV, TSV or JSONL) or rows."""

    file: str | None = None
    rows: list[dict[str, Any]] | None = None
    prompt_column: str = "prompt"
    answer_column: str | None = Field(None, description="the answer whose log-probability is scored")
    subject_column: str | None = Field(None, description="causal_trace: the tokens that get corrupted")
    reference_columns: list[str] | None = Field(None, description="carried into the results as ref_<name>")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptsConfig":
        if (self.file is None) == (self.rows is None):
            raise ValueError("prompts: give exactly one of prompts.file or prompts.rows")
        if self.rows is not None and not self.rows:
            raise ValueError("prompts.rows: empty list of rows")
        return self


def axis(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class InterventionConfig(_Strict):
    """An intervention grid. Lists are grid axes: site, layers, heads, neurons, kind, alpha,
    factor, noise_scale, seed."""

    site: str | list[str] = Field(description="TransformerLens hook names; {layer} takes each of `layers`")
    layers: Any = "all"
    heads: Any = Field(None, description="attn.hook_z: 'all', a head or a list; one cell per head")
    neurons: Any = Field(None, description="mlp.hook_post: a neuron or a list; one cell per neuron")
    positions: Any = Field("all", description="prompt positions, 'prompt', 'generated' or 'all'")
    kind: str | list[str] = "zero"
    alpha: float | list[float] = Field(1.0, description="add: alpha x vector")
    factor: float | list[float] = Field(0.0, description="scale: the factor")
    noise_scale: float | list[float] = Field(3.0, description="noise: x the site's std over the reference prompts")
    seed: int | list[int] = Field(0, description="noise: the seed")
    vector: str | None = Field(None, description="add / replace: a .safetensors or .pt file holding one vector")
    positive: str | list[str] | None = Field(None, description="add: prompts (a list or a file, one a line) ...")
    negative: str | list[str] | None = Field(None, description="... whose mean activations' difference is the vector")
    reference: str | list[str] | None = Field(None, description="mean / noise: prompts; default the sweep's own")
    source: str | None = Field(None, description="resample / replace: the prompt whose values are written")
    source_position: int = Field(-1, description="replace: the source prompt's position")

    @field_validator("layers", mode="after")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _parse_layers(v, allow_same=False)

    @field_validator("heads", "neurons", mode="after")
    @classmethod
    def _units(cls, v: Any) -> Any:
        if v is None or v == "all":
            return v
        values = axis(v)
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise ValueError(f"expected 'all', an integer or a list of integers, got {v!r}")
        return values

    @model_validator(mode="after")
    def _kinds(self) -> "InterventionConfig":
        from patchscope_core import KINDS

        for k in axis(self.kind):
            if k not in KINDS:
                raise ValueError(f"intervention.kind: unknown kind {k!r} (allowed: {', '.join(KINDS)})")
            if k == "add" and self.vector is None and (self.positive is None or self.negative is None):
                raise ValueError("intervention.vector: add needs a vector file, or positive and negative prompts")
            if k in ("replace", "resample") and self.source is None and (k == "resample" or self.vector is None):
                raise ValueError(f"intervention.source: {k} needs a source prompt" + (" or a vector" if k == "replace" else ""))
        for site in axis(self.site):
            if not isinstance(site, str) or not site.strip():
                raise ValueError(f"intervention.site: expected TransformerLens hook names, got {site!r}")
        return self


class TraceConfig(_Strict):
    """Causal tracing (ROME): corrupt the subject's embeddings, restore one clean state per cell."""

    sites: list[Literal["resid_post", "mlp_out", "attn_out"]] = ["resid_post", "mlp_out", "attn_out"]
    layers: Any = "all"
    positions: Any = Field("all", description="prompt positions to restore, or 'all'")
    window: int = Field(10, ge=1, description="mlp_out / attn_out: restore a window of layers centred on l")
    noise: float = Field(3.0, ge=0, description="x the std of the token embeddings over the sweep's prompts")
    samples: int = Field(10, ge=1, description="noise samples averaged per cell")
    seed: int = 0

    @field_validator("layers", mode="after")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return _parse_layers(v, allow_same=False)

    @field_validator("positions", mode="after")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        return _parse_positions(v, allow_all=True)


# ---------------------------------------------------------------- recipes (kind: recipe)


class _RecipeSection(_Strict):
    """What every recipe section takes (`recipe.name` picks the recipe; patchscope_core.recipes),
    and the one parser of its layer fields (`"same"` only where `same_allowed` names the field)."""

    seed: int = Field(0, description="orders windows and subjects, and pairs rows for the shuffled-label control")
    same_allowed: ClassVar[tuple[str, ...]] = ()

    @field_validator("layers", "source_layers", "target_layers", mode="after", check_fields=False)
    @classmethod
    def _layers(cls, v: Any, info) -> Any:
        return _parse_layers(v, allow_same=info.field_name in cls.same_allowed)


class _CorpusSection(_RecipeSection):
    corpus: str = Field("pydoc", description="pydoc (CPython's pydoc_data.topics) or a UTF-8 text file")
    words: int = Field(48, ge=4, description="words per window")
    windows: int = Field(40, ge=1, description="evaluated windows")
    fit_windows: int = Field(200, ge=1, description="windows the maps are fitted on, disjoint from the evaluated ones")


class TokenIdentityRecipe(_CorpusSection):
    name: Literal["token_identity"]
    layers: Any = "all"
    positions: int = Field(5, ge=1, description="evaluated positions per window")
    min_context: int = Field(8, ge=0, description="the first evaluated position (BOS counted)")
    baselines: list[Literal["logit_lens", "tuned_lens"]] = ["logit_lens", "tuned_lens"]
    target_prompt: str = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


class CrossModelRecipe(_CorpusSection):
    name: Literal["cross_model"]
    source_model: str = Field(description="the model M whose states are read; the sweep's models are the targets M*")
    source_layers: Any = "all"
    target_layers: Any = "all"


class AttributeExtractionRecipe(_RecipeSection):
    name: Literal["attribute_extraction"]
    data: str | None = Field(None, description="the LRE data directory (default: the four relations in sweeps/examples/lre)")
    relations: list[str] = Field(min_length=1)
    subjects: int | None = Field(None, ge=1, description="subjects per relation (default: all)")
    contexts: int = Field(1, ge=1, description="source contexts per subject")
    source_layers: Any = "all"
    target_layers: Any = "all"


class EntityDescriptionRecipe(_RecipeSection):
    name: Literal["entity_description"]
    file: str = Field(description="CSV with columns entity, description (and optionally source)")
    source_template: str = "{entity}"
    layers: Any = "all"
    target_layers: Any = "same"
    same_allowed: ClassVar[tuple[str, ...]] = ("target_layers",)
    target_prompt: str = ("Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
                          "multinational major appliance and consumer electronics corporation, x")


class MultiHopRecipe(_RecipeSection):
    name: Literal["multi_hop"]
    file: str = Field(description="CSV with columns first_hop, bridge, second_hop, answer")
    source_layers: Any = "all"
    target_layers: Any = "all"
    source_template: str = Field("{second_hop}", description="the CoT Patchscope's source; the paper's bare phrase")
    target_template: str = Field("{first_hop}", description="its target; vanilla = source + ' ' + target")
    hop1_template: str = Field("{first_hop}", description="the plain first-hop question (must name the bridge)")
    hop2_template: str = Field("{second_hop} {bridge}", description="the plain second-hop question")

    @field_validator("source_template", "target_template", "hop1_template", "hop2_template", mode="after")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(first_hop="", bridge="", second_hop="", answer="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"a template may use {{first_hop}}, {{bridge}}, {{second_hop}} and {{answer}} only ({exc!r})")
        return v


RECIPE_SECTIONS = {c.model_fields["name"].annotation.__args__[0]: c for c in (
    TokenIdentityRecipe, AttributeExtractionRecipe, EntityDescriptionRecipe, CrossModelRecipe, MultiHopRecipe)}
RecipeSection = Annotated[TokenIdentityRecipe | AttributeExtractionRecipe | EntityDescriptionRecipe | CrossModelRecipe
                          | MultiHopRecipe, Field(discriminator="name")]


KIND_SECTIONS = {"patchscope": ("source", "target"), "intervention": ("prompts", "intervention"),
                 "causal_trace": ("prompts", "trace"), "recipe": ("recipe",)}


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["patchscope", "intervention", "causal_trace", "recipe"] = "patchscope"
    models: list[str] = Field(min_length=1)
    source: SourceConfig | None = None
    target: TargetConfig | None = None
    prompts: PromptsConfig | None = None
    intervention: InterventionConfig | None = None
    trace: TraceConfig | None = None
    recipe: RecipeSection | None = None
    generation: GenerationConfig = GenerationConfig()
    execution: ExecutionConfig = ExecutionConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_name(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("name") not in RECIPE_SECTIONS:
            what = f"unknown recipe {v['name']!r}" if "name" in v else "missing"
            raise ValueError(f"recipe.name: {what} (allowed: {', '.join(RECIPE_SECTIONS)})")
        return v

    @model_validator(mode="after")
    def _sections(self) -> "SweepConfig":
        needed = KIND_SECTIONS[self.kind]
        for section in needed:
            if getattr(self, section) is None:
                raise ValueError(f"{section}: a {self.kind} sweep needs a {section} section")
        for section in {s for sections in KIND_SECTIONS.values() for s in sections} - set(needed):
            if getattr(self, section) is not None:
                raise ValueError(f"{section}: not used by a {self.kind} sweep (kind: {self.kind} takes {', '.join(needed)})")
        if self.kind == "causal_trace":
            for col in ("subject_column", "answer_column"):
                if getattr(self.prompts, col) is None:
                    raise ValueError(f"prompts.{col}: a causal_trace sweep needs it")
        return self

    @model_validator(mode="after")
    def _file_columns(self) -> "SweepConfig":
        if self.source is not None and self.target is not None:
            if self.target.prompt_column is not None and self.source.file is None:
                raise ValueError("target.prompt_column: needs source.file (its rows pair each source with its target)")
            if self.source.reference_columns is not None and self.source.file is None:
                raise ValueError("source.reference_columns: needs source.file")
        twice = sorted({m for m in self.models if self.models.count(m) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} listed twice")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}").expanduser()


# ---------------------------------------------------------------- loading


_NAMES_FIELD = re.compile(r"^[A-Za-z_][\w\[\]]*(\.[\w\[\]]+)+: ")


def _loc(loc: tuple) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    if loc[:1] == ("recipe",) and len(loc) == 2 and loc[1] in RECIPE_SECTIONS:
        return list(RECIPE_SECTIONS[loc[1]].model_fields)
    model: Any = SweepConfig
    for key in loc:
        info = getattr(model, "model_fields", {}).get(key)
        if info is None:
            return []
        model = info.annotation
    return list(getattr(model, "model_fields", {}))


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = err["loc"]
        if where[:1] == ("recipe",) and len(where) > 1 and where[1] in RECIPE_SECTIONS:
            where = where[:1] + where[2:]  # the recipe's name is pydantic's union tag, not a key
        loc = _loc(where)
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {err['loc'][-1]!r} (allowed: {', '.join(_allowed_keys(err['loc'][:-1]))})"
        if not loc or _NAMES_FIELD.match(msg):
            lines.append(msg)  # the check already names its field
        else:
            lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any, where: str = "config") -> SweepConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, models, source, target, ...)")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers, so an unquoted `layers: 5:10` is the slice it looks
    like (PyYAML's SafeLoader would read the integer 310)."""


_BASE60 = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _BASE60]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_text(path: Path, field_name: str, encoding: str = "utf-8") -> str:
    """A text file as UTF-8; other bytes are a ConfigError naming the field, the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{field_name}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


def _refuse_duplicate_keys(node: yaml.Node, path: str = "") -> None:
    """A key given twice in one mapping (YAML keeps the last one silently) is an error."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{name}: given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            _refuse_duplicate_keys(value_node, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]")


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    text = read_text(path, "config")
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML ({exc})") from None
    finally:
        loader.dispose()
    return parse_config(data, str(path))

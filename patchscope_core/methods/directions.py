"""Explaining directions (SAE latents, MLP neurons, vectors of your own) with a Patchscope whose
source is a given vector (SelfIE, Chen et al. 2024; Kharlapenko et al. 2024, "Self-explaining
SAE features").

Place in the core: `methods/`, beside `patchscope.py`, on the engine's one path. A write is
`Replace(vector)` (or `Add`) at a site and at every placeholder `X` of an explanation template,
during the prefill with the KV cache on (`Positions(indices=...)` at prompt positions), exactly
as a Patchscope writes f(h); rows of one batch carry different vectors (`forward/dispatch.py`).
The sweep kind `feature_explanation` (sweeps/kinds/) and its worker operation call
`explain_cells`; everything here also works on a loaded engine in a notebook.

Where directions come from:
- an SAE in sparsify's on-disk format (`sparsify.SparseCoder.load_from_disk`, or `load_from_hub`
  with `hub:`): decoder rows `W_dec[i]`; its hookpoint names a Hugging Face module relative to
  the base model (`layers.12`), translated to the bridge's site through the bridge's own
  component mapping (`hookpoint_site`);
- an SAE directory in SAELens's saved format (`cfg.json` with `d_in`, `d_sae`, `hook_name`;
  `sae_weights.safetensors` with `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`),
  read directly: its hook name is a TransformerLens name;
- MLP neurons: neuron i's output direction, the row i of W_out (the module under
  `blocks.{l}.mlp.hook_post`, the down projection, as the bridge maps it);
- a safetensors file of named vectors.

Measures of one written cell (docs/kinds/feature_explanation.md):
- `self_similarity`: cosine between the direction and the residual stream (`hook_resid_post` of
  the last layer) at the placeholder positions of the patched run, averaged over placeholders;
- `entropy`: of the first generated token's distribution under the patch (nats);
- `relevancy` (SelfIE): mean over the generated tokens of log p(token | patched) - log p(token |
  unpatched), both teacher-forced on the same template and generated tokens;
- the direction's logit lens: its top tokens through the final norm and the unembedding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base.errors import PatchscopeError
from ..base.values import nonfinite_index
from ..engine import Engine
from ..forward.hooks import HookContext
from ..interventions.kinds import Add as AddKind
from ..interventions.kinds import Positions
from ..interventions.kinds import Replace as ReplaceKind
from ..interventions.runs import Intervention, ResolvedIntervention, ResolvedRun
from ..models.components import module_boundary
from ..models.info import ModelInfo
from ..models.sites import SITES, ResolvedSite, Site, resid_post, resolve_site
from ..models.tokens import check_context, tokenize

PLACEHOLDER = "X"
_PLACEHOLDER = re.compile(r"(?<![A-Za-z0-9_])X(?![A-Za-z0-9_])")
AUTO_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # `scales: auto`: multiples of the site's typical norm
SELF_SIMILARITY_KEEP = 0.5  # auto: rungs whose self-similarity is at least this share of the ladder's best
# The sites a direction of d_model may sit at (a hookpoint is looked for among them).
_RESIDUAL_FORMS = [f for f, (_, unit) in SITES.items() if unit is None]


# ---------------------------------------------------------------- sources (headers: no weights)


@dataclass(frozen=True)
class SaeHeader:
    """What an SAE's config says, read without its weights."""

    d_in: int
    n_latents: int
    site: str  # the TransformerLens hook name it reads and writes
    form: str  # sparsify | saelens


def hookpoint_site(info: ModelInfo, hookpoint: str, field_name: str) -> str:
    """The TransformerLens site whose value is the output of the Hugging Face module `hookpoint`
    (sparsify's name, relative to the base model: `layers.12`, `layers.12.mlp`), found through
    the bridge's component mapping (`module_boundary`); refused naming `field_name` if none is."""
    if not isinstance(hookpoint, str) or not hookpoint:
        raise PatchscopeError(f"{field_name}: expected a module name such as 'layers.12', got {hookpoint!r}")
    blocks = info.components["blocks"].name
    base = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    wanted = {hookpoint, f"{base}.{hookpoint}" if base else hookpoint}
    for form in _RESIDUAL_FORMS:
        names = [form] if "{l}" not in form else [form.format(l=l) for l in range(info.n_layers)]
        for name in names:
            try:
                module, side, _ = module_boundary(info.components, name)
            except LookupError:
                continue
            if module in wanted and side == "output":
                return name
    raise PatchscopeError(
        f"{field_name}: {info.name} has no module {hookpoint!r} whose output is a residual-width site "
        f"(sparsify names modules of the base model, e.g. 'layers.{info.n_layers - 1}' or "
        f"'layers.{info.n_layers - 1}.mlp'; layers 0 .. {info.n_layers - 1})"
    )


def _read_json(path: Path, field_name: str) -> dict:
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no {path.name} in {str(path.parent)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PatchscopeError(f"{field_name}: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PatchscopeError(f"{field_name}: {path} holds no JSON object")
    return data


def sae_dir(spec: dict[str, Any], field_name: str, weights: bool = False) -> Path:
    """The directory holding the SAE's cfg.json: `path` or `saelens` as given, or for `hub`
    the hookpoint's folder of the hub repository (its cfg.json alone unless `weights`)."""
    if spec.get("hub"):
        from huggingface_hub import snapshot_download

        wanted = f"{spec['hookpoint']}/*" if weights else f"{spec['hookpoint']}/cfg.json"
        try:
            root = Path(snapshot_download(spec["hub"], allow_patterns=wanted))
        except Exception as exc:  # noqa: BLE001 - an unreachable hub or repository is bad input here
            raise PatchscopeError(f"{field_name}.hub: cannot fetch {spec['hub']!r} ({type(exc).__name__})") from None
        return root / spec["hookpoint"]
    key = "saelens" if spec.get("saelens") else "path"
    path = Path(str(spec[key])).expanduser()
    if not path.is_dir():
        raise PatchscopeError(f"{field_name}.{key}: no such directory {str(path)!r}")
    return path


def sae_header(spec: dict[str, Any], info: ModelInfo, field_name: str = "features.sae") -> SaeHeader:
    """The SAE's width, latent count and site, from its cfg.json only; refuses an SAE whose site
    the model does not have or whose width is not the site's."""
    folder = sae_dir(spec, field_name)
    cfg = _read_json(folder / "cfg.json", field_name)
    if spec.get("saelens"):
        d_in, n, hook = cfg.get("d_in"), cfg.get("d_sae"), cfg.get("hook_name")
        if not isinstance(hook, str):
            raise PatchscopeError(f"{field_name}.saelens: cfg.json has no hook_name")
        site = resolve_site(Site(hook), info, f"{field_name}.saelens: hook_name").site.hook
        form = "saelens"
    else:
        if not spec.get("hookpoint"):
            raise PatchscopeError(f"{field_name}.hookpoint: a sparsify SAE needs the module it reads ('layers.12')")
        site = hookpoint_site(info, spec["hookpoint"], f"{field_name}.hookpoint")
        d_in = cfg.get("d_in")
        n = cfg.get("num_latents") or (d_in or 0) * cfg.get("expansion_factor", 0)
        form = "sparsify"
    if not isinstance(d_in, int) or not isinstance(n, int) or n < 1:
        raise PatchscopeError(f"{field_name}: {folder / 'cfg.json'} does not give the SAE's width and latent count")
    if d_in != info.d_model:
        raise PatchscopeError(
            f"{field_name}: the SAE reads vectors of width {d_in}, but {site} of {info.name} is {info.d_model} wide "
            "(an SAE for another model?)"
        )
    return SaeHeader(d_in, n, site, form)


def read_vectors(path: str | Path, width: int, field_name: str = "features.vectors.file") -> dict[str, torch.Tensor]:
    """Named vectors from a safetensors file: each 1-D of `width`, finite."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no such file {str(path)!r}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable file is bad input
        raise PatchscopeError(f"{field_name}: cannot read {path} as safetensors ({type(exc).__name__})") from None
    if not tensors:
        raise PatchscopeError(f"{field_name}: {path} holds no tensor")
    out = {}
    for name in sorted(tensors):
        v = tensors[name]
        if v.ndim != 1 or v.numel() != width:
            raise PatchscopeError(f"{field_name}: vector {name!r} has shape {list(v.shape)}; the site takes [{width}]")
        if not v.is_floating_point() or nonfinite_index(v) is not None:
            raise PatchscopeError(f"{field_name}: vector {name!r} holds NaN or infinite values")
        if float(v.float().norm()) == 0:
            raise PatchscopeError(f"{field_name}: vector {name!r} is zero and has no direction")
        out[name] = v.float()
    return out


def placeholders(info: ModelInfo, template: str, field_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(token ids as the model sees the template, the positions of its placeholder tokens): every
    standalone `X` must be one token of its own (a leading space allowed)."""
    spans = [m.span() for m in _PLACEHOLDER.finditer(template)]
    if not spans:
        raise PatchscopeError(f"{field_name}: {template[:50]!r} has no placeholder {PLACEHOLDER!r} to write at")
    ids = tokenize(info, template, field_name)
    enc = info.tokenizer(template, add_special_tokens=False, return_offsets_mapping=True)
    bos = len(ids) - len(enc["input_ids"])
    positions = []
    for start, end in spans:
        hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        text = template[enc["offset_mapping"][hit[0]][0] : enc["offset_mapping"][hit[0]][1]] if len(hit) == 1 else ""
        if len(hit) != 1 or text.strip() != PLACEHOLDER:
            raise PatchscopeError(
                f"{field_name}: the placeholder at character {start} of {template[:50]!r} is not a token of its own "
                f"for {info.name}; put spaces or quotes around it"
            )
        positions.append(bos + hit[0])
    return ids, tuple(positions)


# ---------------------------------------------------------------- directions (weights)


class Sae:
    """An SAE's decoder rows and encoder: sparsify's `SparseCoder` or a SAELens directory."""

    def __init__(self, spec: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.spec = spec
        folder = sae_dir(spec, "features.sae", weights=True)  # from the hub: SparseCoder.load_from_hub's files
        if spec.get("saelens"):
            from safetensors.torch import load_file

            w = load_file(str(folder / "sae_weights.safetensors"))
            self.coder = None
            self.W_dec = w["W_dec"].float().to(device)
            self.W_enc, self.b_enc = w["W_enc"].float().to(device), w["b_enc"].float().to(device)
            self.b_dec = w.get("b_dec", torch.zeros(self.W_dec.shape[1])).float().to(device)
        else:
            from sparsify import SparseCoder

            self.coder = SparseCoder.load_from_disk(folder, device=device)
            self.W_dec = self.coder.W_dec.detach().float()

    @torch.no_grad()
    def max_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[n_latents]: each latent's largest activation over the rows of x [tokens, d_in]
        (sparsify's own `encode`, top-k; SAELens: ReLU(W_enc (x - b_dec) + b_enc))."""
        if self.coder is not None:
            enc = self.coder.encode(x.to(self.coder.dtype))
            out = torch.zeros(self.coder.num_latents)
            return out.scatter_reduce(0, enc.top_indices.flatten().cpu(), enc.top_acts.flatten().float().cpu(), "amax")
        acts = torch.relu((x.float() - self.b_dec) @ self.W_enc + self.b_enc)
        return acts.max(dim=0).values.cpu()


def neuron_directions(engine: Engine, layer: int) -> torch.Tensor:
    """[d_mlp, d_model]: W_out of block `layer`'s MLP, row i neuron i's output direction. The
    module is the one the bridge puts `mlp.hook_post` on (its input is the neurons)."""
    site = resolve_site(Site(f"blocks.{layer}.mlp.hook_post"), engine.info, "features.neurons.layers")
    module = engine.modules.get_submodule(site.module)
    w = module.weight.detach().float()
    return w.T if isinstance(module, torch.nn.Linear) else w  # Linear: [out, in]; GPT-2's Conv1D: [in, out]


def random_direction(site: str, seed: int, width: int) -> torch.Tensor:
    """The control: a seeded Gaussian direction per site (norm-matched when written: every
    written vector has norm scale x the site's typical norm)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, site)))
    return torch.randn(width, generator=g)


@torch.no_grad()
def typical_norm(engine: Engine, site: ResolvedSite, rows: Sequence[Sequence[int]]) -> float:
    """The median norm of the site's activations over the rows' tokens but the first (BOS, and
    the first token's outsized norm), unpatched: the unit `scales` are multiples of."""
    values = engine.reader.read([site], [tuple(r) for r in rows], purpose="norms", keep=False)
    norms = torch.cat([values[(site.site.hook, tuple(r))][1:].float().norm(dim=-1) for r in rows])
    return float(norms.median())


@torch.no_grad()
def logit_lens(engine: Engine, vectors: torch.Tensor, k: int = 5) -> list[list[int]]:
    """Each vector's top-k tokens through the final norm and the unembedding (the bridge's
    `ln_final` and `unembed` modules)."""
    components = engine.info.components
    norm = engine.modules.get_submodule(components["ln_final"].name)
    unembed = engine.modules.get_submodule(components["unembed"].name)
    p = next(unembed.parameters())
    logits = unembed(norm(vectors.to(p.device, p.dtype)[:, None, :]))[:, 0].float()
    return logits.topk(k, dim=-1).indices.tolist()


@torch.no_grad()
def top_latents(engine: Engine, sae: Sae, site: ResolvedSite, prompts: Sequence[str], k: int) -> list[int]:
    """The k latents with the largest activation anywhere in `prompts` (every token but BOS),
    most active first (ties: lower id)."""
    rows = [tokenize(engine.info, p, "features.top.prompts") for p in prompts]
    values = engine.reader.read([site], rows, purpose="top_latents", keep=False)
    bos = 1 if engine.info.prepend_bos else 0
    x = torch.cat([values[(site.site.hook, r)][bos:] for r in rows]).float()
    best = sae.max_activations(x)
    order = sorted(range(len(best)), key=lambda i: (-float(best[i]), i))
    return order[:k]


# ---------------------------------------------------------------- the write and the measures


@dataclass(frozen=True)
class Explanation:
    """One written cell: `vector` (already scaled) at `site` and every placeholder position of
    `prompt_ids`, replaced or added; `direction` is what self-similarity compares to."""

    prompt_ids: tuple[int, ...]
    positions: tuple[int, ...]
    site: ResolvedSite
    vector: torch.Tensor
    direction: torch.Tensor
    write: str = "replace"
    max_new_tokens: int = 16


@dataclass
class Explained:
    generated_token_ids: list[int]
    generated_text: str
    self_similarity: float
    entropy: float
    relevancy: float
    patched_logprobs: list[float]
    clean_logprobs: list[float]


def _runs(requests: Sequence[Explanation], engine: Engine, score: bool, answers=None, patched=True):
    runs, actions = [], []
    for i, r in enumerate(requests):
        kind = ReplaceKind(vector=r.vector) if r.write == "replace" else AddKind(alpha=1.0, vector=r.vector)
        write = Intervention(r.site.site, kind, Positions(indices=r.positions))
        ivs = (ResolvedIntervention(write, r.site, write.positions),) if patched else ()
        answer = tuple(answers[i]) if score else ()
        runs.append(ResolvedRun(None, r.prompt_ids, answer, ivs, 0 if score else r.max_new_tokens))
        actions.append([kind.prepare(r.site, engine.reader)] if patched else [])
    return runs, actions


@torch.no_grad()
def _score(engine: Engine, runs, actions, late: ResolvedSite | None, positions, batch_size: int):
    """Teacher-forced log-probabilities of each run's answer, the first answer token's entropy
    and (with `late`) the late residual at each run's placeholder positions."""
    out = []
    for start in range(0, len(runs), batch_size):
        batch = runs[start : start + batch_size]
        where = positions[start : start + batch_size]
        got: dict[int, torch.Tensor] = {}

        def read(x: torch.Tensor, ctx: HookContext, where=where, got=got) -> None:
            for b, pos in enumerate(where):
                cols = [int((ctx.positions[b] == p).nonzero()[0]) for p in pos]
                got[b] = x[b, cols].float()

        hooks = engine._dispatch_hooks(batch, actions[start : start + batch_size])
        if late is not None:
            hooks = hooks + [(late, read)]
        keep = max(len(r.answer_ids) for r in batch) + 1
        logits, _ = engine._forward(batch, hooks, keep)
        logprobs = torch.log_softmax(logits, dim=-1)
        for b, r in enumerate(batch):
            k = len(r.answer_ids)
            first = logprobs[b, keep - k - 1]
            predicted = logprobs[b, keep - k - 1 : keep - 1].gather(
                1, torch.tensor(r.answer_ids)[:, None].to(first.device)
            )
            entropy = float(-(first.exp() * first).sum())
            out.append((predicted[:, 0].tolist(), entropy, got.get(b)))
    return out


@torch.no_grad()
def _generate(engine: Engine, runs, actions, late: ResolvedSite, positions, batch_size: int):
    """The patched generation, measured in its own forward passes: per run (generated ids, the
    log-probability of each generated token as it was chosen, the first token's entropy, the
    late residual at the placeholders in the prefill). Batches of rows of similar length."""
    order = sorted(range(len(runs)), key=lambda i: len(runs[i].prompt_ids))
    out: list = [None] * len(runs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [runs[i] for i in idx]
        where = [positions[i] for i in idx]
        got: dict[int, torch.Tensor] = {}
        steps: list[torch.Tensor] = []

        def read(x: torch.Tensor, ctx: HookContext, where=where, got=got) -> None:
            if ctx.step == 0:  # the prefill: where the placeholders are
                for b, pos in enumerate(where):
                    cols = [int((ctx.positions[b] == p).nonzero()[0]) for p in pos]
                    got[b] = x[b, cols].float()

        rows = len(batch)

        def keep(module, args, output, n=rows, steps=steps) -> None:
            if output.logits.shape[0] == n:  # not a shared prefix's own pass (one row)
                steps.append(torch.log_softmax(output.logits[:, -1].float(), dim=-1))

        hooks = engine._dispatch_hooks(batch, [actions[i] for i in idx]) + [(late, read)]
        handle = engine.modules.register_forward_hook(keep)
        try:
            outputs = engine._generate(batch, hooks)
        finally:
            handle.remove()
        for b, (i, o) in enumerate(zip(idx, outputs)):
            logprobs = [float(steps[t][b, token]) for t, token in enumerate(o.generated)]
            first = steps[0][b]
            out[i] = (o.generated, logprobs, float(-(first.exp() * first).sum()), got[b])
    return out


@torch.no_grad()
def explain(engine: Engine, requests: Sequence[Explanation], batch_size: int = 32) -> list[Explained]:
    """Generate from each request under its write (KV cache on, batched), measuring in the same
    forward passes (self-similarity in the prefill, entropy and the tokens' log-probabilities at
    each step); then one teacher-forced pass without the write over the same tokens (relevancy)."""
    if not requests:
        return []
    for i, r in enumerate(requests):
        check_context(len(r.prompt_ids), r.max_new_tokens, engine.info, f"explanations[{i}]")
    runs, actions = _runs(requests, engine, score=False)
    late = resolve_site(Site(resid_post(engine.info.n_layers - 1)), engine.info, "late layer")
    positions = [r.positions for r in requests]
    patched = _generate(engine, runs, actions, late, positions, batch_size)
    generated = [g for g, _, _, _ in patched]
    c_runs, c_actions = _runs(requests, engine, score=True, answers=generated, patched=False)
    clean = _score(engine, c_runs, c_actions, None, positions, batch_size)
    tok = engine.model.tokenizer
    out = []
    for r, (gen, p_lp, entropy, resid), (c_lp, _, _) in zip(requests, patched, clean):
        d = r.direction.float().to(resid.device)
        sims = torch.nn.functional.cosine_similarity(resid, d[None, :], dim=-1)
        relevancy = sum(a - b for a, b in zip(p_lp, c_lp)) / len(p_lp)
        out.append(
            Explained(
                gen,
                tok.decode(gen, skip_special_tokens=True),
                float(sims.mean()),
                entropy,
                relevancy,
                p_lp,
                c_lp,
            )
        )
    return out


def choose_scale(self_similarity: Sequence[float], entropy: Sequence[float]) -> int:
    """The rung `scales: auto` picks (Kharlapenko et al.: the scale where the model still keeps
    the feature, self-similarity high, and says something definite, first-token entropy low):
    of the rungs whose self-similarity is at least SELF_SIMILARITY_KEEP x the ladder's best,
    the one of lowest entropy (ties: the smaller scale)."""
    best = max(self_similarity)
    keep = [i for i, s in enumerate(self_similarity) if s >= SELF_SIMILARITY_KEEP * best] if best > 0 else []
    keep = keep or list(range(len(entropy)))
    return min(keep, key=lambda i: (entropy[i], i))


def mentions(text: str, tokens: Sequence[str], ignore: str = "") -> bool:
    """Whether `text` contains one of `tokens` as a word (case-insensitive; tokens of fewer than
    two letters or digits are skipped, and so are the words of `ignore`, the explanation's
    template: an explanation that echoes its template's "the meaning of the word" is no evidence
    for a logit-lens token " the" or " of")."""
    words = set(re.findall(r"\w+", text.lower())) - set(re.findall(r"\w+", ignore.lower()))
    return any((t := re.sub(r"\W", "", s.lower())) and len(t) >= 2 and t in words for s in tokens)


# ---------------------------------------------------------------- a sweep's cells (plain data)

_SAES: dict[tuple[int, str], Sae] = {}  # per engine and SAE: loaded once by a worker
_TOPS: dict[tuple[int, str], list[int]] = {}


def _sae(engine: Engine, spec: dict) -> Sae:
    key = (id(engine), json.dumps(spec, sort_keys=True))
    if key not in _SAES:
        _SAES.clear()  # one SAE held at a time
        _SAES[key] = Sae(spec, device="cpu")
    return _SAES[key]


def _direction(engine: Engine, source: dict, cell: dict, cache: dict) -> tuple[Any, torch.Tensor]:
    """(the feature as stored: a latent id, a neuron id, a vector's name, 'random'; its direction)."""
    kind = cell["source"]
    if kind == "control":
        return "random", random_direction(cell["site"], source.get("seed", 0), engine.info.d_model)
    if kind == "vector":
        if "vectors" not in cache:
            cache["vectors"] = read_vectors(source["file"], engine.info.d_model)
        return cell["feature"], cache["vectors"][cell["feature"]]
    if kind == "neuron":
        layer = cell["feature_layer"]
        if ("neurons", layer) not in cache:
            cache[("neurons", layer)] = neuron_directions(engine, layer)
        return cell["feature"], cache[("neurons", layer)][cell["feature"]]
    sae = _sae(engine, source["sae"])
    feature = cell["feature"]
    if cell.get("rank") is not None:  # top: {k, prompts}: the rank's latent on the prompts
        key = (id(engine), json.dumps([source["sae"], source["top"]], sort_keys=True))
        if key not in _TOPS:
            site = resolve_site(Site(cell["feature_site"]), engine.info, "features.sae")
            _TOPS[key] = top_latents(engine, sae, site, source["top"]["prompts"], source["top"]["k"])
        feature = _TOPS[key][cell["rank"]]
    return feature, sae.W_dec[feature]


@torch.no_grad()
def explain_cells(engine: Engine, payload: dict[str, Any], batch_size: int = 32) -> list[dict[str, Any]]:
    """A `feature_explanation` task's records, one per cell, in order. payload: `source` (where
    directions come from), `templates`, `write`, `max_new_tokens`, `logit_lens_k`, `cells`
    (dicts: source, feature, rank, feature_layer, feature_site, site, template, scale). The
    written vector is scale x the site's typical norm (on the cell's template) x the unit direction;
    `chosen` marks, per (feature, template, site), the scale `choose_scale` picks."""
    info, source, cache = engine.info, payload["source"], {}
    templates = [placeholders(info, t, "explanation.templates") for t in payload["templates"]]
    norms: dict[tuple[str, int], float] = {}
    requests, meta = [], []
    for cell in payload["cells"]:
        site = resolve_site(Site(cell["site"]), info, "explanation.layers")
        ids, positions = templates[cell["template"]]
        where = (cell["site"], cell["template"])
        if where not in norms:
            norms[where] = typical_norm(engine, site, [ids])
        feature, d = _direction(engine, source, cell, cache)
        unit = d.float() / d.float().norm()
        vector = unit * cell["scale"] * norms[where]
        requests.append(Explanation(ids, positions, site, vector, unit, payload["write"], payload["max_new_tokens"]))
        meta.append((feature, unit, float(vector.norm())))
    results = explain(engine, requests, batch_size)
    lens = logit_lens(engine, torch.stack([u for _, u, _ in meta]), payload.get("logit_lens_k", 5))
    tok = engine.model.tokenizer
    records = []
    for cell, (feature, _, norm), res, top in zip(payload["cells"], meta, results, lens):
        words = [tok.decode([t]) for t in top]
        records.append(
            {
                "feature": feature,
                "norm": norm,
                "site_norm": norms[(cell["site"], cell["template"])],
                "generated_token_ids": res.generated_token_ids,
                "generated_text": res.generated_text,
                "self_similarity": res.self_similarity,
                "entropy": res.entropy,
                "relevancy": res.relevancy,
                "logit_lens_token_ids": top,
                "logit_lens_tokens": words,
                "matches_logit_lens": mentions(res.generated_text, words, payload["templates"][cell["template"]]),
            }
        )
    groups: dict[tuple, list[int]] = {}
    for i, (cell, rec) in enumerate(zip(payload["cells"], records)):
        groups.setdefault((cell["source"], str(rec["feature"]), cell["template"], cell["site"]), []).append(i)
    for members in groups.values():
        pick = choose_scale([records[i]["self_similarity"] for i in members], [records[i]["entropy"] for i in members])
        for j, i in enumerate(members):
            records[i]["chosen"] = j == pick
    return records


__all__ = [
    "AUTO_LADDER",
    "Explained",
    "Explanation",
    "PLACEHOLDER",
    "Sae",
    "SaeHeader",
    "choose_scale",
    "explain",
    "explain_cells",
    "hookpoint_site",
    "logit_lens",
    "mentions",
    "neuron_directions",
    "placeholders",
    "random_direction",
    "read_vectors",
    "sae_header",
    "top_latents",
    "typical_norm",
]

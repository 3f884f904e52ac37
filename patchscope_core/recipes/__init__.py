"""The paper's Patchscopes as recipes (Ghandeharioun et al., ICML 2024, §4.1-§5), with their
metrics and baselines; no Ray, no W&B (a sweep runs them with `kind: recipe`).

A recipe is a frozen dataclass of settings that turns input rows into `Probe`s (a Patchscope,
a lens on a hidden state, or the model's plain answer to a prompt), and a metric;
`RecipeRunner` runs probes on a `PatchscopeEngine` and scores them; `run_recipe` does both:

    from patchscope_core import PatchscopeEngine, load_model
    from patchscope_core.recipes import TokenIdentity, corpus_windows, pydoc_text, run_recipe
    engine = PatchscopeEngine(load_model("smollm2-135m"), name="smollm2-135m")
    evaluated, fit = corpus_windows(pydoc_text(), n_eval=40, n_fit=200)
    results = run_recipe(engine, TokenIdentity(layers=tuple(range(30))), [{"text": w} for w in evaluated], fit)

| recipe | paper | rows | metric |
| --- | --- | --- | --- |
| `token_identity` | §4.1 | windows of text | precision@1, surprisal; logit lens, tuned lens |
| `attribute_extraction` | §4.2 | LRE facts | object in the generation; plain question; shuffled-label control |
| `entity_description` | §4.4 | entities with references | RougeL; shuffled-label control |
| `cross_model` | §4.5 | windows of text | precision@1 through a least-squares affine map |
| `multi_hop` | §5 | two-hop chains | answer in the generation; hop1, hop2, vanilla; control |
"""

from .attributes import AttributeExtraction, load_lre
from .entities import ENTITY_PROMPT, EntityDescription, load_entities
from .lenses import final_logprobs, fit_affine, fit_affine_maps
from .metrics import contains_answer, description_of, precision_at_1, rouge_l, shuffled_labels, surprisal
from .multihop import MultiHop, load_chains
from .next_token import IDENTITY_PROMPT, CrossModel, TokenIdentity, corpus_windows, positions_in, pydoc_text
from .probes import METHODS, METRICS, Probe, Recipe, RecipeRunner, run_recipe

RECIPES: dict[str, type[Recipe]] = {
    r.name: r for r in (TokenIdentity, AttributeExtraction, EntityDescription, CrossModel, MultiHop)
}

__all__ = [
    "AttributeExtraction",
    "CrossModel",
    "ENTITY_PROMPT",
    "EntityDescription",
    "IDENTITY_PROMPT",
    "METHODS",
    "METRICS",
    "MultiHop",
    "Probe",
    "RECIPES",
    "Recipe",
    "RecipeRunner",
    "TokenIdentity",
    "contains_answer",
    "corpus_windows",
    "description_of",
    "final_logprobs",
    "fit_affine",
    "fit_affine_maps",
    "load_chains",
    "load_entities",
    "load_lre",
    "positions_in",
    "precision_at_1",
    "pydoc_text",
    "rouge_l",
    "run_recipe",
    "shuffled_labels",
    "surprisal",
]

"""The recipes on the real SmolLM2-135M: the token-identity Patchscope recovers common words at an
early layer, and cross-model patching of SmolLM2 into itself fits the identity at l* = l."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import InterventionRun, Patchscope, PatchscopeEngine, Source, Target
from patchscope_core.recipes import IDENTITY_PROMPT, CrossModel, RecipeRunner, corpus_windows, pydoc_text

pytestmark = pytest.mark.smollm2

WORDS = ["apple", "house", "water", "music", "table", "garden", "river", "doctor", "window", "money", "city", "book"]


def test_token_identity_recovers_common_words_at_an_early_layer(smollm2):
    """'Yesterday we talked for a long time about the apple', read at 'apple' (one token, after
    context) and layer 2, patched into 'cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?' at '?':
    the target continues '? -> apple'. Without the patch it names none of the words."""
    engine = PatchscopeEngine(smollm2, name="smollm2-135m")
    tok = smollm2.tokenizer
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    specs = [
        Patchscope(
            Source(f"Yesterday we talked for a long time about the {w}", 2, -1),
            Target(IDENTITY_PROMPT, 2, (-1,)),
            max_new_tokens=2,
        )
        for w in WORDS
    ]
    results = engine.run(specs, batch_size=len(specs))
    arrow = tok(" ->", add_special_tokens=False)["input_ids"]
    assert [r.generated_token_ids for r in results] == [arrow + i for i in ids]
    (plain,) = engine.run_interventions([InterventionRun(IDENTITY_PROMPT, (), None, 2)], clean=False)
    assert not any(w in plain.generated_text for w in WORDS)


def test_cross_model_into_itself_fits_the_identity_and_keeps_the_prediction(smollm2):
    engine = PatchscopeEngine(smollm2, name="smollm2-135m")
    evaluated, fit = corpus_windows(pydoc_text(), words=48, n_eval=4, n_fit=30, seed=1)
    recipe = CrossModel(source_layers=(6,), target_layers=(6, 12))
    runner = RecipeRunner(engine, fit, recipe.pairs(30), batch_size=16)
    probes = recipe.build([{"text": w} for w in evaluated], lambda p: 0)
    results = runner.run(probes, "next_token")
    same = runner.maps[(6, 6, False)]
    n = sum(len(smollm2.to_tokens(t)[0]) - 1 for t in fit)
    assert n > 2 * 577  # more vectors than twice the unknowns of each output
    assert torch.allclose(same.W, torch.eye(576), atol=1e-6) and same.b.abs().max() < 1e-5
    at_same = [o["score"] for p, o in zip(probes, results) if p.target.layer == 6]
    assert at_same == [1.0] * 4  # the state written back where it was read: the model's own prediction

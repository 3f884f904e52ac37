"""Activation patching equals TransformerLens's own patching functions on the bridge, its
identities hold, work is shared (counted), and bad input fails before any weights load."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from patchscope_core import Engine, InputError, model_info
from patchscope_core.methods.patcher import Patcher
from patchscope_core.methods.patching import Cell, Pair, check_pair, make_cells

TINY_PAIR = Pair("The fox jumps over the", "The fix jumps over the", " dog", " cat")
IOI_PAIR = Pair(
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    " Mary",
    " John",
)

# (TransformerLens function, our site, positions, per head)
GRIDS = {
    "resid_pre": (tlp.get_act_patch_resid_pre, "blocks.{layer}.hook_resid_pre", "each"),
    "attn_out": (tlp.get_act_patch_attn_out, "blocks.{layer}.hook_attn_out", "each"),
    "mlp_out": (tlp.get_act_patch_mlp_out, "blocks.{layer}.hook_mlp_out", "each"),
    "z_by_pos": (tlp.get_act_patch_attn_head_out_by_pos, "blocks.{layer}.attn.hook_z", "each"),
    "z_all_pos": (tlp.get_act_patch_attn_head_out_all_pos, "blocks.{layer}.attn.hook_z", "all"),
    "v_by_pos": (tlp.get_act_patch_attn_head_v_by_pos, "blocks.{layer}.attn.hook_v", "each"),
    "q_by_pos": (tlp.get_act_patch_attn_head_q_by_pos, "blocks.{layer}.attn.hook_q", "each"),
    "k_all_pos": (tlp.get_act_patch_attn_head_k_all_pos, "blocks.{layer}.attn.hook_k", "all"),
}
LLAMA_ONLY = ("v_by_pos", "q_by_pos", "k_all_pos")  # GPT-2's q/k/v are split from c_attn: no module boundary


def logit_diff_of(checked):
    def metric(logits):
        return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

    return metric


def tokens(checked):
    return torch.tensor([checked.clean_ids]), torch.tensor([checked.corrupted_ids])


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {name: Engine(m, name=name) for name, m in tiny_models.items()}


def grid(result, direction):
    return torch.tensor([c.patched for c in result.cells if c.direction == direction])


@pytest.mark.parametrize(
    "model,name", [("tiny-llama", g) for g in GRIDS] + [("tiny-gpt2", g) for g in GRIDS if g not in LLAMA_ONLY]
)
def test_grid_equals_transformer_lens_both_directions(engines, model, name):
    engine = engines[model]
    fn, site, positions = GRIDS[name]
    checked = check_pair(TINY_PAIR, engine.info)
    clean, corrupted = tokens(checked)
    cells = make_cells(engine.info, len(checked.clean_ids), [site], positions=positions)
    result = Patcher(engine).patch(TINY_PAIR, cells, directions=("denoising", "noising"))
    bridge, metric = engine.model, logit_diff_of(checked)
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        _, corrupted_cache = bridge.run_with_cache(corrupted)
        denoising = fn(bridge, corrupted, clean_cache, metric).flatten()
        noising = fn(bridge, clean, corrupted_cache, metric).flatten()
    assert grid(result, "denoising") == pytest.approx(denoising.tolist(), abs=1e-4)
    assert grid(result, "noising") == pytest.approx(noising.tolist(), abs=1e-4)
    assert result.clean_values["logit_diff"] == pytest.approx(float(metric(bridge(clean).detach())), abs=1e-4)
    assert result.corrupted_values["logit_diff"] == pytest.approx(float(metric(bridge(corrupted).detach())), abs=1e-4)


def test_every_position_of_resid_pre_at_layer_0_is_the_source_run(engines):
    engine = engines["tiny-llama"]
    result = Patcher(engine).patch(TINY_PAIR, [Cell("hook_resid_pre", 0, None)], directions=("denoising", "noising"))
    den, noi = result.cells
    assert den.patched == pytest.approx(result.clean_values["logit_diff"], abs=1e-5)
    assert den.recovered == pytest.approx(1.0, abs=1e-4)
    assert noi.patched == pytest.approx(result.corrupted_values["logit_diff"], abs=1e-5)
    assert noi.recovered == pytest.approx(0.0, abs=1e-4)


def test_patching_what_the_base_run_holds_gives_the_base_run_and_is_not_run(engines):
    engine = engines["tiny-llama"]
    checked = check_pair(TINY_PAIR, engine.info)
    first_diff = next(i for i, (a, b) in enumerate(zip(checked.clean_ids, checked.corrupted_ids)) if a != b)
    assert first_diff > 1
    cells = [Cell("hook_resid_post", l, p) for l in range(engine.info.n_layers) for p in range(first_diff)]
    before = dict(engine.counts)
    result = Patcher(engine).patch(TINY_PAIR, cells, directions=("denoising",))
    assert engine.counts["patch_unchanged"] - before.get("patch_unchanged", 0) == len(cells)
    assert engine.counts["patch_rows"] == before.get("patch_rows", 0)
    want = float(logit_diff_of(checked)(engine.model(torch.tensor([checked.corrupted_ids])).detach()))
    assert all(c.patched == pytest.approx(want, abs=1e-4) and c.recovered == 0.0 for c in result.cells)


def test_a_batch_equals_its_rows_one_at_a_time_and_each_pair_runs_once(engines):
    engine = engines["tiny-llama"]
    n = len(check_pair(TINY_PAIR, engine.info).clean_ids)
    cells = make_cells(engine.info, n, ["attn.hook_z", "hook_mlp_out", "attn.hook_k"], window=3)
    metrics = ("logit_diff", "logprob", "prob", "kl")
    before = dict(engine.counts)
    batched = Patcher(engine, batch_size=64).patch(TINY_PAIR, cells, ("denoising", "noising"), metrics)
    assert engine.counts["patch_clean"] - before.get("patch_clean", 0) == 1
    assert engine.counts["patch_corrupted"] - before.get("patch_corrupted", 0) == 1
    rows = engine.counts["patch_rows"] - before.get("patch_rows", 0)
    assert 0 < rows < len(cells) * 2
    single = Patcher(engine, batch_size=1).patch(TINY_PAIR, cells, ("denoising", "noising"), metrics)
    assert [c.patched for c in batched.cells] == pytest.approx([c.patched for c in single.cells], abs=1e-5)


def test_window_and_every_metric_equal_the_bridge_with_hooks(engines):
    """attn_out at layer 2 with window 3 (layers 1, 2, 3) at one position, denoising: the bridge's
    own run_with_hooks writing the clean values there, teacher-forced over the answer."""
    engine = engines["tiny-llama"]
    pair = Pair(TINY_PAIR.clean, TINY_PAIR.corrupted, " dog runs", " cat")
    checked = check_pair(pair, engine.info, ("logprob",))
    p = len(checked.clean_ids) - 2
    result = Patcher(engine).patch(
        pair, [Cell("hook_attn_out", 2, p, window=3)], ("denoising",), ("logit_diff", "logprob", "prob", "kl")
    )
    got = {c.metric: c.patched for c in result.cells}
    bridge, answer = engine.model, list(checked.answer_ids)
    with torch.no_grad():
        clean_logits, cache = bridge.run_with_cache(torch.tensor([list(checked.clean_ids) + answer[:-1]]))

        def write(x, hook):
            x = x.clone()
            x[:, p] = cache[hook.name][:, p]
            return x

        logits = bridge.run_with_hooks(
            torch.tensor([list(checked.corrupted_ids) + answer[:-1]]),
            fwd_hooks=[(f"blocks.{l}.hook_attn_out", write) for l in (1, 2, 3)],
        )[0].float()
    m = len(checked.clean_ids)
    lp = torch.log_softmax(logits, -1)
    clean_lp = torch.log_softmax(clean_logits[0, m - 1].float(), -1)
    assert got["logit_diff"] == pytest.approx(
        float(logits[m - 1, answer[0]] - logits[m - 1, checked.wrong_id]), abs=1e-4
    )
    assert got["logprob"] == pytest.approx(sum(float(lp[m - 1 + j, t]) for j, t in enumerate(answer)), abs=1e-4)
    assert got["prob"] == pytest.approx(float(lp[m - 1, answer[0]].exp()), abs=1e-5)
    assert got["kl"] == pytest.approx(float((clean_lp.exp() * (clean_lp - lp[m - 1])).sum()), abs=1e-4)
    assert len(answer) > 1 and result.clean_values["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_neuron_of_mlp_hook_post_equals_the_bridge_with_hooks(engines):
    engine = engines["tiny-llama"]
    checked = check_pair(TINY_PAIR, engine.info)
    m = len(checked.clean_ids)
    cells = make_cells(engine.info, m, ["mlp.hook_post"], layers=[1], positions=[-1], neurons=[5, 77])
    result = Patcher(engine).patch(TINY_PAIR, cells, ("noising",))
    bridge, metric = engine.model, logit_diff_of(checked)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([checked.corrupted_ids]))
        for cell, got in zip(cells, result.cells):

            def write(x, hook, n=cell.neuron):
                x = x.clone()
                x[:, m - 1, n] = cache[hook.name][:, m - 1, n]
                return x

            logits = bridge.run_with_hooks(
                torch.tensor([checked.clean_ids]), fwd_hooks=[("blocks.1.mlp.hook_post", write)]
            )
            assert got.patched == pytest.approx(float(metric(logits)), abs=1e-4)
    assert result.cells[0].patched != pytest.approx(result.cells[1].patched, abs=1e-7)


def test_generation_keeps_the_patch_under_the_cache(engines):
    """A patched run's continuation equals greedy uncached decoding with the patch re-applied."""
    engine = engines["tiny-gpt2"]
    checked = check_pair(TINY_PAIR, engine.info)
    result = Patcher(engine).patch(TINY_PAIR, [Cell("hook_resid_post", 1, None)], ("denoising",), max_new_tokens=4)
    bridge, m = engine.model, len(checked.clean_ids)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([checked.clean_ids]))
        seq = list(checked.corrupted_ids)

        def write(x, hook):
            x = x.clone()
            x[:, :m] = cache[hook.name][:, :m]
            return x

        for _ in range(4):
            logits = bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=[("blocks.1.hook_resid_post", write)])
            seq.append(int(logits[0, -1].argmax()))
    want = bridge.tokenizer.decode(seq[m:], skip_special_tokens=True)
    assert result.cells[0].generated_text == want


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.smollm2
def test_smollm2_ioi_equals_transformer_lens_on_a_subset(smollm2):
    engine = Engine(smollm2, name="smollm2-135m")
    checked = check_pair(IOI_PAIR, engine.info)
    clean, corrupted = tokens(checked)
    m = len(checked.clean_ids)
    d = next(i for i, (a, b) in enumerate(zip(checked.clean_ids, checked.corrupted_ids)) if a != b)
    positions = sorted({d - 1, d, d + 1, m - 1})
    metric = logit_diff_of(checked)
    with torch.no_grad():
        _, clean_cache = smollm2.run_with_cache(clean)
        _, corrupted_cache = smollm2.run_with_cache(corrupted)
    patcher = Patcher(engine)
    cases = [
        (tlp.get_act_patch_resid_pre, "hook_resid_pre", [(l, p) for l in (0, 12, 29) for p in range(m)], True),
        (
            tlp.get_act_patch_attn_head_out_by_pos,
            "attn.hook_z",
            [(l, p, h) for l in (9,) for p in positions for h in range(9)],
            False,
        ),
        (
            tlp.get_act_patch_attn_head_v_by_pos,
            "attn.hook_v",
            [(l, p, h) for l in (3,) for p in positions for h in range(3)],
            False,
        ),
    ]
    for fn, site, index, both in cases:
        cells = [Cell(site, *i) for i in index]
        df = pd.DataFrame(index, columns=["layer", "pos", "head"][: len(index[0])])
        directions = ("denoising", "noising") if both else ("denoising",)
        result = patcher.patch(IOI_PAIR, cells, directions)
        with torch.no_grad():
            want = fn(smollm2, corrupted, clean_cache, metric, index_axis_names=None, index_df=df)
            assert grid(result, "denoising") == pytest.approx(want.tolist(), abs=1e-4), site
            if both:
                want = fn(smollm2, clean, corrupted_cache, metric, index_axis_names=None, index_df=df)
                assert grid(result, "noising") == pytest.approx(want.tolist(), abs=1e-4), site


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,field,words",
    [
        (
            lambda i: check_pair(
                Pair("The fox jumps over the", "The dog jumps over the", " a", " b"), i, field_name="prompts[3]"
            ),
            "prompts[3]:",
            ["same number of tokens", "15 vs 14", "'f', 'o', 'x'", "'do', 'g'"],
        ),
        (
            lambda i: check_pair(Pair("The fox", "The fix", " dog", " dog"), i),
            "pair.wrong_answer:",
            ["equals the answer"],
        ),
        (
            lambda i: check_pair(Pair("The fox", "The fix", " dog"), i),
            "pair.wrong_answer:",
            ["logit_diff needs a wrong answer"],
        ),
        (lambda i: check_pair(Pair("The fox", "The fix", " dog", " cat"), i, ("accuracy",)), "metric:", ["logit_diff"]),
        (
            lambda i: make_cells(i, 5, ["blocks.{layer}.attn.hook_x"]),
            "patching.sites[0]:",
            ["unknown site", "blocks.{layer}.attn.hook_z", "blocks.{layer}.mlp.hook_post"],
        ),
        (
            lambda i: make_cells(i, 5, ["blocks.{layer}.attn.hook_k"], heads=[2]),
            "patching.heads:",
            ["2 key/value heads"],
        ),
        (lambda i: make_cells(i, 5, ["blocks.{layer}.attn.hook_q"], heads=[4]), "patching.heads:", ["4 query heads"]),
        (lambda i: make_cells(i, 5, ["hook_mlp_out"], positions=[5]), "patching.positions:", ["out of range"]),
        (lambda i: make_cells(i, 5, ["hook_mlp_out"], layers=[4]), "patching.layers:", ["0 .. 3"]),
    ],
)
def test_bad_input_is_refused_before_weights_load(no_weights, call, field, words):
    info = model_info("tiny-llama")
    with pytest.raises(InputError) as err:
        call(info)
    assert str(err.value).startswith(field), str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)
    make_cells(info, 5, ["blocks.{layer}.attn.hook_z"], heads=[3])  # 4 query heads: head 3 is fine for z


def test_fused_qkv_sites_and_generation_at_them_are_refused(no_weights):
    with pytest.raises(InputError, match=r"^patching.cells\[0\].site: blocks.0.attn.hook_q is split by the bridge"):
        make_cells(model_info("tiny-gpt2"), 5, ["attn.hook_q"])


def test_generation_at_qkv_sites_is_refused_before_any_run(engines):
    engine = engines["tiny-llama"]
    before = engine.counts["patch_clean"]
    with pytest.raises(InputError, match="^max_new_tokens:"):
        Patcher(engine).patch(TINY_PAIR, [Cell("attn.hook_v", 1, 2, head=0)], max_new_tokens=3)
    assert engine.counts["patch_clean"] == before

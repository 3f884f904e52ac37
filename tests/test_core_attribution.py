"""Attribution patching (AtP, AtP*) equals TransformerLens's `attribution_patch` and autograd
written here, is the first-order term of exact patching (finite differences), and refuses bad
input before any weights load."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import Node, attribution_patch

from patchscope_core import Engine, InputError, model_info
from patchscope_core.methods.attribution import Attributor, check_attribution
from patchscope_core.methods.patching import Pair, check_pair

PAIRS = [
    Pair("The fox jumps over the", "The fix jumps over the", " dog", " cat"),
    Pair("The fox jumps over the", "The fax jumps over the", " dog", " cat"),
]


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {name: Engine(m, name=name) for name, m in tiny_models.items()}


def tl_scores(bridge, checked):
    def metric(logits):
        return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

    return attribution_patch(
        bridge, torch.tensor([checked.clean_ids]), torch.tensor([checked.corrupted_ids]), metric
    ).node_scores


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_head_and_mlp_estimates_equal_transformer_lens(engines, model):
    engine = engines[model]
    info = engine.info
    results = Attributor(engine).attribute(PAIRS, ["attn.hook_z", "hook_mlp_out"])
    for pair, res in zip(PAIRS, results):
        scores = tl_scores(engine.model, check_pair(pair, info))
        z, z_all = res.estimates[("atp", "attn.hook_z")]
        mlp, _ = res.estimates[("atp", "hook_mlp_out")]
        m = z.shape[1]
        want_z = torch.tensor(
            [
                [[scores[Node("attn_head_out", p, l, h)] for h in range(info.n_heads)] for p in range(m)]
                for l in range(info.n_layers)
            ]
        )
        want_mlp = torch.tensor([[[scores[Node("mlp_out", p, l)]] for p in range(m)] for l in range(info.n_layers)])
        assert torch.allclose(z, want_z, rtol=1e-4, atol=1e-6 * want_z.abs().max())
        assert torch.allclose(mlp, want_mlp, rtol=1e-4, atol=1e-6 * want_mlp.abs().max())
        assert torch.allclose(z_all, want_z.sum(1), rtol=1e-4, atol=1e-5)


def metric_of(checked):
    return lambda logits: logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]


def caches(bridge, checked):
    with torch.no_grad():
        _, clean = bridge.run_with_cache(torch.tensor([checked.clean_ids]))
        _, corr = bridge.run_with_cache(torch.tensor([checked.corrupted_ids]))
    return clean, corr


def moved(bridge, checked, hooks):
    with torch.no_grad():
        return float(metric_of(checked)(bridge.run_with_hooks(torch.tensor([checked.corrupted_ids]), fwd_hooks=hooks)))


SITES = [
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "hook_resid_pre",
]


@pytest.mark.parametrize("site", SITES)
def test_estimate_is_the_first_order_term_of_exact_patching(engines, site):
    """Patching a_corr + eps (a_clean - a_corr) at the node with the largest estimate of layer 1
    (through the bridge's own hook point) moves the metric by eps x estimate (central differences)."""
    engine = engines["tiny-llama"]
    checked = check_pair(PAIRS[0], engine.info)
    est, _ = Attributor(engine).attribute([PAIRS[0]], [site], layers=[1])[0].estimates[("atp", site)]
    p, u = divmod(int(est[0].abs().argmax()), est.shape[-1])
    clean, corr = caches(engine.model, checked)
    name = f"blocks.1.{site}"
    eps = 1e-3

    def hook(sign):
        def fn(x, hook):
            x = x.clone()
            d = clean[name][0, p] - corr[name][0, p]
            idx = (0, p, u) if x.dim() == 4 or site == "mlp.hook_post" else (0, p)
            x[idx] = corr[name][idx] + sign * eps * (d[u] if len(idx) == 3 else d)
            return x

        return fn

    fd = (moved(engine.model, checked, [(name, hook(1))]) - moved(engine.model, checked, [(name, hook(-1))])) / (
        2 * eps
    )
    assert abs(float(est[0, p, u])) > 1e-3
    assert fd == pytest.approx(float(est[0, p, u]), rel=1e-2)


@pytest.mark.parametrize("site", ["attn.hook_q", "attn.hook_k"])
def test_qk_fix_is_the_pattern_change_of_the_patched_query_or_key_to_first_order(engines, site):
    """The bridge patches the node's clean q (or k) and gives the new pattern at hook_pattern; writing
    A_corr + eps (A_new - A_corr) there moves the metric by eps x the QK-fixed estimate."""
    engine = engines["tiny-llama"]
    checked = check_pair(PAIRS[0], engine.info)
    res = Attributor(engine).attribute([PAIRS[0]], [site], layers=[1], method=["atp", "atp_star"])[0]
    est, _ = res.estimates[("atp_star", site)]
    p, u = divmod(int(est[0].abs().argmax()), est.shape[-1])
    clean, corr = caches(engine.model, checked)
    name, pat = f"blocks.1.{site}", "blocks.1.attn.hook_pattern"
    new = {}

    def patch(x, hook):
        x = x.clone()
        x[0, p, u] = clean[name][0, p, u]
        return x

    def keep(x, hook):
        new["A"] = x.detach().clone()

    moved(engine.model, checked, [(name, patch), (pat, keep)])
    eps = 1e-3

    def write(sign):
        return lambda x, hook: corr[pat] + sign * eps * (new["A"] - corr[pat])

    fd = (moved(engine.model, checked, [(pat, write(1))]) - moved(engine.model, checked, [(pat, write(-1))])) / (
        2 * eps
    )
    assert abs(float(est[0, p, u])) > 1e-4
    assert fd == pytest.approx(float(est[0, p, u]), rel=1e-2)
    assert float(est[0, p, u]) != pytest.approx(float(res.estimates[("atp", site)][0][0, p, u]), rel=1e-3)


def test_graddrop_equals_backwards_with_each_layers_contribution_detached(engines):
    """Per dropped layer l, the bridge with hook_attn_out and hook_mlp_out of layer l detached;
    gradients at each node through a zero tensor added at its hook point."""
    engine = engines["tiny-llama"]
    bridge, info = engine.model, engine.info
    checked = check_pair(PAIRS[0], info)
    sites = ("attn.hook_z", "hook_mlp_out")
    res = Attributor(engine).attribute([PAIRS[0]], list(sites), method="atp_star")[0]
    clean, corr = caches(bridge, checked)
    total = {s: 0.0 for s in sites}
    for drop in range(info.n_layers):
        zeros = {}

        def probe(name):
            def fn(x, hook):
                zeros[name] = torch.zeros_like(x, requires_grad=True)
                return x + zeros[name]

            return fn

        hooks = [(f"blocks.{drop}.hook_{w}_out", lambda x, hook: x.detach()) for w in ("attn", "mlp")]
        hooks += [
            (f"blocks.{l}.{s}", probe(f"blocks.{l}.{s}")) for l in range(info.n_layers) for s in sites if l != drop
        ]
        with torch.enable_grad():
            metric = metric_of(checked)(bridge.run_with_hooks(torch.tensor([checked.corrupted_ids]), fwd_hooks=hooks))
            names = list(zeros)
            grads = dict(zip(names, torch.autograd.grad(metric, [zeros[n] for n in names], allow_unused=True)))
        for s in sites:
            per_layer = []
            for l in range(info.n_layers):
                n, g = f"blocks.{l}.{s}", grads.get(f"blocks.{l}.{s}")
                if g is None:
                    per_layer.append(torch.zeros(clean[n].shape[1], 1 if s == "hook_mlp_out" else info.n_heads))
                    continue
                prod = ((clean[n] - corr[n]) * g)[0]
                per_layer.append(
                    prod.reshape(
                        prod.shape[0],
                        per_layer[0].shape[-1] if per_layer else prod.shape[1] if s != "hook_mlp_out" else 1,
                        -1,
                    ).sum(-1)
                )
            total[s] = total[s] + torch.stack(per_layer).abs()
    for s in sites:
        got = res.scores[("atp_star", s)][0]
        assert torch.allclose(got, total[s] / info.n_layers, rtol=1e-4, atol=1e-6), s
        assert not torch.allclose(got, res.estimates[("atp_star", s)][0].abs(), rtol=1e-2), s


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sites": ["blocks.{layer}.attn.hook_x"]}, "attribution.sites[0]:"),
        ({"sites": ["attn.hook_z"], "method": "eap"}, "attribution.method:"),
        ({"sites": ["attn.hook_z"], "layers": [4]}, "attribution.layers:"),
        ({"sites": ["attn.hook_z"], "metric": "accuracy"}, "attribution.metric:"),
    ],
)
def test_bad_input_is_refused_before_weights_load(no_weights, kwargs, field):
    with pytest.raises(InputError) as err:
        check_attribution(model_info("tiny-llama"), **kwargs)
    assert str(err.value).startswith(field), str(err.value)


def test_fused_qkv_is_refused(no_weights):
    with pytest.raises(InputError, match=r"^attribution.sites\[0\]: blocks.0.attn.hook_q is split"):
        check_attribution(model_info("tiny-gpt2"), ["attn.hook_q"])


@pytest.mark.smollm2
def test_smollm2_ioi_equals_transformer_lens(smollm2):
    engine = Engine(smollm2, name="smollm2-135m")
    pair = Pair(
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        " Mary",
        " John",
    )
    res = Attributor(engine).attribute([pair], ["attn.hook_z", "hook_mlp_out"])[0]
    scores = tl_scores(smollm2, check_pair(pair, engine.info))
    z, _ = res.estimates[("atp", "attn.hook_z")]
    want = torch.tensor(
        [[[scores[Node("attn_head_out", p, l, h)] for h in range(9)] for p in range(z.shape[1])] for l in range(30)]
    )
    assert torch.allclose(z, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    mlp, _ = res.estimates[("atp", "hook_mlp_out")]
    want = torch.tensor([[[scores[Node("mlp_out", p, l)]] for p in range(z.shape[1])] for l in range(30)])
    assert torch.allclose(mlp, want, rtol=1e-4, atol=1e-5 * want.abs().max())


# ---------------------------------------------------------------- verify: exact patching of chosen nodes


def test_verify_patches_top_k_and_random_nodes_and_the_statistics_hold(engines):
    from patchscope_core.methods.attribution_verify import pearson, spearman, summarise, upper_rate, verify
    from patchscope_core.methods.patcher import Patcher

    engine = engines["tiny-llama"]
    results = Attributor(engine).attribute(PAIRS, ["attn.hook_z", "hook_mlp_out"], method=["atp", "atp_star"])
    patcher = Patcher(engine)
    # heads summed over positions: 4 layers x 4 heads, the whole grid patched exactly
    full = verify(patcher, PAIRS, results, top_k=5, random=16, positions="all")
    assert all(v.full and len(v.nodes) == 16 for v in full if v.site == "attn.hook_z")
    rows = summarise(results, full, positions="all", top_k=5, ks=(3,))
    z = {r["method"]: r for r in rows if r["site"] == "attn.hook_z"}
    assert z["atp"]["nodes"] == 32 and z["atp"]["recall@3"] is not None
    # the exact effect of a node is the bridge's own patch of that head at every position
    v = next(v for v in full if v.site == "attn.hook_z" and v.pair == 0)
    checked = check_pair(PAIRS[0], engine.info)
    clean, corr = caches(engine.model, checked)
    n = v.nodes[3]
    layer, head = divmod(n, engine.info.n_heads)

    def write(x, hook):
        x = x.clone()
        x[:, :, head] = clean[hook.name][:, :, head]
        return x

    with torch.no_grad():
        logits = engine.model.run_with_hooks(
            torch.tensor([checked.corrupted_ids]), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", write)]
        )
        base = engine.model(torch.tensor([checked.corrupted_ids]))
    metric = metric_of(checked)
    assert float(v.exact[3]) == pytest.approx(float(metric(logits) - metric(base)), abs=1e-4)
    # a sample: top-k plus random others, not the grid; the bound counts the rest
    part = verify(patcher, PAIRS, results, top_k=3, random=4, positions="each", seed=1)
    assert all(not v.full and 3 <= len(v.nodes) <= 3 * 2 + 4 for v in part)
    rows = summarise(results, part, positions="each", top_k=3)
    assert all(r["recall@3"] is None and r["false_negative_bound"] is not None for r in rows)
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert pearson(a, b) == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), abs=1e-9)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert upper_rate(0, 20) == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-6)


def test_verify_refuses_bad_fields(engines):
    from patchscope_core.methods.attribution_verify import verify

    with pytest.raises(InputError, match=r"^verify.top_k:"):
        verify(None, [], [], top_k=-1)
    with pytest.raises(InputError, match=r"^verify.positions:"):
        verify(None, [], [], positions="some")

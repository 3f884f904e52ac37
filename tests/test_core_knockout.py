"""Attention knockout (the `knockout` kind) on tiny random Llama (grouped-query), GPT-2 and Qwen2
models and on SmolLM2, checked against independent computations: a hand-written one-token
attention, and a reference written here directly on a separate plain Hugging Face copy whose
eager attention gets an additive mask (uncached, one row, no padding) at every step."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import Decoding, Intervention, InterventionRun, PatchscopeError, Site, Zero, model_info
from patchscope_core.engine import Engine
from patchscope_core.interventions import Knockout, resolve_run, run_from_dict, run_to_dict
from patchscope_core.models.loading import _load_tokenizer, _tiny_hf_model, _tiny_tokenizer_dir
from patchscope_core.models.tokens import subject_span
from tests.reference import compare_tokens

N_NEW = 6
ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
PROMPTS = ["Paris is the capital of France", "The capital city of x is", "Water is a liquid."]


def _qwen2_hf():
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = _load_tokenizer(str(_tiny_tokenizer_dir()))
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval(), tok


def hf_copy(name: str):
    """A separate plain Hugging Face model with the same weights, on eager attention."""
    hf = _qwen2_hf()[0] if name == "tiny-qwen2" else _tiny_hf_model(name)[0]
    hf.config._attn_implementation = "eager"
    return hf


@pytest.fixture(scope="module")
def models(tiny_models):
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = _qwen2_hf()
    qwen2 = TransformerBridge.boot_transformers(
        "tiny-qwen2", hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32
    )
    return {**tiny_models, "tiny-qwen2": qwen2}


def engine_of(model, name, **decoding):
    return Engine(model, name=name, decoding=Decoding(stop_at_eos=False, **decoding))


def attention(hf, layer: int):
    return hf.transformer.h[layer].attn if hasattr(hf, "transformer") else hf.model.layers[layer].self_attn


# ---------------------------------------------------------------- the reference: eager attention + an additive mask


def masked(hf, n_prompt: int, blocked, n_heads: int):
    """Pre-hooks on every attention module of the plain copy that add the dtype's minimum to the
    scores of (layer, head, query, key) where blocked(layer, head, q, k, n_prompt) (absolute
    positions of one unpadded row, uncached: the whole sequence each step)."""
    low = torch.finfo(torch.float32).min
    handles = []
    for layer in range(hf.config.num_hidden_layers):

        def pre(mod, args, kwargs, layer=layer):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            t = x.shape[1]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.triu(torch.full((t, t), low), 1)[None, None]
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, low)
            extra = torch.zeros(1, n_heads, t, t)
            for h in range(n_heads):
                for q in range(t):
                    for k in range(q + 1):
                        if blocked(layer, h, q, k, n_prompt):
                            extra[0, h, q, k] = low
            return args, {**kwargs, "attention_mask": mask + extra}

        handles.append(attention(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
    return handles


@torch.no_grad()
def reference_generation(hf, ids: list[int], blocked, n_new: int, n_heads: int):
    """Greedy, uncached: the whole sequence re-run at every step with the additive mask."""
    handles = masked(hf, len(ids), blocked, n_heads) if blocked else []
    tokens, logits = list(ids), []
    try:
        for _ in range(n_new):
            out = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()
            logits.append(out)
            tokens.append(int(out.argmax()))
    finally:
        for h in handles:
            h.remove()
    return tokens[len(ids) :], logits


@torch.no_grad()
def engine_generation(engine, run):
    """The engine's cached generation of one run alone, with every step's logits."""
    steps = []
    handle = engine.modules.register_forward_hook(lambda m, a, out: steps.append(out.logits[0, -1].float().clone()))
    try:
        (result,) = engine.run([run], batch_size=1, clean=False)
    finally:
        handle.remove()
    return result, steps


def cases(info, prompt: str):
    """(interventions, blocked(layer, head, q, k, n)) pairs: the same edges written twice, as a
    knockout and by hand. The tiny models have 4 layers and 4 heads."""
    subj = set(range(*subject_span(info, prompt, prompt.split()[0])))
    last = lambda q, n: q == n - 1  # noqa: E731
    return [
        (
            [Intervention("blocks.1.attn", Knockout(from_="last", to=(1, 3), window=3))],
            lambda l, h, q, k, n: l in (0, 1, 2) and last(q, n) and k in (1, 3),
        ),
        (
            [
                Intervention(
                    "blocks.2.attn",
                    Knockout(from_=("last", "generated"), to="subject", heads=(0, 3), subject=prompt.split()[0]),
                )
            ],
            lambda l, h, q, k, n: l == 2 and h in (0, 3) and q >= n - 1 and k in subj,
        ),
        (
            [Intervention("blocks.3.attn", Knockout(from_="generated", to="all_previous", window=2))],
            lambda l, h, q, k, n: l in (2, 3) and q >= n and k < q,
        ),
        (
            [Intervention("blocks.0.attn", Knockout(from_=(2, -1), to=(0, "last"), heads=1, window=4))],
            lambda l, h, q, k, n: l in (0, 1) and h == 1 and q in (2, n - 1) and k in (0, n - 1),
        ),  # clipped at 0
        (
            [
                Intervention("blocks.1.attn", Knockout(from_="last", to="non_subject", subject=prompt.split()[0])),
                Intervention("blocks.3.attn", Knockout(from_="generated", to="last", heads=(2,))),
            ],
            lambda l, h, q, k, n: (
                (l == 1 and q == n - 1 and 1 <= k < n - 1 and k not in subj)
                or (l == 3 and h == 2 and q >= n and k == n - 1)
            ),
        ),
    ]


@pytest.mark.parametrize("name", ARCHS)
def test_knockout_equals_eager_attention_with_an_additive_mask_through_cached_generation(models, name):
    engine, hf = engine_of(models[name], name), hf_copy(name)
    n_heads = engine.info.n_heads
    for prompt in PROMPTS[:2]:
        for k, (ivs, blocked) in enumerate(cases(engine.info, prompt)):
            run = InterventionRun(prompt, ivs, max_new_tokens=N_NEW)
            result, steps = engine_generation(engine, run)
            want, want_logits = reference_generation(hf, result.prompt_token_ids, blocked, N_NEW, n_heads)
            _, clean = reference_generation(hf, result.prompt_token_ids, None, N_NEW, n_heads)
            label = f"{name} case {k} on {prompt!r}"
            assert max(float((a - b).abs().max()) for a, b in zip(want_logits, clean)) > 1e-2, f"{label}: no effect"
            compare_tokens(result.generated_token_ids, want, want_logits, label)
            assert len(steps) == N_NEW
            for step, (got, ref) in enumerate(zip(steps, want_logits)):
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=lambda m: f"{label} step {step}: {m}")


@pytest.mark.parametrize("name", ARCHS)
def test_cached_equals_uncached_and_a_batch_equals_its_rows_alone(models, name):
    cached, uncached = engine_of(models[name], name), engine_of(models[name], name, use_cache=False)
    runs = [
        InterventionRun(p, ivs, answer=" Paris" if j % 2 else None, max_new_tokens=N_NEW)
        for j, p in enumerate(PROMPTS)
        for ivs, _ in cases(cached.info, p)
    ]
    runs.append(
        InterventionRun(
            PROMPTS[1],
            [
                Intervention(Site("blocks.1.attn.hook_z", head=1), Zero()),
                Intervention("blocks.2.attn", Knockout(to="all_previous")),
            ],
            max_new_tokens=N_NEW,
        )
    )
    runs.append(InterventionRun(PROMPTS[2], [], answer=" Paris", max_new_tokens=N_NEW))
    assert len({len(r.prompt_ids) for r in cached.resolve(runs)}) == 3  # left padding in the batch
    batch = cached.run(runs, batch_size=32, clean=False)
    alone = [cached.run([r], batch_size=1, clean=False)[0] for r in runs]
    again = uncached.run(runs, batch_size=32, clean=False)
    for k, (b, a, u) in enumerate(zip(batch, alone, again)):
        for label, other in (("alone", a), ("uncached", u)):
            assert b.generated_token_ids == other.generated_token_ids, f"{name} runs[{k}] batch vs {label}"
            torch.testing.assert_close(
                torch.tensor(b.top_logprobs), torch.tensor(other.top_logprobs), atol=1e-4, rtol=0
            )
            if b.answer_logprobs:
                torch.testing.assert_close(
                    torch.tensor(b.answer_logprobs), torch.tensor(other.answer_logprobs), atol=1e-4, rtol=0
                )


@pytest.mark.parametrize("name", ARCHS)
def test_an_empty_knockout_is_bit_identical_and_leaves_other_rows_bit_identical(models, name):
    engine = engine_of(models[name], name)
    plain = [InterventionRun(p, [], answer=" Paris", max_new_tokens=N_NEW) for p in PROMPTS]
    empty = [
        InterventionRun(p, [Intervention("blocks.1.attn", Knockout(to=()))], answer=" Paris", max_new_tokens=N_NEW)
        for p in PROMPTS[:2]
    ] + [
        InterventionRun(
            PROMPTS[2],
            [Intervention("blocks.0.attn", Knockout(from_=(), to="last", window=9))],
            answer=" Paris",
            max_new_tokens=N_NEW,
        )
    ]
    mixed = [
        InterventionRun(
            PROMPTS[0],
            [Intervention("blocks.1.attn", Knockout(to="all_previous", window=4))],
            answer=" Paris",
            max_new_tokens=N_NEW,
        )
    ] + plain[1:]
    want = engine.logits(plain)
    for got in (engine.logits(empty), engine.logits(mixed)[1:]):
        for g, w in zip(got, want[-len(got) :]):
            assert torch.equal(g, w)
    assert not torch.equal(engine.logits(mixed)[0], want[0])
    gen_plain, gen_empty = engine.run(plain, clean=False), engine.run(empty, clean=False)
    for a, b in zip(gen_plain, gen_empty):
        assert a.generated_token_ids == b.generated_token_ids and a.top_logprobs == b.top_logprobs
        assert a.answer_logprobs == b.answer_logprobs


def _hidden(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@pytest.mark.parametrize("name", ARCHS)
def test_a_query_blocked_from_every_other_key_gets_the_attention_of_a_one_token_context(models, name):
    """Knocking out every key but itself: the query's head output (o_proj's input) is that head's
    value vector of the query token alone, computed here by hand; other heads and other
    positions are untouched."""
    model = models[name]
    engine = engine_of(model, name)
    info = engine.info
    layer, head, q = 2, 1, 4
    attn = attention(engine.modules, layer)
    o_proj = attn.c_proj if name == "tiny-gpt2" else attn.o_proj
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attn.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("x", _hidden(a, kw)[0].clone()), with_kwargs=True
        ),
        o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0].clone())),
    ]
    try:
        engine.logits([InterventionRun(PROMPTS[0], [])])
        clean_z = seen["z"].view(-1, info.n_heads, info.d_head)
        engine.logits(
            [
                InterventionRun(
                    PROMPTS[0], [Intervention(f"blocks.{layer}.attn", Knockout(from_=q, to="all_previous", heads=head))]
                )
            ]
        )
    finally:
        for h in handles:
            h.remove()
    x, z = seen["x"][q], seen["z"].view(-1, info.n_heads, info.d_head)
    with torch.no_grad():
        want = _value_of_head(attn, name, info, x, head)
    torch.testing.assert_close(z[q, head], want, atol=1e-5, rtol=0)
    assert float((clean_z[q, head] - want).abs().max()) > 1e-3  # the clean query attends elsewhere too
    others = [h for h in range(info.n_heads) if h != head]
    assert torch.equal(z[q, others], clean_z[q, others]) and torch.equal(z[:q], clean_z[:q])


def _value_of_head(attn, name, info, x, head):
    """Head `head`'s value vector of the token x: what attention over a one-token context returns."""
    if name == "tiny-gpt2":
        v = attn.c_attn(x)[2 * info.d_model :].view(info.n_heads, info.d_head)  # c_attn: [q | k | v]
        return v[head]
    v = attn.v_proj(x).view(-1, info.d_head)  # [kv heads, d_head]; query head h reads kv head h // groups
    return v[head // (info.n_heads // v.shape[0])]


@pytest.mark.parametrize("name", ARCHS)
def test_every_attention_site_moves_the_output(models, name):
    """No layer's knockout is a silent no-op: blocking the last token's every other key at one
    layer moves its next-token logits, at every layer of every architecture."""
    engine = engine_of(models[name], name)
    n = engine.info.n_layers
    runs = [
        InterventionRun(PROMPTS[0], [Intervention(f"blocks.{l}.attn", Knockout(to="all_previous"))]) for l in range(n)
    ]
    clean_all = engine.logits([InterventionRun(PROMPTS[0], [])])[0]
    clean = clean_all[-1]
    for layer, logits in enumerate(engine.logits(runs)):
        moved = float((logits[-1] - clean).abs().max())
        assert moved > 0.05, f"{name}: a knockout at blocks.{layer}.attn moves the logits by {moved:.2e} only"
        torch.testing.assert_close(logits[:-1], clean_all[:-1], atol=1e-5, rtol=0)  # earlier queries: untouched


def test_the_sdpa_implementation_is_wrapped_the_same_way(models):
    """A model on sdpa: the knockout wraps sdpa, and equals the eager reference."""
    import copy

    name = "tiny-llama"
    engine, hf = engine_of(models[name], name), hf_copy(name)
    for layer in range(engine.info.n_layers):
        attn = attention(engine.modules, layer)
        attn.__dict__["config"] = copy.copy(attn.config)
        attn.config.__dict__["_attn_implementation_internal"] = "sdpa"
    ivs, blocked = cases(engine.info, PROMPTS[0])[4]
    result, steps = engine_generation(engine, InterventionRun(PROMPTS[0], ivs, max_new_tokens=N_NEW))
    want, want_logits = reference_generation(hf, result.prompt_token_ids, blocked, N_NEW, engine.info.n_heads)
    compare_tokens(result.generated_token_ids, want, want_logits, "sdpa")
    for got, ref in zip(steps, want_logits):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input, before any weights load


@pytest.mark.parametrize(
    "kind, site, positions, message",
    [
        (
            Knockout(to="everything"),
            "blocks.1.attn",
            "all",
            "run.interventions[0].knockout.to: expected prompt positions",
        ),
        (Knockout(from_="first", to="last"), "blocks.1.attn", "all", "run.interventions[0].knockout.from: expected"),
        (
            Knockout(to="last", heads=7),
            "blocks.1.attn",
            "all",
            "run.interventions[0].knockout.heads: 7 is out of range",
        ),
        (
            Knockout(to="last", window=0),
            "blocks.1.attn",
            "all",
            "run.interventions[0].knockout.window: expected an integer >= 1",
        ),
        (Knockout(to="subject"), "blocks.1.attn", "all", "run.interventions[0].knockout.subject: to: subject"),
        (
            Knockout(to="subject", subject="Rome"),
            "blocks.1.attn",
            "all",
            "run.interventions[0].knockout.subject: 'Rome' does not occur",
        ),
        (
            Knockout(from_=3, to=(0, 1, 2, 3)),
            "blocks.1.attn",
            "all",
            "run.interventions[0].knockout.to: blocks every key of query position 3",
        ),
        (Knockout(from_=1, to="all_previous"), "blocks.1.attn", "all", None),
        (Knockout(to=(40,)), "blocks.1.attn", "all", "run.interventions[0].knockout.to: 40 is out of range"),
        (Knockout(to="last"), "blocks.9.attn", "all", "run.interventions[0].site: layer 9"),
        (
            Knockout(to="last"),
            "blocks.1.hook_resid_post",
            "all",
            "run.interventions[0].site: knockout acts on blocks.{l}.attn",
        ),
        (Zero(), "blocks.1.attn", "all", "run.interventions[0].site: zero acts on a value"),
        (
            Knockout(to="last"),
            "blocks.1.attn",
            (1, 2),
            "run.interventions[0].positions: a knockout's queries are its `from`",
        ),
    ],
)
def test_bad_knockouts_are_refused_before_weights_load(no_weights, kind, site, positions, message):
    run = InterventionRun(PROMPTS[0], [Intervention(site, kind, positions)])
    if message is None:
        resolve_run(run, model_info("tiny-llama"))
        return
    with pytest.raises(PatchscopeError) as err:
        resolve_run(run, model_info("tiny-llama"))
    assert str(err.value).startswith(message), str(err.value)


def test_a_knockout_travels_to_workers_as_plain_data_with_the_from_key():
    kind = Knockout(from_=("last", "generated"), to=("subject", 2), heads=(0, 3), window=9, subject="Paris")
    data = run_to_dict(InterventionRun(PROMPTS[0], [Intervention("blocks.4.attn", kind)]))
    assert data["interventions"][0]["values"]["from"] == ["last", "generated"]
    assert run_from_dict(data).interventions[0].kind == kind


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.smollm2
def test_smollm2_knockout_equals_eager_attention_with_an_additive_mask(smollm2):
    from transformers import AutoModelForCausalLM

    from patchscope_core.models import smollm2_dir

    engine = engine_of(smollm2, "smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    prompt = "The capital of France is"
    subj = set(range(*subject_span(engine.info, prompt, "France")))
    cases = [
        (
            Knockout(from_=("last", "generated"), to="subject", subject="France", window=9),
            14,
            lambda l, h, q, k, n: 10 <= l <= 18 and q >= n - 1 and k in subj,
        ),
        (
            Knockout(from_="generated", to="all_previous", heads=(0, 4, 8), window=5),
            25,
            lambda l, h, q, k, n: 23 <= l <= 27 and h in (0, 4, 8) and q >= n and k < q,
        ),
    ]
    for k, (kind, layer, blocked) in enumerate(cases):
        run = InterventionRun(prompt, [Intervention(f"blocks.{layer}.attn", kind)], max_new_tokens=4)
        result, steps = engine_generation(engine, run)
        want, want_logits = reference_generation(hf, result.prompt_token_ids, blocked, 4, engine.info.n_heads)
        _, clean = reference_generation(hf, result.prompt_token_ids, None, 4, engine.info.n_heads)
        assert max(float((a - b).abs().max()) for a, b in zip(want_logits, clean)) > 1e-2, f"case {k}: no effect"
        compare_tokens(result.generated_token_ids, want, want_logits, f"smollm2 case {k}")
        for got, ref in zip(steps, want_logits):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the CLI


def test_cli_intervene_knockout_maps_its_options_onto_the_kind(tiny_models, capsys):
    import json

    from sweeps.cli import main

    prompt = PROMPTS[0]
    argv = [
        "intervene",
        "--model",
        "tiny-llama",
        "--prompt",
        prompt,
        "--kind",
        "knockout",
        "--from",
        "last",
        "generated",
        "--to",
        "3",
        "subject",
        "--subject",
        "Paris",
        "--layers",
        "1..3",
        "--head",
        "0",
        "2",
        "--answer",
        " France",
        "--max-new-tokens",
        "4",
        "--no-stop-at-eos",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    kind = Knockout(from_=("last", "generated"), to=(3, "subject"), subject="Paris", heads=(0, 2), window=3)
    (want,) = engine_of(tiny_models["tiny-llama"], "tiny-llama").run(
        [InterventionRun(prompt, [Intervention("blocks.2.attn", kind)], answer=" France", max_new_tokens=4)]
    )
    assert out["generated_token_ids"] == want.generated_token_ids
    assert out["answer_logprobs"] == pytest.approx(want.answer_logprobs, abs=1e-6)
    assert out["answer_logprob"] != pytest.approx(out["clean_answer_logprob"], abs=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--to", "3"], "--layers: a knockout takes --layers"),
        (["--to", "3", "--layers", "1..3", "--site", "blocks.1.attn"], "--layers: a knockout takes --layers"),
        (["--to", "3", "--layers", "3..1"], "--layers: expected 0 <= a <= b"),
        (["--to", "3", "--layers", "a..b"], "--layers: expected a..b"),
        (["--to", "nowhere", "--layers", "1"], "run.interventions[0].knockout.to: expected prompt positions"),
    ],
)
def test_cli_bad_knockout_options_name_the_option_before_any_weights(no_weights, capsys, extra, message):
    from sweeps.cli import main

    argv = ["intervene", "--model", "tiny-llama", "--prompt", PROMPTS[0], "--kind", "knockout", *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_cli_other_kinds_refuse_the_knockout_options(no_weights, capsys):
    from sweeps.cli import main

    base = [
        "intervene",
        "--model",
        "tiny-llama",
        "--prompt",
        PROMPTS[0],
        "--kind",
        "zero",
        "--site",
        "blocks.1.hook_resid_post",
    ]
    assert main(base + ["--layers", "1..3"]) == 2
    assert capsys.readouterr().err.startswith("error: --layers: not used by --kind zero")
    assert main(base + ["--to", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --to: not used by --kind zero")


def test_rows_of_one_prompt_share_the_prefix_no_knockout_touches(models):
    """Knockouts from the last token leave every earlier position's keys and values clean, so rows
    of one prompt compute that prefix once; each row still equals itself alone."""
    name = "tiny-llama"
    engine = engine_of(models[name], name)
    runs = [
        InterventionRun(
            PROMPTS[0],
            [Intervention(f"blocks.{l}.attn", Knockout(from_=("last", "generated"), to=to, subject="Paris"))],
            answer=" France",
            max_new_tokens=N_NEW,
        )
        for l in range(4)
        for to in ("subject", "all_previous", (0, 2))
    ]
    before = engine.counts["shared_prefix_tokens"]
    batch = engine.run(runs, batch_size=32, clean=False)
    assert engine.counts["shared_prefix_tokens"] > before
    for k, (run, b) in enumerate(zip(runs, batch)):
        (a,) = engine.run([run], batch_size=1, clean=False)
        assert b.generated_token_ids == a.generated_token_ids, f"runs[{k}]"
        torch.testing.assert_close(torch.tensor(b.top_logprobs), torch.tensor(a.top_logprobs), atol=1e-4, rtol=0)

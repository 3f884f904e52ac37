"""A patchscope store of many rows written without a model: what the report and W&B do at scale
(the rows are those a patchscope sweep stores, with made-up generations and log-probabilities,
drawn from a seeded generator so that tests can compute what the report must show)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sweeps.kinds.base import digest
from sweeps.sinks.store import ResultStore

WORDS = ["France", "Paris", "river", "city", "painter", "language", "company", "the", "a", "of"]


def patchscope_rows(
    n_prompts: int, layers=(0, 1, 2, 3), positions=(-1,), model: str = "tiny-llama", seed: int = 0
) -> list[dict]:
    """One row per (prompt, layer, position): prompt i's answer is WORDS[i % 10]; the generation
    contains it with a probability that grows with the layer (so the means differ by layer)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        answer = WORDS[i % len(WORDS)]
        for layer in layers:
            for pos in positions:
                hit = rng.random() < (layer + 1) / (len(layers) + 1)
                words = list(rng.choice(WORDS[2:], size=4))
                text = " ".join([answer] + words if hit else words)
                lp = [float(-x) for x in np.sort(rng.exponential(2.0, size=10))]
                rows.append(
                    {
                        "cell_id": digest([model, i, layer, pos]),
                        "model": model,
                        "source_prompt": f"Entity number {i}",
                        "source_layer": layer,
                        "source_position": pos,
                        "target_prompt": "x is a",
                        "target_layer": layer,
                        "target_position": -1,
                        "row": i,
                        "ref_answer": answer,
                        "source_position_abs": 3,
                        "target_position_abs": 2,
                        "source_token_ids": [5, 6, 7, 8 + i % 50],
                        "target_token_ids": [9, 10, 11],
                        "generated_token_ids": [int(t) for t in rng.integers(0, 500, size=5)],
                        "generated_text": text,
                        "top_token_ids": [int(t) for t in rng.integers(0, 500, size=10)],
                        "top_logprobs": lp,
                        "max_new_tokens": 5,
                        "task_id": f"t{i}",
                        "time_task_s": 0.1,
                        "worker_node": "node",
                        "worker_pid": 1,
                        "worker_device": "cpu",
                        "worker_peak_mb": 1.0,
                    }
                )
    return rows


def write_store(out_dir: Path, rows: list[dict], per_file: int = 2000, kind: str = "patchscope") -> ResultStore:
    """`rows` as task files of `per_file` rows under out_dir/results/, with a manifest naming the kind."""
    out_dir = Path(out_dir)
    store = ResultStore(out_dir)
    for k in range(0, len(rows), per_file):
        store.write(f"{k:08d}", rows[k : k + per_file])
    out_dir.joinpath("manifest.json").write_text(
        json.dumps({"name": "big", "config": {"kind": kind}, "cells_total": len(rows)})
    )
    return store

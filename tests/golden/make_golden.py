"""Writes the golden fixtures of tests/test_golden.py: run once, at the code they pin.

- `examples.json`: for every example config (sweeps/examples/*.yaml) its config hash, cell
  count, first cell ids, a digest of every cell id, the first tasks' payload digests and the
  `--dry-run` text;
- `stores/<kind>/`: one tiny sweep per sweep kind (config, its data, the Parquet store), run in
  process on tiny-llama, for the resume test.

    PYTHONPATH=$PWD python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.golden import common  # noqa: E402


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    common.fix_cpu_count()
    examples = {}
    for path in sorted(common.EXAMPLES.glob("*.yaml")):
        examples[path.name] = common.pin_example(path)
        print(path.name, examples[path.name]["n_cells"], examples[path.name]["config_hash"])
    (HERE / "examples.json").write_text(json.dumps(examples, indent=1, sort_keys=True) + "\n")

    from patchscope_core import PatchscopeEngine, load_model

    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    for kind, (cfg, files) in common.RUNS.items():
        run_dir = HERE / "stores" / kind
        shutil.rmtree(run_dir, ignore_errors=True)
        config = common.write_run_config(run_dir, cfg, files)
        n = common.run_in_process(config, engine, run_dir / "out")
        (run_dir / "sweep-here.yaml").unlink()
        print(kind, n, "cells")


if __name__ == "__main__":
    main()

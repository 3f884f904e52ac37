"""The config sections every sweep kind shares: generation, execution, output (with W&B)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from patchscope_core.base.values import MAX_SEED

from .errors import ConfigError
from .fields import Strict


class GenerationConfig(Strict):
    max_new_tokens: int = Field(20, ge=0, description="0: score only, no generation (intervention, knockout)")
    stop_at_eos: bool = True
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    top_logprobs: int = Field(10, ge=1, description="how many first-token log-probabilities to keep")

    @model_validator(mode="after")
    def _seed(self) -> GenerationConfig:
        if self.do_sample and self.seed is None:
            raise ValueError("generation.seed: sampling needs an explicit seed so results can be reproduced")
        return self

    def decoding(self):
        from patchscope_core import Decoding

        return Decoding(
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop_at_eos=self.stop_at_eos,
        )


class ExecutionConfig(Strict):
    workers: int = Field(2, ge=1, description="Ray actors per model, each holding the model for its lifetime")
    backend: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="local: every task in this process, one worker per model, no Ray; ray: Ray actors; "
        "auto: local for a local sweep of one worker, ray for more workers or --address",
    )
    batch_size: int | Literal["auto"] = Field(
        "auto",
        description="rows per forward pass (a generate batch); auto: 16 on a CPU, and on a GPU as many "
        "rows as its free memory holds after the weights (each row's KV cache, from the model's config), "
        "at most 512; a batch out of memory is halved",
    )
    batches_per_task: int = Field(
        8,
        ge=1,
        description="forward batches a task carries where the kind packs the cells of many source prompts "
        "(patchscope, intervention, recipe): a task of batch_size x batches_per_task cells is seconds of "
        "work, not one prompt's few rows",
    )
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="a generate batch holds at most this many tokens "
        "(rows x longest prompt + new tokens); default: no limit",
    )
    gpus_per_worker: float = Field(0, ge=0, description="0: CPU; fractional shares a GPU; >1 spreads the model")
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs (and torch threads) per worker; auto: a local sweep shares the machine's cores "
        "among the workers, a sweep that joins a cluster asks 1",
    )

    @field_validator("batch_size", mode="after")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or v < 1):
            raise ValueError(f"expected 'auto' or an integer >= 1, got {v!r}")
        return v

    @property
    def batch_rows(self) -> int:
        """Rows per forward pass as the driver sizes tasks: batch_size, or for auto 16 without a GPU
        and 256 with one (each worker then sizes its own batches from its GPU's free memory)."""
        if self.batch_size != "auto":
            return self.batch_size
        return 256 if self.gpus_per_worker > 0 else 16

    @field_validator("cpus_per_worker", mode="after")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        if v != "auto" and v <= 0:
            raise ValueError(f"expected 'auto' or a number > 0, got {v!r}")
        return v

    @model_validator(mode="after")
    def _local_backend(self) -> ExecutionConfig:
        if self.backend == "local" and self.workers > 1:
            raise ValueError(
                f"execution.backend: local runs one worker in this process, but execution.workers is "
                f"{self.workers}; use backend: ray (or auto) for more workers, or workers: 1"
            )
        return self

    def resolved(self, local: bool) -> ExecutionConfig:
        """These settings with cpus_per_worker a number and the backend chosen: auto gives each
        of a local sweep's workers its share of this machine's cores (at least 1), and 1 on a
        cluster joined; backend auto is local for a local sweep of one worker, else ray. A local
        backend asked to join a cluster (`local` False: --address) is a ConfigError."""
        if self.backend == "local" and not local:
            raise ConfigError(
                "execution.backend: local runs in this process, but --address (or RAY_ADDRESS) joins a "
                "Ray cluster; use backend: ray (or auto) to join it, or run without --address"
            )
        update: dict[str, Any] = {}
        if self.backend == "auto":
            update["backend"] = "local" if local and self.workers == 1 else "ray"
        if self.cpus_per_worker == "auto":
            import os

            update["cpus_per_worker"] = float(max(1, (os.cpu_count() or 1) // self.workers) if local else 1)
        return self.model_copy(update=update) if update else self

    max_in_flight_per_worker: int = Field(2, ge=1, description="tasks queued on one actor at once (back-pressure)")
    device_map: str | None = Field(None, description="accelerate device map; default 'auto' when gpus_per_worker > 1")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_restarts: int = Field(2, ge=-1, description="Ray actor restarts after a crash (-1: forever)")
    max_task_retries: int = Field(2, ge=-1, description="Ray retries of a task whose actor died (-1: forever)")
    placement_timeout_s: float = Field(
        600,
        gt=0,
        description="seconds a worker may take to be placed and load its model before it is reported "
        "and its work goes to the others; with no worker placed by then the sweep stops",
    )
    max_cells: int = Field(10_000_000, ge=1, description="refuse a grid of more cells than this")

    def check_cells(self, n_cells: int) -> None:
        """A grid of more than max_cells cells is a ConfigError (counted before any cell is built)."""
        if n_cells > self.max_cells:
            raise ConfigError(
                f"execution.max_cells: the grid has {n_cells:,} cells, more than the limit of "
                f"{self.max_cells:,}; make the grid smaller (or split it into several sweeps), "
                "or raise execution.max_cells"
            )


class WandbConfig(Strict):
    project: str = "patchscope-sweeps"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []
    max_table_rows: int = Field(
        10_000,
        ge=1,
        description="the most rows of the per-cell W&B tables (the live `cells` table and the final "
        "`results` table; W&B itself cuts a table at 200,000; each row costs the driver about 0.3 ms, "
        "more than a cheap cell's compute): a larger sweep logs a seeded sample of "
        "its cells, the same at every run, in grid order, and says so once (printed, and in the run's "
        "summary as results_table_sampled); the report's aggregated tables are logged whole",
    )


class ContrastConfig(Strict):
    """A difference of two groups of rows: the mean over the rows whose reference column is
    `plus` minus the mean over those where it is `minus` (e.g. answers ' great' vs ' terrible')."""

    column: str = Field(description="a reference column of the prompts (results: ref_<column>)")
    plus: str
    minus: str


class ReportConfig(Strict):
    """What the summaries and pictures measure (kinds that take it: intervention). Not part of
    the config hash: changing it redraws, never recomputes."""

    metric: str | None = Field(None, description="a result column to average (default: the kind's own)")
    contrast: ContrastConfig | None = None


class OutputConfig(Strict):
    dir: str | None = Field(None, description="default runs/<name>")
    wandb: WandbConfig = WandbConfig()

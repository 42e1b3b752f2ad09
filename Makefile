# Two commands do everything on a fresh machine:
#   make reproduce   set up .venv, train both toy models, run both notebooks, write res/
#   make test        set up .venv, run ruff and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: reproduce test study bench gpu-check clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

reproduce: $(VENV)/.installed
	$(PY) reproduce.py $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sample.py

# On a CUDA machine: the CUDA-graph step against the CPU step (test), then its speed and a 50k-step projection
gpu-check: $(VENV)/.installed
	bash benchmarks/gpu_check.sh $(PY)

clean-venv:
	rm -rf $(VENV)

study: $(VENV)/.installed
	$(PY) study.py --preset cpu $(ARGS)

# On a fresh machine (each target sets up .venv from requirements*.txt first):
#   make reproduce   3 seeds of both toy models, the headline, both notebooks; writes results/reproduce/
#                    and compares the headline with the committed res/reproduce/ (ARGS=--refresh-res
#                    rewrites res/reproduce/: maintainers only)
#   make notebooks   open both notebooks in JupyterLab (this environment's kernel); with nothing trained
#                    they use the weights shipped in res/*/weights/
#   make test        ruff and the test suite
# One target per preset of ditnorm/presets.py: train (or resume), measure what is not yet measured, report.
# Outputs go to results/<preset>/; ARGS=--refresh-res writes the committed res/<preset>/ instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: reproduce notebooks test study paper mnist interventions bench gpu-paper clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

define preset
	$(PY) experiment.py train --preset $(1) --jobs $(JOBS) $(ARGS)
	$(PY) experiment.py measure --preset $(1) --jobs $(JOBS) $(ARGS)
	$(PY) experiment.py report --preset $(1) $(ARGS)
endef

# 3 seeds x {LayerNorm, no norm} at the CPU recipe (27-29 min on 2 cores: train 8, measure 16-19, report 1-2;
# AVX-512 Intel Xeon and AVX2 AMD EPYC, docs/performance.md)
reproduce: $(VENV)/.installed
	$(call preset,reproduce)

# 4 norms x 2 data sets x 6 seeds at the short CPU recipe
study: $(VENV)/.installed
	$(call preset,study)

# The paper schedule (batch 2048, lr 1e-4, EMA 0.9999, 50k steps) for layernorm and none, seeds 0-2: about
# 2 h 20 min per pair of runs on 2 cores (5.3-6.5 steps/s each, AMD EPYC, seed 0 on 2026-12-04);
# interrupted runs resume from their last checkpoint.
paper: $(VENV)/.installed
	$(call preset,paper)

# Real images: MnistDiT-XS/4 and -S/4, layernorm and none at 3 seeds, rmsnorm and dyt at one, 10k steps at
# batch 64 (about 25 min per XS run and 90 min per S run on one core), measured on the held-out digits.
mnist: $(VENV)/.installed
	$(call preset,mnist)

# When does LayerNorm hurt? Weight decay, dropout and a cap on each block's output, MnistDiT-XS/4, layernorm and
# none at 3 seeds (30 runs; ~22 min a run, two side by side at 7.3-7.8 steps/s each, on the 2-core Intel
# Xeon with AVX-512, 2026-12-07; res/interventions/prediction.md).
interventions: $(VENV)/.installed
	$(call preset,interventions)

# ARGS are jupyter lab's, e.g. ARGS="--no-browser --port 8890"
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter lab $(ARGS) ToyDiT_visualization.ipynb TokenEmbeddingsViz.ipynb

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sample.py

# On a CUDA machine: the CUDA checks and the whole paper-schedule study (benchmarks/gpu_paper.sh)
gpu-paper: $(VENV)/.installed
	bash benchmarks/gpu_paper.sh $(PY)

clean-venv:
	rm -rf $(VENV)

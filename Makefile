# On a fresh machine (each target sets up .venv from requirements*.txt first):
#   make reproduce   3 seeds of both toy models, the headline, both notebooks; writes results/reproduce/
#                    and compares the headline with the committed res/reproduce/ (ARGS=--refresh-res
#                    rewrites res/reproduce/: maintainers only)
#   make notebooks   open both notebooks in JupyterLab (this environment's kernel)
#   make test        ruff and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: reproduce notebooks test study paper paper-cpu bench gpu-check gpu-paper clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

reproduce: $(VENV)/.installed
	$(PY) reproduce.py $(ARGS)

# ARGS are jupyter lab's, e.g. ARGS="--no-browser --port 8890"
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter lab $(ARGS) ToyDiT_visualization.ipynb TokenEmbeddingsViz.ipynb

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

# The paper schedule (batch 2048, lr 1e-4, EMA 0.9999, 50k steps, a checkpoint every 5k) for layernorm and
# none, seed 0, zero data, on the CPU: both runs at once, one thread each (~90 min on 2 cores). The study
# samples every checkpoint (1000 x 1000 steps) with the EMA weights, then with the raw ones (the runs are
# reused); the notebooks make the 10k/50k figures of the original study.
PAPER := results/paper_cpu
PAPER_STUDY := study.py --preset gpu --device cpu --norms layernorm,none --data zeros --seeds 1 --jobs 2 \
	--no-dyt-check
paper-cpu: $(VENV)/.installed
	$(PY) $(PAPER_STUDY) --results-dir $(PAPER) --res-dir res/paper_cpu
	$(PY) $(PAPER_STUDY) --weights raw --results-dir $(PAPER) --res-dir res/paper_cpu/raw
	$(PY) reproduce.py --layernorm-run $$(echo $(PAPER)/zeros-layernorm-seed0/*-ToyDiT-1-layernorm) \
		--none-run $$(echo $(PAPER)/zeros-none-seed0/*-ToyDiT-1-none) --steps 10000,50000 \
		--results-dir $(PAPER) --out-dir res/paper_cpu --refresh-res --pretrained ''

# The paper-schedule study with seeds (res/paper/): train or resume layernorm and none, seeds 0-2, two runs
# at a time with one thread each (about 1 h 40 min per pair on 2 idle cores), measure every checkpoint, report.
# Interrupted runs resume where their last checkpoint left off.
paper: $(VENV)/.installed
	$(PY) paper.py train $(ARGS)
	$(PY) paper.py measure $(ARGS)
	$(PY) paper.py report $(ARGS)

# On a CUDA machine: the CUDA checks and the whole paper-schedule study (benchmarks/gpu_paper.sh)
gpu-paper: $(VENV)/.installed
	bash benchmarks/gpu_paper.sh $(PY)

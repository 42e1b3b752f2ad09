#!/usr/bin/env bash
# The MNIST ladder on one GPU in one command: benchmarks/gpu_mnist.py trains XS, S, B, L x (layernorm and
# none at seeds 0-2, rmsnorm and dyt at seed 0) side by side in one process, then measures every run
# (ditnorm/mnist_study.measure_run) and reports (ditnorm/studies/mnist.report):
#   bash benchmarks/gpu_mnist.sh [PYTHON] [OUT] [SIZES] [PRESET] [SEEDS]   (default python3, ./gpu_out, XS,S,
#                                                            mnist, 0,1,2)
#   bash benchmarks/gpu_mnist.sh python3 gpu_out S interventions 0   # the interventions' seed 0 at S (~250 s)
# OUT/mnist/runs/*/measures.csv, results.md and curves.png are the small statistics to commit (say which
# device made them); OUT/gpu_mnist.log has everything printed. NEVER RUN ON A GPU.
# Estimate (gpu_mnist.py's docstring; arithmetic, not measured): the whole ladder takes about 42 minutes
# of device time (44 PFLOP of fp32 at 20 TFLOP/s, the small sizes launch-bound) -- it does NOT fit 10
# minutes; SIZES=XS,S takes about 7. The timeout below stops it at 590 s; rerunning resumes nothing.
set -u
PY=${1:-python3}
OUT=${2:-gpu_out}
SIZES=${3:-XS,S}  # what fits 10 minutes; XS,S,B,L for the whole ladder (~42 min)
PRESET=${4:-mnist}
SEEDS=${5:-0,1,2}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_mnist.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
start=$SECONDS
timeout 590 "$PY" benchmarks/gpu_mnist.py --device cuda --sizes "$SIZES" --preset "$PRESET" --seeds "$SEEDS" \
    --out "$OUT/$PRESET"
rc=$?
echo "== gpu_mnist.py: exit $rc after $((SECONDS - start)) s"
exit $rc

#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command:
#   bash benchmarks/gpu_check.sh [PYTHON]     (default python3; `make gpu-check` passes the venv's)
# 1. the CUDA-graph steps (plain and torch.compile'd) against the CPU step, the CUDA-graph sampler against
#    p_sample_loop (tests/test_fast_train_step.py, tests/test_fast_sampler.py -k cuda), and the forms for
#    small shapes with their one-graph tracing (tests/test_fast_small_shapes.py)
# 2. benchmarks/bench_train.py --device cuda --profile: official-style eager vs the plain graph step and the
#    compiled graph step with inductor's defaults and with combo_kernels, 50k-step projection, each against
#    the CPU step, and the GPU time per kernel of the plain and compiled steps
# 3. benchmarks/bench_sample.py --device cuda: the CUDA-graph sampler against the eager loop
# 4. a real run: train_toy.py through torchrun, one model, 50k steps at batch 2048, with empty inductor and
#    Triton caches (what a first run costs), timed end to end; its log must name the compiled step path
# It goes on after a failed part, names each failure, and exits non-zero if any part failed.
# Not yet run since the fast/ package replaced train_step.py and toy_sampler.py (no GPU since then); the
# earlier version's results are in benchmarks/h100_2026-11-26.md.
set -u
PY=${1:-python3}
cd "$(dirname "$0")/.."
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d)}
mkdir -p "$LOGS"
failed=()
part() {  # part NAME COMMAND...: run it, keep its whole output in $LOGS/NAME.log, print it but for the
          # training log's step lines other than every 10,000th
    local name=$1 rc; shift
    echo "== $name: $*"
    "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    awk '!/ step [0-9]+ \| loss/ || / step [0-9]*0000 \|/' "$LOGS/$name.log"
    if ((rc)); then failed+=("$name (exit $rc)"); fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
part tests "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_train_step.py tests/test_fast_sampler.py \
    tests/test_fast_small_shapes.py tests/test_fast_proof.py -k "cuda or graph or small"
part bench timeout 300 "$PY" benchmarks/bench_train.py --device cuda --profile --no-generic \
    --compile-modes default,default+combo_kernels
part sample timeout 120 "$PY" benchmarks/bench_sample.py --device cuda --repeats 2
runs=$(mktemp -d)
train=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_toy.py --results-dir "$runs")
start=$(date +%s%N)
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) part train timeout 300 "${train[@]}"
end=$(date +%s%N)
echo "train_toy.py, 50k steps at batch 2048 (checkpoints 10k, 50k), empty compile caches:" \
    "$(((end - start) / 1000000)) ms wall, process start to exit; logs in $LOGS"
# the run records how its step was built (first log line and config.json)
part train-records grep -q "step path cuda-graph-compiled (compile mode default)" "$LOGS/train.log"
if [[ " ${failed[*]} " == *" train "* ]]; then  # the same run without torch.compile, to tell the two apart
    part train-no-compile timeout 300 "${train[@]}" --no-compile
fi
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"

#!/usr/bin/env bash
# The CUDA path's checks and the paper-schedule study on one GPU, in one command (~10 min planned):
#   bash benchmarks/gpu_paper.sh [PYTHON] [OUT]        (default python3 and ./gpu_out)
# 1. the CUDA tests: the CUDA-graph sampler against p_sample_loop (tests/test_fast_sampler.py -k cuda)
# 2. experiment.py train --preset paper --device cuda: layernorm and none, seeds 0-2, six runs side by side on the GPU
# 3. experiment.py measure --preset paper --device cuda, then report: results/paper/res/ as res/paper/
#    is laid out, from the GPU's runs
# Everything it prints goes to OUT/gpu_paper.log as well; OUT/res_paper.tar.gz holds that record (commit its
# runs/ files with the log, saying which device made them). Not yet run on a GPU. Since the CUDA-graph
# training step was removed, CUDA trains with the trainer's plain step: the H100 record's projection for a
# plain eager step is 784-945 s per 50k-step run (docs/performance.md), so the 420 s limit of part 2 no
# longer fits six runs; measure before relying on it.
set -u
PY=${1:-python3}
OUT=${2:-gpu_out}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_paper.log") 2>&1
failed=()
part() {  # part NAME COMMAND...: run it, say how long it took and whether it failed
    local name=$1 start=$SECONDS rc; shift
    echo "== $name: $*"
    "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if ((rc)); then failed+=("$name"); fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
part tests timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_sampler.py -k "cuda or graph"
runs=$(mktemp -d)
flags=(--preset paper --device cuda --seeds 0,1,2 --results-dir "$runs")
part train timeout 420 "$PY" experiment.py train "${flags[@]}" --jobs 6
grep -h "step path" "$runs"/paper/*/log.txt | head -2
part measure timeout 300 "$PY" experiment.py measure "${flags[@]}" --jobs 3
part report "$PY" experiment.py report "${flags[@]}"
tar czf "$OUT/res_paper.tar.gz" -C "$runs/paper" res
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all parts passed"

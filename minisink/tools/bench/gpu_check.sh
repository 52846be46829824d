#!/usr/bin/env bash
# Every GPU check in one run, most important first, each step given at most what is left of a time
# budget, so that a run cut short still reports what it measured (JSON rows are written per model).
#
#   bash minisink/tools/bench/gpu_check.sh [OUT_DIR] [SECONDS]    # default: gpu-check, 560 s
#
# OUT_DIR gets gpu_check.log (everything printed) and one JSON file of rows per benchmark run.
#
# 1. the pythia-6.9b shape in bf16: eager, compiled (CUDA graphs), recompute   (python -m minisink bench gpu)
# 2. the CUDA tests: tests/test_cuda.py and the CUDA cases of tests/test_dtypes.py
# 3. the llama-2-7b, falcon-7b and mpt-7b shapes in bf16
# 4. pythia-6.9b in fp16, then the other three in fp16, eager and recompute only (no compile)
# then one summary table of every row measured. Compiling a 7B step takes most of the time.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu-check}
budget=${2:-560}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1   # one log of everything, beside the JSON rows
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py=${PYTHON:-python3}

left() {  # seconds for the next step: at most $1, and what the budget has left, less 15 for the summary
  local rest=$((budget - SECONDS - 15))
  echo $((rest < $1 ? (rest > 0 ? rest : 1) : $1))
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $py -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; }

bench() {  # bench NAME LIMIT ARGS...: one benchmark run, its log and JSON rows under $out
  local name=$1 limit; limit=$(left "$2"); shift 2
  timeout "$limit" $py -m minisink bench gpu --json "$out/$name.json" "$@"
  echo "[$name: exit $? after $SECONDS s]"
}

bench 1-pythia-bf16 200 --models pythia-6.9b --dtype bf16
timeout "$(left 150)" $py -m pytest -q -p no:cacheprovider -rfEs --durations=8 -k cuda \
  tests/test_cuda.py tests/test_dtypes.py
echo "[tests: exit $? after $SECONDS s]"
bench 3-bf16 240 --models llama-2-7b,falcon-7b,mpt-7b --dtype bf16
bench 4-pythia-fp16 100 --models pythia-6.9b --dtype fp16
bench 5-fp16-eager 100 --models llama-2-7b,falcon-7b,mpt-7b --dtype fp16 --no-compile

$py - "$out" <<'PY'
import json, sys
from pathlib import Path
from minisink.tools.bench.gpu import summary
rows = [r for f in sorted(Path(sys.argv[1]).glob("*.json")) for r in json.loads(f.read_text())["rows"]]
summary(rows)
PY
echo "[gpu_check: done after $SECONDS s]"

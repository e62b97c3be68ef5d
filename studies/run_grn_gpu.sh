#!/usr/bin/env bash
# The GRN study (studies/grn_study.py --budget gpu) on one GPU, sized to finish within about
# 170 s on an H100 with 16 CPU cores, startup included: six training processes share the GPU
# (tiny models are launch-bound, so one process alone leaves it mostly idle). A deadline inside
# the study stops launching runs after 130 s and kills stragglers 25 s later, and the table is
# rewritten after every finished run, so a slow machine still leaves a (partial) result.
#
# Run from the repository root, with the full Fashion-MNIST IDX files in .fmnist/:
#     OUT=/some/folder bash studies/run_grn_gpu.sh [extra grn_study.py options]
# Writes 5 files: $OUT/grn/{results.md,results.json,collapse_block.png,collapse_expansion.png}
# and $OUT/grn_log.txt. The training runs go to a scratch folder outside $OUT.
# A dry run on a CPU at a tiny scale:
#     OUT=/tmp/g bash studies/run_grn_gpu.sh --device cpu --max-steps 2 --jobs 3
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
cd "$(dirname "$0")/.."
DATA=${DATA:-.fmnist}
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/grn_work.XXXXXX")
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT"
{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "cpu cores: $(getconf _NPROCESSORS_ONLN)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  time "$PY" studies/grn_study.py --budget gpu --device cuda --data "$DATA" \
    --output "$OUT/grn" --work "$WORK" "$@"
  date -u +"end %Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee "$OUT/grn_log.txt"

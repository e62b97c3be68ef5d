#!/usr/bin/env bash
# One GPU session for issue 12: the CUDA tests, then the benchmark table (bf16, 224 px, mask 0.6),
# most important first; each part under its own time limit so the whole fits a device budget
# (the first session ran with TEST_S=45 LARGE_S=40 ATTO_S=30: too short for large and atto).
#   OUT=/some/dir bash benchmarks/gpu_check.sh      (logs in $OUT, default ./gpu_logs)
set -u
source "$(dirname "$0")/gpu_session.sh"
# 1. CUDA tests without compilation (sync debug mode, CUDA-graph step, sparse == dense)
timeout ${TEST_S:-90} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not compile" > "$OUT/test_gpu.log" 2>&1
echo "tests done at $(elapsed) s" >> "$OUT/times.txt"
# 2. the benchmark rows (regional compile + CUDA graphs), most important first
BENCH="benchmarks/fcmae_speed.py --device cuda --amp bf16 --compile --mode eager,graph,compile+graph,compile --repeats 10 --select-repeats 5"
timeout ${BASE_S:-150} $PY $BENCH --time-limit $(( ${BASE_S:-150} - 75 )) --model convnextv2_base --batch 64 --profile > "$OUT/bench_base_b64.log" 2>&1
echo "base done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${LARGE_S:-120} $PY $BENCH --time-limit $(( ${LARGE_S:-120} - 50 )) --model convnextv2_large --batch 32 --contenders sparse,masked-dense > "$OUT/bench_large_b32.log" 2>&1
echo "large done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${ATTO_S:-100} $PY $BENCH --time-limit $(( ${ATTO_S:-100} - 45 )) --model convnextv2_atto --batch 256 --contenders sparse,masked-dense > "$OUT/bench_atto_b256.log" 2>&1
echo "atto done at $(elapsed) s" >> "$OUT/times.txt"
# 3. whatever time is left: compiled-model tests on CUDA, base in fp32
if [ "$(elapsed)" -lt "${REST_AFTER_S:-200}" ]; then
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "compile" > "$OUT/test_gpu_compile.log" 2>&1
  echo "compile tests done at $(elapsed) s" >> "$OUT/times.txt"
fi
echo "total $(elapsed) s" >> "$OUT/times.txt"

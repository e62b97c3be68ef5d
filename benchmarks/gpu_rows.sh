#!/usr/bin/env bash
# Second GPU session for issue 12 (the first, gpu_check.sh, measured base b64 in every mode): the
# remaining rows in their best mode found there (compile+graph), three benchmark processes at once
# so that their compilations overlap; their final timed rounds take turns (--barrier, a file lock).
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
LIMIT=${LIMIT:-200}  # 93 s was too short: three parallel compiles took 58-62 s each before the first timing
B="$OUT/barrier"
COMMON="benchmarks/fcmae_speed.py --device cuda --amp bf16 --compile --mode compile+graph --repeats 10 --barrier $B --barrier-count 3 --barrier-timeout 25"
timeout $LIMIT $PY $COMMON --model convnextv2_large --batch 32 --contenders sparse,masked-dense > "$OUT/bench_large_b32.log" 2>&1 &
timeout $LIMIT $PY $COMMON --model convnextv2_atto --batch 256 --contenders sparse,masked-dense > "$OUT/bench_atto_b256.log" 2>&1 &
timeout $LIMIT $PY $COMMON --model convnextv2_base --batch 64 --contenders sparse,encoder > "$OUT/bench_base_b64_encoder.log" 2>&1 &
wait
rm -f "$B".*

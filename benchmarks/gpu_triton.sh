#!/usr/bin/env bash
# One GPU session for the Triton depthwise (sparse_dwconv="triton"), most important first, sized
# for a ~10-minute device slot (each part under its own limit; logs in $OUT, default ./gpu_logs):
#   1. the CUDA tests without compilation: the Triton kernels against cuDNN (fp32, bf16), the
#      step under sync-debug "error", the CUDA-graph step, sparse == masked dense; then one
#      depthwise layer per stage, grid vs Triton (benchmarks/dwconv_kernels.py);
#   2. the three benchmark rows (base b64, large b32, atto b256; bf16, 224 px, compile+graph),
#      sparse (cuDNN on the zero-filled map) vs sparse-triton vs masked-dense, three processes
#      whose compilations overlap and whose timed rounds take turns (--barrier);
#   3. where one eager step of each sparse kernel spends its GPU time (base b64, torch.profiler);
#   4. the input pipeline with nvJPEG decoding (benchmarks/data_pipeline.py --device cuda), and
#      what a base b32/b64 bf16 step keeps for backward on CUDA (benchmarks/saved_activations.py);
#   5. with the time left, the compiled-model CUDA tests (whole-model compile, reduce-overhead).
#   OUT=/some/dir bash benchmarks/gpu_triton.sh
set -u
source "$(dirname "$0")/gpu_session.sh"
timeout ${TEST_S:-120} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not compile" > "$OUT/test_gpu.log" 2>&1
echo "tests done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${LAYER_S:-60} $PY benchmarks/dwconv_kernels.py --model convnextv2_base --batch 64 > "$OUT/dwconv_layers_base_b64.log" 2>&1
timeout 30 $PY benchmarks/dwconv_kernels.py --model convnextv2_atto --batch 256 > "$OUT/dwconv_layers_atto_b256.log" 2>&1
echo "layer timings done at $(elapsed) s" >> "$OUT/times.txt"
LIMIT=${ROWS_S:-250}
B="$OUT/barrier"
COMMON="benchmarks/fcmae_speed.py --device cuda --amp bf16 --compile --mode compile+graph --repeats 10 --barrier $B --barrier-count 3 --barrier-timeout 40 --contenders sparse,sparse-triton,masked-dense"
timeout $LIMIT $PY $COMMON --model convnextv2_base --batch 64 > "$OUT/bench_base_b64.log" 2>&1 &
timeout $LIMIT $PY $COMMON --model convnextv2_large --batch 32 > "$OUT/bench_large_b32.log" 2>&1 &
timeout $LIMIT $PY $COMMON --model convnextv2_atto --batch 256 > "$OUT/bench_atto_b256.log" 2>&1 &
wait
rm -f "$B".*
echo "rows done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${PROFILE_S:-60} $PY benchmarks/fcmae_speed.py --device cuda --amp bf16 --mode eager --repeats 5 \
  --contenders sparse,sparse-triton --model convnextv2_base --batch 64 --profile > "$OUT/profile_base_b64.log" 2>&1
echo "profile done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${DECODE_S:-45} $PY benchmarks/data_pipeline.py --device cuda --workers 0 4 --images 512 --epochs 1 > "$OUT/data_pipeline_cuda.log" 2>&1
echo "decode done at $(elapsed) s" >> "$OUT/times.txt"
timeout ${SAVED_S:-30} $PY benchmarks/saved_activations.py --device cuda --model convnextv2_base --batch 32 64 --amp bf16 > "$OUT/saved_activations_base.log" 2>&1
echo "saved activations done at $(elapsed) s" >> "$OUT/times.txt"
if [ "$(elapsed)" -lt "${REST_AFTER_S:-470}" ]; then
  timeout $(( 580 - $(elapsed) )) $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "compile" > "$OUT/test_gpu_compile.log" 2>&1
  echo "compile tests done at $(elapsed) s" >> "$OUT/times.txt"
fi
echo "total $(elapsed) s" >> "$OUT/times.txt"

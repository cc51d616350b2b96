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
OUT=${OUT:-gpu-wave5-results}
work=${WORK:-/tmp/wave5}
. "$(dirname "$0")/gpu_common.sh"

for stage in ${STAGES:-serve}; do
  mkdir -p "$work/$stage"
  case $stage in
  serve)  # gpu_wave4.sh's serve stage, as it is, into $OUT/serve.tgz
    OUT="$OUT" WORK="$work/serve-run" STAGES=serve bash "$(dirname "$0")/gpu_wave4.sh"
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

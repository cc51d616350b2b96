#!/usr/bin/env bash
# Serving on one GPU box, side by side in one run (issue 13): `make serve`'s launcher
# (serve/local.py) with a cut-down serve_config.yaml (the OIP router + the models in $MODELS, each
# with $REPLICAS replicas sharing the card), once per ingress in $INGRESSES; for each model, after
# its replicas have finished warming their batch sizes (GET /<model>/tuning: warm_sizes.background
# is no longer "running"; measuring before that times the warm-up's first runs of new sizes, which
# cost ~1 s each on an H200 for YOLO), `autobatch bench`:
#   simple route, one JPEG per request, 64 clients      (what a plain HTTP client sends)
#   OIP v2 over HTTP, 32 JPEGs per request, 16 clients  (binary tensor data)
#   OIP v2 over gRPC, 32 JPEGs per request, 16 clients
# Results: one JSON report per run under $OUT (or ./gpu-serving-results), and a table on stdout.
#
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; bash benchmarks/gpu_serving.sh
#   MODELS="resnet50 vit_b_16" REPLICAS=2 INGRESSES=haproxy DURATION=10 bash benchmarks/gpu_serving.sh
# Each launch costs ~45 s before the first answer plus the warm-up; keep one call within 10 minutes.
set -uo pipefail
out=${OUT:-gpu-serving-results}; mkdir -p "$out"
duration=${DURATION:-15}
models=${MODELS:-resnet50}
replicas=${REPLICAS:-1}
py=${PYTHON:-python3}
cfg=$(mktemp --suffix=.yaml)
"$py" - "$cfg" "$replicas" $models <<'PY'
import sys, yaml
path, replicas, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
config = yaml.safe_load(open("serve_config.yaml"))
apps = [a for a in config["applications"] if a["name"] in ("oip", *models)]
share = 1.0 / len(models)  # the card split between the models, then between each model's replicas
for app in apps:
    if app["name"] == "oip":
        app["args"]["models"] = models
    else:
        app["args"].update(num_cpus=1, memory_fraction=round(0.9 * share, 3))
        app["args"].pop("num_gpus", None)
        if replicas > 1:
            app["args"]["replicas_per_gpu"] = replicas
            app["args"]["memory_fraction"] = round(0.9 * share / replicas, 3)
        else:
            app["args"]["num_gpus"] = round(share, 3)
config["applications"] = apps
yaml.safe_dump(config, open(path, "w"))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# PYSPY=/path/to/py-spy: sample the model's replicas and the router (6 s, from 2 s into a bench) as
# collapsed stacks per thread, to see where a replica's CPU goes under load.
spy() {
  [ -n "${PYSPY:-}" ] || return 0
  for who in "ServeReplica:$model:" "ServeReplica:oip:"; do
    for pid in $(pgrep -f "$who"); do
      (sleep 2; timeout 30 "$PYSPY" record -p "$pid" -d 6 -r 250 --threads --nonblocking --format raw \
        -o "$out/spy-$1-$(echo "$who" | cut -d: -f2)-$pid.txt" >/dev/null 2>&1) &
    done
  done
}
for ingress in ${INGRESSES:-haproxy proxy}; do
  launched=$SECONDS
  setsid "$py" -m serve.local "$cfg" --ingress "$ingress" --temp-dir /tmp/rayb > "$out/serve-$ingress-r$replicas.log" 2>&1 &
  pid=$!
  for model in $models; do
    ok=0
    for _ in $(seq 1 300); do
      if curl -sf "127.0.0.1:8000/$model/tuning" 2>/dev/null | "$py" -c 'import json,sys; t=json.load(sys.stdin); sys.exit((t.get("warm_sizes") or {}).get("background") == "running")' 2>/dev/null; then ok=1; break; fi
      sleep 1
    done
    echo "== ingress $ingress, $model x$replicas replicas: tuned and warm=$ok $((SECONDS - launched)) s after the launch"
    [ "$ok" = 1 ] || continue
    curl -s "127.0.0.1:8000/$model/tuning" | "$py" -c 'import json,sys; t=json.load(sys.stdin); print("tuned batch", t["batch_size"], "max safe", t["max_safe_batch"], "serving", t["serving"]["max_batch_size"], "wait ms", round(t["serving"]["batch_wait_timeout_s"]*1e3,1), "cache", t["cache"])'
    tag="$ingress-$model-r$replicas"
    spy "$tag-simple"
    "$py" -m serve.bench --route "$model" --concurrency 64 --duration "$duration" --warmup 64 --no-progress --out "$out/$tag-simple-1x64.json" | tail -3
    spy "$tag-v2http"
    "$py" -m serve.bench --route "$model" --protocol v2 --samples-per-request 32 --concurrency 16 --duration "$duration" --warmup 16 --no-progress --out "$out/$tag-v2http-32x16.json" | tail -3
    "$py" -m serve.bench --route "$model" --protocol v2 --transport grpc --samples-per-request 32 --concurrency 16 --duration "$duration" --warmup 16 --no-progress --out "$out/$tag-v2grpc-32x16.json" | tail -3
  done
  kill -INT -- -"$pid" 2>/dev/null; sleep 8; kill -KILL -- -"$pid" 2>/dev/null; sleep 2
done

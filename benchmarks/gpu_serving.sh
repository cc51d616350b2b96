#!/usr/bin/env bash
# Serving on one GPU box, side by side in one run: `make serve`'s launcher (serve/local.py) with a
# cut-down serve_config.yaml (the OIP router + ResNet-50 on the whole card), under the HAProxy ingress
# and then Ray's default proxy; in each, `autobatch bench`:
#   simple route, one JPEG per request, 64 clients      (what a plain HTTP client sends)
#   OIP v2 over HTTP, 32 JPEGs per request, 16 clients  (binary tensor data)
#   OIP v2 over gRPC, 32 JPEGs per request, 16 clients
# Results: one JSON report per run under $OUT (or ./gpu-serving-results), and a table on stdout.
#
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; bash benchmarks/gpu_serving.sh
set -uo pipefail
out=${OUT:-gpu-serving-results}; mkdir -p "$out"
duration=${DURATION:-15}
py=${PYTHON:-python3}
cfg=$(mktemp --suffix=.yaml)
"$py" - "$cfg" <<'PY'
import sys, yaml
config = yaml.safe_load(open("serve_config.yaml"))
apps = [a for a in config["applications"] if a["name"] in ("oip", "resnet50")]
for app in apps:
    if app["name"] == "oip":
        app["args"]["models"] = ["resnet50"]
    else:
        app["args"].update(num_gpus=1.0, num_cpus=1)
config["applications"] = apps
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY
for ingress in haproxy proxy; do
  setsid "$py" -m serve.local "$cfg" --ingress "$ingress" --temp-dir /tmp/rayb > "$out/serve-$ingress.log" 2>&1 &
  pid=$!
  ok=0
  for _ in $(seq 1 240); do
    if curl -sf 127.0.0.1:8000/v2/models/resnet50/ready >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  echo "== ingress $ingress: ready=$ok after ${SECONDS}s"
  if [ "$ok" = 1 ]; then
    curl -s 127.0.0.1:8000/resnet50/tuning | "$py" -c 'import json,sys; t=json.load(sys.stdin); print("tuned batch", t["batch_size"], "max safe", t["max_safe_batch"], "serving", t["serving"]["max_batch_size"], "wait ms", round(t["serving"]["batch_wait_timeout_s"]*1e3,1))'
    "$py" -m serve.bench --route resnet50 --concurrency 64 --duration "$duration" --warmup 64 --no-progress --out "$out/$ingress-simple-1x64.json" | tail -4
    "$py" -m serve.bench --route resnet50 --protocol v2 --samples-per-request 32 --concurrency 16 --duration "$duration" --warmup 16 --no-progress --out "$out/$ingress-v2http-32x16.json" | tail -4
    "$py" -m serve.bench --route resnet50 --protocol v2 --transport grpc --samples-per-request 32 --concurrency 16 --duration "$duration" --warmup 16 --no-progress --out "$out/$ingress-v2grpc-32x16.json" | tail -4
  fi
  kill -INT -- -"$pid" 2>/dev/null; sleep 8; kill -KILL -- -"$pid" 2>/dev/null; sleep 2
done

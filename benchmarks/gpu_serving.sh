#!/usr/bin/env bash
# Serving on one GPU box, side by side in one run (issue 13): `make serve`'s launcher
# (serve/local.py) with a cut-down serve_config.yaml (the OIP router with $ROUTERS replicas + the
# models in $MODELS, each with $REPLICAS replicas sharing the card), once per ingress in $INGRESSES;
# for each model, after its replicas have finished warming their batch sizes (GET /<model>/tuning:
# warm_sizes.background is no longer "running"; measuring before that times the warm-up's first runs
# of new sizes, which cost ~1 s each on an H200 for YOLO), `autobatch bench`:
#   simple route, one JPEG per request, at each of $SIMPLE_LEVELS clients (what a plain HTTP client
#       sends; from $PROCESSES load processes: one process cannot send 1,000 requests/s)
#   OIP v2 over HTTP, $SAMPLES JPEGs per request, $V2_CLIENTS clients (binary tensor data; or each of $V2_LEVELS)
#   OIP v2 over gRPC, the same (unless V2_GRPC=0)
# $SERVER_TREE (default .) is where the served code comes from: a checkout of an earlier commit
# serves "before" with this tree's load generator, so both are measured by the same client.
# Results: one JSON report per run under $OUT (or ./gpu-serving-results), and a table on stdout.
#
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; bash benchmarks/gpu_serving.sh
#   MODELS="resnet50 vit_b_16" REPLICAS=2 INGRESSES=haproxy DURATION=10 bash benchmarks/gpu_serving.sh
#   SERVER_TREE=.baseline TAG=before MODELS=resnet50 INGRESSES=haproxy bash benchmarks/gpu_serving.sh
# Each launch costs ~45 s before the first answer plus the warm-up; keep one call within 10 minutes.
set -uo pipefail
out=${OUT:-gpu-serving-results}; mkdir -p "$out"
duration=${DURATION:-15}
models=${MODELS:-resnet50}
replicas=${REPLICAS:-1}
routers=${ROUTERS:-2}
num_cpus=${NUM_CPUS:-2}
simple_levels=${SIMPLE_LEVELS:-64}
processes=${PROCESSES:-4}
samples=${SAMPLES:-32}
v2_clients=${V2_CLIENTS:-24}
server_tree=$(cd "${SERVER_TREE:-.}" && pwd)
tag=${TAG:+$TAG-}
py=$(command -v "${PYTHON:-python3}")
case $py in /*) ;; *) py=$PWD/$py ;; esac  # absolute: the launcher runs from $SERVER_TREE
cfg=$(mktemp --suffix=.yaml)
"$py" - "$cfg" "$replicas" "$routers" "$num_cpus" "$server_tree/serve_config.yaml" $models <<'PY'
import sys, yaml
path, replicas, routers, num_cpus, source, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6:]
config = yaml.safe_load(open(source))
apps = [a for a in config["applications"] if a["name"] in ("oip", *models)]
share = 1.0 / len(models)  # the card split between the models, then between each model's replicas
for app in apps:
    if app["name"] == "oip":
        app["args"]["models"] = models
        app["args"]["num_replicas"] = routers
    else:
        app["args"].update(num_cpus=num_cpus, memory_fraction=round(0.9 * share, 3))
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
bench() {  # bench TAG ARGS...: one autobatch bench run, its report to $out/TAG.json, its summary lines here
  local name=$1; shift
  echo "-- $name"
  "$py" -m autobatch.client.bench --route "$model" --duration "$duration" --no-progress --out "$out/$name.json" "$@" | tail -3
}
# A `timeout` or Ctrl-C that ends this script ends what it launched too (the launcher runs in a group
# of its own, and `ray start` daemonises the cluster outside it).
pid=
cleanup() {
  [ -n "$pid" ] && { kill -INT -- -"$pid" 2>/dev/null; sleep 5; kill -KILL -- -"$pid" 2>/dev/null; }
  ray stop --force >/dev/null 2>&1; pkill -x haproxy 2>/dev/null
}
trap 'cleanup; exit 143' TERM INT
for ingress in ${INGRESSES:-haproxy proxy}; do
  launched=$SECONDS
  (cd "$server_tree" && PYTHONPATH="$server_tree${PYTHONPATH:+:$PYTHONPATH}" exec setsid "$py" -m serve.local "$cfg" \
     --ingress "$ingress" --temp-dir /tmp/rayb) > "$out/serve-$tag$ingress-r$replicas.log" 2>&1 &
  pid=$!
  for model in $models; do
    ok=0
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || { echo "the launcher exited; see $out/serve-$tag$ingress-r$replicas.log"; break; }
      if curl -sf "127.0.0.1:8000/$model/tuning" 2>/dev/null | "$py" -c 'import json,sys; t=json.load(sys.stdin); sys.exit((t.get("warm_sizes") or {}).get("background") == "running")' 2>/dev/null; then ok=1; break; fi
      sleep 1
    done
    echo "== ${tag:+$tag: }ingress $ingress, $model x$replicas replicas: tuned and warm=$ok $((SECONDS - launched)) s after the launch"
    [ "$ok" = 1 ] || continue
    curl -s "127.0.0.1:8000/$model/tuning" | tee "$out/$tag$ingress-$model-r$replicas-tuning.json" | "$py" -c 'import json,sys; t=json.load(sys.stdin); s=t["serving"]; print("tuned batch", t["batch_size"], "max safe", t["max_safe_batch"], "serving", s["max_batch_size"], "wait ms", round(s["batch_wait_timeout_s"]*1e3,1), "overlap", s.get("overlap"), "cache", t["cache"])'
    name="$tag$ingress-$model-r$replicas"
    for clients in $simple_levels; do
      spy "$name-simple-$clients"
      p=$(( clients < processes ? clients : processes ))
      bench "$name-simple-1x$clients" --concurrency "$clients" --warmup "$clients" --processes "$p"
    done
    for v2c in ${V2_LEVELS:-$v2_clients}; do  # V2_LEVELS="16 32 64 128": a goodput curve past saturation
      spy "$name-v2http-$v2c"
      bench "$name-v2http-${samples}x$v2c" --protocol v2 --samples-per-request "$samples" --concurrency "$v2c" \
        --warmup "$v2c" --processes 2
    done
    if [ "${V2_GRPC:-1}" = 1 ]; then
      bench "$name-v2grpc-${samples}x$v2_clients" --protocol v2 --transport grpc --samples-per-request "$samples" \
        --concurrency "$v2_clients" --warmup "$v2_clients"
    fi
    curl -s "127.0.0.1:8000/$model/tuning" > "$out/$name-tuning-after.json"
  done
  kill -INT -- -"$pid" 2>/dev/null; sleep 8; kill -KILL -- -"$pid" 2>/dev/null
  # `ray start` daemonised the cluster outside the launcher's group: stop it, and the ingress it ran,
  # so that the next launch (another ingress, another tree) starts clean on the same ports
  ray stop --force >/dev/null 2>&1; pkill -x haproxy 2>/dev/null
  for _ in $(seq 1 30); do ss -ltn | grep -qE ':(8000|9000|6379) ' || break; sleep 1; done
done

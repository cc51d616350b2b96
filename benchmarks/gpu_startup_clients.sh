#!/usr/bin/env bash
# On one GPU box (issues 12 and 14): serve_config.yaml through `make serve`'s launcher, cold (empty
# tuning cache) and cached, HAProxy ingress, then cached again under Ray's default proxy; in each,
# start-up to first answer per model (benchmarks/startup.py) and README's tritonclient script for
# all four models over HTTP and gRPC, 1 and 32 samples per request (examples/oip_clients.py).
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; bash benchmarks/gpu_startup_clients.sh
# tritonclient: `pip install tritonclient[http]`, or on the device (no index) wheels in .gpu-extra/, made here
# by benchmarks/gpu_extra_wheels.sh and carried: carry [".gpu", ".gpu-extra"].
set -uo pipefail
out=${OUT:-gpu-startup-results}; mkdir -p "$out"
if [ -d .gpu-extra ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/tc .gpu-extra/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/tc:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
py=${PYTHON:-python3}  # the GPU image has python3 only
clients="$py examples/oip_clients.py --samples 1 32"
cache=$(mktemp -d)/tuning.json
timeout 360 "$py" benchmarks/startup.py --runs cold cached --ingress haproxy --cache "$cache" --then "$clients" --timeout-s 200 \
  --out "$out/startup-haproxy.json" 2>&1 | grep -v "^(ServeReplica\|^\s*$" | tail -60
if [ "${PROXY_LEG:-1}" = 1 ]; then
  timeout 200 "$py" benchmarks/startup.py --runs cached --ingress proxy --cache "$cache" --then "$clients" \
    --out "$out/startup-proxy.json" 2>&1 | grep -v "^(ServeReplica\|^\s*$" | tail -40
fi
# the launchers' logs (each replica's load, tuning and warm-up lines) in one file: a device run returns 8 files at most
mkdir -p /tmp/startup-logs && cp /tmp/startup-*/serve-*.log /tmp/startup-logs/ 2>/dev/null
tar -czf "$out/startup-logs.tgz" -C /tmp startup-logs

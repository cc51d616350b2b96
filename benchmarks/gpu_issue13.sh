#!/usr/bin/env bash
# Issue 13 on one GPU box, before and after in one run (one device call, ~8 minutes):
#   1. feed_gpu.py: ResNet-50's image path stage by stage, predict whole vs overlapped, no HTTP
#   2. serving, this tree ("after"): ResNet-50 alone on the card, simple route at 1/8/32/64 clients
#      and OIP v2 with 32 JPEGs per request over HTTP and gRPC (benchmarks/gpu_serving.sh)
#   3. serving, $BASELINE ("before", a checkout of the commit before the change), the same, same client
#   4. plain Ray Serve as its docs teach (PIL decode per request, @serve.batch defaults, Ray's proxy),
#      one image per request at 1/8/32 clients (benchmarks/serving_vs_plain.py)
#   5. this tree, ViT-B/16 and YOLO11n-pose sharing the card: 64 clients, and 32 JPEGs per request
# STAGES (default "1 2 3 4 5") picks which run. Everything lands under $OUT/issue13.tgz; the summary
# table (benchmarks/serving_table.py) prints last.
#
#   B=.baseline; git archive <commit> serve_config.yaml optimizer deployments serve | tar -x -C $B   # here
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; BASELINE=.baseline bash benchmarks/gpu_issue13.sh
set -uo pipefail
final=${OUT:-gpu-issue13-results}
work=$(mktemp -d)/issue13; mkdir -p "$work"
baseline=${BASELINE:-.baseline}
duration=${DURATION:-5}
stages=" ${STAGES:-1 2 3 4 5} "
run() { save; case "$stages" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# what has finished reaches $OUT before the next stage starts (a call cut off keeps it)
save() { mkdir -p "$final"; tar -czf "$final/issue13.tgz" -C "$(dirname "$work")" issue13 2>/dev/null; }
if [ -f .gpu-extra/py-spy.xz ]; then xz -dc .gpu-extra/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/gpu.txt"
python3 -c "import torch, torchvision, ray; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)" | tee -a "$work/gpu.txt"

run 1 && echo "=== 1. the image path in-process (feed_gpu.py)" && timeout 150 python3 benchmarks/feed_gpu.py --models resnet50 --sizes 64 256 --repeats 5 --no-tuner \
  --out "$work/feed_gpu-resnet50.json" > "$work/feed_gpu.log" 2>&1
run 1 && grep -A6 "forward alone img/s" "$work/feed_gpu.log" | head -8

run 2 && echo "=== 2. after: ResNet-50" && OUT=$work/serving TAG=after MODELS=resnet50 INGRESSES=haproxy DURATION=$duration SIMPLE_LEVELS="1 8 32 64" \
  PYSPY=${PYSPY:-/tmp/py-spy} timeout 200 bash benchmarks/gpu_serving.sh 2>&1 | grep -E "^==|^tuned|^-- |throughput" | tee -a "$work/serving.log"

if run 3 && [ -d "$baseline" ]; then
  echo "=== 3. before: ResNet-50 ($baseline)"
  OUT=$work/serving SERVER_TREE=$baseline TAG=before MODELS=resnet50 INGRESSES=haproxy DURATION=$duration \
    SIMPLE_LEVELS="1 8 32 64" timeout 200 bash benchmarks/gpu_serving.sh 2>&1 | grep -E "^==|^tuned|^-- |throughput" | tee -a "$work/serving.log"
fi

run 4 && echo "=== 4. plain Ray Serve, PIL decode per request, Ray's proxy" && timeout 150 python3 benchmarks/serving_vs_plain.py --model resnet50 --device "${DEVICE:-cuda}" --variants "plain batched" \
  --plain-image-pipeline host --concurrency 1 8 32 --duration "$duration" --warmup-s 3 --raw-sizes \
  --out "$work/plain-resnet50.json" > "$work/plain.log" 2>&1
run 4 && grep -B2 -A6 "variant " "$work/plain.log" | head -12

run 5 && echo "=== 5. after: ViT-B/16 and YOLO11n-pose" && OUT=$work/serving TAG=after MODELS="vit_b_16 yolo11n_pose" INGRESSES=haproxy DURATION=$duration SIMPLE_LEVELS=64 V2_GRPC=0 \
  timeout 240 bash benchmarks/gpu_serving.sh 2>&1 | grep -E "^==|^tuned|^-- |throughput" | tee -a "$work/serving.log"

python3 benchmarks/serving_table.py "$work/serving" "$work/plain-resnet50.json" | tee "$work/summary.txt"
save; cp "$work/summary.txt" "$final/"

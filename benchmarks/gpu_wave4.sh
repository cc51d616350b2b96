#!/usr/bin/env bash
# Issues 20 and 22 on one GPU, each stage within one 10-minute device call (STAGES picks):
#   serve   serve_config.yaml as it is through `make serve`'s launcher, cold then cached, phase by
#           phase (benchmarks/startup.py: issue 22's < 60 s cold, < 15 s cached); while the cached
#           apps are up, what they serve against their own tuners (benchmarks/served_vs_tuned.py:
#           32 JPEGs per request at 16/32/64 clients for ResNet-50, 16 for ViT and YOLO, one JPEG at
#           64) and a torch.profiler capture of ResNet-50 serving beside its tuning probe at the
#           same batch (benchmarks/profile_serving.py: issue 20 item 1)
#   llama   the 8B-shaped NF4 Llama: the fast-probe search, then whole generations at its batch
#           (benchmarks/llama_fast_tuning.py --order fast,check: < 30 s, within 5%)
#   search  the vision models' search against a brute-force scan at 1/2/4 GiB
#           (benchmarks/tune_vs_bruteforce.py: <= 6 probes, never over the scan's largest)
#   layout  serve_config.yaml less the Llama (this image's transformers predates the continuous
#           scheduler's), cold, then what it serves (served_vs_tuned.py); then the same with ResNet-50
#           as 2 replicas of half its share (num_replicas 2, num_gpus 0.125): issue 20 item 3 inside
#           the default layout, one process vs two for the same quarter of the card
#   replicas ResNet-50 alone with 1, 2 and 4 replicas on the card (benchmarks/gpu_serving.sh through
#           HAProxy: one JPEG per request at $REPLICA_SIMPLE_LEVELS clients, 32 per request at
#           $REPLICA_V2_LEVELS): issue 20 item 3, whether more processes per card serve more
# $OUT gets at most 8 files back: each stage's results are packed into $OUT/<stage>.tgz, with its log
# beside it, as soon as the stage ends (a call cut off keeps what finished).
#
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES=serve bash benchmarks/gpu_wave4.sh
#   . .gpu/activate; export PYTHONPATH=$PWD:$PYTHONPATH; STAGES="llama search" bash benchmarks/gpu_wave4.sh
# The CPU rehearsal (the same stages, small): DEVICE=cpu SERVE_CONFIG=<a cut-down config> MODELS=resnet50 \
#   LEVELS="2" SIMPLE_CLIENTS="2" SAMPLES=4 STAGES="serve llama search" SEARCH_MODELS=resnet50 \
#   SEARCH_BUDGETS_MB="1024" LLAMA_ARGS=--quick LLAMA_CONFIG=small bash benchmarks/gpu_wave4.sh
set -uo pipefail
OUT=${OUT:-gpu-wave4-results}
work=${WORK:-/tmp/wave4}
. "$(dirname "$0")/gpu_common.sh"

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
  llama)
    echo "=== llama: the 8B-shaped NF4 Llama, fast probes then whole generations at their batch"
    timeout "${LLAMA_TIMEOUT:-420}" $py benchmarks/llama_fast_tuning.py --device "$device" --llama-config "${LLAMA_CONFIG:-llama3-8b}" \
      --order fast,check ${LLAMA_ARGS:-} --out "$work/llama/llama_fast.json" > "$OUT/llama.log" 2>&1
    echo "rc $?"; grep -vE "it/s\]" "$OUT/llama.log" | tail -15
    pack llama
    ;;
  search)
    echo "=== search: vision search vs brute force"
    for m in ${SEARCH_MODELS:-vit_b_16 resnet50 yolo11n_pose}; do
      timeout "${SEARCH_TIMEOUT:-75}" $py benchmarks/tune_vs_bruteforce.py --model "$m" --device "$device" \
        --budgets-mb ${SEARCH_BUDGETS_MB:-1024 2048 4096} --out "$work/search/search-$m.json" > "$work/search/search-$m.log" 2>&1
      echo "rc $? $m" | tee -a "$OUT/search.log"; tail -8 "$work/search/search-$m.log" | tee -a "$OUT/search.log"
      pack search >/dev/null
    done
    ;;
  layout)
    echo "=== layout: serve_config.yaml less the Llama, ResNet-50 as 1 then 2 replicas of its share"
    for n in ${LAYOUT_REPLICAS:-1 2}; do
      cfg="$work/layout/resnet50-x$n.yaml"
      $py - "${SERVE_CONFIG:-serve_config.yaml}" "$cfg" "$n" <<'PY'
import sys, yaml
source, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = yaml.safe_load(open(source))
apps = [a for a in config["applications"] if (a.get("args") or {}).get("model") != "llama_int4"]
for app in apps:
    args = app["args"]
    if app["name"] == "oip":
        args["models"] = [m for m in args["models"] if m != "llama_int4"]
    elif args.get("model") == "resnet50" and n > 1:  # the app's share of the card, split between n processes
        args["num_replicas"] = n
        args["num_gpus"] = round(args.get("num_gpus", 0.25) / n, 4)
        args["memory_fraction"] = round(args.get("memory_fraction", 0.22) / n, 4)
config["applications"] = apps
yaml.safe_dump(config, open(path, "w"))
PY
      models=$([ "$n" = 1 ] && echo "${LAYOUT_MODELS:-resnet50 vit_b_16 yolo11n_pose}" || echo resnet50)
      then="$py benchmarks/served_vs_tuned.py --models $models --levels ${LEVELS:-16 32} --other-levels ${OTHER_LEVELS:-16} \
--simple-clients ${SIMPLE_CLIENTS:-64} --samples-per-request ${SAMPLES:-32} --duration ${DURATION:-8} \
--out $work/layout/served-resnet50-x$n.json > $work/layout/served-resnet50-x$n.log 2>&1"
      timeout "${LAYOUT_TIMEOUT:-200}" $py benchmarks/startup.py --config "$cfg" --runs cold --then "$then" --then-runs cold \
        --timeout-s "${STARTUP_APP_TIMEOUT:-150}" --out "$work/layout/startup-resnet50-x$n.json" >> "$OUT/layout.log" 2>&1
      echo "rc $? resnet50 x$n" | tee -a "$OUT/layout.log"
      tail -12 "$work/layout/served-resnet50-x$n.log" 2>/dev/null | tee -a "$OUT/layout.log"
      stop_everything; pack layout >/dev/null
    done
    ;;
  replicas)
    echo "=== replicas: ResNet-50 alone, 1/2/4 replicas per card"
    for r in ${REPLICA_COUNTS:-1 2 4}; do
      OUT="$work/replicas" MODELS=resnet50 REPLICAS=$r INGRESSES=haproxy DURATION="${DURATION:-8}" V2_GRPC=0 \
        SIMPLE_LEVELS="${REPLICA_SIMPLE_LEVELS:-64 256}" V2_LEVELS="${REPLICA_V2_LEVELS:-64}" PROCESSES=8 \
        timeout "${REPLICA_TIMEOUT:-170}" bash benchmarks/gpu_serving.sh >> "$OUT/replicas.log" 2>&1
      echo "rc $? replicas $r" | tee -a "$OUT/replicas.log"
      stop_everything; pack replicas >/dev/null
    done
    grep -E "^==|^-- |images/s|req/s|samples/s" "$OUT/replicas.log" | tail -40
    ;;
  *) echo "unknown stage $stage" ;;
  esac
done
stop_everything

#!/usr/bin/env bash
# Make an LLM GPU bundle (../shared/tools/gpu-bundle with GPU_BUNDLE_OUT=.gpu-llm and
# GPU_BUNDLE_PKGS naming transformers>=5.19 huggingface-hub>=1.0 tokenizers safetensors accelerate
# ray[serve] bitsandbytes, ultralytics left out) start on the device machine:
#   - Ray's dashboard refuses to start without its web build folder, and `make serve`'s launcher then
#     waits 300 s for the dashboard port and exits (the 2026-12-07 H100 run): an empty page is enough;
#   - the `kernels` package makes transformers >= 5.2x fetch Hub kernels at load, which fails offline
#     (deployments/llama_int4.py also sets USE_HUB_KERNELS=0): left out.
#   bash benchmarks/gpu_llm_bundle_fixup.sh .gpu-llm/site.tar.xz
set -euo pipefail
bundle=${1:-.gpu-llm/site.tar.xz}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$bundle"
root=$work; [ -d "$work/site" ] && root=$work/site
[ -d "$root/ray" ] || { echo "no ray/ in $bundle"; exit 1; }
rm -rf "$root"/kernels "$root"/kernels-*.dist-info
mkdir -p "$root/ray/dashboard/client/build/static"
[ -f "$root/ray/dashboard/client/build/index.html" ] || echo '<!doctype html><title>Ray</title>' > "$root/ray/dashboard/client/build/index.html"
tar -C "$work" -cf - . | xz -T2 -6 > "$bundle.new"
mv "$bundle.new" "$bundle"
ls -l "$bundle"

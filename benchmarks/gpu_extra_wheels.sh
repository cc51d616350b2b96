#!/usr/bin/env bash
# The stock Triton client for a device run (the GPU image has none, and nothing can be fetched
# there): wheels for Python 3.12 / x86-64 into .gpu-extra/ (git-ignored), which
# benchmarks/gpu_startup_clients.sh installs with --no-index before running examples/oip_clients.py.
# Only what the image lacks: it already has numpy, urllib3, certifi, ml-dtypes, grpcio and protobuf
# (.gpu/'s Ray bundle brings the protobuf and grpcio versions Ray needs).
#   bash benchmarks/gpu_extra_wheels.sh      # from the project root, here (with a package index)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-extra
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu-extra \
  tritonclient==2.73.0 python-rapidjson geventhttpclient gevent greenlet zope.event zope.interface brotli
ls -la .gpu-extra

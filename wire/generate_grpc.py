"""Regenerate grpc_predict_v2_pb2.py / grpc_predict_v2_pb2_grpc.py from grpc_predict_v2.proto
(a copy of kserve/open-inference-protocol specification/protocol/open_inference_grpc.proto,
package `inference`). A development step; the generated modules are committed.

    python -m pip install --target /tmp/grpctools grpcio-tools==1.81.1
    PYTHONPATH=/tmp/grpctools:. python -m wire.generate_grpc

grpcio-tools 1.81.1 writes protobuf gencode 6.33.5, which runs on protobuf 6.33.5+ and 7.x (the
runtime accepts gencode one major version older), so it works both beside tritonclient[grpc]
(protobuf < 7) and in Ray 2.60's own set (grpcio-reflection 1.85 needs protobuf >= 7.35).

The messages are registered in a descriptor pool of their own, not protobuf's default one:
tritonclient and KServe ship their own copies of the same `inference.*` messages, and two files
defining one symbol in the default pool fail at import ("duplicate symbol
'inference.ServerLiveRequest'"), so a process could not load both. The wire format is unchanged.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PROTO = "wire/grpc_predict_v2.proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = ("# A pool of our own: tritonclient's copy of these messages may sit in the default pool.\n"
            "_POOL = _descriptor_pool.DescriptorPool()\n"
            "DESCRIPTOR = _POOL.AddSerializedFile(")


def main() -> int:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={ROOT}",
                    f"--grpc_python_out={ROOT}", str(ROOT / PROTO)], check=True)
    generated = HERE / "grpc_predict_v2_pb2.py"
    text = generated.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{generated}: expected one {DEFAULT_POOL!r}; protoc's output changed, update this script")
    generated.write_text(text.replace(DEFAULT_POOL, OWN_POOL))
    print(f"wrote {generated} and {generated.with_name('grpc_predict_v2_pb2_grpc.py')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

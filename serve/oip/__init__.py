"""The Open Inference Protocol v2 (KServe v2 / Triton's HTTP/REST and gRPC protocol) for autobatch:
tensors.py (datatypes, JSON and binary tensor forms), request.py (a request, validated against a
model's declared tensors), rest.py and grpc_codec.py (the two wires), metadata.py (metadata and
health documents, REST paths). Everything here but router.py is Ray-free. See docs/oip.md."""

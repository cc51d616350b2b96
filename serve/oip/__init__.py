"""The Open Inference Protocol v2 (KServe v2 / Triton's HTTP/REST and gRPC protocol) on the server:
rest.py (the REST wire), metadata.py (metadata and health documents, REST paths), shed.py (the
router's shedding) and router.py (the Ray Serve ingress). The tensors, requests and the gRPC codec
the clients share live in wire/. Everything here but router.py is Ray-free. See docs/oip.md."""

"""The Open Inference Protocol v2 (KServe v2 / Triton's HTTP/REST and gRPC protocol) on the server:
rest.py (the REST wire), metadata.py (metadata and health documents, REST paths), shed.py (the
router's shedding) and router.py (the Ray Serve ingress, `serve.oip.router:build_router`, which also
hands /v1 to serve/api/openai_api.py). A model replica's side of the protocol is
serve/api/tensor_routes.py; the router reaches it through serve/api/calls.py. The tensors, requests
and the gRPC codec the clients share live in wire/. Everything here but router.py is Ray-free. Imports
serve/api/ and serve/replica/, never serve/cluster/. See docs/oip.md."""

"""The Ray glue and the launcher's parts:

  deployment.py   the Ray Serve deployment around a Replica: reads what only Ray knows (GPU ids,
                  user_config, max_ongoing_requests) and hands it to the replica and its routes
  ports.py        which ports `make serve` needs, and who already holds one
  loopback.py     keeping the gRPC servers Ray opens in its workers on loopback
  readiness.py    `make serve`'s "ready" lines, one per application
  stopping.py     how `make serve` stops what it started

The launcher itself is serve/local.py (`python -m serve.local`) and the app builder serve/app.py.
Imports serve/replica/ and serve/api/, never the ingress (serve/oip/): tests/test_layering.py."""

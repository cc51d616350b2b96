"""Ray Serve integration, in four parts plus its entry points (docs/architecture.md draws them):

  app.py, local.py, live_config.py   the entry points: `serve.app:build` (the app builder),
                                     `python -m serve.local` (`make serve`), `autobatch config|retune`
  replica/   one replica's work and its batcher, apart from Ray Serve: load, tune, warm, batch, run,
             admit, report (settings, metrics, stats); imports no other part
  api/       what a replica answers: its HTTP routes, the OIP tensor routes, the OpenAI API, a
             request's memory cost, the profile capture, an ingress's call to a replica; imports replica/
  oip/       the one ingress, the Open Inference Protocol router (REST and gRPC); imports api/, replica/
  cluster/   the Ray glue and the launcher's parts: the deployment class around a Replica, and what
             `make serve` runs around `serve run` (ports, loopback, readiness, stopping); imports api/, replica/

optimizer/ and deployments/ never import this; tests/test_layering.py checks every arrow."""
import time as _time

IMPORTED_AT_S = _time.time()  # when this package began importing: the start of a replica's imports (serve/replica/timeline.py)

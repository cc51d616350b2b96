"""Ray Serve integration: the batched deployment (deployment.py: Ray glue only; the replica's work in
replica.py, settings.py, routes.py, stats.py, batch_runner.py, warmup.py), the app builder (app.py,
`serve.app:build`), autobatch metrics (metrics.py) and test-only fault hooks (faults.py, behind
AUTOBATCH_TEST_FAULTS=1). optimizer/ and deployments/ never import this."""
import time as _time

IMPORTED_AT_S = _time.time()  # when this package began importing: the start of a replica's imports (serve/timeline.py)

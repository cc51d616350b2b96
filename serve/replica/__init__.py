"""One replica's work and its batcher, apart from Ray Serve (serve/cluster/deployment.py is the glue):

  replica.py        the lifecycle: load, tune, warm, reconfigure, run_batch, the typed report
  batcher.py        how requests become device batches (the only place a request joins a batch)
  batch_runner.py   running one formed batch: the two stages, the OOM split, per-sample retries
  settings.py       ReplicaSettings (declared once), the user_config layer, the batch settings in force
  admission.py      refusing, fast, what cannot be answered in time
  warmup.py, warm_schedule.py   running each batch size once, and when
  llm.py            the Llama's continuous scheduler as a replica serves it
  stats.py, metrics.py, logs.py, timeline.py   what the replica reports, exports, logs, and its start-up
  autoscaling.py    the replica's scaling targets and the policy Ray's controller runs on them
  budgets.py        memory shares that add up; single_flight.py one tuning per GPU type in a cluster
  faults.py         test-only fault injection (AUTOBATCH_TEST_FAULTS=1)

Imports no other part of serve/ (the routes, the ingress and the Ray glue import it), and Ray only
in metrics.py (ray.serve.metrics) and single_flight.py (a named actor): tests/test_layering.py.
Nothing is imported here, so that Ray's controller can load autoscaling.py alone."""

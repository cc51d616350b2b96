"""A fifth model family is one file plus one registration, and nothing else edited.

tests/fifth_model/tiny_mlp.py is the file; the registration is $AUTOBATCH_MODELS in the
application's runtime_env, with the file's folder on the PYTHONPATH, as a user would ship a model of
their own. The application is the real one (serve.app:build, its argument validator, the batched
deployment, tuning on the CPU, GET /tuning), reached over HTTP."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from serve_helpers import ServeCluster

from deployments.registry import BUILTIN_MODELS, MODELS_ENV, create_spec, model_names

pytestmark = pytest.mark.timeout(600)

FIFTH_DIR = Path(__file__).resolve().parent / "fifth_model"
REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRATION = "tiny_mlp=tiny_mlp:TinyMLPSpec"
ROUTE = "/tiny_mlp"


@pytest.fixture
def registered(monkeypatch):
    """The registration in this process, as the replica gets it from its runtime_env."""
    monkeypatch.syspath_prepend(str(FIFTH_DIR))
    monkeypatch.setenv(MODELS_ENV, REGISTRATION)


def local_spec():
    """The same family in the test process: same code, same seeded weights, to check the replica's answers."""
    sys.path.insert(0, str(FIFTH_DIR))
    try:
        from tiny_mlp import TinyMLPSpec
    finally:
        sys.path.remove(str(FIFTH_DIR))
    spec = TinyMLPSpec()
    spec.load("cpu", "float32")
    return spec


def test_the_registration_adds_the_model_where_it_is_set_and_only_there(registered, monkeypatch):
    from serve.app import AppArgs

    assert "tiny_mlp" in model_names() and set(BUILTIN_MODELS) < set(model_names())
    spec = create_spec("tiny_mlp")
    assert [t.metadata() for t in spec.inputs()] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
    assert AppArgs.model_validate({"model": "tiny_mlp"}).model == "tiny_mlp"  # the builder's validator accepts it
    monkeypatch.delenv(MODELS_ENV)
    assert "tiny_mlp" not in model_names()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ServeCluster(num_cpus=2)
    cache_path = str(tmp_path_factory.mktemp("fifth-model-cache") / "tuning.json")
    python_path = os.pathsep.join([str(FIFTH_DIR), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    c.deploy([{
        "name": "tiny_mlp", "route_prefix": ROUTE, "import_path": "serve.app:build",
        "runtime_env": {"env_vars": {MODELS_ENV: REGISTRATION, "PYTHONPATH": python_path}},
        "args": {"model": "tiny_mlp", "device": "cpu", "max_batch": 4, "repeats": 1, "num_cpus": 0.5,
                 "cache_path": cache_path},
    }])
    try:
        c.wait_running(["tiny_mlp"])
        yield c
    finally:
        c.shutdown()


def test_the_fifth_model_answers_over_http_as_its_spec_does(cluster):
    spec = local_spec()
    body, content_type = spec.example_payload()
    r = cluster.post(ROUTE, body, content_type)
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = spec.encode(spec.predict([spec.decode(body, content_type)])[0])
    assert answer["model"] == "tiny_mlp" and answer["class_id"] == expected["class_id"]
    assert answer["scores"] == pytest.approx(expected["scores"], abs=1e-5) and sum(answer["scores"]) == pytest.approx(1.0)

    # several at once: batched together, each answer still its own
    requests = [[float((i * 7 + j) % 5 - 2) for j in range(8)] for i in range(4)]
    responses = cluster.post_concurrently(ROUTE, [(json.dumps(v).encode(), "application/json", {}) for v in requests], retries_on_503=3)
    for values, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        mine = spec.predict([spec.decode(json.dumps(values).encode())])[0]
        assert response.json()["scores"] == pytest.approx(mine["scores"], abs=1e-5)

    bad = cluster.post(ROUTE, b"[1, 2, 3]", "application/json")
    assert bad.status_code == 422 and "JSON list of 8 numbers" in bad.json()["error"]

    assert cluster.http.get(ROUTE + "/").json()["model"] == "tiny_mlp"
    t = cluster.tuning(ROUTE)
    assert t["model"] == "tiny_mlp" and t["cache"] == "miss" and t["probe_count"] >= 1
    assert 1 <= t["serving"]["max_batch_size"] <= 4
    assert t["stats"]["samples_served"] >= 5 and t["stats"]["batches"] >= 1

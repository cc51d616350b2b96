"""A replica's side of the Open Inference Protocol: what the OIP router (serve/oip/router.py) calls
by DeploymentHandle. The router parsed the wire and checked the tensors against the declared ones;
here a request of N samples becomes one entry of the replica's batcher (serve/replica/batcher.py), counted
by its N samples, so batches form by sample (a request larger than a batch spreads over several;
the served latency and the stats count samples), and the N answers come back in order. It is not
held for the batch wait (which gathers one-sample requests): a request of many brings its own batch,
and the batcher still merges requests that arrive while the device computes.

A request fails whole, with the first failing element's index and its own status: decoding runs
first and nothing is queued when an element cannot be decoded; an element that fails in its batch
(batch_runner.py answers it alone) fails its request, and its batch-mates from other requests are
answered as usual.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import numpy as np

from wire import PayloadError
from wire.request import InferFailure, InferRequest, InferResponse
from wire.tensors import NUMPY_DTYPES, Tensor

from ..replica.admission import Refused
from ..replica.batch_runner import Outcome
from ..replica.batcher import Entry
from . import costs
from .costs import decoded_sample_bytes
from ..replica.replica import Replica

log = logging.getLogger("ray.serve")


def _message(outcome: Outcome) -> str:
    try:
        return json.loads(outcome.body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"failed with status {outcome.status}"



def timeout_parameter_s(parameters: dict) -> float | None:
    """The request's `timeout` parameter (Triton's: microseconds from arrival) in seconds, None if
    absent; the replica's admission refuses a request it cannot answer within it (serve/replica/admission.py)."""
    value = (parameters or {}).get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PayloadError(f"parameter 'timeout' must be a positive number of microseconds (Triton's unit), "
                           f"got {value!r}; leave it out for no bound", 400)
    return float(value) / 1e6

class TensorRoutes:
    """A tensor request's samples go to the replica's batcher as one entry (`Replica.submit`)."""

    def __init__(self, replica: Replica, decoded_bytes_per_sample: int | None = None):
        self._replica = replica
        self.decoded_bytes_per_sample = (decoded_sample_bytes(replica.spec, replica.model_name)
                                         if decoded_bytes_per_sample is None else int(decoded_bytes_per_sample))

    def metadata(self) -> dict:
        """The model's declared tensors as the router reads them (TensorSpec fields), and the most
        samples a request may carry (the router refuses more before forwarding the request)."""
        spec = self._replica.spec
        fields = lambda t: {**dataclasses.asdict(t), "shape": list(t.shape)}  # noqa: E731
        return {"name": self._replica.model_name, "inputs": [fields(t) for t in spec.inputs()],
                "outputs": [fields(t) for t in spec.outputs()],
                "max_request_samples": self._replica.admission.max_request_samples()}

    def ready(self) -> bool:
        try:
            self._replica.check_health()
            return True
        except RuntimeError:
            return False

    def _fail(self, error: PayloadError, index: int | None = None) -> InferFailure:
        self._replica.count_error(error.status)
        return InferFailure.of(error, index)

    async def infer(self, request: InferRequest) -> InferResponse | InferFailure:
        """Admitted by its sample count (serve/replica/admission.py: a replica at capacity sheds it whole,
        before any decoding), then decoded, batched by sample and gathered."""
        n = request.samples
        body_bytes = request.payload_bytes
        try:
            deadline_s = timeout_parameter_s(request.parameters)
        except PayloadError as exc:
            return self._with_room(self._fail(exc))
        try:
            ticket = self._replica.admission.admit(deadline_s, samples=n, body_bytes=body_bytes,
                                                   decoded_bytes=n * self.decoded_bytes_per_sample)
        except Refused as refused:
            self._replica.count_shed(refused.reason)
            self._replica.count_error(refused.status)
            costs.released(body_bytes)
            return self._with_room(InferFailure(refused.status, refused.message, refused.retry_after_s))
        try:
            with ticket:
                answer = await self._infer_admitted(request, ticket.deadline_at)
        finally:  # answered, failed or cancelled (the client left): its buffers go back to the OS
            request.inputs = []
            costs.released(body_bytes + ticket.decoded_bytes)
        return self._with_room(answer)

    def _with_room(self, answer):
        """The answer, carrying the replica's admission room for the router (serve/oip/shed.py)."""
        answer.admission = self._replica.admission.room(self._replica.replica_id)
        return answer

    async def _infer_admitted(self, request: InferRequest, deadline_at: float | None) -> InferResponse | InferFailure:
        replica, spec = self._replica, self._replica.spec
        n = request.samples
        inputs = {t.name: t.data for t in request.inputs}
        try:
            samples = await asyncio.get_running_loop().run_in_executor(replica.decode_executor, spec.decode_tensors,
                                                                       inputs, dict(request.parameters))
        except PayloadError as exc:
            return self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must still not become a 500 for the client's tensors
            log.exception("autobatch: %s decode_tensors raised outside PayloadError", replica.model_name)
            return self._fail(PayloadError(f"the tensors could not be decoded ({type(exc).__name__}: {exc}); check "
                                           f"them against GET /v2/models/{replica.model_name}", 422))
        if len(samples) != n:
            return self._fail(PayloadError(f"internal error: {replica.model_name} decoded {len(samples)} samples "
                                           f"from a request of {n}", 500))
        for index, sample in enumerate(samples):
            if isinstance(sample, PayloadError):
                return self._fail(sample, index)
        try:
            # One entry of n samples, not held for the wait: a request of many brings its own batch. The
            # batcher merges concurrent requests, splits one larger than the max batch and keeps the order.
            outcomes = await replica.submit(Entry(samples, keep_value=True, deadline_at=deadline_at, waits=False))
        except Exception as exc:  # noqa: BLE001 - only a bug in the batching itself gets here
            log.exception("autobatch: batch handler failed")
            return self._fail(PayloadError(f"internal error while serving ({type(exc).__name__}: {exc})", 500))
        for index, outcome in enumerate(outcomes):
            if not outcome.ok:
                return self._fail(PayloadError(_message(outcome), outcome.status), index)
        try:
            produced = spec.encode_tensors([outcome.value for outcome in outcomes])
            outputs = [self._output(t, produced[t.name], n) for t in spec.outputs()]
        except Exception as exc:  # noqa: BLE001 - the answers were computed; only their tensors failed
            log.exception("autobatch: %s encode_tensors failed", replica.model_name)
            return self._fail(PayloadError(f"internal error encoding the answer ({type(exc).__name__}: {exc})", 500))
        return InferResponse(model_name=request.model_name, outputs=outputs, model_version="1")

    @staticmethod
    def _output(declared, array, samples: int) -> Tensor:
        """A produced array as its declared output: its datatype, one row per sample."""
        array = np.asarray(array, dtype=NUMPY_DTYPES[declared.datatype])
        if array.ndim != len(declared.shape) or array.shape[0] != samples:
            raise ValueError(f"output {declared.name!r} has shape {list(array.shape)}, expected {list(declared.shape)} "
                             f"with {samples} samples")
        return Tensor(declared.name, declared.datatype, tuple(int(d) for d in array.shape), array)

"""A replica's HTTP routes, relative to its route prefix:

  GET  /        what the route serves (Replica.describe)
  GET  /tuning  the tuning in use and what the batches did (Replica.tuning_report)
  POST /profile a torch.profiler capture of the replica serving, or of its tuning probe
                (serve/api/profiling.py; only where the app's profile_dir or $AUTOBATCH_PROFILE_DIR is set)
  POST /        one payload: decoded in a thread (a bad payload is answered 4xx here and never
                reaches a batch), then batched, then answered with its own status

Every error is JSON {"error": message}, and the message says what to send instead.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wire import PayloadError

from ..replica.admission import DEADLINE_HEADER, Refused, Ticket, parse_deadline_ms
from ..replica.batch_runner import Outcome
from ..replica.batcher import Entry
from . import costs, profiling
from .costs import decoded_sample_bytes
from ..replica.replica import Replica

log = logging.getLogger("ray.serve")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def subpath(request: Request) -> str:
    """The request's path below the application's route prefix, "/" for the route itself."""
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


def _declared_length(headers: Mapping[str, str]) -> int:
    """The body's size as its Content-Length says (0 when absent or not a number: charged once read)."""
    try:
        return max(0, int(headers.get("content-length") or 0))
    except ValueError:
        return 0


class HttpRoutes:
    """A POST is one request of one sample: one entry of the replica's batcher (`Replica.submit`)."""

    def __init__(self, replica: Replica):
        self._replica = replica
        self.decoded_bytes_per_sample = decoded_sample_bytes(replica.spec, replica.model_name)

    def _reply_error(self, status: int, message: str) -> JSONResponse:
        self._replica.count_error(status)
        return error_response(status, message)

    async def handle(self, request: Request) -> Response:
        return await self.answer(request.method, subpath(request), request.headers, request.body)

    async def answer(self, method: str, path: str, headers: Mapping[str, str],
                     read_body: Callable[[], Awaitable[bytes]]) -> Response:
        """One request to this route: `path` below the route prefix, `read_body()` the body (the
        HTTP proxy's request, or the OIP router forwarding a simple route)."""
        replica = self._replica
        if method in ("GET", "HEAD"):
            if path == "/tuning":
                return JSONResponse(replica.tuning_report())
            if path == "/":
                return JSONResponse(replica.describe())
            return error_response(404, f"no such path {path!r}; use POST / for predictions, GET /tuning for the tuning in use")
        if method != "POST":
            return error_response(405, f"method {method} is not served; use POST / with the payload, or GET /tuning")
        if path == "/profile":
            return await self._profile(read_body)
        if path != "/":
            return error_response(404, f"no such path {path!r}; POST the payload to the route itself")
        # Admitted before the body is read: a refused request costs no transfer of its body from the proxy.
        ticket = self.admit(headers, _declared_length(headers))
        if isinstance(ticket, Response):
            return ticket
        body = b""
        try:
            with ticket:
                try:
                    body = await read_body()
                except Exception as exc:  # noqa: BLE001 - client went away / broken stream
                    return self._reply_error(400, f"could not read the request body ({exc}); send the payload again")
                return await self._decode_and_infer(headers, body, ticket)
        finally:  # answered, refused in decoding or cancelled: its buffers go back to the OS
            costs.released(len(body) + ticket.decoded_bytes)

    async def _profile(self, read_body: Callable[[], Awaitable[bytes]]) -> JSONResponse:
        replica = self._replica
        directory = profiling.profile_dir(replica.builder.profile_dir)
        if directory is None:
            return error_response(404, f"profiling is off; give the app profile_dir: <folder>, or start the replicas with "
                                       f"{profiling.PROFILE_DIR_ENV}=<folder>, to capture torch.profiler traces there")
        try:
            asked = profiling.parse_request(await read_body(), replica.settings.size)
        except profiling.ProfileRequestError as exc:
            return error_response(400, str(exc))
        try:
            return JSONResponse(await profiling.capture_replica(replica, asked, directory))
        except Exception as exc:  # noqa: BLE001 - a failed capture must not take the replica down
            log.exception("autobatch: %s: the profile capture failed", replica.model_name)
            return error_response(500, f"the profile capture failed ({type(exc).__name__}: {exc})")

    def admit(self, headers: Mapping[str, str], body_bytes: int, samples: int = 1) -> Ticket | Response:
        """A ticket for this request (serve/replica/admission.py), or the answer that refuses it."""
        try:
            deadline_s = parse_deadline_ms(headers.get(DEADLINE_HEADER))
        except ValueError as exc:
            return self._reply_error(400, str(exc))
        try:
            return self._replica.admission.admit(deadline_s, samples=samples, body_bytes=body_bytes,
                                                 decoded_bytes=samples * self.decoded_bytes_per_sample)
        except Refused as refused:
            self._replica.count_shed(refused.reason)
            self._replica.count_error(refused.status)
            return JSONResponse({"error": refused.message}, status_code=refused.status, headers=refused.headers())

    async def _decode_and_infer(self, headers: Mapping[str, str], body: bytes, ticket: Ticket) -> Response:
        replica = self._replica
        content_type = headers.get("content-type")
        try:
            sample = await asyncio.get_running_loop().run_in_executor(replica.decode_executor, replica.spec.decode,
                                                                      body, content_type)
        except PayloadError as exc:
            return self._reply_error(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must still not become a 500 for the client's payload
            log.exception("autobatch: %s decode raised outside PayloadError", replica.model_name)
            return self._reply_error(422, f"the payload could not be decoded ({type(exc).__name__}: {exc}); "
                                          f"check it is what GET / describes")
        entry = Entry([sample], poisoned=replica.config.faults.is_poisoned(headers), deadline_at=ticket.deadline_at)
        try:
            outcome: Outcome = (await replica.submit(entry))[0]
        except Exception as exc:  # noqa: BLE001 - only a bug in the batching itself gets here
            log.exception("autobatch: batch handler failed")
            return self._reply_error(500, f"internal error while serving ({type(exc).__name__}: {exc})")
        if not outcome.ok:
            replica.count_error(outcome.status)
        return Response(content=outcome.body, status_code=outcome.status, media_type="application/json")

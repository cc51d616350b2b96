"""A call from an ingress (the OIP router, its OpenAI API) to a model's replica by handle, and what
a failed call becomes: a replica that died mid-request is ReplicaLost (503, retry), any other
failure of the call a JSON 500 that says what failed. Both ingresses import it from here, so
neither imports the other for it.
"""
from __future__ import annotations

import asyncio
import logging

from wire import PayloadError

log = logging.getLogger("ray.serve")


class ReplicaLost(PayloadError):
    """The model's replica died with this request in flight (killed, crashed, out of host memory).

    Ray's own proxy answers that with a plain-text 500; behind this router it is a 503 with
    Retry-After and a JSON body, since every route is idempotent and a replacement is starting."""

    def __init__(self, model: str, exc: BaseException):
        super().__init__(f"the {model} replica stopped while answering this request ({type(exc).__name__}); "
                         f"Ray Serve is starting a replacement: retry in a few seconds", status=503)


async def call_model(model: str, call):
    """Await a DeploymentHandle call; a replica that died mid-request becomes ReplicaLost, and any
    other failure of the call itself a JSON 500 that says what failed (not Ray's plain-text one)."""
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

    try:
        return await call
    except RayActorError as exc:
        log.warning("autobatch: %s: a replica died with a request in flight: %s", model, exc)
        raise ReplicaLost(model, exc) from None
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the transport between router and replica
        log.exception("autobatch: %s: the call to its replica failed", model)
        raise PayloadError(f"internal error forwarding the request to {model} ({type(exc).__name__}: "
                           f"{str(exc)[:300]})", status=500) from None

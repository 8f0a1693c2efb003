"""Liveness and readiness probes for load balancers and orchestrators: `/healthz` and `/readyz`."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import ResolverMatch

from labeling.errors import error_body

logger = logging.getLogger(__name__)

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# A probe must answer before its caller gives up (Docker's and Kubernetes' default timeouts are a few seconds).
BROKER_TIMEOUT_SECONDS = 2.0
CACHE_PROBE_KEY = "preflab:readyz"


def _timed(check: Callable[[], None]) -> dict:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # any failure of a dependency is the answer, not an error of the probe
        logger.warning("readiness: %s", exc)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def _database() -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        # Outside a request's cycle nothing else drops a broken connection: the next probe must connect afresh.
        connection.close_if_unusable_or_obsolete()
        raise


def _cache() -> None:
    # A read is enough: it travels to Redis (or the cache directory) and back, and writes nothing.
    cache.get(CACHE_PROBE_KEY)


def _broker() -> None:
    from worker.celery import app

    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS)


def readiness() -> tuple[int, dict]:
    """The state of each dependency. The database is the one the service cannot work without (503); without
    Redis, labeling goes on, reranking runs uncached and training submissions answer 503 (`degraded`, 200)."""
    checks = {"database": _timed(_database), "cache": _timed(_cache), "broker": _timed(_broker)}
    if not checks["database"]["ok"]:
        return 503, {"status": "unavailable", "checks": checks}
    degraded = not all(check["ok"] for check in checks.values())
    return 200, {"status": "degraded" if degraded else "ok", "checks": checks}


class HealthCheckMiddleware:
    """Answers the probes before the host check, the HTTPS redirect, sessions and authentication: probes come from
    inside the deployment (Docker, Kubernetes, a load balancer), by address and over plain HTTP, and their answers
    hold nothing secret. Placed right after the request-context middleware, so probes are logged and counted."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if path not in (LIVENESS_PATH, READINESS_PATH):
            return self.get_response(request)
        # The access log and the request metrics name the probe as they name a route.
        request.resolver_match = ResolverMatch(self, (), {}, route=path.lstrip("/"))
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse(error_body(message=f"Method {request.method} is not allowed here; use GET.",
                                               code="method_not_allowed"), status=405)
            response["Allow"] = "GET, HEAD"
            return response
        if path == LIVENESS_PATH:
            status, body = 200, {"status": "ok"}
        else:
            status, body = readiness()
        response = JsonResponse(body, status=status)
        response["Cache-Control"] = "no-store"
        return response

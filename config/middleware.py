"""Per-request context: a request id for every log line, request metrics and one structured access-log line."""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from django.core.signals import request_finished
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.middleware.common import CommonMiddleware as DjangoCommonMiddleware
from django.utils.functional import SimpleLazyObject, empty

from config.logging import NO_REQUEST_ID, request_id_var
from config.metrics import HTTP_LATENCY, HTTP_REQUESTS, method_of, route_of

access_logger = logging.getLogger("preflab.access")

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is reused (so a proxy's or client's id follows the request through our logs) only when it is a
# short plain token; anything else could forge log lines or blow up their size, and gets a fresh id instead.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(request: HttpRequest) -> str:
    incoming = request.META.get("HTTP_X_REQUEST_ID", "")
    if _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def _user_id(request: HttpRequest) -> int | None:
    user = getattr(request, "user", None)
    # A session user nobody looked at is still a lazy object: resolving it here would cost queries per request.
    if user is None or (isinstance(user, SimpleLazyObject) and user._wrapped is empty):
        return None
    return user.pk if getattr(user, "is_authenticated", False) else None


def _token_prefix(request: HttpRequest) -> str | None:
    # DRF copies the authenticated ApiToken onto the Django request as `auth`.
    return getattr(getattr(request, "auth", None), "prefix", None) or None


@receiver(request_finished, dispatch_uid="preflab_request_id_clear")
def _request_id_clear(sender, **kwargs) -> None:
    # A worker thread serves many requests: what it logs between them must not carry the previous one's id.
    request_id_var.set(NO_REQUEST_ID)


class RequestContextMiddleware:
    """Outermost middleware: everything logged while the request runs carries its id, and the request is
    counted, timed and logged once when the response leaves."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = request_id_from(request)
        request.request_id = request_id
        # Cleared by request_finished rather than here: Django logs 4xx/5xx responses (django.request) after the
        # middleware has returned, and a streamed body is still produced after that.
        request_id_var.set(request_id)
        started = time.perf_counter()
        response = self.get_response(request)
        # For a streamed response this is the time to the first byte, which is what a client waits on.
        duration = time.perf_counter() - started
        response[REQUEST_ID_HEADER] = request_id
        self._record(request, response, duration)
        return response

    def _record(self, request: HttpRequest, response: HttpResponse, duration: float) -> None:
        method, route, status = method_of(request), route_of(request), response.status_code
        HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
        HTTP_LATENCY.labels(method=method, route=route).observe(duration)
        duration_ms = round(duration * 1000, 2)
        fields = {
            "method": request.method,
            "path": request.path,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "request_id": request.request_id,
            "user_id": _user_id(request),
            "token_prefix": _token_prefix(request),
        }
        level = logging.ERROR if status >= 500 else logging.INFO
        access_logger.log(level, "%s %s %s %.2fms", request.method, request.path, status, duration_ms, extra=fields)


class CommonMiddleware(DjangoCommonMiddleware):
    """Django's, except that an /api/ request with a body (POST, PUT, PATCH, DELETE) to a path missing its trailing
    slash is not redirected to the path with it: a 301 makes clients send it again as a GET without its body, and
    under DEBUG Django raises instead (a 500). It gets the API's JSON 404, which names the path to use."""

    def should_redirect_with_slash(self, request: HttpRequest) -> bool:
        if request.method not in ("GET", "HEAD") and request.path_info.startswith("/api/"):
            return False
        return super().should_redirect_with_slash(request)

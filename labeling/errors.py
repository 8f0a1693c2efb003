"""The one domain error type and the one place that turns every API error into a JSON body."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import is_valid_path
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

logger = logging.getLogger(__name__)


class DomainError(Exception):
    """A rule of the domain was broken; carries the HTTP status, a code and the offending field."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid",
                 status_code: int = status.HTTP_400_BAD_REQUEST, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
        self.status_code = status_code
        self.extra = extra or {}


class NotFound(DomainError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, code="not_found", status_code=status.HTTP_404_NOT_FOUND)


class Conflict(DomainError):
    def __init__(self, message: str, *, field: str | None = None, code: str = "conflict") -> None:
        super().__init__(message, field=field, code=code, status_code=status.HTTP_409_CONFLICT)


class Forbidden(DomainError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, code="forbidden", status_code=status.HTTP_403_FORBIDDEN)


class ServiceUnavailable(DomainError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, code="unavailable", status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


def _first_field_error(detail: Any, prefix: str = "") -> tuple[str | None, str]:
    """The first (field path, message) in a DRF validation detail, for the top-level summary."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            # A ListField's errors are keyed by item index: `candidates[0]`, as the services name items.
            path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
            field, message = _first_field_error(value, path)
            return (None if key == "non_field_errors" and not prefix else field), message
    if isinstance(detail, list) and detail:
        for index, item in enumerate(detail):
            if item:
                inner_prefix = f"{prefix}[{index}]" if isinstance(item, (dict, list)) else prefix
                return _first_field_error(item, inner_prefix)
    return (prefix or None), str(detail)


def error_body(*, message: str, code: str, field: str | None = None, fields: Any = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "field": field}}
    if fields is not None:
        body["error"]["fields"] = fields
    if extra:
        body["error"].update(extra)
    return body


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DomainError):
        return Response(error_body(message=exc.message, code=exc.code, field=exc.field, extra=exc.extra),
                        status=exc.status_code)
    if isinstance(exc, (OperationalError, InterfaceError)):
        # The database went away (restart, failover, network): the service's transaction was rolled back, so
        # the client may retry; Django drops the broken connection when the request ends and the next request
        # opens a fresh one. A clean 503 instead of an HTML 500 tells clients and load balancers just that.
        logger.warning("database unavailable: %s", exc)
        set_rollback()
        return Response(error_body(message="The database is unreachable right now; try again in a moment.",
                                   code="database_unavailable"),
                        status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"})
    if isinstance(exc, RequestDataTooBig):
        # Django refuses a body over DATA_UPLOAD_MAX_MEMORY_SIZE before reading it; left alone it is an HTML 400.
        return Response(error_body(message=f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} "
                                           "bytes.", code="too_large"),
                        status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_field_error(exc.detail)
        label = f"{field}: {message}" if field else message
        response.data = error_body(message=label, code="invalid", field=field, fields=exc.detail)
    elif isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "error"
        response.data = error_body(message=str(exc.detail), code=code)
    return response


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


def _api_not_found(request: HttpRequest | None = None) -> JsonResponse:
    message = "Not found."
    if request is not None and not request.path_info.endswith("/") and is_valid_path(f"{request.path_info}/"):
        # A request with a body is not redirected to the path with its slash (see config.middleware).
        message = f"Not found. API paths end in a slash: {request.path_info}/"
    return JsonResponse(error_body(message=message, code="not_found"), status=status.HTTP_404_NOT_FOUND)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 for a URL no route matches: under /api/ the JSON error body every API answer uses (a client
    that sends an id with a slash in it, or a misspelt path, gets JSON too), elsewhere Django's page."""
    if _is_api(request):
        return _api_not_found()
    return defaults.page_not_found(request, exception)


class ApiNotFoundMiddleware:
    """Under DEBUG Django answers a URL no route matches with its HTML debug page and never calls handler404: this
    gives an /api/ URL the JSON body of `page_not_found` whatever DEBUG says. A middleware rather than a catch-all
    route, so that CommonMiddleware (outside this one) still redirects a path missing its trailing slash to the
    route that has it, and the metrics keep counting such URLs as unmatched."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        # No resolver_match: the 404 came from the URL resolver, not from a view that answered it.
        if response.status_code == 404 and getattr(request, "resolver_match", None) is None and _is_api(request):
            return _api_not_found(request)
        return response

"""The one domain error type and the one place that turns every API error into a JSON body."""
from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


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
            path = f"{prefix}.{key}" if prefix else str(key)
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

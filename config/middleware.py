"""Per-request context: a request id for every log line, request metrics and one structured access-log line;
a limit on password guessing at the login form and the token endpoint; and the Content-Security-Policy header."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
import unicodedata
import uuid
from collections.abc import Callable

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_login_failed
from django.core.cache import cache
from django.core.exceptions import RequestDataTooBig
from django.core.signals import request_finished
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.common import CommonMiddleware as DjangoCommonMiddleware
from django.shortcuts import render
from django.urls import reverse
from django.utils.functional import SimpleLazyObject, empty

from config.logging import NO_REQUEST_ID, request_id_var
from config.metrics import HTTP_LATENCY, HTTP_REQUESTS, method_of, route_of
from labeling.errors import error_body

access_logger = logging.getLogger("preflab.access")
logger = logging.getLogger(__name__)

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


def _drop_body(response: HttpResponse) -> None:
    """A HEAD answer has the GET's headers and no body (RFC 9110). Django leaves dropping it to the server, and
    gunicorn, which does, logs a warning for every such request: a load balancer's HEAD probes filled the log."""
    if response.streaming:
        response.streaming_content = []
        return
    if not response.has_header("Content-Length"):
        response["Content-Length"] = str(len(response.content))
    response.content = b""


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
        if request.method == "HEAD":
            _drop_body(response)
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


# Wrong passwords allowed per username and client address in each window; past them that pair is refused (429)
# until the window ends. Behind a proxy every client has the proxy's address, so the limit is per username.
LOGIN_FAILURES_MAX = 10
LOGIN_WINDOW_SECONDS = 15 * 60
LOGIN_CACHE_PREFIX = "preflab:login-failures:"
_LOGIN_FAILED = "preflab_login_failed"


@functools.cache
def _login_paths() -> frozenset[str]:
    return frozenset({reverse("login"), reverse("admin:login"), reverse("labeling_api:token-create")})


def _login_username(request: HttpRequest) -> str:
    """The username a login POST names, normalized as broadly as Django's form and DRF's field do (NFKC,
    surrounding whitespace) and case-folded: every spelling that can reach one account shares one counter. A body
    this cannot read counts under the empty name, so it is limited per address instead of escaping the limit."""
    username = None
    try:
        if request.content_type == "application/json":
            data = json.loads(request.body)
            username = data.get("username") if isinstance(data, dict) else None
        else:
            username = request.POST.get("username")
    except (ValueError, RecursionError, RequestDataTooBig):
        username = None
    if not isinstance(username, str):
        return ""
    return unicodedata.normalize("NFKC", username).strip().casefold()


def _login_key(request: HttpRequest, username: str) -> str:
    address = request.META.get("REMOTE_ADDR", "")
    digest = hashlib.sha256(f"{username}\0{address}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{LOGIN_CACHE_PREFIX}{int(time.time() // LOGIN_WINDOW_SECONDS)}:{digest}"


@receiver(user_login_failed, dispatch_uid="preflab_login_failed_mark")
def _login_failed_mark(sender, credentials: dict, request=None, **kwargs) -> None:
    # DRF passes its own Request; the mark goes on the Django request the middleware holds.
    if request is not None:
        setattr(getattr(request, "_request", request), _LOGIN_FAILED, True)


class LoginThrottleMiddleware:
    """Refuses a login (the login page, the admin's, the token endpoint) for a username and address that got
    LOGIN_FAILURES_MAX wrong passwords in the current window, before any password is checked. It goes after
    AuthenticationMiddleware: the refusal page then has its user and keeps the CSRF cookie its form is sent with.

    Each attempt takes a slot from the counter before the view runs and gives it back unless a password was
    wrong (Django's `user_login_failed`), so requests sent in parallel cannot all slip in under the limit, and
    successful logins never use it up. Without the cache, logins are not limited rather than refused."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or request.path not in _login_paths():
            return self.get_response(request)
        username = _login_username(request)
        key = _login_key(request, username)
        try:
            cache.add(key, 0, timeout=LOGIN_WINDOW_SECONDS * 2)
            attempts = cache.incr(key)
        except Exception:  # the counter lives in the cache: an outage must not lock everyone out
            logger.warning("login throttle cache unavailable; login attempt let through", exc_info=True)
            return self.get_response(request)
        if attempts > LOGIN_FAILURES_MAX:
            return self._refuse(request)
        response = self.get_response(request)
        if not getattr(request, _LOGIN_FAILED, False):
            try:
                cache.decr(key)
            except Exception:
                logger.warning("login throttle cache unavailable; attempt not given back", exc_info=True)
        return response

    def _refuse(self, request: HttpRequest) -> HttpResponse:
        retry_after = int(LOGIN_WINDOW_SECONDS - time.time() % LOGIN_WINDOW_SECONDS) + 1
        message = f"Too many failed logins; try again in {(retry_after + 59) // 60} minutes."
        if request.path_info.startswith("/api/"):
            response = JsonResponse(error_body(message=message, code="throttled"), status=429)
        else:
            form = AuthenticationForm(request, initial={"username": request.POST.get("username", "")})
            response = render(request, "registration/login.html",
                              {"form": form, "next": request.POST.get("next", ""), "throttled": message}, status=429)
        response["Retry-After"] = str(retry_after)
        return response


CSP_HEADER = "Content-Security-Policy"
# Under DEBUG, Django answers a 404 and an unhandled exception (a 500, or a 400 for a suspicious request) with its own
# technical pages, which style and script themselves inline: under the policy they would show unstyled, their
# tracebacks folded shut. They are told apart by the robots tag they open with, so that our own error pages (the
# labeling panel answers 400, 404 and 409 with the panel) keep the policy under DEBUG too.
_DEBUG_PAGE_STATUSES = frozenset({400, 404, 500})
_DEBUG_PAGE_MARK = b'<meta name="robots" content="NONE,NOARCHIVE">'


def _is_django_debug_page(response: HttpResponse) -> bool:
    return (settings.DEBUG and response.status_code in _DEBUG_PAGE_STATUSES and not response.streaming
            and _DEBUG_PAGE_MARK in response.content[:1024])


def _csp_header_value(policy: dict[str, list[str]]) -> str:
    """`{"default-src": ["'self'"], ...}` as the header spells it: `default-src 'self'; ...`."""
    return "; ".join(" ".join([directive, *sources]) for directive, sources in policy.items())


class ContentSecurityPolicyMiddleware:
    """Sets settings.CONTENT_SECURITY_POLICY on every response, or the policy of the first prefix of
    settings.CONTENT_SECURITY_POLICY_PREFIXES that the path starts with. Django 5.2 has no CSP support of its own;
    the settings are in the shape of Django 6's SECURE_CSP (directive: sources), so they can move there as they are."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        # Built once: the policies are settings, and the header is the same for every request of a prefix.
        self.default = _csp_header_value(settings.CONTENT_SECURITY_POLICY)
        self.by_prefix = [(prefix, _csp_header_value(policy))
                          for prefix, policy in settings.CONTENT_SECURITY_POLICY_PREFIXES.items()]

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if _is_django_debug_page(response):
            return response
        path = request.path_info
        response[CSP_HEADER] = next((value for prefix, value in self.by_prefix if path.startswith(prefix)),
                                    self.default)
        return response

"""The liveness and readiness probes (/healthz, /readyz), and HEAD answers without a body."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client, override_settings

from tests.reliability.servers import free_port
from worker.celery import app as celery_app

pytestmark = pytest.mark.django_db

# As production has them: one public host name, HTTPS enforced.
PRODUCTION_EDGE = {"ALLOWED_HOSTS": ["preflab.example.com"], "SECURE_SSL_REDIRECT": True}


def _redis_nobody_listens_on() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@override_settings(**PRODUCTION_EDGE)
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_a_probe_by_address_over_plain_http_is_answered(path):
    """Docker and Kubernetes probe the container by address over plain HTTP: neither the host check (a 400) nor the
    HTTPS redirect (a 301) may answer them, or the service never turns healthy."""
    response = Client().get(path, HTTP_HOST="10.1.2.3:8000")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response.json()["status"] == "ok"


@override_settings(**PRODUCTION_EDGE)
def test_everything_else_still_gets_the_host_check_and_the_redirect():
    assert Client().get("/accounts/login/", HTTP_HOST="10.1.2.3:8000").status_code == 400
    redirected = Client().get("/accounts/login/", HTTP_HOST="preflab.example.com")
    assert redirected.status_code == 301
    assert redirected["Location"] == "https://preflab.example.com/accounts/login/"
    # Only the exact probe paths are answered early.
    assert Client().get("/readyz/", HTTP_HOST="10.1.2.3:8000").status_code == 400


def test_readiness_checks_each_dependency():
    body = Client().get("/readyz").json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "cache", "broker"}
    for name, check in body["checks"].items():
        assert check["ok"] is True, name
        assert check["ms"] >= 0


def test_without_redis_the_service_is_ready_but_degraded(monkeypatch):
    """Labeling needs only the database; without Redis, reranking runs uncached and training submissions answer 503
    (tests/reliability/test_faults.py), so a load balancer keeps sending traffic and the body says what is down."""
    nowhere = _redis_nobody_listens_on()
    monkeypatch.setitem(celery_app.conf, "broker_write_url", nowhere)
    caches = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": nowhere,
                          "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    with override_settings(CACHES=caches):
        response = Client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["ok"] is True
    for name in ("cache", "broker"):
        assert body["checks"][name]["ok"] is False, name
        assert "Error" in body["checks"][name]["error"], body
    # Redis is back: so is the answer.
    monkeypatch.undo()
    assert Client().get("/readyz").json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_a_probe_takes_get_and_head_only(path):
    response = Client().post(path)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_probes_are_logged_and_counted_under_their_own_name(caplog):
    caplog.set_level(logging.INFO, logger="preflab.access")
    Client().get("/healthz")
    (record,) = [r for r in caplog.records if r.name == "preflab.access"]
    assert record.route == "healthz"
    assert record.status == 200


def _wsgi(method: str, path: str) -> tuple[str, dict, bytes]:
    """One request through the WSGI handler, as gunicorn makes it (Django's test client drops HEAD bodies itself,
    so it cannot show whether the application sent one)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1:8000", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1"}
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=dict(headers))

    result = WSGIHandler()(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()
    return started["status"], started["headers"], body


@pytest.mark.parametrize("path", ["/healthz", "/accounts/login/", "/api/v1/projects/", "/api/v1/no-such-thing/"])
def test_a_head_answer_has_the_get_headers_and_no_body(path):
    """gunicorn drops a HEAD body itself but logs a warning for each: a load balancer's HEAD probes filled the log."""
    get_status, get_headers, get_body = _wsgi("GET", path)
    head_status, head_headers, head_body = _wsgi("HEAD", path)
    assert get_body
    assert head_body == b""
    assert head_status == get_status
    assert head_headers["Content-Type"] == get_headers["Content-Type"]
    assert int(head_headers["Content-Length"]) == len(get_body)
    if path == "/healthz":
        assert json.loads(get_body) == {"status": "ok"}

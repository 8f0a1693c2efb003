"""Request ids on responses and log records, the JSON formatter, and the one access-log line per request."""
from __future__ import annotations

import json
import logging
import re
import sys
import types

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from config.logging import NO_REQUEST_ID, JsonFormatter, RequestIdFilter, request_id_var
from labeling.services import api_token_create

ACCESS_LOGGER = "preflab.access"


@pytest.fixture
def logs(caplog):
    """caplog with the request-id filter on its handler, as the console handler has it in settings.LOGGING."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    return caplog


def _access_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


def _break_project_list(monkeypatch) -> None:
    def broken(**kwargs):
        raise RuntimeError("the selector broke")

    monkeypatch.setattr("labeling.selectors.project_list_for_user", broken)


def _api_500(user, **headers):
    """GET /api/v1/projects/ as `user` once _break_project_list made it raise: an unhandled exception, a 500."""
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client.get("/api/v1/projects/", **headers)


@pytest.mark.django_db
def test_a_request_without_an_id_gets_a_fresh_one_on_the_response():
    first = Client().get("/accounts/login/")
    second = Client().get("/accounts/login/")
    assert re.fullmatch(r"[0-9a-f]{32}", first["X-Request-ID"])
    assert first["X-Request-ID"] != second["X-Request-ID"]


@pytest.mark.django_db
def test_a_sane_incoming_id_is_echoed():
    response = Client().get("/accounts/login/", HTTP_X_REQUEST_ID="lb-7f3a.01:edge_2")
    assert response["X-Request-ID"] == "lb-7f3a.01:edge_2"


@pytest.mark.django_db
@pytest.mark.parametrize("incoming", ["", "two words", "line\nbreak", "x" * 129, "-starts-with-dash", "é"])
def test_an_unsafe_incoming_id_is_replaced(incoming):
    response = Client().get("/accounts/login/", HTTP_X_REQUEST_ID=incoming)
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


@pytest.mark.django_db
def test_records_logged_during_the_request_carry_its_id_and_later_ones_do_not(logs, manager, monkeypatch):
    _break_project_list(monkeypatch)
    response = _api_500(manager, HTTP_X_REQUEST_ID="req-123")
    assert response.status_code == 500
    during = [record for record in logs.records if record.name == "django.request"]
    assert during, "Django logs the traceback of a 500 on django.request"
    assert {record.request_id for record in during} == {"req-123"}
    assert {record.request_id for record in _access_records(logs)} == {"req-123"}

    logging.getLogger("preflab.test").warning("after the request")
    assert logs.records[-1].request_id == NO_REQUEST_ID
    assert request_id_var.get() == NO_REQUEST_ID


def test_the_console_handler_of_the_settings_stamps_request_ids():
    handler = settings.LOGGING["handlers"]["console"]
    assert handler["filters"] == ["request_id"]
    assert settings.LOGGING["filters"]["request_id"]["()"] == "config.logging.RequestIdFilter"
    root_filters = [f for h in logging.getLogger().handlers for f in h.filters]
    assert any(isinstance(f, RequestIdFilter) for f in root_filters)
    plain = logging.Formatter(settings.LOGGING["formatters"]["plain"]["format"])
    record = logging.LogRecord("preflab.test", logging.INFO, __file__, 1, "hello", (), None)
    token = request_id_var.set("abc123")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    assert "[abc123] hello" in plain.format(record)


@pytest.mark.django_db
def test_the_access_line_is_json_with_route_status_timing_user_and_token_prefix(logs, project, manager,
                                                                               monkeypatch):
    token, key = api_token_create(user=manager, name="ci")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    # The middleware's clock: the request starts at 10 s and its response leaves 0.25 s later.
    ticks = iter([10.0, 10.25])
    monkeypatch.setattr("config.middleware.time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    response = api.get(f"/api/v1/projects/{project.slug}/", HTTP_X_REQUEST_ID="trace-42")
    assert response.status_code == 200

    [record] = _access_records(logs)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["logger"] == ACCESS_LOGGER and entry["level"] == "INFO"
    assert entry["method"] == "GET"
    assert entry["route"] == "api/v1/projects/<slug:slug>/"
    assert entry["path"] == f"/api/v1/projects/{project.slug}/"
    assert entry["status"] == 200
    assert entry["duration_ms"] == 250.0
    assert entry["request_id"] == "trace-42"
    assert entry["user_id"] == manager.pk
    assert entry["token_prefix"] == token.prefix and key.startswith(token.prefix) and key not in line
    assert entry["message"].startswith(f"GET /api/v1/projects/{project.slug}/ 200 ")


@pytest.mark.django_db
def test_an_anonymous_request_logs_no_user_or_token(logs):
    Client().get("/accounts/login/")
    [record] = _access_records(logs)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["user_id"] is None and entry["token_prefix"] is None
    assert entry["route"] == "accounts/login/" and entry["status"] == 200


@pytest.mark.django_db
def test_a_session_user_is_logged_when_the_view_looked_at_it(logs, manager):
    client = Client()
    client.force_login(manager)
    assert client.get("/").status_code == 200
    entry = json.loads(JsonFormatter().format(_access_records(logs)[-1]))
    assert entry["user_id"] == manager.pk and entry["token_prefix"] is None


def test_json_formatter_keeps_extras_tracebacks_and_values_json_cannot_hold():
    logger = logging.getLogger("preflab.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed %s", ("step",),
                                   sys.exc_info(), extra={"run_id": 7, "path_obj": object()})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed step"
    assert entry["run_id"] == 7
    assert entry["path_obj"].startswith("<object object")
    assert "ValueError: boom" in entry["exc_info"]
    assert entry["request_id"] == NO_REQUEST_ID
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", entry["time"])


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_a_refused_api_request_is_one_access_line_and_nothing_else(logs, settings, project, labeler, debug):
    settings.DEBUG = debug
    api = APIClient()
    api.force_authenticate(labeler)
    answers = [
        (api.get(f"/api/v1/projects/{project.slug}/members/"), 403),
        (api.get("/api/v1/projects/no-such-project/"), 404),
        (APIClient().get("/api/v1/projects/"), 401),
        (Client().get("/api/v1/nothing/"), 404),
    ]
    assert [response.status_code for response, _ in answers] == [status for _, status in answers]
    assert [(record.name, getattr(record, "status", None)) for record in logs.records] == [
        (ACCESS_LOGGER, status) for _, status in answers]


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_a_labeler_refused_the_dashboard_is_one_access_line_without_a_traceback(logs, settings, labeler, debug):
    settings.DEBUG = debug
    client = Client()
    client.force_login(labeler)
    assert client.get("/dashboard/", HTTP_X_REQUEST_ID="dash-1").status_code == 403
    [record] = logs.records
    assert (record.name, record.status, record.request_id, record.exc_info) == (ACCESS_LOGGER, 403, "dash-1", None)


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_a_500_logs_its_traceback_once_with_the_request_id_and_its_access_line(logs, settings, manager,
                                                                                 monkeypatch, debug):
    settings.DEBUG = debug
    _break_project_list(monkeypatch)
    assert _api_500(manager, HTTP_X_REQUEST_ID="boom-1").status_code == 500
    [traceback] = [record for record in logs.records if record.exc_info]
    assert traceback.name == "django.request" and traceback.levelno == logging.ERROR
    assert traceback.request_id == "boom-1"
    assert "RuntimeError: the selector broke" in logging.Formatter().format(traceback)
    [access] = _access_records(logs)
    assert (access.status, access.levelno, access.request_id) == (500, logging.ERROR, "boom-1")
    assert len(logs.records) == 2
    # Nothing prints django.request records on its own, beside the console handler on the root (Django's
    # default logging adds a DEBUG-only console handler to "django", which would print the traceback again).
    assert logging.getLogger("django").handlers == [] and logging.getLogger("django.request").handlers == []

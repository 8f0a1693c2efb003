"""Reranking on the manager dashboard: per-project traffic recorded per minute, its statistics from known rows,
the section and its JSON, and the API keys panel (create, revoke) with its permissions."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from labeling.models import ApiToken
from labeling.services import api_token_create
from rewards import services, serving
from rewards.models import RERANK_LATENCY_BOUNDS_MS, RERANK_LATENCY_FIELDS, RerankMinute
from rewards.selectors import latency_percentile, rerank_usage
from rewards.services import rerank_latency_bucket, rerank_usage_record, reward_model_register
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.tiny import tiny_reward_model

RERANK_URL = "/api/v1/rerank/"
NOW = datetime(2025, 3, 4, 12, 30, 30, tzinfo=UTC)


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _minute_row(project, minute: datetime, *, errors: int = 0, rejected: int = 0, cache_hits: int = 0,
                latency_ms_sum: float = 0.0, **buckets: int) -> RerankMinute:
    answered = sum(buckets.values())
    return RerankMinute.objects.create(project=project, minute=minute, requests=answered + errors + rejected,
                                       errors=errors, rejected=rejected, cache_hits=cache_hits,
                                       latency_ms_sum=latency_ms_sum, **buckets)


def _known_rows(project, current_minute: datetime, *, earlier_minutes: int = 59) -> None:
    """109 requests in the window: 5 errors, 4 rejected, 100 answered (40 from the cache); of the answered, 40
    took at most 5 ms, 50 took 100-200 ms, 9 took 500-1000 ms and 1 took 2-5 s. Rows outside the window or of
    another project must not count."""
    _minute_row(project, current_minute, errors=2, rejected=4, cache_hits=25, latency_ms_sum=3000.0,
                latency_le_5ms=25, latency_le_200ms=30, latency_le_1000ms=5)
    _minute_row(project, current_minute - timedelta(minutes=earlier_minutes), errors=3, cache_hits=15,
                latency_ms_sum=2000.0, latency_le_5ms=15, latency_le_200ms=20, latency_le_1000ms=4,
                latency_le_5000ms=1)
    _minute_row(project, current_minute - timedelta(minutes=60), errors=7,
                latency_le_50000ms=1000)
    _minute_row(ProjectFactory(), current_minute, latency_gt_50000ms=500)


def _stat(html: str, name: str) -> str:
    match = re.search(rf'<dd data-stat="{name}">(.*?)</dd>', html, re.S)
    assert match, name
    return re.sub(r"<[^>]+>", "", match.group(1)).split()[0]


# --- percentiles and recording -------------------------------------------------------------------------


def test_latency_percentile_interpolates_inside_the_bucket_it_falls_in():
    counts = [0] * len(RERANK_LATENCY_FIELDS)
    assert latency_percentile(counts, 0.5) is None
    counts[RERANK_LATENCY_FIELDS.index("latency_le_5ms")] = 40
    counts[RERANK_LATENCY_FIELDS.index("latency_le_200ms")] = 50
    counts[RERANK_LATENCY_FIELDS.index("latency_le_1000ms")] = 9
    counts[RERANK_LATENCY_FIELDS.index("latency_le_5000ms")] = 1
    assert latency_percentile(counts, 0.2) == pytest.approx(2 + 3 * 20 / 40)
    assert latency_percentile(counts, 0.5) == pytest.approx(100 + 100 * 10 / 50)
    assert latency_percentile(counts, 0.95) == pytest.approx(500 + 500 * 5 / 9)
    assert latency_percentile(counts, 0.99) == pytest.approx(1000.0)
    assert latency_percentile(counts, 1.0) == pytest.approx(5000.0)
    only_first = [3] + [0] * (len(counts) - 1)
    assert latency_percentile(only_first, 0.5) == pytest.approx(0.5)
    # Slower than the last bound: the last bound is all that is known.
    assert latency_percentile([0] * (len(counts) - 1) + [2], 0.5) == float(RERANK_LATENCY_BOUNDS_MS[-1])


def test_latency_buckets_include_their_upper_bound():
    assert rerank_latency_bucket(0.2) == "latency_le_1ms"
    assert rerank_latency_bucket(1.0) == "latency_le_1ms"
    assert rerank_latency_bucket(1.01) == "latency_le_2ms"
    assert rerank_latency_bucket(150) == "latency_le_200ms"
    assert rerank_latency_bucket(50_000) == "latency_le_50000ms"
    assert rerank_latency_bucket(50_001) == "latency_gt_50000ms"


@pytest.mark.django_db
def test_requests_of_one_minute_add_up_in_one_row(project):
    minute = NOW.replace(second=0)
    assert rerank_usage_record(project=project, latency_ms=150.0, at=minute)
    assert rerank_usage_record(project=project, latency_ms=3.5, cached=True, at=minute + timedelta(seconds=20))
    assert rerank_usage_record(project=project, latency_ms=12.0, error=True, at=minute + timedelta(seconds=25))
    assert rerank_usage_record(project=project, latency_ms=900.0, at=minute + timedelta(seconds=59.9))
    row = RerankMinute.objects.get(project=project)
    assert row.minute == minute
    assert (row.requests, row.cache_hits, row.errors) == (4, 1, 1)
    assert row.latency_ms_sum == pytest.approx(150.0 + 3.5 + 900.0)
    assert {name: getattr(row, name) for name in RERANK_LATENCY_FIELDS if getattr(row, name)} == {
        "latency_le_200ms": 1, "latency_le_5ms": 1, "latency_le_1000ms": 1}
    # The next minute is a row of its own.
    rerank_usage_record(project=project, latency_ms=1.0, at=minute + timedelta(seconds=60))
    assert list(RerankMinute.objects.filter(project=project).values_list("minute", "requests")) == [
        (minute, 4), (minute + timedelta(minutes=1), 1)]


@pytest.mark.django_db
def test_a_failed_write_is_logged_and_leaves_the_transaction_usable(project, monkeypatch, caplog):
    monkeypatch.setattr(services, "_rerank_upsert_sql", lambda: "INSERT INTO no_such_table VALUES (%s)")
    with caplog.at_level(logging.WARNING, logger="rewards.services"):
        assert rerank_usage_record(project=project, latency_ms=5.0) is False
    assert "was not recorded" in caplog.text
    assert RerankMinute.objects.count() == 0  # the surrounding transaction still answers queries


@pytest.fixture
def buffered(settings):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_USAGE_FLUSH_SECONDS": 0.05}
    buffer = services.RerankUsageBuffer()
    yield buffer
    buffer.stop()


def _rows(project) -> list[tuple]:
    return list(RerankMinute.objects.filter(project=project).order_by("minute")
                .values_list("minute", "requests", "cache_hits", "errors", "latency_le_5ms"))


@pytest.mark.django_db(transaction=True)
def test_buffered_counts_of_many_threads_add_up_and_the_writer_thread_stores_them(buffered, monkeypatch):
    project = ProjectFactory()
    monkeypatch.setattr(services, "rerank_usage_buffer", buffered)
    minute = NOW.replace(second=0)

    def record(number: int) -> None:
        for _ in range(50):
            assert rerank_usage_record(project=project, latency_ms=3.0, cached=number % 2 == 0, at=minute)

    threads = [threading.Thread(target=record, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rerank_usage_record(project=project, latency_ms=7.0, error=True, at=minute + timedelta(minutes=1))
    # The process's writer thread, not this test, writes the rows.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (buffered.pending() or len(_rows(project)) < 2):
        time.sleep(0.05)
    assert _rows(project) == [(minute, 400, 200, 0, 400), (minute + timedelta(minutes=1), 1, 0, 1, 0)]
    assert buffered.pending() == {}


@pytest.mark.django_db
def test_a_failed_flush_keeps_its_counts_for_the_next(project, monkeypatch, settings):
    buffer = services.RerankUsageBuffer()
    buffer._owner_pid = os.getpid()  # no writer thread: this test flushes by hand
    minute = NOW.replace(second=0)
    answered = [int(name == "latency_le_2ms") for name in RERANK_LATENCY_FIELDS]
    buffer.add(project_id=project.pk, minute=minute, counts=(1, 1, 0, 0, 2.0, *answered))
    sql = services._rerank_upsert_sql
    monkeypatch.setattr(services, "_rerank_upsert_sql", lambda: "INSERT INTO no_such_table VALUES (%s)")
    assert buffer.flush() is False
    assert list(buffer.pending()) == [(project.pk, minute)]
    buffer.add(project_id=project.pk, minute=minute, counts=(1, 0, 1, 0, 0.0, *([0] * len(RERANK_LATENCY_FIELDS))))
    monkeypatch.setattr(services, "_rerank_upsert_sql", sql)
    assert buffer.flush() is True and buffer.pending() == {}
    row = RerankMinute.objects.get(project=project)
    assert (row.requests, row.cache_hits, row.errors, row.latency_ms_sum) == (2, 1, 1, 2.0)


@pytest.mark.django_db
def test_a_rerank_request_is_counted_through_the_buffer(project, manager, monkeypatch, settings, fresh_caches):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_USAGE_FLUSH_SECONDS": 3600.0}
    buffer = services.RerankUsageBuffer()
    buffer._owner_pid = os.getpid()
    monkeypatch.setattr(services, "rerank_usage_buffer", buffer)
    _, key = api_token_create(user=manager, scope=ApiToken.Scope.RERANK, project=project)
    response = _bearer(key).post(RERANK_URL, {"project": project.slug, "prompt": "p", "candidates": []},
                                 format="json")
    assert response.status_code == 400
    assert not RerankMinute.objects.exists()
    assert buffer.flush() is True
    row = RerankMinute.objects.get(project=project)
    assert (row.requests, row.rejected, row.errors) == (1, 1, 0)


# --- statistics from known rows ------------------------------------------------------------------------


@pytest.mark.django_db
def test_rerank_usage_from_known_rows(project):
    current = NOW.replace(second=0)
    _known_rows(project, current)
    usage = rerank_usage(project=project, now=NOW)
    assert usage["start"] == current - timedelta(minutes=59) and usage["end"] == current + timedelta(minutes=1)
    assert (usage["requests"], usage["errors"], usage["rejected"], usage["answered"], usage["cache_hits"]) == (
        109, 5, 4, 100, 40)
    assert usage["requests_per_minute"] == pytest.approx(109 / 60)
    assert usage["peak_requests_per_minute"] == 66
    assert usage["cache_hit_rate"] == pytest.approx(0.4)
    assert usage["error_rate"] == pytest.approx(5 / 109) and usage["rejected_rate"] == pytest.approx(4 / 109)
    assert usage["latency_ms"] == {"mean": pytest.approx(50.0), "p50": pytest.approx(120.0),
                                   "p95": pytest.approx(500 + 500 * 5 / 9), "p99": pytest.approx(1000.0)}
    assert sum(bucket["requests"] for bucket in usage["latency_buckets"]) == 100
    assert usage["latency_buckets"][-1] == {"le_ms": None, "requests": 0}
    series = usage["series"]
    assert len(series) == 60 and series[0]["minute"] == current - timedelta(minutes=59)
    assert series[0] == {"minute": current - timedelta(minutes=59), "requests": 43, "cache_hits": 15, "errors": 3,
                         "rejected": 0}
    assert series[-1] == {"minute": current, "requests": 66, "cache_hits": 25, "errors": 2, "rejected": 4}
    assert all(point["requests"] == 0 for point in series[1:-1])

    short = rerank_usage(project=project, minutes=1, now=NOW)
    assert (short["requests"], short["latency_ms"]["p50"]) == (66, pytest.approx(100 + 100 * 5 / 30))
    empty = rerank_usage(project=ProjectFactory(), now=NOW)
    assert empty["requests"] == 0 and empty["cache_hit_rate"] is None and empty["latency_ms"]["p99"] is None


# --- through the rerank API ----------------------------------------------------------------------------


@pytest.fixture
def reranking(project, tmp_path):
    serving.pool.clear()
    cache.clear()
    reward_model_register(project=project, path=tiny_reward_model(tmp_path), deploy=True)
    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="product")
    yield _bearer(key)
    serving.pool.clear()
    cache.clear()


@pytest.mark.django_db
def test_rerank_requests_are_counted_miss_hit_and_error(project, reranking, monkeypatch):
    body = {"project": project.slug, "prompt": "How do I boil an egg?",
            "candidates": ["Eight minutes in boiling water.", "No idea."]}
    first = reranking.post(RERANK_URL, body, format="json")
    second = reranking.post(RERANK_URL, body, format="json")
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    usage = rerank_usage(project=project)
    assert (usage["requests"], usage["answered"], usage["cache_hits"], usage["errors"]) == (2, 2, 1, 0)
    assert usage["cache_hit_rate"] == pytest.approx(0.5)
    assert usage["latency_ms"]["mean"] == pytest.approx(
        (first.json()["timing_ms"] + second.json()["timing_ms"]) / 2, rel=1e-3)

    # A bad request with the project's key counts against that project, as rejected (the caller's doing) and
    # not as an error of the service.
    assert reranking.post(RERANK_URL, {**body, "candidates": []}, format="json").status_code == 400
    usage = rerank_usage(project=project)
    assert (usage["requests"], usage["rejected"], usage["errors"], usage["answered"]) == (3, 1, 0, 2)

    # When the statistics cannot be written the request is answered all the same.
    monkeypatch.setattr(services, "_rerank_upsert_sql", lambda: "INSERT INTO no_such_table VALUES (%s)")
    assert reranking.post(RERANK_URL, body, format="json").status_code == 200
    assert rerank_usage(project=project)["requests"] == 3


# --- the section, its JSON and the keys panel -----------------------------------------------------------


@pytest.mark.django_db
def test_the_project_page_shows_the_rerank_numbers(project, manager):
    # Rows 30 minutes apart stay in the window even if a minute turns over during the test.
    _known_rows(project, timezone.now().replace(second=0, microsecond=0), earlier_minutes=30)
    html = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    assert _stat(html, "rerank-requests") == "109"
    assert _stat(html, "rerank-per-minute") == "1.82"
    assert _stat(html, "rerank-p50") == "120.0"
    assert _stat(html, "rerank-p95") == "777.8"
    assert _stat(html, "rerank-p99") == "1000.0"
    assert _stat(html, "rerank-hit-rate") == "0.400"
    assert _stat(html, "rerank-errors") == "5" and _stat(html, "rerank-rejected") == "4"
    assert 'id="chart-rerank"' in html and f'data-rerank-url="/dashboard/{project.slug}/rerank.json"' in html
    table = re.search(r'<table class="data" id="table-rerank">(.*?)</table>', html, re.S).group(1)
    assert table.count("<tr>") == 61  # the header and one row per minute


@pytest.mark.django_db
def test_the_rerank_json_is_the_selector_output(project, manager):
    _known_rows(project, timezone.now().replace(second=0, microsecond=0), earlier_minutes=30)
    client = _client(manager)
    data = client.get(f"/dashboard/{project.slug}/rerank.json").json()
    assert (data["requests"], data["cache_hits"], data["errors"], data["rejected"]) == (109, 40, 5, 4)
    assert data["latency_ms"]["p50"] == pytest.approx(120.0) and len(data["series"]) == 60
    assert len(client.get(f"/dashboard/{project.slug}/rerank.json?minutes=5").json()["series"]) == 5
    for bad in ("0", "100000", "soon"):
        response = client.get(f"/dashboard/{project.slug}/rerank.json?minutes={bad}")
        assert response.status_code == 400 and response.json()["error"]["field"] == "minutes"


@pytest.mark.django_db
def test_a_manager_creates_and_revokes_a_key_and_the_revoked_key_gets_401(project, manager):
    client = _client(manager)
    created = client.post(f"/dashboard/{project.slug}/api-keys/", {"name": "chat product"})
    assert created.status_code == 201 and "no-store" in created["Cache-Control"]
    html = created.content.decode()
    key = re.search(r'id="new-api-key-value" readonly value="([^"]+)"', html).group(1)
    token = ApiToken.objects.get(project=project)
    assert token.key_hash == ApiToken.hash_key(key) and token.scope == "rerank" and token.name == "chat product"
    assert token.user == manager and f'data-key="{token.prefix}"' in html
    # Shown once: the page never shows it again.
    assert key not in client.get(f"/dashboard/{project.slug}/").content.decode()

    rerank = {"project": project.slug, "prompt": "hi", "candidates": ["hello"]}
    # The key is accepted (the project has no reward model deployed yet, hence 409, not 401).
    assert _bearer(key).post(RERANK_URL, rerank, format="json").status_code == 409

    revoked = client.post(f"/dashboard/{project.slug}/api-keys/{token.prefix}/revoke/")
    assert revoked.status_code == 302 and revoked.url == f"/dashboard/{project.slug}/#api-keys"
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert _bearer(key).post(RERANK_URL, rerank, format="json").status_code == 401
    page = client.get(f"/dashboard/{project.slug}/").content.decode()
    row = re.search(rf'<tr data-key="{token.prefix}">(.*?)</tr>', page, re.S).group(1)
    assert "chat product" in row and "active" not in row and "Revoke" not in row
    assert client.post(f"/dashboard/{project.slug}/api-keys/pfl_nosuchkey/revoke/").status_code == 404
    # A NUL (%00) in the prefix cannot match a key; the database would refuse it in the query.
    assert client.post(f"/dashboard/{project.slug}/api-keys/{token.prefix}%00/revoke/").status_code == 404


@pytest.mark.django_db
def test_htmx_gets_the_keys_panel_alone(project, manager):
    client = _client(manager)
    created = client.post(f"/dashboard/{project.slug}/api-keys/", {"name": "x" * 101}, HTTP_HX_REQUEST="true")
    assert created.status_code == 400 and "<html" not in created.content.decode()
    assert "name" in created.content.decode() and not ApiToken.objects.filter(project=project).exists()
    created = client.post(f"/dashboard/{project.slug}/api-keys/", {"name": "batch"}, HTTP_HX_REQUEST="true")
    html = created.content.decode()
    assert created.status_code == 201 and html.lstrip().startswith('<section class="card"') and "new-api-key" in html
    prefix = ApiToken.objects.get(project=project).prefix
    revoked = client.post(f"/dashboard/{project.slug}/api-keys/{prefix}/revoke/", HTTP_HX_REQUEST="true")
    assert revoked.status_code == 200 and f"The key {prefix}… is revoked." in revoked.content.decode()


@pytest.mark.django_db
def test_labelers_and_outsiders_cannot_see_reranking_or_manage_keys(project, labeler, outsider):
    token, _ = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project)
    for user, status in ((labeler, 403), (outsider, 404)):
        client = _client(user)
        assert client.get(f"/dashboard/{project.slug}/").status_code == status
        assert client.get(f"/dashboard/{project.slug}/rerank.json").status_code == status
        assert client.post(f"/dashboard/{project.slug}/api-keys/", {"name": "mine"}).status_code == status
        assert client.post(f"/dashboard/{project.slug}/api-keys/{token.prefix}/revoke/").status_code == status
    assert list(ApiToken.objects.filter(project=project)) == [token]
    token.refresh_from_db()
    assert token.revoked_at is None
    anonymous = Client().post(f"/dashboard/{project.slug}/api-keys/", {"name": "mine"})
    assert anonymous.status_code == 302 and anonymous.url.startswith("/accounts/login/")

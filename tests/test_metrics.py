"""The /metrics endpoint: metric families, request counters by route pattern, access rules, the training-run
gauge and the multiprocess mode gunicorn runs in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from config import metrics
from rewards.models import TrainingRun
from tests.conftest import client_for
from tests.rewards.factories import TrainingRunFactory

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def _scrape(client: Client | None = None, **extra) -> dict[str, dict[tuple, float]]:
    """GET /metrics from loopback; {metric family: {sorted (label, value) pairs + sample name: value}}."""
    response = (client or Client()).get("/metrics", REMOTE_ADDR=LOOPBACK, **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    families: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return families


def _requests_total(families, *, method: str, route: str, status: int) -> float:
    key = ("preflab_http_requests_total", ("method", method), ("route", route), ("status", str(status)))
    return families.get("preflab_http_requests", {}).get(key, 0.0)


@pytest.mark.django_db
def test_metrics_from_loopback_lists_every_family_in_the_text_format():
    families = _scrape()
    assert {"preflab_http_requests", "preflab_http_request_duration_seconds", "preflab_rerank_batch_size",
            "preflab_model_load_seconds", "preflab_rerank_cache_lookups", "preflab_training_runs"} <= set(families)


@pytest.mark.django_db
def test_requests_are_counted_and_timed_under_their_route_pattern_not_their_path(project, manager):
    route = "api/v1/projects/<slug:slug>/"
    before = _scrape()
    api = client_for(manager)
    assert api.get(f"/api/v1/projects/{project.slug}/").status_code == 200
    assert api.get(f"/api/v1/projects/{project.slug}/").status_code == 200
    assert api.get("/api/v1/projects/no-such-project/").status_code == 404
    after = _scrape()

    assert (_requests_total(after, method="GET", route=route, status=200)
            - _requests_total(before, method="GET", route=route, status=200)) == 2
    assert (_requests_total(after, method="GET", route=route, status=404)
            - _requests_total(before, method="GET", route=route, status=404)) == 1
    count_key = ("preflab_http_request_duration_seconds_count", ("method", "GET"), ("route", route))
    latency = after["preflab_http_request_duration_seconds"]
    assert latency[count_key] - before["preflab_http_request_duration_seconds"].get(count_key, 0.0) == 3
    routes = {dict(labels[1:])["route"] for labels in after["preflab_http_requests"]}
    assert not any(project.slug in value or "no-such-project" in value for value in routes)


@pytest.mark.django_db
def test_a_path_that_matches_no_route_is_counted_under_one_shared_label():
    before = _scrape()
    assert Client().get("/api/v1/nothing/here/42/").status_code == 404
    after = _scrape()
    unmatched = metrics.UNMATCHED_ROUTE
    assert (_requests_total(after, method="GET", route=unmatched, status=404)
            - _requests_total(before, method="GET", route=unmatched, status=404)) == 1


@pytest.mark.django_db
def test_an_odd_method_does_not_create_a_new_label_value():
    Client().generic("BREW", "/metrics", REMOTE_ADDR=LOOPBACK)
    families = _scrape()
    methods = {dict(labels[1:])["method"] for labels in families["preflab_http_requests"]}
    assert "BREW" not in methods and "other" in methods


@pytest.mark.django_db
@pytest.mark.parametrize("remote", ["10.1.2.3", "203.0.113.9", "2001:db8::1"])
def test_a_remote_address_is_refused_without_a_token(remote):
    response = Client().get("/metrics", REMOTE_ADDR=remote)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert b"preflab_http_requests" not in response.content


@pytest.mark.django_db
def test_loopback_behind_a_proxy_is_not_trusted():
    # A reverse proxy on the same machine forwards outside requests from 127.0.0.1.
    response = Client().get("/metrics", REMOTE_ADDR=LOOPBACK, HTTP_X_FORWARDED_FOR="198.51.100.7")
    assert response.status_code == 403


@pytest.mark.django_db
def test_ipv6_loopback_is_allowed():
    assert Client().get("/metrics", REMOTE_ADDR="::1").status_code == 200


@pytest.mark.django_db
def test_a_remote_scraper_with_the_configured_token_is_allowed_and_a_wrong_one_refused(settings):
    settings.PREFLAB = {**settings.PREFLAB, "METRICS_TOKEN": "scrape-secret-123"}
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret-123", **remote).status_code == 200
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret-12", **remote).status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Token scrape-secret-123", **remote).status_code == 403
    assert Client().get("/metrics", **remote).status_code == 403


@pytest.mark.django_db
def test_no_token_configured_means_no_bearer_is_accepted(settings):
    settings.PREFLAB = {**settings.PREFLAB, "METRICS_TOKEN": ""}
    response = Client().get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 403


@pytest.mark.django_db
def test_metrics_only_answers_get():
    assert Client().post("/metrics", REMOTE_ADDR=LOOPBACK).status_code == 405


@pytest.mark.django_db
def test_training_run_gauge_counts_the_rows_per_status_and_kind():
    now = timezone.now()
    TrainingRunFactory.create_batch(2, kind=TrainingRun.Kind.REWARD, status=TrainingRun.Status.RUNNING,
                                    started_at=now)
    TrainingRunFactory(kind=TrainingRun.Kind.DPO, status=TrainingRun.Status.FAILED, started_at=now, finished_at=now)
    gauge = _scrape()["preflab_training_runs"]

    def value(status: str, kind: str) -> float:
        return gauge[("preflab_training_runs", ("kind", kind), ("status", status))]

    assert value("running", "reward") == 2
    assert value("failed", "dpo") == 1
    assert value("queued", "rlhf") == 0
    assert len(gauge) == len(TrainingRun.Status.values) * len(TrainingRun.Kind.values)

    TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING).update(status=TrainingRun.Status.SUCCEEDED,
                                                                         finished_at=now)
    gauge = _scrape()["preflab_training_runs"]
    assert value("running", "reward") == 0
    assert value("succeeded", "reward") == 2


@pytest.mark.django_db
def test_training_run_gauge_costs_one_query_per_scrape(django_assert_num_queries):
    TrainingRunFactory.create_batch(3)
    with django_assert_num_queries(1):
        families = list(metrics.TRAINING_RUNS.collect())
    assert families[0].name == "preflab_training_runs"


_WORKER = """
import django
django.setup()
from config.metrics import HTTP_REQUESTS, RERANK_CACHE
HTTP_REQUESTS.labels(method="GET", route="api/v1/projects/", status="200").inc()
RERANK_CACHE.labels(result="hit").inc(3)
"""


@pytest.mark.django_db
def test_multiprocess_mode_sums_the_values_of_every_worker_process(tmp_path, monkeypatch):
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="config.settings.test",
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path), DATABASE_URL=f"sqlite:///{tmp_path / 'unused.sqlite3'}")
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER], cwd=ROOT, env=env) for _ in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    assert len(list(tmp_path.glob("*.db"))) >= 2

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = metrics.scrape_registry()
    labels = {"method": "GET", "route": "api/v1/projects/", "status": "200"}
    assert registry.get_sample_value("preflab_http_requests_total", labels) == 2
    assert registry.get_sample_value("preflab_rerank_cache_lookups_total", {"result": "hit"}) == 6
    assert registry.get_sample_value("preflab_training_runs", {"status": "queued", "kind": "reward"}) == 0

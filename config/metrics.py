"""Prometheus metrics of the service, defined once here, and the /metrics view that exposes them."""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from labeling.errors import error_body

logger = logging.getLogger(__name__)

# gunicorn forks several workers, each with its own copy of every metric. When PROMETHEUS_MULTIPROC_DIR is set
# (by `manage.py serve` and docker-compose, before any worker starts) prometheus_client keeps the values in
# memory-mapped files in that folder and a scrape sums the files of every process; the folder must be emptied
# before the server starts, or counts of a previous run leak in. Without it (tests, `runserver`) the ordinary
# in-process registry is used. There are no live gauges here (the training-run gauge is read from the
# database at scrape time), so dead workers' files need no clean-up while the server runs.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

HTTP_REQUESTS = Counter(
    "preflab_http_requests", "HTTP requests answered, by method, URL route pattern and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "preflab_http_request_duration_seconds", "Time to answer an HTTP request, by method and URL route pattern.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
RERANK_BATCH_SIZE = Histogram(
    "preflab_rerank_batch_size", "Items scored in one forward pass of a reward model.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
MODEL_LOAD_SECONDS = Histogram(
    "preflab_model_load_seconds", "Time to load a model from disk, by kind of model.",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
RERANK_CACHE = Counter(
    "preflab_rerank_cache_lookups", "Reward-score cache lookups of reranking, by result (hit or miss).",
    ["result"],
)

TRAINING_RUNS_METRIC = "preflab_training_runs"
TRAINING_RUNS_HELP = "Training runs in the database, by status and kind."

# Methods outside this set share one label value, so that odd clients cannot create new series at will.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"


class TrainingRunCollector:
    """Counts training runs per status and kind at scrape time with one aggregate query, so the gauge is right
    whichever process changed the rows."""

    def describe(self) -> Iterable[Metric]:
        # Registering a collector calls describe(); answering without a query keeps imports off the database.
        yield GaugeMetricFamily(TRAINING_RUNS_METRIC, TRAINING_RUNS_HELP, labels=["status", "kind"])

    def collect(self) -> Iterable[Metric]:
        from rewards.models import TrainingRun

        try:
            rows = list(TrainingRun.objects.order_by().values("status", "kind").annotate(count=Count("id")))
        except DatabaseError:
            logger.warning("Could not count training runs for /metrics.", exc_info=True)
            return
        # Every combination is reported, zeros included, so a series does not vanish when its last run moves on.
        counts = {(status, kind): 0 for status in TrainingRun.Status.values for kind in TrainingRun.Kind.values}
        for row in rows:
            counts[(row["status"], row["kind"])] = row["count"]
        family = GaugeMetricFamily(TRAINING_RUNS_METRIC, TRAINING_RUNS_HELP, labels=["status", "kind"])
        for (status, kind), count in sorted(counts.items()):
            family.add_metric([status, kind], count)
        yield family


TRAINING_RUNS = TrainingRunCollector()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR_ENV) or None


if multiprocess_dir() is None:
    REGISTRY.register(TRAINING_RUNS)


def scrape_registry() -> CollectorRegistry:
    """The registry one scrape reads: every worker's files in multiprocess mode, this process's otherwise."""
    if multiprocess_dir() is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(TRAINING_RUNS)
    return registry


def route_of(request: HttpRequest) -> str:
    """The URL pattern that answered (`api/v1/projects/<slug:slug>/next/`), never the raw path: a label value per
    project or id would grow the series without bound."""
    match = getattr(request, "resolver_match", None)
    if match is None or match.route is None:
        return UNMATCHED_ROUTE
    return match.route or "/"


def method_of(request: HttpRequest) -> str:
    method = (request.method or "").upper()
    return method if method in KNOWN_METHODS else "other"


def _is_loopback(request: HttpRequest) -> bool:
    # A reverse proxy on the same host makes every outside request arrive from loopback; the forwarding headers
    # it adds tell those apart from a scraper that really runs on this machine.
    if any(header in request.META for header in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def _has_token(request: HttpRequest) -> bool:
    expected = settings.PREFLAB.get("METRICS_TOKEN", "")
    if not expected:
        return False
    scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def metrics_access_allowed(request: HttpRequest) -> bool:
    """Metrics are for the operator's Prometheus: a scraper on this machine, or one that sends the token."""
    return _is_loopback(request) or _has_token(request)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not metrics_access_allowed(request):
        message = ("Metrics are served to loopback addresses only, or with 'Authorization: Bearer <token>' "
                   "matching PREFLAB_METRICS_TOKEN.")
        return JsonResponse(error_body(message=message, code="forbidden", field="Authorization"), status=403)
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)

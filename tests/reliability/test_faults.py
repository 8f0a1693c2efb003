"""Infrastructure faults against real servers: Redis stopped and started again under a running gunicorn, and
PostgreSQL restarted and stopped under one, with requests in flight."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis as redis_client
import requests
from django.conf import settings
from django.db import connection
from django.test import Client

from labeling.models import ApiToken, Comparison, Membership, Pair
from labeling.services import api_token_create
from rewards.models import TrainingRun
from rewards.services import reward_model_register
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.reliability.servers import (
    Gunicorn,
    PostgresCluster,
    RedisServer,
    manage,
    postgres_bin_dir,
    redis_binary,
    service_env,
    wait_until,
)
from tests.rewards.factories import labeled_pairs
from tests.rewards.tiny import tiny_reward_model

TIMEOUT = 60  # seconds a request may take before the test calls it hung
TRAINING = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64}


class Api:
    """A bearer-token client of a running server."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.key = key
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.base_url}{path}", timeout=TIMEOUT)

    def post(self, path: str, body: dict) -> requests.Response:
        return self.session.post(f"{self.base_url}{path}", json=body, timeout=TIMEOUT)


def _error_code(response: requests.Response) -> str | None:
    """The `error.code` of a JSON error body, None when the body is not one."""
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _test_database_url() -> str:
    """The test run's own database, for a server process to share the rows this test commits."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


# --- Redis down ------------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    if redis_binary() is None:
        pytest.skip("redis-server is not installed: the Redis fault test starts a private one")
    server = RedisServer(log_dir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_with_redis_down_labeling_goes_on_jobs_are_refused_reranking_skips_the_cache_and_all_recovers(figure,
        redis_server, tmp_path):
    queue = ProjectFactory(slug="faults-queue")
    pairs = [PairFactory(project=queue) for _ in range(10)]
    labeler = UserFactory()
    Membership.objects.create(project=queue, user=labeler, role=Membership.Role.LABELER)
    _, labeler_key = api_token_create(user=labeler, name="faults")
    browser = Client()
    browser.force_login(labeler)
    session_cookie = browser.cookies["sessionid"].value

    training = ProjectFactory(slug="faults-training")
    labeled_pairs(training, count=4)
    manager = UserFactory()
    Membership.objects.create(project=training, user=manager, role=Membership.Role.MANAGER)
    _, manager_key = api_token_create(user=manager, name="faults")

    reward_model_register(project=queue, path=tiny_reward_model(tmp_path / "rm"), deploy=True)
    _, rerank_key = api_token_create(user=manager, scope=ApiToken.Scope.RERANK, project=queue, name="faults")

    # The test's secret key, so that the server accepts the session signed here.
    env = service_env(var_dir=tmp_path / "var", DATABASE_URL=_test_database_url(),
                      DJANGO_SECRET_KEY=settings.SECRET_KEY, REDIS_URL=redis_server.url(0),
                      CELERY_BROKER_URL=redis_server.url(1))
    web = Gunicorn(env=env, log_dir=tmp_path)
    web.start()
    try:
        api, manager_api, rerank_api = (Api(web.url, key) for key in (labeler_key, manager_key, rerank_key))
        broker = redis_client.Redis.from_url(redis_server.url(1))

        def submit_training() -> requests.Response:
            return manager_api.post("/api/v1/training-runs/", {"project": training.slug, "kind": "reward",
                                                               "hyperparameters": TRAINING})

        rerank_body = {"project": queue.slug, "prompt": "How do I boil an egg?",
                       "candidates": ["Boil it for eight minutes.", "No idea.", "Eggs are birds."]}

        # Redis up: a run is queued on the broker and a repeated rerank is a cache hit.
        accepted = submit_training()
        assert accepted.status_code == 202, accepted.text
        assert broker.llen("training") == 1
        first = rerank_api.post("/api/v1/rerank/", rerank_body)
        assert first.status_code == 200, first.text
        assert first.json()["cached"] is False
        assert rerank_api.post("/api/v1/rerank/", rerank_body).json()["cached"] is True
        broker.close()

        redis_server.stop()

        # Labeling never touches Redis: the queue, submissions and the labeling page all keep working.
        labeling = Counter()
        for _ in pairs:
            offered = api.get(f"/api/v1/projects/{queue.slug}/next/")
            labeling[offered.status_code] += 1
            page = requests.get(f"{web.url}/projects/{queue.slug}/label/", cookies={"sessionid": session_cookie},
                                timeout=TIMEOUT)
            labeling[page.status_code] += 1
            assert page.status_code == 200 and offered.json()["left"] in page.text
            submitted = api.post("/api/v1/comparisons/", {"pair": offered.json()["pair"], "choice": "left"})
            labeling[submitted.status_code] += 1
        assert labeling == {200: 20, 201: 10}, labeling
        assert Comparison.objects.filter(pair__in=pairs).count() == 10
        assert set(Pair.objects.filter(pk__in=[p.pk for p in pairs]).values_list("status", flat=True)) == {"complete"}

        # A job submission is refused with a clear 503, and the attempt is kept as a failed run.
        refused = submit_training()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert "training queue is unreachable" in refused.json()["error"]["message"]
        failed = TrainingRun.objects.filter(project=training, status=TrainingRun.Status.FAILED).get()
        assert "broker is unreachable" in failed.error

        # Reranking answers without its cache (and without its throttle, which lives there too).
        uncached = [rerank_api.post("/api/v1/rerank/", rerank_body) for _ in range(2)]
        assert [r.status_code for r in uncached] == [200, 200], [r.text for r in uncached]
        assert [r.json()["cached"] for r in uncached] == [False, False]
        assert uncached[0].json()["results"] == first.json()["results"]

        # Monitoring and the probes do not depend on Redis; readiness says what is down.
        assert requests.get(f"{web.url}/metrics", timeout=TIMEOUT).status_code == 200
        assert requests.get(f"{web.url}/healthz", timeout=TIMEOUT).status_code == 200
        ready = requests.get(f"{web.url}/readyz", timeout=TIMEOUT)
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "degraded"
        assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
            "database": True, "cache": False, "broker": False}

        redis_server.start()
        restarted = time.monotonic()
        again = submit_training()
        recovered = time.monotonic() - restarted
        assert again.status_code == 202, again.text
        assert TrainingRun.objects.get(pk=again.json()["id"]).status == TrainingRun.Status.QUEUED
        broker = redis_client.Redis.from_url(redis_server.url(1))
        assert broker.llen("training") == 1  # the restarted Redis is empty: this is the new run's message
        broker.close()
        assert rerank_api.post("/api/v1/rerank/", rerank_body).json()["cached"] is False
        assert rerank_api.post("/api/v1/rerank/", rerank_body).json()["cached"] is True
        assert requests.get(f"{web.url}/readyz", timeout=TIMEOUT).json()["status"] == "ok"
        figure(f"[faults] redis down: {labeling[200] + labeling[201]}/{sum(labeling.values())} labeling requests "
              f"ok, training submit {refused.status_code} in {refused.elapsed.total_seconds():.2f} s, rerank "
              f"{uncached[0].status_code} uncached in {uncached[1].elapsed.total_seconds():.2f} s, /metrics and "
              f"/healthz 200, /readyz degraded in {ready.elapsed.total_seconds():.2f} s; redis back: training "
              f"submit 202 in {recovered:.2f} s, cache hit again")
    finally:
        web.stop()


# --- PostgreSQL restarted and stopped --------------------------------------------------------------------

SEED = """
import json
from django.contrib.auth import get_user_model
from labeling import services
from labeling.models import Membership

user = get_user_model().objects.create_user("labeler", password="faults-labeler-password")
project = services.project_create(name="Faults", slug="faults")
services.membership_set(project=project, user=user, role=Membership.Role.LABELER)
for i in range(20):
    services.pair_create(project=project, prompt=f"Question {i}?", response_a=f"Answer {i}.",
                         response_b=f"Another answer {i}.")
_, key = services.api_token_create(user=user, name="faults")
print(json.dumps({"key": key, "slug": project.slug}))
"""


@pytest.fixture
def postgres_cluster():
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: the restart test starts a "
                    "private cluster")
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def _waiting_on_a_lock(cluster: PostgresCluster, dbname: str) -> bool:
    with psycopg.connect(cluster.dsn(dbname), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s",
                           [dbname]).fetchone()
    return bool(row and row[0])


class Traffic:
    """Threads asking for the next pair in a loop, recording how each request ended, until stopped."""

    def __init__(self, api: Api, slug: str, *, threads: int = 3) -> None:
        self.api = api
        self.slug = slug
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        api = Api(self.api.base_url, self.api.key)  # a session per thread: requests.Session is not thread-safe
        while not self._stop.is_set():
            try:
                response = api.get(f"/api/v1/projects/{self.slug}/next/")
                outcome = ("ok" if response.status_code == 200
                           else f"{response.status_code} {_error_code(response) or 'not json'}")
            except requests.RequestException as exc:
                outcome = f"connection error {type(exc).__name__}"
            with self._lock:
                self.outcomes[outcome] += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=TIMEOUT + 5)


def test_a_postgres_restart_fails_requests_in_flight_cleanly_and_the_next_succeed(figure, postgres_cluster, tmp_path):
    pg = postgres_cluster
    pg.create_database("preflab")
    env = service_env(var_dir=tmp_path / "var", DATABASE_URL=pg.url("preflab"))
    manage("migrate", "--no-input", env=env)
    seed = json.loads(manage("shell", "-c", SEED, env=env).strip().splitlines()[-1])
    slug = seed["slug"]
    web = Gunicorn(env=env, log_dir=tmp_path, threads=4)
    web.start()
    try:
        api = Api(web.url, seed["key"])
        offered = api.get(f"/api/v1/projects/{slug}/next/")
        assert offered.status_code == 200, offered.text
        pair = offered.json()["pair"]

        # A submit held in flight: another session locks the pair's row, so the request waits inside its
        # transaction when the server goes away under it.
        locker = psycopg.connect(pg.dsn("preflab"))
        with ThreadPoolExecutor(max_workers=1) as pool:
            locker.execute("SELECT id FROM labeling_pair WHERE id = %s FOR UPDATE", [pair])
            in_flight = pool.submit(api.post, "/api/v1/comparisons/", {"pair": pair, "choice": "left"})
            wait_until(lambda: _waiting_on_a_lock(pg, "preflab"), what="the submit to wait on the row lock",
                       timeout=TIMEOUT)
            with Traffic(api, slug) as during_restart:
                time.sleep(0.2)
                pg.restart(mode="fast")
                time.sleep(0.2)
            cut = in_flight.result(timeout=TIMEOUT)
        locker.close()
        assert cut.status_code == 503, cut.text
        assert cut.json()["error"]["code"] == "database_unavailable"

        # The very next requests succeed: dead pooled connections are noticed and replaced.
        first_after = api.get(f"/api/v1/projects/{slug}/next/")
        assert first_after.status_code == 200, first_after.text
        assert first_after.json()["pair"] == pair  # the lease committed before the restart is still held
        resubmitted = api.post("/api/v1/comparisons/", {"pair": pair, "choice": "left"})
        assert resubmitted.status_code == 201, resubmitted.text  # the cut submit was rolled back, not half-stored
        with ThreadPoolExecutor(max_workers=4) as pool:
            after = Counter(r.status_code for r in pool.map(
                lambda _: api.get(f"/api/v1/projects/{slug}/next/"), range(12)))
        assert after == {200: 12}, after
        # Every request during the restart either succeeded or failed as a clean JSON 503.
        assert set(during_restart.outcomes) <= {"ok", "503 database_unavailable"}, during_restart.outcomes

        # Connections dropped while idle (the server's persistent ones) are replaced before use, not failed on.
        # Their health check reads the socket instead of sending a query, so the requests start once the
        # server has ended those sessions (a request racing the drop itself is one in flight, answered 503).
        with psycopg.connect(pg.dsn("preflab"), autocommit=True) as conn:
            dropped = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'preflab' AND pid <> pg_backend_pid()").fetchall()]
            for pid in dropped:
                conn.execute("SELECT pg_terminate_backend(%s)", [pid])
            wait_until(lambda: not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                                                [dropped]).fetchone()[0],
                       what="the dropped sessions to end", timeout=TIMEOUT)
        assert len(dropped) >= 1
        with ThreadPoolExecutor(max_workers=4) as pool:
            after_drop = Counter(r.status_code for r in pool.map(
                lambda _: api.get(f"/api/v1/projects/{slug}/next/"), range(12)))
        assert after_drop == {200: 12}, after_drop

        # Down for a while: each request fails fast with the same 503, and the first after the start succeeds.
        pg.stop(mode="fast")
        down = [api.get(f"/api/v1/projects/{slug}/next/") for _ in range(3)]
        down.append(api.post("/api/v1/comparisons/", {"pair": first_after.json()["pair"], "choice": "right"}))
        assert [(r.status_code, _error_code(r)) for r in down] == [(503, "database_unavailable")] * 4
        metrics = requests.get(f"{web.url}/metrics", timeout=TIMEOUT)
        assert metrics.status_code == 200 and "preflab_http_requests" in metrics.text
        # Alive, not ready: an orchestrator stops routing traffic here but does not restart the container.
        assert requests.get(f"{web.url}/healthz", timeout=TIMEOUT).status_code == 200
        unready = requests.get(f"{web.url}/readyz", timeout=TIMEOUT)
        assert unready.status_code == 503, unready.text
        assert unready.json()["status"] == "unavailable"
        assert unready.json()["checks"]["database"]["ok"] is False
        pg.start()
        back = api.get(f"/api/v1/projects/{slug}/next/")
        assert back.status_code == 200, back.text
        assert requests.get(f"{web.url}/readyz", timeout=TIMEOUT).json()["checks"]["database"]["ok"] is True
        with psycopg.connect(pg.dsn("preflab")) as conn:
            stored = conn.execute("SELECT count(*) FROM labeling_comparison").fetchone()[0]
        assert stored == 1
        figure(f"[faults] postgres restart: in-flight submit {cut.status_code} {cut.json()['error']['code']}, "
              f"{sum(during_restart.outcomes.values())} requests during the restart {dict(during_restart.outcomes)}, "
              f"first request after it ok in {first_after.elapsed.total_seconds():.2f} s, then 12/12 ok; "
              f"{len(dropped)} idle connections dropped: 12/12 next requests ok; stopped: "
              f"4/4 requests 503 (slowest {max(r.elapsed.total_seconds() for r in down):.2f} s), /metrics 200, "
              f"/readyz 503 in {unready.elapsed.total_seconds():.2f} s; "
              f"started again: first request ok in {back.elapsed.total_seconds():.2f} s")
    finally:
        web.stop()

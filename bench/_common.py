"""Shared parts of the load and export benchmarks: Django set-up, seeded projects, labelers, gunicorn, CPU meters."""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

# Bumped when the generated content changes, so that an older seed is rebuilt instead of reused.
SEED_VERSION = 1
LABELER_PREFIX = "bench-labeler-"


def django_setup() -> None:
    """Django on the PostgreSQL database DATABASE_URL names, created when it does not exist yet, migrated."""
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor != "postgresql":
        sys.exit(f"{sys.argv[0]} needs PostgreSQL: set DATABASE_URL.")
    database_create_missing(connection)
    call_command("migrate", verbosity=0)


def database_create_missing(connection) -> None:
    import psycopg
    from psycopg import sql

    params = connection.get_connection_params()
    name = params.pop("dbname")
    try:
        psycopg.connect(dbname=name, **params).close()
        return
    except psycopg.OperationalError:
        pass
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    print(f"created database {name}", file=sys.stderr)


# --- seeded projects ---------------------------------------------------------------------------------------


def _seed_marker(pairs: int, labels_per_pair: int, labeled: bool) -> str:
    return f"bench seed v{SEED_VERSION}: {pairs} pairs, {labels_per_pair} labels per pair, labeled={labeled}"


def project_seeded(*, slug: str, pairs: int, labels_per_pair: int = 1, labelers: list | None = None,
                   labeled: bool = False) -> tuple[object, float]:
    """The project `slug` with `pairs` generated pairs (and, when `labeled`, one comparison per pair by the
    labelers in turn), reused when an earlier run seeded it with the same shape. Returns it with the seconds
    spent seeding (0 when reused).

    A marker in the guidelines is written last, in the same transaction as the rows, so an interrupted seed is
    never taken for a finished one."""
    from django.db import connection, transaction

    from labeling.models import Project

    marker = _seed_marker(pairs, labels_per_pair, labeled)
    project = Project.objects.filter(slug=slug).first()
    if project is not None and project.guidelines == marker:
        return project, 0.0
    started = time.perf_counter()
    if project is not None:
        _project_drop(project.pk)
    with transaction.atomic():
        project = Project.objects.create(name=f"Bench {pairs:,} pairs", slug=slug, labels_per_pair=labels_per_pair)
        with connection.cursor() as cursor:
            # The generated rows are consistent by construction: skip the per-row foreign-key triggers, which
            # would otherwise cost three index probes per pair.
            cursor.execute("SET LOCAL session_replication_role = replica")
            _fill(cursor, project.pk, pairs)
            if labeled:
                _label(cursor, project.pk, [user.pk for user in labelers or []])
        Project.objects.filter(pk=project.pk).update(guidelines=marker)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE labeling_prompt")
        cursor.execute("VACUUM ANALYZE labeling_response")
        cursor.execute("VACUUM ANALYZE labeling_pair")
        cursor.execute("VACUUM ANALYZE labeling_comparison")
    project.refresh_from_db()
    return project, time.perf_counter() - started


def _project_drop(project_id: int) -> None:
    from django.db import connection, transaction

    # Set-based, children first: the ORM's cascade would load a million objects.
    with transaction.atomic(), connection.cursor() as cursor:
        for statement in (
            "DELETE FROM labeling_comparison c USING labeling_pair p WHERE c.pair_id = p.id AND p.project_id = %s",
            "DELETE FROM labeling_lease l USING labeling_pair p WHERE l.pair_id = p.id AND p.project_id = %s",
            "DELETE FROM labeling_apitoken WHERE project_id = %s",
            "DELETE FROM labeling_pair WHERE project_id = %s",
            "DELETE FROM labeling_prompt WHERE project_id = %s",
            "DELETE FROM labeling_response WHERE project_id = %s",
            "DELETE FROM labeling_membership WHERE project_id = %s",
            "DELETE FROM labeling_project WHERE id = %s",
        ):
            cursor.execute(statement, [project_id])


def _fill(cursor, project_id: int, pairs: int) -> None:
    """Chat prompts of about 300 characters and responses of about 250, each distinct, made in SQL."""
    cursor.execute(
        """
        INSERT INTO labeling_prompt (project_id, content, content_hash, created_at)
        SELECT %s, jsonb_build_array(
                   jsonb_build_object('role', 'user', 'content', 'Question ' || g || ': ' || repeat(md5(g::text), 4)),
                   jsonb_build_object('role', 'assistant', 'content', 'Could you say more about ' || md5('c' || g)),
                   jsonb_build_object('role', 'user', 'content', 'Sure: ' || repeat(md5('u' || g), 2))),
               md5('p' || g) || md5('q' || g), now()
        FROM generate_series(1, %s) g
        """, [project_id, pairs])
    cursor.execute(
        """
        INSERT INTO labeling_response (project_id, text, model_name, metadata, content_hash, created_at)
        SELECT %s, 'Answer ' || g || ': ' || repeat(md5('r' || g) || ' ', 7), 'bench', '{}'::jsonb,
               md5('r' || g) || md5('s' || g), now()
        FROM generate_series(1, %s) g
        """, [project_id, 2 * pairs])
    # Both inserts above ran alone in this transaction, so their ids are consecutive: pair i takes prompt
    # first + i and responses first + 2i, 2i + 1 (checked, not assumed). Joining on row numbers instead lets the
    # planner, blind on tables it has just filled, rescan the responses for every prompt.
    cursor.execute("SELECT min(id), max(id), count(*) FROM labeling_prompt WHERE project_id = %s", [project_id])
    first_prompt, last_prompt, prompts = cursor.fetchone()
    cursor.execute("SELECT min(id), max(id), count(*) FROM labeling_response WHERE project_id = %s", [project_id])
    first_response, last_response, responses = cursor.fetchone()
    if last_prompt - first_prompt + 1 != prompts or last_response - first_response + 1 != responses:
        raise RuntimeError("generated ids are not consecutive; is something else writing to this database?")
    cursor.execute(
        """
        INSERT INTO labeling_pair (project_id, prompt_id, response_a_id, response_b_id, priority, label_count,
                                   status, source, created_at)
        SELECT %s, %s + i, %s + 2 * i, %s + 2 * i + 1, (i %% 3)::int, 0, 'open', 'bench', now()
        FROM generate_series(0, %s - 1) i
        """, [project_id, first_prompt, first_response, first_response, pairs])


def _label(cursor, project_id: int, labeler_ids: list[int]) -> None:
    """One comparison per pair, by the labelers in turn, with the mix of choices, strengths, rationales and
    flags a real project has; every pair is then complete."""
    if not labeler_ids:
        raise ValueError("labeling needs labelers")
    cursor.execute(
        """
        INSERT INTO labeling_comparison (pair_id, project_id, labeler_id, source, choice, strength, margin, rationale,
                                         flags, swapped, time_ms, created_at)
        SELECT p.id, p.project_id, (%(labelers)s::bigint[])[1 + (p.id %% cardinality(%(labelers)s::bigint[]))], 'label',
               (ARRAY['a', 'b', 'a', 'b', 'tie', 'both_bad'])[1 + (p.id %% 6)], NULL, NULL,
               CASE WHEN p.id %% 4 = 0 THEN 'Clearer and more helpful, ' || md5(p.id::text) ELSE '' END,
               CASE WHEN p.id %% 10 = 0 THEN '["factual_error"]'::jsonb ELSE '[]'::jsonb END,
               p.id %% 2 = 0, 1000 + (p.id %% 20000)::int, now() - make_interval(secs => (p.id %% 86400))
        FROM labeling_pair p WHERE p.project_id = %(project)s
        """, {"project": project_id, "labelers": labeler_ids})
    cursor.execute("UPDATE labeling_pair SET label_count = 1, status = 'complete' WHERE project_id = %s",
                   [project_id])


def project_reset(project) -> int:
    """Undo what a load run did to a seeded project (its comparisons and leases), so every run starts from the
    same state; returns the number of pairs put back in the queue."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE labeling_pair SET label_count = 0, status = 'open'
            WHERE project_id = %(project)s AND (label_count > 0 OR status <> 'open' OR id IN (
                SELECT l.pair_id FROM labeling_lease l JOIN labeling_pair lp ON lp.id = l.pair_id
                WHERE lp.project_id = %(project)s))
            """, {"project": project.pk})
        touched = cursor.rowcount
        cursor.execute("DELETE FROM labeling_comparison c USING labeling_pair p "
                       "WHERE c.pair_id = p.id AND p.project_id = %s", [project.pk])
        cursor.execute("DELETE FROM labeling_lease l USING labeling_pair p "
                       "WHERE l.pair_id = p.id AND p.project_id = %s", [project.pk])
    with connection.cursor() as cursor:
        # The dead index entries a run leaves at the head of the queue would otherwise slow the next run down.
        for table in ("labeling_pair", "labeling_lease", "labeling_comparison"):
            cursor.execute(f"VACUUM ANALYZE {table}")
    return touched


def labelers(count: int) -> list:
    """The benchmark's labelers, created on first use."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    return [users.get_or_create(username=f"{LABELER_PREFIX}{i:03d}")[0] for i in range(count)]


def labelers_with_tokens(*, count: int, projects: list) -> list[tuple[object, str]]:
    """`count` labelers who are members of every project in `projects`, each with a fresh API token (the tokens
    of earlier runs are deleted)."""
    from labeling.models import ApiToken, Membership
    from labeling.services import api_token_create

    users = labelers(count)
    ApiToken.objects.filter(user__in=users).delete()
    for project in projects:
        for user in users:
            Membership.objects.get_or_create(project=project, user=user)
    return [(user, api_token_create(user=user, name="bench")[1]) for user in users]


# --- gunicorn ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def gunicorn(*, workers: int, threads: int, worker_class: str = "gthread", reuse_port: bool = True,
             extra_env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """gunicorn on a free loopback port with the production settings, JSON logs and a listening socket per worker
    (as in docker-compose), its log in a temporary file; stopped, with its workers, on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="preflab-bench-") as tmp:
        metrics_dir = Path(tmp) / "prometheus"
        metrics_dir.mkdir()
        env = dict(os.environ)
        env.update({
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": env.get("DJANGO_SECRET_KEY", "bench-only-secret-key-" + "x" * 40),
            "DJANGO_SECURE_SSL_REDIRECT": "false",
            "PREFLAB_LOG_FORMAT": "json",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        log_path = Path(tmp) / "gunicorn.log"
        command = [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}",
                   "--workers", str(workers), "--worker-class", worker_class, "--no-control-socket",
                   "--timeout", "120"] + (["--reuse-port"] if reuse_port else [])
        if worker_class == "gthread":
            command += ["--threads", str(threads)]
        with open(log_path, "wb") as log:
            server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            _wait_listening(server, port, log_path)
            yield server, port, log_path
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_listening(server: subprocess.Popen, port: int, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"gunicorn exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"gunicorn did not listen within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


# --- measurements ----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[min(999, max(0, round(q * 10) - 1))]


class CpuMeter:
    """CPU seconds used between start() and stop() by this process, the server's process tree, the PostgreSQL
    backends serving `database`, and the whole machine (the rest is other people's work on the same cores).

    Processes come and go meanwhile (a database connection is replaced after CONN_MAX_AGE), so a thread samples
    every process's CPU time twice a second and adds up each one's growth; a process that ends loses at most
    its last half second."""

    def __init__(self, *, server_pid: int | None, database: str, interval: float = 0.5) -> None:
        self.server_pid = server_pid
        self.database = database
        self.interval = interval
        self._first: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _processes(self) -> Iterator[tuple[str, object]]:
        import psutil

        yield "client", psutil.Process()
        if self.server_pid is not None:
            try:
                server = psutil.Process(self.server_pid)
                yield "server", server
                for child in server.children(recursive=True):
                    yield "server", child
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            # A backend's title is "postgres: <cluster>: <user> <database> <client> <state>".
            if cmdline.startswith("postgres: ") and f" {self.database} " in cmdline:
                yield "postgres", proc

    def _sample(self, *, first: bool = False) -> None:
        import psutil

        for kind, proc in self._processes():
            try:
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            key = (kind, proc.pid)
            if first:
                self._first[key] = times.user + times.system
            else:
                # A process first seen after start() began within the interval: all its CPU time counts.
                self._first.setdefault(key, 0.0)
            self._last[key] = times.user + times.system

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._first.clear()
        self._last.clear()
        self._stop.clear()
        self._sample(first=True)
        self._machine_start = self._machine_busy()
        self._wall_start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Cores used on average over the interval, by who used them."""
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._wall_start
        used = {"client": 0.0, "server": 0.0, "postgres": 0.0}
        for (kind, pid), last in self._last.items():
            used[kind] += max(0.0, last - self._first[(kind, pid)])
        cores = {kind: seconds / wall for kind, seconds in used.items()}
        machine = (self._machine_busy() - self._machine_start) / wall
        cores["other"] = max(0.0, machine - sum(cores.values()))
        cores["machine"] = machine
        return cores


def rss_tree(pid: int) -> int:
    """Resident memory in bytes of a process and its children."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total

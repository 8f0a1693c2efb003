"""Benchmark: load time of the manager dashboard's pages and JSON endpoints on a project with 100k comparisons.

Seeds a project on PostgreSQL (set-based SQL: pairs with two labels each from 40 labelers, gold pairs with five,
comparisons spread over a week, an hour of rerank traffic and a few training runs), then requests every
dashboard page and endpoint through the whole Django stack (middleware, session login, templates) with the test
client, N times each, as a project manager. The baseline is a trivial page through the same stack that counts
the project's comparisons with one `SELECT count(*)`. A second table times the selectors behind the pages one by
one, to show where the time goes. The target is 300 ms per page; nothing is asserted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/preflab_bench_dash .venv/bin/python bench/dashboard_pages.py \
        --comparisons 100000 --repeat 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/preflab_bench_dash")
# Debug mode keeps every query in memory and renders slower; the figures are for a production-like process.
os.environ["DJANGO_DEBUG"] = "false"

TARGET_MS = 300.0
SLUG = "bench-dash"
LABELERS = 40
GOLD_LABELS = 5
# Bumped when the generated rows change, so that an older seed is rebuilt instead of reused.
SEED_VERSION = 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", type=int, default=100_000, help="comparisons in the measured project")
    parser.add_argument("--gold-share", type=float, default=0.1, help="share of the comparisons on gold pairs")
    parser.add_argument("--small-projects", type=int, default=4,
                        help="other projects of 1,000 comparisons, for the overview")
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per page")
    parser.add_argument("--reseed", action="store_true", help="rebuild the seeded projects even if they exist")
    return parser.parse_args()


# --- seeding ----------------------------------------------------------------------------------------------


def _marker(comparisons: int, gold_share: float) -> str:
    return f"dashboard bench seed v{SEED_VERSION}: {comparisons} comparisons, gold share {gold_share}"


def _drop(cursor, project_id: int) -> None:
    # Set-based, children first: the ORM's cascade would load every row.
    for statement in (
        "DELETE FROM labeling_comparison c USING labeling_pair p WHERE c.pair_id = p.id AND p.project_id = %s",
        "DELETE FROM labeling_lease l USING labeling_pair p WHERE l.pair_id = p.id AND p.project_id = %s",
        "DELETE FROM labeling_pair WHERE project_id = %s",
        "DELETE FROM labeling_prompt WHERE project_id = %s",
        "DELETE FROM labeling_response WHERE project_id = %s",
    ):
        cursor.execute(statement, [project_id])


def _fill(cursor, project_id: int, *, regular: int, gold: int, labeler_ids: list[int]) -> None:
    """`regular` pairs with two labels each and `gold` gold pairs with GOLD_LABELS labels each. A labeler agrees
    with a pair's hidden answer three times in four; labels are spread over the last seven days."""
    pairs = regular + gold
    cursor.execute(
        """
        INSERT INTO labeling_prompt (project_id, content, content_hash, created_at)
        SELECT %s, jsonb_build_array(jsonb_build_object('role', 'user',
                   'content', 'Question ' || g || ': ' || repeat(md5(g::text), 3))),
               md5('p' || g) || md5('q' || g), now()
        FROM generate_series(1, %s) g
        """, [project_id, pairs])
    cursor.execute(
        """
        INSERT INTO labeling_response (project_id, text, model_name, metadata, content_hash, created_at)
        SELECT %s, 'Answer ' || g || ': ' || repeat(md5('r' || g) || ' ', 5), 'bench', '{}'::jsonb,
               md5('r' || g) || md5('s' || g), now()
        FROM generate_series(1, %s) g
        """, [project_id, 2 * pairs])
    cursor.execute(
        """
        INSERT INTO labeling_pair (project_id, prompt_id, response_a_id, response_b_id, priority, gold_choice,
                                   label_count, status, source, created_at)
        SELECT %(project)s, p.id, r.first_id + 2 * (p.rn - 1), r.first_id + 2 * (p.rn - 1) + 1, 0,
               CASE WHEN p.rn > %(regular)s THEN 'a' END,
               CASE WHEN p.rn > %(regular)s THEN %(gold_labels)s ELSE 2 END,
               CASE WHEN p.rn > %(regular)s THEN 'open' ELSE 'complete' END, 'bench', now()
        FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM labeling_prompt
              WHERE project_id = %(project)s) p,
             (SELECT min(id) AS first_id FROM labeling_response WHERE project_id = %(project)s) r
        """, {"project": project_id, "regular": regular, "gold_labels": GOLD_LABELS})
    n = len(labeler_ids)
    cursor.execute(
        """
        WITH pairs AS (
            SELECT id, row_number() OVER (ORDER BY id) AS rn, gold_choice IS NOT NULL AS gold
            FROM labeling_pair WHERE project_id = %(project)s
        ), slots AS (
            -- Regular pairs: two different labelers; gold pairs: GOLD_LABELS labelers 7 apart.
            SELECT p.id, j, CASE WHEN p.gold THEN (p.rn + 7 * j) %% %(n)s
                                 ELSE (p.rn + j * (1 + (p.rn / %(n)s) %% (%(n)s - 1))) %% %(n)s END AS who
            FROM pairs p, generate_series(0, %(gold_labels)s - 1) j
            WHERE j < CASE WHEN p.gold THEN %(gold_labels)s ELSE 2 END
        )
        INSERT INTO labeling_comparison (pair_id, project_id, labeler_id, source, choice, strength, margin, rationale,
                                         flags, swapped, time_ms, created_at)
        SELECT s.id, %(project)s, (%(labelers)s::bigint[])[1 + s.who], 'label',
               CASE WHEN (s.id * 7919 + s.who * 104729) %% 4 <> 0
                    THEN (ARRAY['a', 'b', 'a', 'b', 'tie', 'both_bad'])[1 + s.id %% 6]
                    ELSE (ARRAY['a', 'b', 'tie', 'both_bad'])[1 + (s.id + s.who) %% 4] END,
               NULL, NULL, CASE WHEN s.id %% 4 = 0 THEN 'Clearer, ' || md5(s.id::text) ELSE '' END,
               '[]'::jsonb, (s.id + s.who) %% 2 = 0, 800 + ((s.id * 13 + s.who * 101) %% 30000)::int,
               now() - make_interval(secs => ((s.id * 37 + s.who * 977) %% (7 * 86400)))
        FROM slots s
        """, {"project": project_id, "n": n, "gold_labels": GOLD_LABELS, "labelers": labeler_ids})


def _rerank_traffic(project) -> None:
    """An hour of rerank traffic: 20-40 requests a minute, a third of them cache hits, a few errors."""
    from datetime import timedelta

    from django.utils import timezone

    from rewards.models import RerankMinute

    now = timezone.now().replace(second=0, microsecond=0)
    rows = []
    for i in range(60):
        hits, misses, errors = 8 + i % 7, 16 + i % 11, i % 5 == 0
        rows.append(RerankMinute(project=project, minute=now - timedelta(minutes=i),
                                 requests=hits + misses + errors, cache_hits=hits, errors=errors,
                                 latency_ms_sum=hits * 6.0 + misses * 450.0, latency_le_10ms=hits,
                                 latency_le_500ms=misses - 2, latency_le_2000ms=2))
    RerankMinute.objects.filter(project=project).delete()
    RerankMinute.objects.bulk_create(rows)


def _training_runs(project, user) -> None:
    from django.utils import timezone

    from rewards.models import TrainingRun

    TrainingRun.objects.filter(project=project).delete()
    now = timezone.now()
    history = [{"step": step, "loss": 0.7 - step / 1000, "learning_rate": 5e-5} for step in range(0, 500, 10)]
    TrainingRun.objects.bulk_create([
        TrainingRun(project=project, kind="reward", status="succeeded", created_by=user, started_at=now,
                    finished_at=now, step=500, total_steps=500, metrics_history=history,
                    eval_metrics={"eval_accuracy": 0.61})
        for _ in range(10)
    ])


def seed(*, comparisons: int, gold_share: float, small_projects: int, reseed: bool):
    """The measured project (reused when an earlier run seeded the same shape), the small ones and the manager.
    Returns (project, manager, seconds spent seeding)."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from labeling.models import Membership, Project

    started = time.perf_counter()
    users = get_user_model().objects
    manager, _ = users.get_or_create(username="bench-dash-manager")
    labelers = [users.get_or_create(username=f"bench-dash-labeler-{i:02d}")[0] for i in range(LABELERS)]
    labeler_ids = [user.pk for user in labelers]

    def project_with(slug: str, total: int, gold_fraction: float) -> Project:
        marker = _marker(total, gold_fraction)
        project, _ = Project.objects.get_or_create(slug=slug, defaults={"name": slug, "labels_per_pair": 2})
        if project.guidelines == marker and not reseed:
            return project
        gold = int(total * gold_fraction) // GOLD_LABELS
        regular = (total - gold * GOLD_LABELS) // 2
        with transaction.atomic(), connection.cursor() as cursor:
            _drop(cursor, project.pk)
            # The generated rows are consistent by construction: skip the per-row foreign-key triggers.
            cursor.execute("SET LOCAL session_replication_role = replica")
            _fill(cursor, project.pk, regular=regular, gold=gold, labeler_ids=labeler_ids)
            Project.objects.filter(pk=project.pk).update(guidelines=marker)
        for user in labelers:
            Membership.objects.get_or_create(project=project, user=user)
        Membership.objects.update_or_create(project=project, user=manager, defaults={"role": "manager"})
        return project

    project = project_with(SLUG, comparisons, gold_share)
    for i in range(small_projects):
        project_with(f"{SLUG}-small-{i}", 1000, gold_share)
    _rerank_traffic(project)
    _training_runs(project, manager)
    with connection.cursor() as cursor:
        for table in ("labeling_prompt", "labeling_response", "labeling_pair", "labeling_comparison",
                      "rewards_rerankminute"):
            cursor.execute(f"VACUUM ANALYZE {table}")
    return project, manager, time.perf_counter() - started


# --- the baseline page --------------------------------------------------------------------------------------


def baseline_view(request):
    """A trivial page through the same stack: login required, one count of the project's comparisons."""
    from django.contrib.auth.views import redirect_to_login
    from django.http import HttpResponse

    from labeling.models import Comparison

    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    count = Comparison.objects.filter(project__slug=request.GET["project"]).count()
    return HttpResponse(f"<!doctype html><title>count</title><p>{count} comparisons</p>")


def _urlconf():
    from django.urls import include, path

    return [path("bench/baseline/", baseline_view), path("", include("config.urls"))]


# --- measuring ----------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def time_calls(call: Callable[[], object], repeat: int) -> list[float]:
    call()  # warm: connections, template and URL caches
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    args = parse_args()
    import _common

    _common.django_setup()

    from django.conf import settings
    from django.test import Client

    project, manager, seed_s = seed(comparisons=args.comparisons, gold_share=args.gold_share,
                                    small_projects=args.small_projects, reseed=args.reseed)
    from labeling.models import Comparison

    total = Comparison.objects.filter(project=project).count()
    print(f"project {project.slug}: {total:,} comparisons, {LABELERS} labelers; seeding {seed_s:.1f} s "
          f"(the labels are reused when an earlier run seeded the same shape)")
    # The figures are only as quiet as the machine: the load average says how many others were running.
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.1f}")

    module = sys.modules[__name__]
    module.urlpatterns = _urlconf()
    settings.ROOT_URLCONF = __name__
    client = Client()
    client.force_login(manager)
    base = f"/dashboard/{project.slug}/"
    pages = [
        ("baseline: count(*) page", f"/bench/baseline/?project={project.slug}"),
        ("overview", "/dashboard/"),
        ("project page (with labelers table)", base),
        ("charts JSON", f"{base}charts.json"),
        ("stats JSON (API)", f"/api/v1/projects/{project.slug}/stats/"),
        ("rerank JSON", f"{base}rerank.json"),
        ("training page", f"/dashboard/{project.slug}/training/"),
    ]

    def get(url: str) -> Callable[[], object]:
        def call():
            response = client.get(url)
            if response.status_code != 200:
                sys.exit(f"{url} answered {response.status_code}")
            return response
        return call

    rows = [(name, time_calls(get(url), args.repeat)) for name, url in pages]
    baseline = statistics.median(rows[0][1])
    print(f"\n{args.repeat} requests per page after one warm-up, test client in-process; target {TARGET_MS:.0f} ms")
    print(f"{'page':<36} {'p50 ms':>9} {'p95 ms':>9} {'x base':>8}  target")
    for name, timings in rows:
        p50, p95 = statistics.median(timings), _percentile(timings, 95)
        verdict = "ok" if p95 < TARGET_MS else "SLOW"
        print(f"{name:<36} {p50:>9.1f} {p95:>9.1f} {p50 / baseline:>8.1f}  {verdict}")

    from labeling import selectors, stats
    from rewards.selectors import rerank_usage

    parts = [
        ("pair_counts", lambda: stats.pair_counts(project=project)),
        ("comparison_counts", lambda: stats.comparison_counts(project=project)),
        ("choice_distribution", lambda: stats.choice_distribution(project=project)),
        ("labeler_activity", lambda: stats.labeler_activity(project=project)),
        ("comparison_throughput_hourly", lambda: stats.comparison_throughput_hourly(project=project)),
        ("labeler_agreement", lambda: stats.labeler_agreement(project=project)),
        ("gold_accuracy", lambda: stats.gold_accuracy(project=project)),
        ("labeler_table (from project_stats)",
         lambda: selectors.labeler_table(stats=stats.project_stats(project=project))),
        ("project_recent_activity", lambda: selectors.project_recent_activity(projects=[project])),
        ("rerank_usage", lambda: rerank_usage(project=project)),
    ]
    print(f"\nselectors alone ({args.repeat} calls each)")
    print(f"{'selector':<36} {'p50 ms':>9} {'p95 ms':>9}")
    for name, call in parts:
        timings = time_calls(call, args.repeat)
        print(f"{name:<36} {statistics.median(timings):>9.1f} {_percentile(timings, 95):>9.1f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

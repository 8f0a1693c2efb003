"""Benchmark: next-pair + submit latency of the labeling queue at a small and a large project, same run.

Fills two projects on PostgreSQL with generated pairs (set-based SQL, seconds for a million rows), then times
`pair_next_for_labeler` followed by `comparison_submit` for a number of labelers in turn. The small project is
the baseline: the ratio large/small shows whether the queue's cost grows with the size of the project.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/preflab_bench .venv/bin/python bench/queue_next.py \
        --small 10000 --large 1000000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--labelers", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=300, help="next+submit cycles timed per project")
    parser.add_argument("--overlap", type=int, default=3, help="labels_per_pair of both projects")
    return parser.parse_args()


def fill(project, pairs: int) -> None:
    """Insert `pairs` pairs with distinct prompts and responses straight in SQL (the bench measures the queue,
    not the importer)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO labeling_prompt (project_id, content, content_hash, created_at)
            SELECT %s, to_jsonb('bench prompt ' || g), md5('p' || g) || md5('q' || g), now()
            FROM generate_series(1, %s) g
            """, [project.pk, pairs])
        cursor.execute(
            """
            INSERT INTO labeling_response (project_id, text, model_name, metadata, content_hash, created_at)
            SELECT %s, 'bench response ' || g, '', '{}'::jsonb, md5('r' || g) || md5('s' || g), now()
            FROM generate_series(1, %s) g
            """, [project.pk, 2 * pairs])
        cursor.execute(
            """
            INSERT INTO labeling_pair (project_id, prompt_id, response_a_id, response_b_id, priority, label_count,
                                       status, source, created_at)
            SELECT %(project)s, p.id, r.first_id + 2 * (p.rn - 1), r.first_id + 2 * (p.rn - 1) + 1,
                   (p.rn %% 3)::int, 0, 'open', 'bench', now()
            FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM labeling_prompt
                  WHERE project_id = %(project)s) p,
                 (SELECT min(id) AS first_id FROM labeling_response WHERE project_id = %(project)s) r
            """, {"project": project.pk})
        cursor.execute("ANALYZE labeling_pair; ANALYZE labeling_comparison; ANALYZE labeling_lease;")


def time_cycles(project, labelers, cycles: int) -> list[float]:
    from labeling import services

    timings = []
    for i in range(cycles):
        labeler = labelers[i % len(labelers)]
        started = time.perf_counter()
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        services.comparison_submit(labeler=labeler, pair_id=lease.pair_id, choice="left")
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    args = parse_args()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection

    from labeling.models import Membership, Project

    if connection.vendor != "postgresql":
        sys.exit("bench/queue_next.py needs PostgreSQL: set DATABASE_URL.")
    import _common
    from django.core.management import call_command

    _common.database_create_missing(connection)
    call_command("migrate", verbosity=0)
    stamp = int(time.time())
    User = get_user_model()
    labelers = [User.objects.create(username=f"bench-{stamp}-{i}") for i in range(args.labelers)]
    rows = []
    for size in (args.small, args.large):
        project = Project.objects.create(name=f"bench {size}", slug=f"bench-{stamp}-{size}",
                                         labels_per_pair=args.overlap)
        Membership.objects.bulk_create([Membership(project=project, user=u) for u in labelers])
        started = time.perf_counter()
        fill(project, size)
        fill_s = time.perf_counter() - started
        time_cycles(project, labelers, 20)  # warm caches and connections
        timings = time_cycles(project, labelers, args.cycles)
        rows.append((size, fill_s, statistics.median(timings), statistics.quantiles(timings, n=100)[98],
                     1000 / statistics.mean(timings)))
        project.delete()
    User.objects.filter(pk__in=[u.pk for u in labelers]).delete()

    print(f"{'pairs':>10} {'fill s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cycles/s':>9}")
    for size, fill_s, p50, p99, rate in rows:
        print(f"{size:>10} {fill_s:>8.1f} {p50:>8.2f} {p99:>8.2f} {rate:>9.1f}")
    print(f"next+submit p50 ratio {args.large} / {args.small} pairs: {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()

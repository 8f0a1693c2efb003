"""Benchmark: import N synthetic HH lines through preferences_import, next to a parse-only and a raw-insert baseline.

Run from the repository root, e.g.
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/preflab .venv/bin/python bench/import_preferences.py --lines 100000
The projects it creates are deleted at the end unless --keep is given.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from labeling.imports import BATCH_LINES, BadLine, parse_hh, preferences_import  # noqa: E402
from labeling.models import Comparison, Pair, Project, Prompt, Response, content_hash  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog model reward human assistant answer question why how what "
         "please explain safe harmful polite helpful refuse sorry cannot help with that sure here is a short list "
         "of ideas recipe weather travel code python error bug fix test data label pair choice").split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def generate(path: Path, *, lines: int, bad_every: int, seed: int = 7) -> int:
    """Write `lines` HH-style lines (one or two turns of dialogue); every `bad_every`-th line is broken in one
    of the ways a real file is. Returns how many bad lines were written."""
    rng = random.Random(seed)
    bad = 0
    with path.open("w", encoding="utf-8") as out:
        for index in range(1, lines + 1):
            if bad_every and index % bad_every == 0:
                bad += 1
                out.write(rng.choice(['{"chosen": "cut off', '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"}',
                                      '{"chosen": 1, "rejected": 2}']) + "\n")
                continue
            dialogue = f"\n\nHuman: {_sentence(rng, 5, 30)} (#{index})"
            if rng.random() < 0.3:
                dialogue += f"\n\nAssistant: {_sentence(rng, 5, 30)}\n\nHuman: {_sentence(rng, 3, 15)}"
            chosen, rejected = _sentence(rng, 5, 60), _sentence(rng, 5, 60)
            if chosen == rejected:
                rejected += " Sorry."
            out.write(json.dumps({"chosen": f"{dialogue}\n\nAssistant: {chosen}",
                                  "rejected": f"{dialogue}\n\nAssistant: {rejected}"}) + "\n")
    return bad


def _fresh_project(label: str) -> Project:
    slug = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    return Project.objects.create(name=slug, slug=slug)


def baseline_parse(path: Path) -> int:
    """Read and json-parse every line: the floor of any importer written in Python."""
    count = 0
    with path.open("rb") as stream:
        for raw in stream:
            try:
                json.loads(raw)
            except ValueError:
                continue
            count += 1
    return count


def baseline_raw_insert(path: Path, project: Project) -> int:
    """Parse each line and insert its rows with plain bulk_create in batches: no lookups, no deduplication,
    no per-line error isolation. It works only because the synthetic data has no duplicates."""
    created = 0
    batch: list = []

    def flush() -> None:
        nonlocal created
        with transaction.atomic():
            prompts = Prompt.objects.bulk_create(
                [Prompt(project=project, content=row.prompt, content_hash=content_hash(row.prompt)) for row in batch])
            responses = Response.objects.bulk_create(
                [Response(project=project, text=r.text, content_hash=content_hash(r.text))
                 for row in batch for r in row.responses])
            pairs = Pair.objects.bulk_create(
                [Pair(project=project, prompt=prompt, response_a=responses[2 * i], response_b=responses[2 * i + 1],
                      label_count=1, status=Pair.Status.COMPLETE, source="import")
                 for i, prompt in enumerate(prompts)])
            Comparison.objects.bulk_create(
                [Comparison(pair=pair, project=project, source=Comparison.Source.IMPORT, choice="a") for pair in pairs])
        created += len(pairs)
        batch.clear()

    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                batch.append(parse_hh(json.loads(raw), number))
            except (ValueError, BadLine):
                continue
            if len(batch) >= BATCH_LINES:
                flush()
    if batch:
        flush()
    return created


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--bad-every", type=int, default=5000, help="Every n-th line is broken (0: none).")
    parser.add_argument("--keep", action="store_true", help="Keep the projects the run creates.")
    args = parser.parse_args()

    if connection.vendor == "postgresql":
        import _common

        _common.database_create_missing(connection)
    call_command("migrate", verbosity=0)

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench-hh.jsonl"
        bad = generate(path, lines=args.lines, bad_every=args.bad_every)
        size_mb = path.stat().st_size / 1e6
        print(f"{args.lines} lines ({bad} bad), {size_mb:.1f} MB, database: {connection.vendor}", flush=True)

        projects = [_fresh_project("raw"), _fresh_project("service")]
        parsed, parse_s = _timed(baseline_parse, path)
        raw_pairs, raw_s = _timed(baseline_raw_insert, path, projects[0])
        with path.open("rb") as stream:
            report, service_s = _timed(lambda: preferences_import(project=projects[1], stream=stream, format="hh"))
        with path.open("rb") as stream:
            again, again_s = _timed(lambda: preferences_import(project=projects[1], stream=stream, format="hh"))

        print(f"\n{'step':<44}{'rows':>9}{'seconds':>10}{'lines/s':>11}{'vs import':>11}")
        for name, rows, seconds in (
            ("baseline: json.loads every line", parsed, parse_s),
            ("baseline: parse + raw bulk_create", raw_pairs, raw_s),
            ("preferences_import (fresh project)", report.pairs_created, service_s),
            ("preferences_import again (all duplicates)", again.duplicates_skipped, again_s),
        ):
            print(f"{name:<44}{rows:>9}{seconds:>10.2f}{args.lines / seconds:>11.0f}{seconds / service_s:>10.2f}x")
        print(f"\nimport report: {report.pairs_created} pairs, {report.comparisons_created} comparisons, "
              f"{report.bad_line_count} bad lines, {report.duplicates_skipped} duplicates")
        if not args.keep:
            for project in projects:
                Comparison.objects.filter(pair__project=project).delete()
                Pair.objects.filter(project=project).delete()
                project.delete()


if __name__ == "__main__":
    main()

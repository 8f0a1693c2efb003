"""Benchmark: exporting 1M comparisons as JSONL, through the API (gunicorn) and `manage.py export_preferences`,
against a plain psycopg server-side cursor writing the same lines, with rows/s and peak memory at 100k and 1M.

Seeds (or reuses) two projects whose pairs are all labeled once (by 32 labelers in turn), then exports each in the
`comparisons` format three ways, one after the other: the raw baseline (a named cursor over the same join, the
same `json.dumps` per row), the management command writing a file, and a streamed GET of
/api/v1/projects/<slug>/export/?format=comparisons from gunicorn written to a file by the client. Each writer runs
in its own process, whose resident memory is sampled every 50 ms; memory is flat when the peak at 1M stays within
25% of the peak at 100k. The three files must be byte-identical.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/preflab_load_bench .venv/bin/python bench/export_comparisons.py
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import _common

FLAT_RATIO = 1.25
# Columns of the `comparisons` export, in its order (labeling/exports.py).
BASELINE_SQL = """
    SELECT c.id, c.pair_id, pr.content, ra.text, rb.text, c.choice, c.strength, c.margin, c.rationale, c.flags,
           c.swapped, c.time_ms, u.username, c.source, c.created_at
    FROM labeling_comparison c
    JOIN labeling_pair p ON p.id = c.pair_id
    JOIN labeling_prompt pr ON pr.id = p.prompt_id
    JOIN labeling_response ra ON ra.id = p.response_a_id
    JOIN labeling_response rb ON rb.id = p.response_b_id
    LEFT JOIN auth_user u ON u.id = c.labeler_id
    WHERE p.project_id = %s
    ORDER BY c.id
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="comparisons of the large project")
    parser.add_argument("--small", type=int, default=100_000, help="comparisons of the small project")
    parser.add_argument("--labelers", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--baseline-child", nargs=2, metavar=("PROJECT_ID", "OUTPUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the baseline, run as a child process ----------------------------------------------------------------------


def baseline_export(project_id: int, output: str) -> None:
    """The same lines as the `comparisons` export from a psycopg named cursor, without Django."""
    import psycopg

    keys = ("id", "pair", "prompt", "response_a", "response_b", "choice", "strength", "margin", "rationale", "flags",
            "swapped", "time_ms", "labeler", "source", "created_at")
    # libpq takes the postgres:// URL as it is.
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn, open(output, "w", encoding="utf-8") as out:
        conn.execute("SET TIME ZONE 'UTC'")
        with conn.cursor(name="bench_export") as cursor:
            cursor.itersize = 2000
            cursor.execute(BASELINE_SQL, [project_id])
            for row in cursor:
                value = dict(zip(keys, row, strict=True))
                value["created_at"] = value["created_at"].isoformat()
                out.write(json.dumps(value, ensure_ascii=False) + "\n")


# --- measuring one export ---------------------------------------------------------------------------------------


class PeakRss:
    """Samples the resident memory of a process tree every 50 ms in a thread; `peak` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _common.rss_tree(self.pid))
            self._stop.wait(0.05)


@dataclass
class Result:
    path: str
    rows: int
    lines: int
    seconds: float
    bytes: int
    peak_rss: int
    digest: str

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    lines = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            lines += block.count(b"\n")
    return lines, digest.hexdigest()


def _run_child(command: list[str], *, env: dict[str, str], output: Path, rows: int, path: str) -> Result:
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=_common.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRss(child.pid) as rss:
        _, stderr = child.communicate()
    seconds = time.perf_counter() - started
    if child.returncode:
        sys.exit(f"{path} export failed ({child.returncode}):\n{stderr.decode()[-3000:]}")
    lines, digest = _file_digest(output)
    return Result(path, rows, lines, seconds, output.stat().st_size, rss.peak, digest)


def export_baseline(project, rows: int, output: Path) -> Result:
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline-child", str(project.pk), str(output)]
    return _run_child(command, env=dict(os.environ), output=output, rows=rows, path="psycopg baseline")


def export_command(project, rows: int, output: Path) -> Result:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="config.settings.production",
               DJANGO_SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key-" + "x" * 40))
    command = [sys.executable, "manage.py", "export_preferences", "--project", project.slug, "--format",
               "comparisons", "--output", str(output)]
    return _run_child(command, env=env, output=output, rows=rows, path="export_preferences")


def export_api(project, rows: int, output: Path, *, port: int, token: str, server_pid: int) -> Result:
    """A streamed GET from gunicorn, written to a file as it arrives; the peak is the server's whole tree."""
    started = time.perf_counter()
    with PeakRss(server_pid) as rss:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("GET", f"/api/v1/projects/{project.slug}/export/?format=comparisons",
                     headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        if response.status != 200:
            sys.exit(f"export API answered {response.status}: {response.read()[:500]!r}")
        with open(output, "wb") as out:
            while block := response.read(1 << 16):
                out.write(block)
        conn.close()
    seconds = time.perf_counter() - started
    lines, digest = _file_digest(output)
    return Result("API (gunicorn)", rows, lines, seconds, output.stat().st_size, rss.peak, digest)


# --- the run ------------------------------------------------------------------------------------------------


def manager_token(projects: list) -> str:
    from django.contrib.auth import get_user_model

    from labeling.models import ApiToken, Membership
    from labeling.services import api_token_create

    user, _ = get_user_model().objects.get_or_create(username="bench-manager")
    ApiToken.objects.filter(user=user).delete()
    for project in projects:
        Membership.objects.update_or_create(project=project, user=user, defaults={"role": Membership.Role.MANAGER})
    return api_token_create(user=user, name="bench")[1]


def report(results: list[Result], args: argparse.Namespace) -> None:
    mb = 1024 * 1024
    print()
    print(f"format comparisons; gunicorn gthread {args.workers} workers x {args.threads} threads; each export "
          f"written to a file; peak RSS sampled every 50 ms (API: gunicorn master and workers together)")
    print(f"{'rows':>10} {'path':<20} {'seconds':>8} {'rows/s':>9} {'MB/s':>7} {'vs base':>8} {'peak RSS MB':>12}")
    base = {r.rows: r for r in results if r.path == "psycopg baseline"}
    for r in results:
        print(f"{r.rows:>10,} {r.path:<20} {r.seconds:>8.1f} {r.rate:>9,.0f} {r.bytes / mb / r.seconds:>7.1f} "
              f"{r.rate / base[r.rows].rate:>7.2f}x {r.peak_rss / mb:>12.1f}")
    print()
    print("check                                            figure     verdict")
    for path in dict.fromkeys(r.path for r in results):
        small = next(r for r in results if r.path == path and r.rows == args.small)
        large = next(r for r in results if r.path == path and r.rows == args.rows)
        ratio = large.peak_rss / small.peak_rss
        print(f"peak RSS {path:<20} {args.rows:,} / {args.small:,}{'':<{9 - len(f'{args.rows:,}{args.small:,}') + 9}}"
              f"{ratio:>6.2f}x    {'PASS' if ratio <= FLAT_RATIO else 'MISS'} (flat: <= {FLAT_RATIO}x)")
    for rows in (args.small, args.rows):
        same = {r.digest for r in results if r.rows == rows}
        counts = {r.lines for r in results if r.rows == rows}
        ok = len(same) == 1 and counts == {rows}
        print(f"the three files are identical, {rows:,} lines{'':<{17 - len(f'{rows:,}')}}"
              f"{'yes' if ok else 'no':>6}     {'PASS' if ok else 'MISS'}")


def main() -> None:
    args = parse_args()
    if args.baseline_child:
        baseline_export(int(args.baseline_child[0]), args.baseline_child[1])
        return
    _common.django_setup()
    labelers = _common.labelers(args.labelers)
    projects = []
    for size in (args.small, args.rows):
        project, seeded_s = _common.project_seeded(slug=f"bench-export-{size}", pairs=size, labelers=labelers,
                                                   labeled=True)
        if seeded_s:
            print(f"seeded {size:,} labeled pairs in {seeded_s:.1f} s")
        projects.append((project, size))
    token = manager_token([project for project, _ in projects])

    results = []
    with tempfile.TemporaryDirectory(prefix="preflab-export-") as tmp, \
            _common.gunicorn(workers=args.workers, threads=args.threads) as (server, port, _log):
        for project, size in projects:
            for run in (export_baseline, export_command):
                output = Path(tmp) / f"{run.__name__}-{size}.jsonl"
                results.append(run(project, size, output))
                output.unlink()
            output = Path(tmp) / f"api-{size}.jsonl"
            results.append(export_api(project, size, output, port=port, token=token, server_pid=server.pid))
            output.unlink()
    report(results, args)


if __name__ == "__main__":
    main()

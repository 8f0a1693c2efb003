"""Benchmark: 32 simulated labelers doing next + submit against gunicorn on PostgreSQL, at 10k and 1M pairs.

Seeds (or reuses) two projects of generated pairs, gives 32 labelers API tokens, starts gunicorn on loopback with
the production settings, and drives it from an asyncio client in a closed loop: each labeler asks for its next
pair (GET /api/v1/projects/<slug>/next/), answers it (POST /api/v1/comparisons/) and asks again, for --seconds on
the large project and --small-seconds on the small one (which must not run out of pairs); then one labeler alone
does the same for --solo-seconds, which gives the latency without queueing. The small project is the baseline of
the next-pair latency: the ratio 1M/10k shows whether the queue's cost grows with the project. Last, as the plain
baseline of the same run, the same clients read the project twice per cycle (the cheapest authenticated requests
of the API) for --baseline-seconds: the ceiling of this stack on these cores. Then, for --one-request-seconds, the
labelers post each answer with `next: true`, whose response carries their next pair: one request per label, as the
labeling page works. Then the labelers run paced (next + submit), together at each of --paced-rates cycles/s, each
cycle timed from when it was due: the latency below saturation, which the closed loop cannot show. Last, --rounds
rounds run next + submit, one request per label and the baseline in turn, --round-seconds each: their ratios come
from the same minutes, so the drift of a shared machine between the phases above does not skew them. The client runs
on the same cores as the server and the database; its CPU share is printed with the results, as is the CPU that
other processes on the machine took meanwhile.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/preflab_load_bench .venv/bin/python bench/load_labeling.py

Targets: at least 300 cycles/s, cycle p99 under 100 ms, zero errors, next-pair p50 at 1M within 1.5x of 10k.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import _common

TARGET_RATE = 300.0
TARGET_P99_MS = 100.0
TARGET_RATIO = 1.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs of the large project")
    parser.add_argument("--small", type=int, default=10_000, help="pairs of the baseline project")
    parser.add_argument("--labelers", type=int, default=32, help="simulated labelers (= concurrent requests)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds of the large project")
    parser.add_argument("--small-seconds", type=float, default=20.0,
                        help="measured seconds of the small project: at 300 cycles/s, with the warm-up and the "
                             "labeler alone, 20 s use about 8,500 of its 10,000 pairs at labels_per_pair 1")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--solo-seconds", type=float, default=10.0,
                        help="measured seconds of one labeler alone, after the load, per project")
    parser.add_argument("--overlap", type=int, default=1, help="labels_per_pair of both projects")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (gthread)")
    parser.add_argument("--worker-class", default="gthread", choices=("gthread", "sync"))
    parser.add_argument("--shared-socket", action="store_true",
                        help="one listening socket for all workers (gunicorn without --reuse-port)")
    parser.add_argument("--only", choices=("small", "large"), help="measure one project only")
    parser.add_argument("--paced-rates", default="50,100,150",
                        help="after the closed loop, the same labelers paced to these total cycles/s on the large "
                             "project (latency below saturation); empty skips it")
    parser.add_argument("--paced-seconds", type=float, default=20.0, help="measured seconds per paced rate")
    parser.add_argument("--baseline-seconds", type=float, default=20.0,
                        help="measured seconds of the baseline (two project reads per cycle); 0 skips it")
    parser.add_argument("--one-request-seconds", type=float, default=30.0,
                        help="measured seconds of the same labelers on the large project answering with "
                             "`next: true` (the submit returns the next pair: one request per label); 0 skips it")
    parser.add_argument("--rounds", type=int, default=3,
                        help="last, this many rounds on the large project, each running next + submit, one request "
                             "per label and the baseline in turn (the order reversed every other round) for "
                             "--round-seconds each: ratios taken minutes apart drift with the machine, ratios "
                             "within a round do not; 0 skips them")
    parser.add_argument("--round-seconds", type=float, default=10.0, help="measured seconds per cycle and round")
    return parser.parse_args()


# --- a small HTTP/1.1 client -------------------------------------------------------------------------------
# The load generator shares the two cores with the server and PostgreSQL, so it is kept lean: one keep-alive
# connection per labeler over asyncio streams (a general-purpose client costs several times the CPU per request).


class HttpError(Exception):
    pass


class Connection:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = (f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                        "Accept: application/json\r\n")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: int | None = None  # the pair in hand, in the one-request cycle

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n{self.headers}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        payload = (head + "\r\n").encode() + (body or b"")
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(payload)
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server may close an idle keep-alive connection just as a request goes out: retry once.
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            body = b""
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readline()
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- the load ----------------------------------------------------------------------------------------------


@dataclass
class Results:
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    empty: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def ask_next(conn: Connection, slug: str, results: Results) -> int | None:
    """GET .../next/: the pair leased, or None (an empty queue, counted, after a pause; an error, recorded)."""
    status, body = await conn.request("GET", f"/api/v1/projects/{slug}/next/")
    if status == 204:
        results.empty += 1
        await asyncio.sleep(0.1)
        return None
    if status != 200:
        results.error(f"next {status}")
        return None
    return json.loads(body)["pair"]


def answer_for(pair: int, rng: random.Random, **extra) -> bytes:
    return json.dumps({"pair": pair, "choice": rng.choice(("left", "right", "left", "tie")),
                       "time_ms": rng.randint(2000, 30000), **extra}).encode()


async def labeling_cycle(conn: Connection, slug: str, rng: random.Random,
                         results: Results) -> tuple[float, float] | None:
    """Next pair, then its answer: the times of the first response and of the second, or None when the cycle
    does not count (an empty queue, an error)."""
    pair = await ask_next(conn, slug, results)
    got_next = time.perf_counter()
    if pair is None:
        return None
    status, body = await conn.request("POST", "/api/v1/comparisons/", answer_for(pair, rng))
    if status not in (200, 201):
        results.error(f"submit {status}: {body[:120]!r}")
        return None
    return got_next, time.perf_counter()


async def one_request_cycle(conn: Connection, slug: str, rng: random.Random,
                            results: Results) -> tuple[float, float] | None:
    """The answer to the pair in hand with `next: true`, whose response carries the next pair: one request per
    label, as the labeling page works. A labeler's first cycle asks for its first pair with GET .../next/."""
    if conn.pending is None:
        conn.pending = await ask_next(conn, slug, results)
        if conn.pending is None:
            return None
    answer = answer_for(conn.pending, rng, next=True)
    conn.pending = None
    status, body = await conn.request("POST", "/api/v1/comparisons/", answer)
    done = time.perf_counter()
    if status not in (200, 201):
        results.error(f"submit {status}: {body[:120]!r}")
        return None
    following = json.loads(body)["next"]
    if following is None:
        results.empty += 1
        return None
    conn.pending = following["pair"]
    return done, done


async def baseline_cycle(conn: Connection, slug: str, rng: random.Random,
                         results: Results) -> tuple[float, float] | None:
    """The plain baseline: two reads of the project (GET /api/v1/projects/<slug>/: the token, one statement, a
    serializer), the cheapest authenticated round trips of the API, over the same client, connections and stack.
    What a labeling cycle costs beyond them is the queue's own work."""
    first, _ = await conn.request("GET", f"/api/v1/projects/{slug}/")
    got_first = time.perf_counter()
    second, _ = await conn.request("GET", f"/api/v1/projects/{slug}/")
    if first != 200 or second != 200:
        results.error(f"project read {first}/{second}")
        return None
    return got_first, time.perf_counter()


async def client_loop(*, cycle, port: int, token: str, slug: str, stop_at: float, measure_from: float,
                      results: Results, rng: random.Random, interval: float | None = None) -> None:
    """One simulated user on one keep-alive connection, running `cycle` until `stop_at`: in a closed loop, or
    with `interval`, one cycle every `interval` seconds (from a random phase). Paced cycles are timed from when
    they were due, so a server that falls behind shows as latency instead of as fewer requests."""
    conn = Connection(port, token)
    due = time.perf_counter() + rng.uniform(0, interval) if interval else 0.0
    try:
        while time.perf_counter() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                started, due = due, due + interval
            else:
                started = time.perf_counter()
            try:
                marks = await cycle(conn, slug, rng, results)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                results.error(type(exc).__name__)
                conn.close()
                continue
            if marks is None:
                continue
            middle, done = marks
            if started >= measure_from and done <= stop_at:
                results.next_ms.append((middle - started) * 1000)
                results.submit_ms.append((done - middle) * 1000)
                results.cycle_ms.append((done - started) * 1000)
    finally:
        conn.close()


async def drive(*, port: int, tokens: list[str], slug: str, warmup: float, seconds: float,
                meter: _common.CpuMeter, cycle=labeling_cycle,
                rate: float | None = None) -> tuple[Results, dict[str, float]]:
    """Every token's user running `cycle` for `warmup` + `seconds`; in a closed loop, or together `rate` cycles
    per second (each user one every len(tokens) / rate seconds)."""
    results = Results()
    now = time.perf_counter()
    measure_from, stop_at = now + warmup, now + warmup + seconds
    rng = random.Random(7)
    interval = len(tokens) / rate if rate else None
    tasks = [asyncio.create_task(client_loop(cycle=cycle, port=port, token=token, slug=slug, stop_at=stop_at,
                                             measure_from=measure_from, results=results,
                                             rng=random.Random(rng.random()), interval=interval))
             for token in tokens]
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    meter.start()
    await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
    cpu = meter.stop()
    await asyncio.gather(*tasks)
    return results, cpu


@dataclass
class Row:
    pairs: int
    seeded_s: float
    results: Results
    seconds: float
    cpu: dict[str, float]
    solo: Results

    @property
    def rate(self) -> float:
        return len(self.results.cycle_ms) / self.seconds

    @property
    def cpu_ms_per_cycle(self) -> float:
        """CPU time of the server, its database backends and the client per cycle: what a cycle costs, whatever
        share of the cores other work on the machine left to this run."""
        used = self.cpu["client"] + self.cpu["server"] + self.cpu["postgres"]
        return 1000 * used / self.rate if self.rate else float("nan")

    @property
    def error_count(self) -> int:
        return sum(self.results.errors.values()) + sum(self.solo.errors.values())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report_paced(paced: list[tuple[float, Results]], seconds: float) -> None:
    p = _common.percentile
    print()
    print("paced: the same 32 labelers on the large project, together at a set rate (each cycle timed from when it "
          "was due)")
    print(f"{'offered':>9} {'cycles/s':>9} {'next p50':>9} {'next p99':>9} {'sub p99':>8} {'cyc p50':>8} "
          f"{'cyc p99':>8} {'errors':>7}")
    for rate, r in paced:
        print(f"{rate:>9.0f} {len(r.cycle_ms) / seconds:>9.1f} {p(r.next_ms, 50):>9.1f} {p(r.next_ms, 99):>9.1f} "
              f"{p(r.submit_ms, 99):>8.1f} {p(r.cycle_ms, 50):>8.1f} {p(r.cycle_ms, 99):>8.1f} "
              f"{sum(r.errors.values()):>7}")


def report(rows: list[Row], args: argparse.Namespace, baseline: Row | None = None,
           one_request: Row | None = None) -> None:
    p = _common.percentile
    print()
    sockets = "one shared listening socket" if args.shared_socket else "a listening socket per worker"
    print(f"gunicorn {args.worker_class}: {args.workers} workers x {args.threads} threads, {sockets}; "
          f"{args.labelers} labelers "
          f"in a closed loop for {args.seconds:.0f} s ({args.small_seconds:.0f} s on the small project) after "
          f"{args.warmup:.0f} s warm-up, then one "
          f"labeler alone for {args.solo_seconds:.0f} s; labels_per_pair {args.overlap}")
    print(f"{'pairs':>9} {'cycles/s':>9} {'next p50':>9} {'next p99':>9} {'sub p50':>8} {'sub p99':>8} "
          f"{'cyc p50':>8} {'cyc p99':>8} {'errors':>7} {'cpu/cyc':>8} | cores: {'client':>6} {'server':>6} "
          f"{'pg':>5} {'other':>5} | alone: {'next p50':>8} {'next p99':>8} {'cyc p50':>8}")
    for row in rows:
        r, solo, cpu = row.results, row.solo, row.cpu
        print(f"{row.pairs:>9,} {row.rate:>9.1f} {p(r.next_ms, 50):>9.1f} {p(r.next_ms, 99):>9.1f} "
              f"{p(r.submit_ms, 50):>8.1f} {p(r.submit_ms, 99):>8.1f} {p(r.cycle_ms, 50):>8.1f} "
              f"{p(r.cycle_ms, 99):>8.1f} {row.error_count:>7} {row.cpu_ms_per_cycle:>8.1f} | "
              f"{cpu['client']:>13.2f} {cpu['server']:>6.2f} {cpu['postgres']:>5.2f} {cpu['other']:>5.2f} | "
              f"{p(solo.next_ms, 50):>15.1f} {p(solo.next_ms, 99):>8.1f} {p(solo.cycle_ms, 50):>8.1f}")
        for kind, count in sorted({**r.errors, **solo.errors}.items()):
            print(f"          error {kind}: {count}")
        if r.empty or solo.empty:
            print(f"          the queue was empty {r.empty + solo.empty} times")
    if baseline is not None:
        b, cpu = baseline.results, baseline.cpu
        print(f"{'baseline':>9} {baseline.rate:>9.1f} {p(b.next_ms, 50):>9.1f} {p(b.next_ms, 99):>9.1f} "
              f"{p(b.submit_ms, 50):>8.1f} {p(b.submit_ms, 99):>8.1f} {p(b.cycle_ms, 50):>8.1f} "
              f"{p(b.cycle_ms, 99):>8.1f} {sum(b.errors.values()):>7} {baseline.cpu_ms_per_cycle:>8.1f} | "
              f"{cpu['client']:>13.2f} {cpu['server']:>6.2f} {cpu['postgres']:>5.2f} {cpu['other']:>5.2f} |")
        print("baseline: the same 32 clients, each cycle two reads of the large project (GET /api/v1/projects/<slug>/:"
              " token, one statement, a serializer) instead of next + submit")
        for row in rows:
            print(f"labeling at {row.pairs:,} pairs / baseline: cycles/s {row.rate / baseline.rate:.2f}, "
                  f"CPU per cycle {row.cpu_ms_per_cycle / baseline.cpu_ms_per_cycle:.2f}")
    if one_request is not None:
        o, cpu = one_request.results, one_request.cpu
        print(f"{'1 request':>9} {one_request.rate:>9.1f} {'':>9} {'':>9} {'':>8} {'':>8} {p(o.cycle_ms, 50):>8.1f} "
              f"{p(o.cycle_ms, 99):>8.1f} {sum(o.errors.values()):>7} {one_request.cpu_ms_per_cycle:>8.1f} | "
              f"{cpu['client']:>13.2f} {cpu['server']:>6.2f} {cpu['postgres']:>5.2f} {cpu['other']:>5.2f} |")
        print(f"1 request: the same 32 labelers on the {one_request.pairs:,}-pair project, each answer posted with "
              "`next: true` so that its response carries the next pair (one request per label, as the labeling "
              "page works)")
        for kind, count in sorted(o.errors.items()):
            print(f"          error {kind}: {count}")
        two = next((row for row in rows if row.pairs == one_request.pairs), None)
        if two is not None:
            print(f"one request / next + submit at {two.pairs:,} pairs: cycles/s {one_request.rate / two.rate:.2f}, "
                  f"CPU per cycle {one_request.cpu_ms_per_cycle / two.cpu_ms_per_cycle:.2f}")
    print(f"latencies in ms, measured by the client; cpu/cyc: ms of CPU per cycle taken by the client, gunicorn and "
          f"its PostgreSQL backends together; cores: CPU seconds per second during the measured interval, of the "
          f"{os.cpu_count()} this machine has (other: every process outside this benchmark)")
    print()
    print(f"{'target':<42} {'figure':>9}   verdict")

    def line(target: str, figure: str, ok: bool, note: str = "") -> None:
        print(f"{target:<42} {figure:>9}   {verdict(ok)}{note}")

    for row in rows:
        share = row.cpu["client"] / max(row.cpu["client"] + row.cpu["server"] + row.cpu["postgres"], 1e-9)
        line(f"cycles/s >= {TARGET_RATE:.0f} at {row.pairs:,} pairs", f"{row.rate:.1f}", row.rate >= TARGET_RATE,
             f"  (the load generator took {share:.0%} of the benchmark's CPU)")
        cycle_p99 = p(row.results.cycle_ms, 99)
        line(f"cycle p99 < {TARGET_P99_MS:.0f} ms at {row.pairs:,} pairs", f"{cycle_p99:.1f}",
             cycle_p99 < TARGET_P99_MS)
    if one_request is not None:
        line(f"cycles/s >= {TARGET_RATE:.0f}, one request per label", f"{one_request.rate:.1f}",
             one_request.rate >= TARGET_RATE)
        cycle_p99 = p(one_request.results.cycle_ms, 99)
        line(f"cycle p99 < {TARGET_P99_MS:.0f} ms, one request per label", f"{cycle_p99:.1f}",
             cycle_p99 < TARGET_P99_MS)
    errors = sum(row.error_count for row in rows) + (one_request.error_count if one_request is not None else 0)
    line("errors = 0", str(errors), errors == 0)
    if len(rows) == 2:
        small, large = rows
        for label, key in (("under load", "results"), ("one labeler", "solo")):
            ratio = p(getattr(large, key).next_ms, 50) / p(getattr(small, key).next_ms, 50)
            line(f"next p50 {large.pairs:,} / {small.pairs:,} <= {TARGET_RATIO}, {label}", f"{ratio:.2f}",
                 ratio <= TARGET_RATIO)


def closed_loop_row(*, cycle, port: int, tokens: list[str], slug: str, server_pid: int, database: str,
                    warmup: float, seconds: float, pairs: int = 0) -> Row:
    """Every labeler running `cycle` in a closed loop for `seconds` after `warmup`, with the CPU it cost."""
    meter = _common.CpuMeter(server_pid=server_pid, database=database)
    results, cpu = asyncio.run(drive(port=port, tokens=tokens, slug=slug, warmup=warmup, seconds=seconds,
                                     meter=meter, cycle=cycle))
    return Row(pairs=pairs, seeded_s=0.0, results=results, seconds=seconds, cpu=cpu, solo=Results())


ROUND_CYCLES = (("next + submit", labeling_cycle), ("one request", one_request_cycle), ("baseline", baseline_cycle))


def run_rounds(*, args: argparse.Namespace, port: int, tokens: list[str], slug: str, server_pid: int,
               database: str) -> list[dict[str, Row]]:
    """`args.rounds` rounds of the three cycles in turn on one project, each after a short warm-up."""
    rounds = []
    for index in range(args.rounds):
        order = ROUND_CYCLES[::-1] if index % 2 else ROUND_CYCLES
        rounds.append({name: closed_loop_row(cycle=cycle, port=port, tokens=tokens, slug=slug, server_pid=server_pid,
                                             database=database, warmup=2.0, seconds=args.round_seconds)
                       for name, cycle in order})
    return rounds


ROUND_RATIOS = (("one request", "next + submit"), ("next + submit", "baseline"), ("one request", "baseline"))


def report_rounds(rounds: list[dict[str, Row]]) -> None:
    """Per round: each cycle's rate and CPU per cycle, and the ratios within the round; then their medians."""
    print()
    print(f"rounds: the three cycles in turn on the large project, {len(rounds)} rounds (cycles/s, ms of CPU per "
          f"cycle; ratios of cycles/s within each round)")
    names = [name for name, _ in ROUND_CYCLES]
    print(f"{'round':>5} " + " ".join(f"{name:>22}" for name in names)
          + "".join(f" {f'{top} / {bottom}':>28}" for top, bottom in ROUND_RATIOS) + f" {'errors':>7}")
    ratios: dict[tuple[str, str], list[float]] = {pair: [] for pair in ROUND_RATIOS}
    for index, rows in enumerate(rounds, start=1):
        for top, bottom in ROUND_RATIOS:
            below = rows[bottom].rate
            ratios[top, bottom].append(rows[top].rate / below if below else float("nan"))
        cells = " ".join(f"{rows[name].rate:>12.1f} ({rows[name].cpu_ms_per_cycle:>5.1f} ms)" for name in names)
        errors = sum(row.error_count for row in rows.values())
        print(f"{index:>5} {cells}" + "".join(f" {ratios[pair][-1]:>28.2f}" for pair in ROUND_RATIOS)
              + f" {errors:>7}")
    for (top, bottom), values in ratios.items():
        values = sorted(values)
        print(f"median {top} / {bottom}: {statistics.median(values):.2f} (from {values[0]:.2f} to {values[-1]:.2f})")
    for name in names:
        rates = sorted(rows[name].rate for rows in rounds)
        print(f"{name}: median {statistics.median(rates):.1f} cycles/s (from {rates[0]:.1f} to {rates[-1]:.1f})")


def main() -> None:
    args = parse_args()
    _common.django_setup()
    from django.conf import settings

    sizes = [args.small, args.pairs]
    if args.only:
        sizes = [args.small] if args.only == "small" else [args.pairs]
    projects = []
    for size in sizes:
        project, seeded_s = _common.project_seeded(slug=f"bench-load-{size}", pairs=size,
                                                   labels_per_pair=args.overlap)
        if seeded_s:
            print(f"seeded {size:,} pairs in {seeded_s:.1f} s")
        else:
            _common.project_reset(project)
        projects.append((project, size, seeded_s))
    labelers = _common.labelers_with_tokens(count=args.labelers, projects=[project for project, _, _ in projects])
    tokens = [token for _, token in labelers]
    database = settings.DATABASES["default"]["NAME"]

    rows = []
    with _common.gunicorn(workers=args.workers, threads=args.threads, worker_class=args.worker_class,
                          reuse_port=not args.shared_socket) as (
            server, port, _log):
        for project, size, seeded_s in projects:
            seconds = args.seconds if size == max(sizes) else args.small_seconds
            meter = _common.CpuMeter(server_pid=server.pid, database=database)
            results, cpu = asyncio.run(drive(port=port, tokens=tokens, slug=project.slug, warmup=args.warmup,
                                             seconds=seconds, meter=meter))
            # The same pairs' latency without queueing behind 31 others: what one assignment costs at this size.
            solo, _ = asyncio.run(drive(port=port, tokens=tokens[:1], slug=project.slug, warmup=1.0,
                                        seconds=args.solo_seconds, meter=meter))
            rows.append(Row(pairs=size, seeded_s=seeded_s, results=results, seconds=seconds, cpu=cpu,
                            solo=solo))
        large, large_size, _ = projects[-1]
        on_large = {"port": port, "tokens": tokens, "slug": large.slug, "server_pid": server.pid,
                    "database": database, "warmup": args.warmup}
        baseline = (closed_loop_row(cycle=baseline_cycle, seconds=args.baseline_seconds, **on_large)
                    if args.baseline_seconds > 0 else None)
        one_request = (closed_loop_row(cycle=one_request_cycle, seconds=args.one_request_seconds, pairs=large_size,
                                       **on_large) if args.one_request_seconds > 0 else None)
        paced = []
        for rate in [float(value) for value in args.paced_rates.split(",") if value.strip()]:
            meter = _common.CpuMeter(server_pid=server.pid, database=database)
            results, _ = asyncio.run(drive(port=port, tokens=tokens, slug=projects[-1][0].slug, warmup=args.warmup,
                                           seconds=args.paced_seconds, meter=meter, rate=rate))
            paced.append((rate, results))
        rounds = run_rounds(args=args, port=port, tokens=tokens, slug=projects[-1][0].slug, server_pid=server.pid,
                            database=database)
    report(rows, args, baseline, one_request)
    if paced:
        report_paced(paced, args.paced_seconds)
    if rounds:
        report_rounds(rounds)


if __name__ == "__main__":
    main()

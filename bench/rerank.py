"""Benchmark: POST /api/v1/rerank/ through gunicorn against the raw reward-model forward on the same batches."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = Path("/work/shared/data/hh-harmless-dev.jsonl")
SIZES = (4, 16, 64)
CONCURRENCY = (1, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None,
                        help="Reward-model folder; default: the embedded MiniLM with a fresh 1-label head.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF JSONL file of real texts.")
    parser.add_argument("--requests", type=int, default=8, help="Requests per (N, concurrency) cell.")
    parser.add_argument("--max-length", type=int, default=256, help="Token limit of the default model's format.")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads (one worker process).")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="Torch threads of the server and of the raw baseline (0: every core).")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_default_model(target: Path, *, max_length: int) -> Path:
    """The embedded MiniLM encoder with a freshly initialised single-output head, saved as a reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.embedded import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "preflab.json").write_text(json.dumps({"format": {"max_length": max_length, "template": "plain"}}))
    return target


def build_requests(data: Path, *, count: int, size: int, offset: int) -> list[tuple[list[dict], list[str]]]:
    """`count` (prompt, candidates) requests: an HH dialogue and `size` real assistant replies, all distinct."""
    from rewards.training.data import read_preference_file

    with data.open("rb") as stream:
        examples, _ = read_preference_file(stream, file_format="hh")
    replies = [text for example in examples for text in (example.chosen, example.rejected) if text.strip()]
    requests = []
    for number in range(count):
        start = (offset + number * size) % len(replies)
        candidates = [replies[(start + i) % len(replies)] for i in range(size)]
        prompt = examples[(offset + number) % len(examples)].prompt
        requests.append((prompt, candidates))
    return requests


def post(url: str, key: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        payload = json.loads(response.read())
    return time.perf_counter() - started, payload


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def wait_for(port: int, process: subprocess.Popen, *, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("gunicorn did not start listening in time")


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    (scratch / "var").mkdir()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.local", "DJANGO_DEBUG": "0",
           "PREFLAB_VAR_DIR": str(scratch / "var"), "PREFLAB_RERANK_RATE": "100000/min",
           "PREFLAB_RERANK_BATCH_WINDOW_MS": str(args.batch_window_ms),
           "PREFLAB_TORCH_THREADS": str(args.torch_threads), "PREFLAB_LOG_LEVEL": "WARNING"}
    # One gunicorn worker keeps the local-memory result cache in one process when no Redis is configured.
    os.environ.update(env)
    import django

    django.setup()
    import torch
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from labeling.models import ApiToken
    from labeling.services import api_token_create, project_create
    from rewards.scoring import RewardScorer
    from rewards.services import reward_model_register
    from rewards.serving import torch_threads_configure

    call_command("migrate", verbosity=0)
    folder = args.model or build_default_model(scratch / "reward-model", max_length=args.max_length)
    owner = get_user_model().objects.create_user(username=f"bench-{os.getpid()}")
    project = project_create(name="Rerank bench", slug=f"rerank-bench-{os.getpid()}", created_by=owner)
    deployed = reward_model_register(project=project, path=folder, deploy=True)
    _, key = api_token_create(user=owner, scope=ApiToken.Scope.RERANK, project=project, name="bench")

    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/rerank/"
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", "1", "--threads", str(args.threads), "--worker-class", "gthread", "--timeout", "300",
         "--log-level", "warning"], cwd=REPO, env=env)
    rows = []
    try:
        wait_for(port, server)
        warm = build_requests(args.data, count=1, size=4, offset=10_000)[0]
        post(url, key, {"project": project.slug, "prompt": warm[0], "candidates": warm[1]})  # loads the model

        batches: dict[tuple[int, int], list] = {}
        for size in SIZES:
            for concurrency in CONCURRENCY:
                offset = size * 1000 + concurrency * 100
                requests = build_requests(args.data, count=args.requests, size=size, offset=offset)
                batches[(size, concurrency)] = requests
                bodies = [{"project": project.slug, "prompt": p, "candidates": c} for p, c in requests]
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=concurrency) as executor:
                    results = list(executor.map(lambda body: post(url, key, body), bodies))
                wall = time.perf_counter() - started
                assert not any(payload["cached"] for _, payload in results)
                latencies = [seconds for seconds, _ in results]
                rows.append({"size": size, "concurrency": concurrency, "p50": percentile(latencies, 0.5),
                             "p95": percentile(latencies, 0.95), "cps": size * len(bodies) / wall})

        # Cache hits: the N=16 requests again.
        hit_bodies = [{"project": project.slug, "prompt": p, "candidates": c} for p, c in batches[(16, 1)]]
        hits = [post(url, key, body) for body in hit_bodies]
        assert all(payload["cached"] for _, payload in hits)
        hit_p50 = percentile([seconds for seconds, _ in hits], 0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)

    # The raw forward in this process with the server stopped, on the very same batches: tokenization with the
    # model's format plus one forward pass per request, no HTTP, database, cache or batching.
    threads = torch_threads_configure()
    scorer = RewardScorer.load(folder, device="cpu")
    scorer.score(*warm, batch_size=len(warm[1]))
    raw = {}
    for size in SIZES:
        requests = batches[(size, 1)] + batches[(size, 8)]
        times = []
        for prompt, candidates in requests:
            started = time.perf_counter()
            scorer.score(prompt, candidates, batch_size=size)
            times.append(time.perf_counter() - started)
        raw[size] = {"p50": percentile(times, 0.5), "cps": size * len(times) / sum(times)}

    print(f"model: {folder} (reward model id {deployed.pk}) | torch threads {threads} (torch reports "
          f"{torch.get_num_threads()}) | gunicorn 1 worker x {args.threads} threads | {args.requests} requests "
          f"per cell | batch window {args.batch_window_ms} ms")
    print(f"{'N':>4}{'conc':>6}{'p50 ms':>9}{'p95 ms':>9}{'cand/s':>9}{'raw p50 ms':>12}{'raw cand/s':>12}"
          f"{'p50/raw':>9}{'cand/s ratio':>14}")
    for row in rows:
        base = raw[row["size"]]
        print(f"{row['size']:>4}{row['concurrency']:>6}{row['p50'] * 1000:>9.1f}{row['p95'] * 1000:>9.1f}"
              f"{row['cps']:>9.1f}{base['p50'] * 1000:>12.1f}{base['cps']:>12.1f}"
              f"{row['p50'] / base['p50']:>9.2f}{row['cps'] / base['cps']:>14.2f}")
    print(f"cache hit p50 (N=16): {hit_p50 * 1000:.1f} ms vs raw forward p50 {raw[16]['p50'] * 1000:.1f} ms "
          f"({raw[16]['p50'] / hit_p50:.0f}x faster)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

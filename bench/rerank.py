"""Benchmark: /api/v1/rerank/ and /api/v1/generate/ through gunicorn against the raw model calls on the same inputs.

The server and the raw baseline take turns, round by round, so neither runs while the other is busy (on a small
machine they would fight over the same cores) and a change of load on the machine reaches both alike:

- rerank, concurrency 1: each request's latency against the raw work for the same request in this process (the
  same tokenization and truncation, `RewardScorer.score_ids` with the forward batch size the server uses: sorted
  by length, batches planned by length), no HTTP, database, cache or micro-batching;
- rerank, concurrency > 1: candidates per second against offline batched scoring of all the round's candidates
  at once (one `score_ids` call over the whole round, the same forward batch size);
- cache hits: the latency of repeated requests, over a kept-alive connection as a product's HTTP client holds;
- generate: tokens per second of /generate/ (seeded sampling, no reranking) against `model.generate` with the
  same prompt ids, settings and seed.

Both sides use the same torch thread count (--torch-threads). Ratios are medians of per-round ratios.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = Path("/work/shared/data/hh-harmless-dev.jsonl")
# A pause between the server's turn and the raw turn: idle torch threads spin a little before they sleep.
SETTLE_SECONDS = 0.5


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="Reward-model folder; default: the embedded MiniLM with a fresh 1-label head.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF JSONL file of real texts.")
    parser.add_argument("--sizes", default="4,16,64", help="Candidates per rerank request (comma-separated).")
    parser.add_argument("--concurrency", default="1,8", help="Concurrent clients (comma-separated).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating server/raw rounds per cell.")
    parser.add_argument("--requests", type=int, default=2,
                        help="Requests per round at concurrency 1 (at higher concurrency: one per client).")
    parser.add_argument("--stream-candidates", type=int, default=256,
                        help="Candidates per round above concurrency 1 (at least one request per client).")
    parser.add_argument("--hits", type=int, default=200, help="Cache-hit requests.")
    parser.add_argument("--max-length", type=int, default=256, help="Token limit of the default model's format.")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads (one worker process).")
    parser.add_argument("--torch-threads", type=int, default=_cores(),
                        help="Torch threads of the server and of the raw baseline (default: every core).")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="PREFLAB_RERANK_BATCH_WINDOW_MS of the server (its default).")
    parser.add_argument("--forward-batch", type=int, default=16, help="Sequences per forward pass, both sides.")
    parser.add_argument("--generate-n", default="1,4", help="Candidates per /generate/ request (comma-separated).")
    parser.add_argument("--generate-rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip-generate", action="store_true")
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


class Texts:
    """Real HH dialogues and replies, handed out so that no two requests of a run are the same."""

    def __init__(self, data: Path) -> None:
        from rewards.training.data import read_preference_file

        with data.open("rb") as stream:
            self.examples, _ = read_preference_file(stream, file_format="hh")
        self.replies = [text for ex in self.examples for text in (ex.chosen, ex.rejected) if text.strip()]
        self._next_prompt = 0
        self._next_reply = 0

    def request(self, size: int) -> tuple[list[dict], list[str]]:
        prompt = self.examples[self._next_prompt % len(self.examples)].prompt
        self._next_prompt += 1
        candidates = [self.replies[(self._next_reply + i) % len(self.replies)] for i in range(size)]
        self._next_reply += size
        return prompt, candidates

    def first_user_turns(self, count: int, *, max_chars: int = 200) -> list[list[dict]]:
        turns = [[ex.prompt[0]] for ex in self.examples
                 if isinstance(ex.prompt, list) and ex.prompt and len(ex.prompt[0]["content"]) <= max_chars]
        return turns[:count]


class Client:
    """POSTs over one kept-alive HTTP connection per thread."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._local = threading.local()

    def post(self, path: str, body: dict) -> tuple[float, dict]:
        payload = json.dumps(body).encode()
        for attempt in (1, 2):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                                                  timeout=600)
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=payload, headers=self.headers)
                response = connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                # The server closed an idle kept-alive connection: open a new one and time that request instead.
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise
                continue
            seconds = time.perf_counter() - started
            break
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {data[:500]!r}")
        return seconds, json.loads(data)


def wait_for(port: int, process: subprocess.Popen, *, seconds: float = 120.0) -> None:
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


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# --- the raw side --------------------------------------------------------------------------------------------


def raw_request(scorer, prompt, candidates, *, forward_batch: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    encoded = [scorer.encode(prompt, candidate).input_ids for candidate in candidates]
    scores = scorer.score_ids(encoded, batch_size=forward_batch)
    return time.perf_counter() - started, scores


def raw_offline(scorer, requests, *, forward_batch: int) -> float:
    started = time.perf_counter()
    encoded = [scorer.encode(prompt, c).input_ids for prompt, candidates in requests for c in candidates]
    scorer.score_ids(encoded, batch_size=forward_batch)
    return time.perf_counter() - started


def raw_generate(model, tokenizer, messages, *, n: int, max_new_tokens: int, seed: int) -> tuple[float, int, list]:
    """`model.generate` on n copies of the chat prompt with the endpoint's sampling settings; (s, tokens, rows)."""
    import torch

    started = time.perf_counter()
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    input_ids = torch.tensor([ids] * n, dtype=torch.long)
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    with torch.inference_mode():
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_k=50, top_p=1.0,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    seconds = time.perf_counter() - started
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    rows, tokens = [], 0
    for row in output[:, input_ids.shape[1]:].tolist():
        length = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        tokens += length
        rows.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    return seconds, tokens, rows


# --- the run -------------------------------------------------------------------------------------------------


def rerank_cells(args, client: Client, slug: str, scorer, texts: Texts) -> tuple[list[dict], list[dict], bool]:
    rows, hit_bodies, scores_match = [], [], True
    for size in [int(s) for s in args.sizes.split(",")]:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            service_latencies, raw_latencies, ratios = [], [], []
            service_candidates = service_seconds = raw_seconds = 0.0
            for number in range(args.rounds):
                # Above concurrency 1 a round is a steady stream (at least --stream-candidates), not one burst
                # whose ramp-up would dominate a round of a second or two.
                count = args.requests if concurrency == 1 else max(concurrency, -(-args.stream_candidates // size))
                requests = [texts.request(size) for _ in range(count)]
                bodies = [{"project": slug, "prompt": p, "candidates": c} for p, c in requests]

                def serve(bodies=bodies, concurrency=concurrency):
                    started = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=concurrency) as executor:
                        results = list(executor.map(lambda body: client.post("/api/v1/rerank/", body), bodies))
                    return time.perf_counter() - started, results

                def raw(requests=requests, concurrency=concurrency):
                    if concurrency == 1:
                        return [raw_request(scorer, p, c, forward_batch=args.forward_batch) for p, c in requests]
                    return raw_offline(scorer, requests, forward_batch=args.forward_batch)

                # Alternate which side goes first, so that a drift in the machine's load hits both alike.
                turns = ["serve", "raw"] if number % 2 == 0 else ["raw", "serve"]
                for turn in turns:
                    if turn == "serve":
                        wall, results = serve()
                    else:
                        raw_result = raw()
                    time.sleep(SETTLE_SECONDS)
                assert not any(payload["cached"] for _, payload in results)
                latencies = [seconds for seconds, _ in results]
                service_latencies += latencies
                service_candidates += size * len(bodies)
                service_seconds += wall
                if concurrency == 1:
                    raw_times = [seconds for seconds, _ in raw_result]
                    raw_latencies += raw_times
                    raw_seconds += sum(raw_times)
                    ratios.append(statistics.median(latencies) / statistics.median(raw_times))
                    for (_, payload), (_, expected) in zip(results, raw_result, strict=True):
                        got = {row["index"]: row["score"] for row in payload["results"]}
                        scores_match &= all(abs(got[i] - s) <= 1e-4 for i, s in enumerate(expected))
                    if size == 16:
                        hit_bodies += bodies
                else:
                    raw_seconds += raw_result
                    ratios.append((size * len(bodies) / wall) / (size * len(bodies) / raw_result))
            row = {"size": size, "concurrency": concurrency, "p50": percentile(service_latencies, 0.5),
                   "p95": percentile(service_latencies, 0.95), "cps": service_candidates / service_seconds,
                   "raw_cps": service_candidates / raw_seconds, "ratio": statistics.median(ratios)}
            if concurrency == 1:
                row["raw_p50"] = percentile(raw_latencies, 0.5)
            rows.append(row)
            print(f"  rerank N={size} c={concurrency}: done", file=sys.stderr, flush=True)
    return rows, hit_bodies, scores_match


def cache_hits(args, client: Client, bodies: list[dict]) -> dict:
    for body in bodies:
        client.post("/api/v1/rerank/", body)  # warm: every body is cached already; this just settles the path
    latencies, server = [], []
    for number in range(args.hits):
        seconds, payload = client.post("/api/v1/rerank/", bodies[number % len(bodies)])
        assert payload["cached"]
        latencies.append(seconds)
        server.append(payload["timing_ms"] / 1000.0)
    return {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "server_p50": percentile(server, 0.5)}


def generate_cells(args, client: Client, slug: str, texts: Texts) -> tuple[list[dict], bool]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards.embedded import smollm2_path

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = texts.first_user_turns(64)
    rows, same_text = [], True
    warm = {"project": slug, "prompt": prompts[0], "n": 1, "max_new_tokens": 4, "seed": 0, "rerank": False}
    client.post("/api/v1/generate/", warm)  # loads the policy in the server
    raw_generate(model, tokenizer, prompts[0], n=1, max_new_tokens=4, seed=0)
    cursor = 1
    for n in [int(value) for value in args.generate_n.split(",")]:
        service_tps, raw_tps, latencies, raw_latencies, ratios = [], [], [], [], []
        for number in range(args.generate_rounds):
            messages, seed = prompts[cursor % len(prompts)], 1000 + cursor
            cursor += 1
            body = {"project": slug, "prompt": messages, "n": n, "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.7, "seed": seed, "rerank": False}
            turns = ["serve", "raw"] if number % 2 == 0 else ["raw", "serve"]
            for turn in turns:
                if turn == "serve":
                    seconds, payload = client.post("/api/v1/generate/", body)
                else:
                    raw_seconds, raw_tokens, raw_rows = raw_generate(model, tokenizer, messages, n=n,
                                                                     max_new_tokens=args.max_new_tokens, seed=seed)
                time.sleep(SETTLE_SECONDS)
            texts_out = [c["text"] for c in sorted(payload["candidates"], key=lambda c: c["index"])]
            same_text &= texts_out == raw_rows
            service_tps.append(payload["tokens_generated"] / seconds)
            raw_tps.append(raw_tokens / raw_seconds)
            latencies.append(seconds)
            raw_latencies.append(raw_seconds)
            ratios.append(service_tps[-1] / raw_tps[-1])
        rows.append({"n": n, "p50": statistics.median(latencies), "raw_p50": statistics.median(raw_latencies),
                     "tps": statistics.median(service_tps), "raw_tps": statistics.median(raw_tps),
                     "ratio": statistics.median(ratios)})
        print(f"  generate n={n}: done", file=sys.stderr, flush=True)
    return rows, same_text


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    (scratch / "var").mkdir()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.local", "DJANGO_DEBUG": "0",
           "PREFLAB_VAR_DIR": str(scratch / "var"), "PREFLAB_RERANK_RATE": "100000/min",
           "PREFLAB_RERANK_BATCH_WINDOW_MS": str(args.batch_window_ms),
           "PREFLAB_RERANK_FORWARD_BATCH": str(args.forward_batch),
           "PREFLAB_TORCH_THREADS": str(args.torch_threads)}
    # The embedded SmolLM2 checkpoint is built once per machine under var/models; share it with the server.
    env.setdefault("PREFLAB_MODEL_CACHE", str(REPO / "var" / "models"))
    os.environ.update(env)
    import django

    django.setup()
    import torch
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from labeling.models import ApiToken
    from labeling.services import api_token_create, project_create
    from rewards.scoring import RewardScorer
    from rewards.services import reward_model_register

    torch.set_num_threads(args.torch_threads)
    if connection.vendor == "postgresql":
        import _common

        _common.database_create_missing(connection)
    call_command("migrate", verbosity=0)
    folder = args.model or build_default_model(scratch / "reward-model", max_length=args.max_length)
    owner = get_user_model().objects.create_user(username=f"bench-{os.getpid()}")
    slug = f"rerank-bench-{os.getpid()}"
    project = project_create(name="Rerank bench", slug=slug, created_by=owner)
    deployed = reward_model_register(project=project, path=folder, deploy=True)
    _, key = api_token_create(user=owner, scope=ApiToken.Scope.RERANK, project=project, name="bench")
    texts = Texts(args.data)

    port = free_port()
    log = (scratch / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", "1", "--threads", str(args.threads), "--worker-class", "gthread", "--timeout", "600",
         "--keep-alive", "75",
         "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(port, key)
    scorer = RewardScorer.load(folder, device="cpu")
    try:
        wait_for(port, server)
        # Warm-up of both sides at every size: the server loads the model, both run each shape once.
        for size in [int(s) for s in args.sizes.split(",")]:
            prompt, candidates = texts.request(size)
            client.post("/api/v1/rerank/", {"project": slug, "prompt": prompt, "candidates": candidates})
            raw_request(scorer, prompt, candidates, forward_batch=args.forward_batch)
        rows, hit_bodies, scores_match = rerank_cells(args, client, slug, scorer, texts)
        hits = cache_hits(args, client, hit_bodies) if hit_bodies else None
        generated, same_text = ([], True) if args.skip_generate else generate_cells(args, client, slug, texts)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    cache_backend = settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]
    print(f"reward model: {folder} (id {deployed.pk}), max_length {args.max_length} | database {connection.vendor},"
          f" cache {cache_backend} | gunicorn 1 worker x {args.threads} threads | torch threads {args.torch_threads}"
          f" on both sides ({_cores()} cores) | forward batch {args.forward_batch}, window {args.batch_window_ms} ms"
          f" | {args.rounds} rounds per cell: {args.requests} requests at concurrency 1, at least"
          f" {args.stream_candidates} candidates above")
    print("rerank (raw: same encoding, same score_ids; concurrency 1 per request, higher: offline over the round)")
    print(f"{'N':>4}{'conc':>6}{'p50 ms':>10}{'p95 ms':>10}{'raw p50 ms':>12}{'cand/s':>9}{'raw cand/s':>12}"
          f"{'ratio':>8}")
    for row in rows:
        raw_p50 = f"{row['raw_p50'] * 1000:>12.1f}" if "raw_p50" in row else f"{'-':>12}"
        print(f"{row['size']:>4}{row['concurrency']:>6}{row['p50'] * 1000:>10.1f}{row['p95'] * 1000:>10.1f}{raw_p50}"
              f"{row['cps']:>9.1f}{row['raw_cps']:>12.1f}{row['ratio']:>8.2f}")
    print("ratio: concurrency 1 = service p50 / raw p50 (lower is better); "
          "higher concurrency = service cand/s / offline cand/s (higher is better)")
    print(f"scores equal the raw forward's (1e-4): {'yes' if scores_match else 'NO'}")
    if hits:
        print(f"cache hit (N=16, {args.hits} requests, kept-alive connection): p50 {hits['p50'] * 1000:.2f} ms, "
              f"p95 {hits['p95'] * 1000:.2f} ms; server's own timing_ms p50 {hits['server_p50'] * 1000:.2f} ms")
    if generated:
        print(f"generate (SmolLM2-135M, max_new_tokens {args.max_new_tokens}, temperature 0.7, seeded, no rerank; "
              f"{args.generate_rounds} rounds)")
        print(f"{'n':>4}{'p50 ms':>10}{'raw p50 ms':>12}{'tok/s':>9}{'raw tok/s':>11}{'ratio':>8}")
        for row in generated:
            print(f"{row['n']:>4}{row['p50'] * 1000:>10.1f}{row['raw_p50'] * 1000:>12.1f}{row['tps']:>9.1f}"
                  f"{row['raw_tps']:>11.1f}{row['ratio']:>8.2f}")
        print(f"same texts as the raw generate call: {'yes' if same_text else 'no'}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

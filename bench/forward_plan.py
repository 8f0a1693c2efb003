"""Benchmark: forward batches planned by length against fixed-size batches, on real HH replies and MiniLM.

First it times single forward passes of MiniLM at several widths and batch sizes and fits time = pass + token
cost, which gives the fixed cost of a pass in tokens' worth of work (the scorer's FORWARD_OVERHEAD_TOKENS for
this device). Then it scores rerank requests of N real candidates both ways, in the same process and on the
same inputs, alternating: fixed batches (the fewest passes of at most --forward-batch, as a plain script
batches sorted inputs) and the planned batches the service uses. It prints candidates per second, padded
tokens as a share of real tokens, and the ratio planned / fixed. A batch of several requests' candidates (as
the micro-batcher forms under concurrency) is measured the same way with --group.

    .venv/bin/python bench/forward_plan.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank import DEFAULT_DATA, Texts, build_default_model

FEWEST_PASSES = 10**9


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def positive_ints(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas") from exc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", type=positive_ints, default=[4, 16, 64],
                        help="Candidates per request (comma-separated).")
    parser.add_argument("--group", type=positive_int, default=1, help="Requests scored together in one call.")
    parser.add_argument("--requests", type=positive_int, default=24, help="Requests per size.")
    parser.add_argument("--forward-batch", type=positive_int, default=16)
    parser.add_argument("--max-length", type=positive_int, default=256)
    return parser.parse_args()


def calibrate(scorer) -> tuple[float, float]:
    """(seconds per pass, seconds per token) fitted on passes of 1-16 rows and 16-256 columns (with a term for
    attention, which grows with the square of the width)."""
    import torch

    shapes = [(rows, width) for rows in (1, 4, 16) for width in (16, 64, 128, 256)]
    samples = []
    for rows, width in shapes * 3:
        ids = [[101] + [2000] * (width - 2) + [102]] * rows
        started = time.perf_counter()
        scorer.score_ids(ids, batch_size=rows, overhead_tokens=FEWEST_PASSES)
        samples.append((rows, width, time.perf_counter() - started))
    samples = samples[len(shapes):]  # the first round warms up
    tokens = torch.tensor([[1.0, float(r * w), float(r * w * w)] for r, w, _ in samples], dtype=torch.float64)
    seconds = torch.tensor([[s] for _, _, s in samples], dtype=torch.float64)
    fit = torch.linalg.lstsq(tokens, seconds).solution
    return float(fit[0, 0]), float(fit[1, 0])


def padded_share(scorer, sequences, overhead_tokens: int, forward_batch: int) -> float:
    from rewards.scoring import forward_batches_plan

    lengths = sorted(len(s) for s in sequences)
    plan = forward_batches_plan(lengths, max_batch=forward_batch, overhead_tokens=overhead_tokens)
    padded = sum((end - start) * lengths[end - 1] for start, end in plan)
    return padded / sum(lengths) - 1.0


def main() -> None:
    args = parse_args()
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django
    import torch

    django.setup()

    from rewards.scoring import RewardScorer

    texts = Texts(args.data)
    with tempfile.TemporaryDirectory() as folder:
        scorer = RewardScorer.load(build_default_model(Path(folder), max_length=args.max_length), device="cpu")
    per_pass, per_token = calibrate(scorer)
    print(f"torch threads {torch.get_num_threads()} | forward pass {per_pass * 1000:.2f} ms + "
          f"{per_token * 1e6:.1f} us/token -> {per_pass / per_token:.0f} tokens per pass "
          f"(scorer uses {scorer.forward_overhead_tokens})")
    print(f"{'N':>4}{'group':>6}{'fixed c/s':>11}{'planned c/s':>13}{'ratio':>7}{'pad fixed':>11}{'pad planned':>13}")
    for size in args.sizes:
        calls = []
        for _ in range(args.requests // args.group or 1):
            seqs = []
            for _ in range(args.group):
                prompt, candidates = texts.request(size)
                seqs += [scorer.encode(prompt, c).input_ids for c in candidates]
            calls.append(seqs)
        fixed_s = planned_s = 0.0
        ratios = []
        for number, seqs in enumerate(calls):
            timings = {}
            modes = ("fixed", "planned") if number % 2 == 0 else ("planned", "fixed")
            for mode in modes:
                overhead = FEWEST_PASSES if mode == "fixed" else None
                started = time.perf_counter()
                scorer.score_ids(seqs, batch_size=args.forward_batch, overhead_tokens=overhead)
                timings[mode] = time.perf_counter() - started
            fixed_s += timings["fixed"]
            planned_s += timings["planned"]
            ratios.append(timings["fixed"] / timings["planned"])
        candidates = size * args.group * len(calls)
        pad_fixed = statistics.mean(padded_share(scorer, s, FEWEST_PASSES, args.forward_batch) for s in calls)
        pad_planned = statistics.mean(padded_share(scorer, s, scorer.forward_overhead_tokens, args.forward_batch)
                                      for s in calls)
        print(f"{size:>4}{args.group:>6}{candidates / fixed_s:>11.1f}{candidates / planned_s:>13.1f}"
              f"{statistics.median(ratios):>7.2f}{pad_fixed:>11.0%}{pad_planned:>13.0%}")
    print("ratio: median over calls of fixed time / planned time (above 1: planning is faster). pad: padded tokens "
          "beyond the real ones.")


if __name__ == "__main__":
    main()

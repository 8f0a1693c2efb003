"""Benchmark: a linear probe on the frozen reward backbone, the ceiling of what its features separate.

Encodes every HH pair with the service's own format and left truncation, runs the frozen MiniLM once, and for
each seed's split by prompt (the same split `bench/train_reward.py` uses) fits a logistic regression on the
difference between the chosen and the rejected reply's features, for three features: the pooler's output (what
BertForSequenceClassification's head reads), the [CLS] state and the mean of all token states. It prints the
held-out accuracy of each, beside the training accuracy, for a few strengths of L2 regularization.

    .venv/bin/python bench/reward_probe.py --limit 1000 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = Path("/work/shared/data/hh-harmless-dev.jsonl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an HH-format preference file")
    parser.add_argument("--limit", type=int, default=1000, help="pairs read from the file")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the split by prompt")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--l2", default="0.001,0.01,0.1", help="L2 strengths of the probe")
    return parser.parse_args()


def features(examples, max_length: int) -> dict:
    """Per pair, chosen then rejected: the pooler output, the [CLS] state and the mean token state."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rewards.embedded import minilm_path
    from rewards.training.data import RewardEncoder, RewardFormat

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    encoder = RewardEncoder(tokenizer, RewardFormat.for_tokenizer(tokenizer, max_length=max_length))
    ids = [side.input_ids for example in examples for side in encoder.encode_pair(example)]
    out: dict[str, list] = {"pooler": [], "cls": [], "mean": []}
    with torch.inference_mode():
        for start in range(0, len(ids), 16):
            batch = tokenizer.pad({"input_ids": ids[start:start + 16]}, return_tensors="pt")
            states = model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out["pooler"].append(states.pooler_output)
            out["cls"].append(states.last_hidden_state[:, 0])
            out["mean"].append((states.last_hidden_state * mask).sum(1) / mask.sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def probe(differences, train_rows: list[int], eval_rows: list[int], l2: float) -> tuple[float, float]:
    """Logistic regression without bias on chosen - rejected (a Bradley-Terry model on frozen features):
    held-out and training accuracy, a tie counted as half right."""
    import torch

    weights = torch.zeros(differences.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200)
    train = differences[train_rows]

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-train @ weights).mean() + l2 * (weights ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def accuracy(scores) -> float:
        return ((scores > 0).float().mean() + 0.5 * (scores == 0).float().mean()).item()

    with torch.no_grad():
        return accuracy(differences[eval_rows] @ weights), accuracy(train @ weights)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ.setdefault("PREFLAB_VAR_DIR", tempfile.mkdtemp(prefix="bench-probe-"))
    import django

    django.setup()
    import torch

    from rewards.training.data import read_preference_file, split_by_prompt

    torch.manual_seed(0)
    with args.data.open("rb") as stream:
        examples, errors = read_preference_file(stream, file_format="hh", limit=args.limit)
    started = time.perf_counter()
    feats = features(examples, args.max_length)
    print(f"data: {args.data} | pairs {len(examples)} (bad lines {len(errors)}) | max_length {args.max_length} | "
          f"features of {2 * len(examples)} texts in {time.perf_counter() - started:.0f} s")
    row_of = {id(example): row for row, example in enumerate(examples)}
    strengths = [float(value) for value in args.l2.split(",")]
    print("held-out accuracy of each feature at each L2 strength, training accuracy in brackets")
    print(f"{'seed':>4} {'train':>6} {'eval':>5}  "
          + "  ".join(f"{name}@{l2:g}".rjust(13) for name in feats for l2 in strengths))
    for seed in [int(value) for value in args.seeds.split(",")]:
        train, evaluation = split_by_prompt(examples, eval_fraction=args.eval_fraction, seed=seed)
        train_rows = [row_of[id(example)] for example in train]
        eval_rows = [row_of[id(example)] for example in evaluation]
        cells = []
        for values in feats.values():
            differences = values[0::2] - values[1::2]
            for l2 in strengths:
                held_out, fitted = probe(differences, train_rows, eval_rows, l2)
                cells.append(f"{held_out:.3f} ({fitted:.2f})".rjust(13))
        print(f"{seed:>4} {len(train):>6} {len(evaluation):>5}  " + "  ".join(cells))


if __name__ == "__main__":
    main()

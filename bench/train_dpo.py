"""Benchmark: the DPO recipe against a plain TRL DPOTrainer script on the same HH pairs, SmolLM2 and settings."""
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF JSONL file.")
    parser.add_argument("--pairs", type=int, default=8, help="Train on the first N usable pairs.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def run_recipe(base: str, train, settings: dict, workdir: Path) -> dict:
    from rewards.training.dpo import train_dpo

    started = time.perf_counter()
    result = train_dpo(base_model=base, train=train, eval=[], output_dir=workdir / "recipe",
                       hyperparameters={**settings, "win_rate_prompts": 0})
    return {"seconds": time.perf_counter() - started, "train_runtime": result.metrics["train_runtime"],
            "pairs_used": result.train_pairs, "shortened": result.shortened_pairs, "loss": result.metrics["train_loss"]}


def run_plain_trl(base: str, train, settings: dict, workdir: Path) -> dict:
    """TRL on its own: conversational rows as they come, TRL's own truncation and its drop of pairs whose prompt
    fills max_length, default reference model, then save_model."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [{"prompt": e.prompt, "chosen": [{"role": "assistant", "content": e.chosen}],
             "rejected": [{"role": "assistant", "content": e.rejected}]} for e in train]
    on_gpu = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(workdir / "plain"), report_to=[], save_strategy="no", disable_tqdm=True,
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu, gradient_checkpointing=False,
        max_length=settings["max_length"], num_train_epochs=settings["num_train_epochs"],
        per_device_train_batch_size=settings["per_device_train_batch_size"], learning_rate=settings["learning_rate"],
        seed=settings["seed"], logging_steps=1,
    )
    trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    shortened = sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > args.max_length
                    for r in trainer.train_dataset)
    output = trainer.train()
    trainer.save_model(str(workdir / "plain"))
    return {"seconds": time.perf_counter() - started, "train_runtime": output.metrics["train_runtime"],
            "pairs_used": kept, "shortened": shortened, "loss": output.training_loss}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django

    django.setup()
    from rewards.embedded import smollm2_path
    from rewards.training.data import read_preference_file

    with args.data.open("rb") as stream:
        train, errors = read_preference_file(stream, file_format="hh", limit=args.pairs)
    base = str(smollm2_path())
    settings = {"max_length": args.max_length, "num_train_epochs": args.epochs,
                "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "seed": args.seed, "warmup_steps": 0, "logging_steps": 1}
    print(f"data: {args.data} | pairs {len(train)} (bad lines {len(errors)}) | model SmolLM2-135M-Instruct | "
          f"max_length {args.max_length} | epochs {args.epochs} | batch {args.batch_size}")

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as scratch:
        recipe = run_recipe(base, train, settings, Path(scratch))
        plain = run_plain_trl(base, train, settings, Path(scratch))

    print(f"{'run':<12}{'wall s':>9}{'train s':>9}{'pairs used':>14}{'shortened':>11}{'pairs/s':>9}{'loss':>9}")
    for name, row in (("preflab", recipe), ("plain TRL", plain)):
        row["pairs_per_s"] = row["pairs_used"] * args.epochs / row["train_runtime"]
        print(f"{name:<12}{row['seconds']:>9.1f}{row['train_runtime']:>9.1f}{row['pairs_used']:>8} / {len(train):<4}"
              f"{row['shortened']:>11}{row['pairs_per_s']:>9.2f}{row['loss']:>9.4f}")
    print(f"training pairs/s ratio preflab / plain TRL: {recipe['pairs_per_s'] / plain['pairs_per_s']:.2f}")
    print(f"wall-time ratio preflab / plain TRL: {recipe['seconds'] / plain['seconds']:.2f}")


if __name__ == "__main__":
    main()

"""Benchmark: the reward recipe against a plain TRL RewardTrainer script on the same HH split and settings."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
    parser.add_argument("--limit", type=int, default=400, help="Use the first N usable pairs.")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None,
                        help="Several seeds, comma-separated (overrides --seed): each seed's split and runs in "
                             "turn, then the mean accuracy of each run and the mean paired difference over them.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--runs", default="service,plain,same",
                        help="Which runs, comma-separated: service; plain (TRL's own data handling, the same "
                             "settings); same (plain TRL on the service's token ids, the equal-work baseline); "
                             "defaults (plain TRL with every RewardConfig default but max_length: 3 epochs at "
                             "1e-4, so about three times as long).")
    args = parser.parse_args()
    args.runs = {name.strip() for name in args.runs.split(",") if name.strip()}
    try:
        args.seeds = [int(value) for value in args.seeds.split(",") if value.strip()] if args.seeds else [args.seed]
    except ValueError:
        parser.error("--seeds takes whole numbers, comma-separated")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if not args.runs or args.runs - {"service", "plain", "same", "defaults"}:
        parser.error("--runs takes service, plain, same and/or defaults")
    return args


def hh_text(prompt) -> str:
    """The HH transcript of a prompt up to the reply, as a plain script would feed it to TRL."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def run_service(train, evaluation, settings: dict, args: argparse.Namespace, workdir: Path, seed: int) -> dict:
    """The service's own path: the pairs imported into a project, a training run submitted and executed by
    the same service the Celery worker calls, then the artifact scored on the bench's held-out pairs."""
    import json

    from django.core.management import call_command

    from labeling.imports import preferences_import
    from labeling.services import project_create
    from rewards import services
    from rewards.models import RewardModel
    from rewards.scoring import RewardScorer, evaluate_preferences

    call_command("migrate", verbosity=0)
    source = workdir / "pairs.trl.jsonl"
    with source.open("w", encoding="utf-8") as out:
        for example in (*train, *evaluation):
            row = {"prompt": example.prompt, "chosen": [{"role": "assistant", "content": example.chosen}],
                   "rejected": [{"role": "assistant", "content": example.rejected}]}
            out.write(json.dumps(row) + "\n")
    project = project_create(name="bench", slug=f"bench-{int(time.time())}-{seed}")
    with source.open("rb") as stream:
        report = preferences_import(project=project, stream=stream, format="trl")
    started = time.perf_counter()
    run = services.training_run_start(project=project, kind="reward", hyperparameters=settings,
                                      eval_fraction=args.eval_fraction, seed=seed, queue=False)
    run = services.training_run_execute(run_id=run.pk)
    seconds = time.perf_counter() - started
    if run.status != "succeeded":
        raise SystemExit(f"service run {run.status}: {run.error}")
    scorer = RewardScorer.load(run.artifact_path)
    metrics = evaluate_preferences(scorer, evaluation)
    correct = _service_correct(scorer, evaluation)
    lineage = RewardModel.objects.get(training_run=run).lineage
    return {"seconds": seconds, "accuracy": metrics["accuracy"], "train_pairs_used": lineage["train_pairs"],
            "shortened": lineage["shortened_pairs"], "train_runtime": run.eval_metrics["train_runtime"],
            "imported": report.pairs_created, "service_eval_pairs": run.eval_count, "correct": correct}


def _service_correct(scorer, evaluation) -> list[bool]:
    """Whether the service's model scored each held-out pair's chosen reply above its rejected one."""
    ids = [scorer.encode(e.prompt, side).input_ids for e in evaluation for side in (e.chosen, e.rejected)]
    scores = scorer.score_ids(ids)
    return [scores[2 * i] > scores[2 * i + 1] for i in range(len(evaluation))]


def too_long(evaluation, max_length: int) -> list[bool]:
    """Pairs whose transcript and longer reply do not fit in max_length tokens (the ones TRL's filter drops
    from training and right truncation cuts at evaluation)."""
    from transformers import AutoTokenizer

    from rewards.embedded import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    return [max(len(tokenizer(hh_text(e.prompt) + " " + side)["input_ids"]) for side in (e.chosen, e.rejected))
            > max_length for e in evaluation]


def run_plain_trl(train, evaluation, settings: dict, workdir: Path, *, trl_defaults: bool = False) -> dict:
    """TRL on its own: explicit-prompt text rows, its EOS handling, its filter of pairs over max_length; the
    held-out pairs are scored with the tokenizer's own right truncation. With `trl_defaults`, the script sets
    only max_length (TRL's 1024 is past MiniLM's 512 positions), the seed and bf16 (TRL's default fails on a CPU),
    and keeps every other value of TRL's RewardConfig (learning rate 1e-4, 3 epochs, batch 8, no warmup)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rewards.embedded import minilm_path

    started = time.perf_counter()
    base = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = {"prompt": [hh_text(e.prompt) for e in train], "chosen": [" " + e.chosen for e in train],
            "rejected": [" " + e.rejected for e in train]}
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    folder = workdir / ("trl-defaults" if trl_defaults else "plain")
    tuned = {} if trl_defaults else {
        "num_train_epochs": settings["num_train_epochs"], "learning_rate": settings["learning_rate"],
        "per_device_train_batch_size": settings["per_device_train_batch_size"]}
    args = RewardConfig(
        output_dir=str(folder), report_to=[], save_strategy="no", disable_tqdm=True, bf16=bf16,
        # BERT tokenizers have no EOS token; TRL needs one to append, so the script names [SEP].
        eos_token=tokenizer.sep_token, max_length=settings["max_length"], seed=settings["seed"], logging_steps=10,
        # Checkpointing activations saves memory and changes no result; off, it only runs faster.
        gradient_checkpointing=False, **tuned,
    )
    trainer = RewardTrainer(model=base, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    output = trainer.train()
    trainer.save_model(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    device = next(trainer.model.parameters()).device
    model.to(device)
    correct = []
    with torch.inference_mode():
        for example in evaluation:
            texts = [hh_text(example.prompt) + " " + side + tokenizer.sep_token
                     for side in (example.chosen, example.rejected)]
            batch = tokenizer(texts, truncation=True, max_length=settings["max_length"], padding=True,
                              return_tensors="pt").to(device)
            if torch.equal(batch["input_ids"][0], batch["input_ids"][1]):
                # Right truncation left nothing of either reply: the model sees one text twice, and which score
                # comes out higher is float noise that changes from run to run. Such a pair counts as a coin flip.
                correct.append(0.5)
                continue
            chosen, rejected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            correct.append(float(chosen > rejected))
    return {"seconds": time.perf_counter() - started, "accuracy": sum(correct) / len(evaluation),
            "train_pairs_used": kept, "shortened": 0, "train_runtime": output.metrics["train_runtime"],
            "correct": correct, "ties": correct.count(0.5)}


def run_plain_trl_same_pairs(train, evaluation, settings: dict, workdir: Path) -> dict:
    """The equal-work baseline: a plain TRL script trained on exactly the token ids the service trains on
    (every pair kept, prompts cut from the left by the service's own encoder; pre-tokenized rows, which TRL
    trains as given), so the two runs differ only in what the service does around the trainer. It scores the
    held-out pairs the same way, as the service's run does at its end."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rewards.embedded import minilm_path
    from rewards.training.data import RewardEncoder, RewardFormat

    started = time.perf_counter()
    base = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    length = settings["max_length"]
    encoder = RewardEncoder(tokenizer, RewardFormat.for_tokenizer(tokenizer, max_length=length))

    def ids(examples) -> list[list[int]]:
        return [side.input_ids for example in examples for side in encoder.encode_pair(example)]

    encoded = ids(train)
    rows = {"chosen_ids": encoded[0::2], "rejected_ids": encoded[1::2]}
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = RewardConfig(
        output_dir=str(workdir / "plain-same"), report_to=[], save_strategy="no", disable_tqdm=True, bf16=bf16,
        max_length=length, num_train_epochs=settings["num_train_epochs"],
        per_device_train_batch_size=settings["per_device_train_batch_size"], learning_rate=settings["learning_rate"],
        gradient_checkpointing=False, seed=settings["seed"], logging_steps=10,
    )
    trainer = RewardTrainer(model=base, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer)
    kept = len(trainer.train_dataset)
    output = trainer.train()
    trainer.save_model(str(workdir / "plain-same"))
    model = trainer.model.eval()
    correct = []
    with torch.inference_mode():
        for start in range(0, len(evaluation), 8):
            batch = tokenizer.pad({"input_ids": ids(evaluation[start:start + 8])},
                                  return_tensors="pt").to(model.device)
            scores = model(**batch).logits[:, 0].view(-1, 2)
            correct += (scores[:, 0] > scores[:, 1]).tolist()
    return {"seconds": time.perf_counter() - started, "accuracy": sum(correct) / len(evaluation),
            "train_pairs_used": kept, "shortened": 0, "train_runtime": output.metrics["train_runtime"],
            "correct": correct}


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """The difference of two runs' accuracies on the same held-out pairs, and its standard error from the
    per-pair differences (a paired comparison: both runs see the same hard and easy pairs)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, (variance / n) ** 0.5


NAMES = {"service": "preflab service", "plain": "plain TRL", "same": "plain, same", "defaults": "TRL defaults"}


def run_seed(args: argparse.Namespace, examples: list, seed: int, scratch_dir: Path) -> dict:
    """One seed's split, the chosen runs on it, and their report; returns the runs' results."""
    from rewards.training.data import split_by_prompt

    train, evaluation = split_by_prompt(examples, eval_fraction=args.eval_fraction, seed=seed)
    settings = {"max_length": args.max_length, "num_train_epochs": args.epochs,
                "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate, "seed": seed}
    print(f"seed {seed} | train {len(train)} | eval {len(evaluation)} | max_length {args.max_length} | "
          f"epochs {args.epochs} | batch {args.batch_size}")
    workdir = scratch_dir / f"seed-{seed}"
    workdir.mkdir()
    runners = {"service": lambda: run_service(train, evaluation, settings, args, workdir, seed),
               "plain": lambda: run_plain_trl(train, evaluation, settings, workdir),
               "same": lambda: run_plain_trl_same_pairs(train, evaluation, settings, workdir),
               "defaults": lambda: run_plain_trl(train, evaluation, settings, workdir, trl_defaults=True)}
    try:
        results = {name: run() for name, run in runners.items() if name in args.runs}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    recipe, plain, same, defaults = (results.get(name) for name in ("service", "plain", "same", "defaults"))
    if recipe and recipe["service_eval_pairs"] != len(evaluation):
        print(f"note: the service held out {recipe['service_eval_pairs']} pairs, the bench {len(evaluation)}")

    long = too_long(evaluation, args.max_length)
    n_long = sum(long)

    def split(correct: list[bool], want_long: bool) -> str:
        picked = [c for c, is_long in zip(correct, long, strict=True) if is_long == want_long]
        return f"{sum(picked) / len(picked):.3f}" if picked else "-"

    print(f"{'run':<16}{'wall s':>7}{'train s':>9}{'s/pair':>8}{'train pairs used':>18}{'shortened':>11}"
          f"{'eval acc':>10}{'fits':>7}{'longer':>8}")
    for key, row in results.items():
        per_pair = row["train_runtime"] / max(row["train_pairs_used"], 1)
        accuracy = "-" if row["accuracy"] != row["accuracy"] else f"{row['accuracy']:.3f}"
        print(f"{NAMES[key]:<16}{row['seconds']:>7.1f}{row['train_runtime']:>9.1f}{per_pair:>8.3f}"
              f"{row['train_pairs_used']:>11} / {len(train):<4}{row['shortened']:>11}{accuracy:>10}"
              f"{split(row['correct'], False):>7}{split(row['correct'], True):>8}")
    print(f"fits / longer: held-out accuracy on the {len(evaluation) - n_long} pairs that fit in {args.max_length} "
          f"tokens and on the {n_long} that do not")
    for key, row in results.items():
        if row.get("ties"):
            print(f"{NAMES[key]}: {row['ties']} held-out pairs cut to the same text on both sides, each counted as "
                  "half right (a coin flip)")
    if recipe and same:
        print("'plain, same' trains plain TRL on the token ids the service trains on (every pair kept, prompts cut "
              "from the left): the equal-work baseline for the overhead.")
        print(f"overhead, equal work: wall preflab / plain-same {recipe['seconds'] / same['seconds']:.3f}, "
              f"training loop {recipe['train_runtime'] / same['train_runtime']:.3f} (target <= 1.05)")
    if recipe and plain:
        print(f"wall-time ratio preflab / plain TRL, same settings: {recipe['seconds'] / plain['seconds']:.2f}")
        print(f"held-out accuracy: preflab {recipe['accuracy']:.3f} vs plain TRL {plain['accuracy']:.3f} "
              f"on the same {len(evaluation)} pairs and settings")
    if recipe and defaults:
        print(f"held-out accuracy: preflab's defaults {recipe['accuracy']:.3f} vs TRL's {defaults['accuracy']:.3f} "
              f"(wall {recipe['seconds']:.0f} vs {defaults['seconds']:.0f} s)")
    for key in ("plain", "same", "defaults"):
        if recipe and key in results:
            diff, se = paired_difference(recipe["correct"], results[key]["correct"])
            print(f"paired: preflab - {NAMES[key]} = {100 * diff:+.1f} points (standard error {100 * se:.1f}, "
                  f"95% interval {100 * (diff - 1.96 * se):+.1f} to {100 * (diff + 1.96 * se):+.1f}) on the same "
                  f"{len(evaluation)} pairs")
    print()
    return results


def report_seeds(per_seed: dict[int, dict]) -> None:
    """Across seeds: each run's mean accuracy, and the mean of the recipe's per-seed differences against each
    plain run with the standard error of that mean (the seeds' splits overlap, so it is a rough one)."""
    seeds = list(per_seed)
    print(f"over seeds {', '.join(map(str, seeds))}:")
    for key in NAMES:
        accuracies = [per_seed[seed][key]["accuracy"] for seed in seeds if key in per_seed[seed]]
        if accuracies:
            print(f"  {NAMES[key]:<16} mean accuracy {statistics.mean(accuracies):.3f} "
                  f"({' / '.join(f'{value:.3f}' for value in accuracies)})")
    for key in ("plain", "same", "defaults"):
        diffs = [per_seed[seed]["service"]["accuracy"] - per_seed[seed][key]["accuracy"] for seed in seeds
                 if "service" in per_seed[seed] and key in per_seed[seed]]
        if len(diffs) > 1:
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            print(f"  preflab - {NAMES[key]}: mean {100 * statistics.mean(diffs):+.1f} points over {len(diffs)} "
                  f"seeds (standard error {100 * se:.1f})")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    scratch_dir = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    # A scratch SQLite database and artifact folder, unless DATABASE_URL points elsewhere.
    os.environ.setdefault("PREFLAB_VAR_DIR", str(scratch_dir / "var"))
    (scratch_dir / "var").mkdir()
    import django

    django.setup()
    from rewards.training.data import read_preference_file

    with args.data.open("rb") as stream:
        examples, errors = read_preference_file(stream, file_format="hh", limit=args.limit)
    print(f"data: {args.data} | pairs {len(examples)} (bad lines {len(errors)})")
    try:
        per_seed = {seed: run_seed(args, examples, seed, scratch_dir) for seed in args.seeds}
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    if len(per_seed) > 1:
        report_seeds(per_seed)


if __name__ == "__main__":
    main()

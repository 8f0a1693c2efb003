"""`manage.py evaluate_reward_model`: pairwise accuracy of a reward model on a preference file."""
from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

# Bad lines listed in the report; the count covers all of them.
MAX_ERRORS_SHOWN = 20


def resolve_model_folder(target: str) -> Path:
    """The model folder a command-line target names (a path to a saved reward model)."""
    path = Path(target)
    if not (path / "config.json").exists():
        raise CommandError(f"{target} is not a reward model folder (no config.json).")
    return path


class Command(BaseCommand):
    help = ("Scores every pair of a JSONL preference file with a reward model and prints pairwise accuracy, "
            "mean margin and accuracy by prompt length as one JSON object on the last line.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="Folder of a saved reward model.")
        parser.add_argument("file", help="JSONL preference file.")
        parser.add_argument("--format", choices=("hh", "trl"), required=True,
                            help="hh: HH-RLHF transcripts; trl: TRL preference rows.")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--limit", type=int, default=None, help="Evaluate at most this many pairs.")
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")

    def handle(self, *args, model: str, file: str, format: str, batch_size: int, limit: int | None,
               device: str | None, **options) -> None:
        from rewards.scoring import RewardScorer, evaluate_preferences
        from rewards.training.data import read_preference_file

        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        folder = resolve_model_folder(model)
        data = Path(file)
        if not data.is_file():
            raise CommandError(f"{file} does not exist.")
        with data.open("rb") as stream:
            examples, errors = read_preference_file(stream, file_format=format, limit=limit)
        for error in errors[:MAX_ERRORS_SHOWN]:
            self.stderr.write(f"line {error['line']}: {error['error']}")
        if not examples:
            raise CommandError(f"No usable pairs in {file} ({len(errors)} bad lines).")

        scorer = RewardScorer.load(folder, device=device)
        report = evaluate_preferences(scorer, examples, batch_size=batch_size)
        report.update({"model": str(folder), "file": str(data), "format": format, "bad_lines": len(errors),
                       "errors": errors[:MAX_ERRORS_SHOWN], "max_length": scorer.format.max_length,
                       "template": scorer.format.template, "device": scorer.device})
        self.stdout.write(json.dumps(report, sort_keys=True))

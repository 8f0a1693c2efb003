"""`manage.py evaluate_reward_model`: pairwise accuracy of a reward model on a preference file."""
from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from labeling.errors import DomainError
from labeling.models import Project
from rewards.models import RewardModel

# Bad lines listed in the report; the count covers all of them.
MAX_ERRORS_SHOWN = 20


def _exists(path: Path) -> bool:
    """Whether anything is at `path`; a name the file system cannot take (one too long) names nothing."""
    try:
        return path.exists()
    except OSError:
        return False


def resolve_model_folder(target: str) -> Path:
    """The model folder a command-line target names (a path to a saved reward model), checked as registering it
    would check it."""
    from rewards.services import reward_model_folder_check

    path = Path(target)
    if not _exists(path):
        raise CommandError(f"No folder at {target}.")
    if not (path / "config.json").exists():
        raise CommandError(f"{target} is not a reward model folder (no config.json).")
    try:
        reward_model_folder_check(path=path)
    except DomainError as exc:
        raise CommandError(exc.message)
    return path


def resolve_reward_model(model_id: int, *, project_slug: str | None) -> RewardModel:
    """A registered reward model by id; with `project_slug`, it must be one of that project's versions."""
    project = None
    if project_slug is not None:
        project = Project.objects.filter(slug=project_slug).first()
        if project is None:
            raise CommandError(f"No project with slug '{project_slug}'.")
    model = RewardModel.objects.select_related("project").filter(pk=model_id).first()
    if model is None:
        raise CommandError(f"No reward model with id {model_id}.")
    if project is not None and model.project_id != project.pk:
        raise CommandError(f"Reward model {model_id} belongs to project '{model.project.slug}', not "
                           f"'{project.slug}'.")
    if not (Path(model.artifact_path) / "config.json").exists():
        raise CommandError(f"The files of reward model {model_id} (version {model.version} of "
                           f"'{model.project.slug}') are gone: {model.artifact_path} has no config.json.")
    return model


def check_device(device: str | None) -> None:
    """Refuse a --device torch cannot name or this machine does not have, before any model is loaded."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for one GPU of several).")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: this machine has no CUDA GPU; use cpu.")
    if kind == "cuda" and (index := torch.device(device).index) is not None \
            and index >= torch.cuda.device_count():
        raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if kind not in ("cpu", "cuda"):
        raise CommandError(f"--device {device}: use cpu or cuda.")


class Command(BaseCommand):
    help = ("Scores every pair of a JSONL preference file with a reward model and prints pairwise accuracy, "
            "mean margin and accuracy by prompt length as one JSON object on the last line.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="A registered reward model's id (VERSION_ID, as in /api/v1/reward-models/) "
                                          "or the folder of a saved reward model (PATH); write a folder named "
                                          "with digits only as ./NAME.")
        parser.add_argument("file", help="JSONL preference file.")
        parser.add_argument("--format", choices=("hh", "trl"), required=True,
                            help="hh: HH-RLHF transcripts; trl: TRL preference rows.")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--limit", type=int, default=None, help="Evaluate at most this many pairs.")
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
        parser.add_argument("--project", default=None,
                            help="Project slug a VERSION_ID must belong to (checked, so a wrong id is an error).")

    def handle(self, *args, model: str, file: str, format: str, batch_size: int, limit: int | None,
               device: str | None, project: str | None = None, **options) -> None:
        from rewards.scoring import RewardScorer, evaluate_preferences
        from rewards.training.data import read_preference_file

        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        registered = None
        if model.isdigit():
            registered = resolve_reward_model(int(model), project_slug=project)
            folder = Path(registered.artifact_path)
        elif project is not None:
            raise CommandError("--project checks a VERSION_ID; a PATH is evaluated as it is.")
        else:
            folder = resolve_model_folder(model)
        check_device(device)
        data = Path(file)
        if not _exists(data):
            raise CommandError(f"{file} does not exist.")
        if not data.is_file():
            raise CommandError(f"{file} is not a file.")
        try:
            with data.open("rb") as stream:
                examples, errors = read_preference_file(stream, file_format=format, limit=limit)
        except OSError as exc:
            raise CommandError(f"{file} could not be read: {exc.strerror or exc}.")
        for error in errors[:MAX_ERRORS_SHOWN]:
            self.stderr.write(f"line {error['line']}: {error['error']}")
        if not examples:
            raise CommandError(f"No usable pairs in {file} ({len(errors)} bad lines).")

        try:
            scorer = RewardScorer.load(folder, device=device)
        except Exception as exc:  # a folder that passed the checks can still hold files transformers refuses
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CommandError(f"The reward model in {folder} could not be loaded: {reason}")
        report = evaluate_preferences(scorer, examples, batch_size=batch_size)
        report.update({"model": str(folder), "file": str(data), "format": format, "bad_lines": len(errors),
                       "errors": errors[:MAX_ERRORS_SHOWN], "max_length": scorer.format.max_length,
                       "template": scorer.format.template, "device": scorer.device})
        if registered is not None:
            report["reward_model"] = {"id": registered.pk, "version": registered.version,
                                      "project": registered.project.slug}
        self.stdout.write(json.dumps(report, sort_keys=True))

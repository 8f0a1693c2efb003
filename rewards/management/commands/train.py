"""`manage.py train`: start a training run for a project, queued for a worker or (--wait) in the foreground."""
from __future__ import annotations

import contextlib
import json
import socket

from django.core.management.base import BaseCommand, CommandError

from labeling.errors import DomainError
from labeling.models import Project
from rewards.models import TrainingRun
from rewards.progress import TqdmProgressCallback
from rewards.selectors import training_run_produced
from rewards.services import training_run_execute, training_run_interrupt, training_run_start

# Command-line options and the TRL config fields they set.
OPTION_FIELDS = {"epochs": "num_train_epochs", "max_length": "max_length", "batch_size": "per_device_train_batch_size",
                 "learning_rate": "learning_rate", "max_steps": "max_steps"}


class Command(BaseCommand):
    help = ("Train a reward model (or a DPO/RLHF policy) on a project's labels. Without --wait the run is queued "
            "for a worker; with --wait it trains here, shows a progress bar and the training logs on stderr and "
            "prints one JSON object (run, status, artifact, the registered model, eval metrics) on stdout.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="Project slug.")
        parser.add_argument("--kind", default=TrainingRun.Kind.REWARD, choices=TrainingRun.Kind.values)
        parser.add_argument("--base-model", default="", help="Path or id; the embedded default when left out.")
        parser.add_argument("--epochs", type=float)
        parser.add_argument("--max-length", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--learning-rate", type=float)
        parser.add_argument("--max-steps", type=int)
        parser.add_argument("--hyperparameters", default="{}",
                            help="More TRL config fields as a JSON object, e.g. '{\"warmup_ratio\": 0.1}'.")
        parser.add_argument("--eval-fraction", type=float, default=0.1)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--wait", action="store_true", help="Train in this process instead of queueing.")

    def handle(self, *args, **options):
        project = Project.objects.filter(slug=options["project"]).first()
        if project is None:
            raise CommandError(f"No project with slug '{options['project']}'.")
        try:
            hyperparameters = json.loads(options["hyperparameters"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--hyperparameters is not valid JSON: {exc}")
        if not isinstance(hyperparameters, dict):
            raise CommandError("--hyperparameters must be a JSON object.")
        for option, field in OPTION_FIELDS.items():
            if options[option] is not None:
                hyperparameters[field] = options[option]
        try:
            run = training_run_start(project=project, kind=options["kind"], base_model=options["base_model"],
                                     hyperparameters=hyperparameters, eval_fraction=options["eval_fraction"],
                                     seed=options["seed"], queue=not options["wait"])
        except DomainError as exc:
            raise CommandError(_one_line(exc))
        self.stderr.write(f"training run {run.pk}: {run.pair_count} pairs ({run.train_count} train, "
                          f"{run.eval_count} eval), dataset {run.dataset_hash[:12]}")
        interrupted = False
        if options["wait"]:
            # transformers' PrinterCallback and TRL print their log dicts with print(): sent to stderr with the
            # progress bar, so that stdout carries only the JSON line (self.stdout holds the real stdout).
            try:
                with contextlib.redirect_stdout(self.stderr._out):
                    run = training_run_execute(run_id=run.pk, worker=f"cli@{socket.gethostname()}",
                                               callbacks=[TqdmProgressCallback(stream=self.stderr._out)])
            except KeyboardInterrupt:
                run = training_run_interrupt(run_id=run.pk) or run
                interrupted = True
        self.stdout.write(json.dumps({"run": run.pk, "status": run.status, "artifact": run.artifact_path or None,
                                      "produced": training_run_produced(run=run),
                                      "eval_metrics": run.eval_metrics, "error": run.error or None}))
        if interrupted:
            raise CommandError(f"training run {run.pk} was interrupted; it is {run.status}.")
        if run.status == TrainingRun.Status.FAILED:
            raise CommandError(f"training run {run.pk} failed: {_flat(run.error)}")
        if options["wait"] and run.status == TrainingRun.Status.CANCELLED:
            # Cancelled from the API or the dashboard while it trained here: no model came of it.
            raise CommandError(f"training run {run.pk} was cancelled; no model was registered.")


def _flat(text: str) -> str:
    return " ".join(text.split()) if text else "no reason recorded"


def _one_line(exc: DomainError) -> str:
    """A refusal as one line: a hyperparameter's message is a fragment that follows its name; any other names its
    field after it."""
    if exc.field and exc.field.startswith("hyperparameters."):
        return f"{exc.field}: {exc.message}"
    return f"{exc.message} ({exc.field})" if exc.field else exc.message

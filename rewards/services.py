"""Writes of training runs and the model registry: submit, execute, cancel, fail, recover, register, deploy.

Queueing a run. `training_run_start` commits the run as `queued` and publishes its task in the same request,
after the commit (`transaction.on_commit`), so a worker never sees a run id before its row exists. If the
broker refuses the message, the run is marked `failed` with the reason and the caller gets a 503: the user is
never told a run was accepted that no worker will pick up, and the row keeps a record of the attempt.

Lost workers. The training task is acked late and requeued when its worker dies, but a requeued message finds
the run `running` and leaves it (the status guard). `training_runs_recover_stale` marks such runs failed once
their heartbeat is older than PREFLAB["TRAINING_STALE_MINUTES"]; the worker runs it when it starts
(`worker_ready`) and Celery beat runs it every few minutes (see worker/celery.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone
from kombu.exceptions import OperationalError

from labeling.errors import Conflict, DomainError, ServiceUnavailable
from labeling.models import Project
from labeling.selectors import PreferenceRow, preference_rows
from rewards.models import Policy, RewardModel, RewardModelDeployment, TrainingRun

logger = logging.getLogger(__name__)

# Publishing gives up quickly: the user is waiting on the HTTP response.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


# --- recipes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    defaults: dict[str, Any]
    validate: Callable[[dict[str, Any]], Any]
    train: Callable[..., Any]
    default_base_model: Callable[[], Any]


def _recipe(kind: str) -> Recipe:
    """The training recipe of a kind, imported on use: torch and TRL load only where training happens."""
    from rewards import embedded

    if kind == TrainingRun.Kind.REWARD:
        from rewards.training import reward

        return Recipe(reward.REWARD_DEFAULTS, reward.validate_reward_hyperparameters, reward.train_reward_model,
                      embedded.minilm_path)
    if kind == TrainingRun.Kind.DPO:
        from rewards.training import dpo

        return Recipe(dpo.DPO_DEFAULTS, dpo.validate_dpo_hyperparameters, dpo.train_dpo, embedded.smollm2_path)
    if kind == TrainingRun.Kind.RLHF:
        from rewards.training import rlhf

        return Recipe(rlhf.RLHF_DEFAULTS, rlhf.validate_rlhf_hyperparameters, rlhf.train_rlhf,
                      embedded.smollm2_path)
    raise DomainError(f"Unknown training kind '{kind}'; use one of {', '.join(TrainingRun.Kind.values)}.",
                      field="kind")


def training_hyperparameters_validate(*, kind: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Check the hyperparameters with the recipe's own validator (TRL config field names); a bad one becomes a
    400 naming the field."""
    from rewards.training.common import HyperparameterError

    recipe = _recipe(kind)
    if not isinstance(hyperparameters, dict):
        raise DomainError("hyperparameters must be an object of TRL config fields.", field="hyperparameters")
    try:
        validated = recipe.validate(dict(hyperparameters))
    except HyperparameterError as exc:
        field = f"hyperparameters.{exc.field}" if exc.field else "hyperparameters"
        raise DomainError(exc.message, field=field, code="invalid_hyperparameter")
    return dict(hyperparameters) if validated is None else dict(validated)


# --- the dataset snapshot -------------------------------------------------------------------------------


def _rows_hash(rows: Sequence[PreferenceRow]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps([row.pair_id, row.prompt, row.chosen, row.rejected, row.margin], sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _example(row: PreferenceRow):
    from rewards.training.data import PreferenceExample

    return PreferenceExample(prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, margin=row.margin)


def _split(rows: list[PreferenceRow], *, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Pair ids of the train and eval sides, split by prompt by the recipes' own splitter."""
    from rewards.training.data import split_by_prompt

    examples = [_example(row) for row in rows]
    pair_of = {id(example): row.pair_id for example, row in zip(examples, rows, strict=True)}
    train, held_out = split_by_prompt(examples, eval_fraction=eval_fraction, seed=seed)
    return [pair_of[id(e)] for e in train], [pair_of[id(e)] for e in held_out]


# --- submit ---------------------------------------------------------------------------------------------


def training_run_start(*, project: Project, kind: str, created_by: AbstractBaseUser | None = None,
                       base_model: str = "", hyperparameters: dict[str, Any] | None = None,
                       eval_fraction: float = 0.1, seed: int = 0, queue: bool = True) -> TrainingRun:
    """Validate, snapshot the project's decided pairs, create the run and (with `queue`) publish its task.

    Raises DomainError (400) for bad input or an empty dataset and ServiceUnavailable (503) when the broker
    cannot take the task, in which case the run is left `failed` with the reason.
    """
    run = _training_run_create(project=project, kind=kind, created_by=created_by, base_model=base_model.strip(),
                               hyperparameters=hyperparameters or {}, eval_fraction=eval_fraction, seed=seed)
    if queue:
        transaction.on_commit(lambda: _training_run_publish(run=run))
    return run


@transaction.atomic
def _training_run_create(*, project: Project, kind: str, created_by: AbstractBaseUser | None, base_model: str,
                         hyperparameters: dict[str, Any], eval_fraction: float, seed: int) -> TrainingRun:
    if kind not in TrainingRun.Kind.values:
        raise DomainError(f"Unknown training kind '{kind}'; use one of {', '.join(TrainingRun.Kind.values)}.",
                          field="kind")
    if not 0.0 <= eval_fraction < 1.0:
        raise DomainError("eval_fraction must be at least 0 and below 1.", field="eval_fraction")
    validated = training_hyperparameters_validate(kind=kind, hyperparameters=hyperparameters)
    reward_model = None
    if kind != TrainingRun.Kind.REWARD:
        reward_model = RewardModel.objects.filter(project=project, is_deployed=True).first()
        if kind == TrainingRun.Kind.RLHF and reward_model is None:
            raise DomainError("RLHF trains against the project's deployed reward model, and none is deployed.",
                              field="kind", code="no_reward_model")

    rows = list(preference_rows(project=project))
    if not rows:
        raise DomainError(f"Project '{project.slug}' has no decided pairs to train on: label some pairs first "
                          "(ties, both-bad and gold pairs are not training data).", field="project",
                          code="empty_dataset")
    train_ids, eval_ids = _split(rows, eval_fraction=eval_fraction, seed=seed)
    if not train_ids:
        raise DomainError("The split left no pairs to train on; lower eval_fraction or add prompts.",
                          field="eval_fraction", code="empty_dataset")
    comparison_ids = sorted(cid for row in rows for cid in row.comparison_ids)
    return TrainingRun.objects.create(
        project=project, kind=kind, base_model=base_model, hyperparameters=validated, created_by=created_by,
        export_policy=TrainingRun.ExportPolicy.MAJORITY, comparison_ids=comparison_ids, dataset_hash=_rows_hash(rows),
        split_seed=seed, eval_fraction=eval_fraction, train_pair_ids=train_ids, eval_pair_ids=eval_ids,
        pair_count=len(rows), train_count=len(train_ids), eval_count=len(eval_ids), reward_model=reward_model,
    )


def _training_run_publish(*, run: TrainingRun) -> None:
    from worker.celery import app
    from worker.tasks import training_run_execute as execute_task

    try:
        # A fresh connection per submission: runs are rare and this reads the broker settings every time.
        with app.connection_for_write() as connection:
            execute_task.apply_async(args=[run.pk], connection=connection, retry=True,
                                     retry_policy=PUBLISH_RETRY_POLICY)
    except (OperationalError, OSError) as exc:
        logger.warning("could not queue training run %s: %s", run.pk, exc)
        training_run_fail(run_id=run.pk, error=f"Could not be queued: the task broker is unreachable ({exc}).")
        raise ServiceUnavailable("The training queue is unreachable right now; the run was not started. "
                                 "Try again in a moment.")


# --- execute --------------------------------------------------------------------------------------------


def _snapshot_rows(run: TrainingRun) -> list[PreferenceRow]:
    rows = list(preference_rows(project=run.project, comparison_ids=run.comparison_ids))
    if _rows_hash(rows) != run.dataset_hash:
        raise DomainError("The labels this run was submitted with have changed (comparisons deleted or edited); "
                          "start a new run.", code="dataset_changed")
    return rows


def _output_dir(run: TrainingRun) -> Path:
    return Path(settings.PREFLAB["ARTIFACTS_DIR"]) / "runs" / str(run.pk)


def _lineage(run: TrainingRun, *, base_model: str, result: Any) -> dict[str, Any]:
    return {
        "training_run": run.pk, "kind": run.kind, "base_model": base_model, "hyperparameters": run.hyperparameters,
        "dataset_hash": run.dataset_hash, "export_policy": run.export_policy, "split_seed": run.split_seed,
        "eval_fraction": run.eval_fraction, "pair_count": run.pair_count,
        "train_pairs": getattr(result, "train_pairs", run.train_count),
        "eval_pairs": getattr(result, "eval_pairs", run.eval_count),
        "shortened_pairs": getattr(result, "shortened_pairs", 0),
        "reward_model": run.reward_model_id,
    }


def _claim(*, run_id: int, worker: str) -> bool:
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED, cancel_requested=False).update(
        status=TrainingRun.Status.RUNNING, started_at=now, heartbeat_at=now, worker_hostname=worker[:255],
    )
    return bool(claimed)


def training_run_execute(*, run_id: int, worker: str = "", callbacks: Iterable[Any] = ()) -> TrainingRun | None:
    """Train a queued run to the end. Safe to call again: only a `queued` run is claimed, so a redelivered
    task or a second worker leaves a running or finished run alone. Returns the run, or None if it is gone."""
    if not _claim(run_id=run_id, worker=worker or _hostname()):
        run = TrainingRun.objects.filter(pk=run_id).first()
        if run is None:
            logger.warning("training run %s no longer exists; nothing to do", run_id)
        else:
            logger.info("training run %s is %s; not starting it again", run_id, run.status)
        return run

    run = TrainingRun.objects.select_related("project", "reward_model").get(pk=run_id)
    # Imported here: it pulls in transformers, which the web process should not load to serve pages.
    from rewards.progress import RunProgressCallback

    progress = RunProgressCallback(run_id=run.pk)
    output_dir = _output_dir(run)
    try:
        rows = _snapshot_rows(run)
        recipe = _recipe(run.kind)
        base_model = run.base_model or str(recipe.default_base_model())
        metadata = {"preflab_training_run": run.pk, "project": run.project.slug, "dataset_hash": run.dataset_hash}
        all_callbacks = [progress, *callbacks]
        if run.kind == TrainingRun.Kind.RLHF:
            train_ids = set(run.train_pair_ids)
            prompts = list({json.dumps(row.prompt, sort_keys=True): row.prompt
                            for row in rows if row.pair_id in train_ids}.values())
            result = recipe.train(base_model=base_model, prompts=prompts,
                                  reward_model_path=run.reward_model.artifact_path, output_dir=output_dir,
                                  hyperparameters=run.hyperparameters, callbacks=all_callbacks, metadata=metadata)
        else:
            by_pair = {row.pair_id: row for row in rows}
            train = [_example(by_pair[pk]) for pk in run.train_pair_ids]
            held_out = [_example(by_pair[pk]) for pk in run.eval_pair_ids]
            kwargs: dict[str, Any] = {}
            if run.kind == TrainingRun.Kind.DPO and run.reward_model is not None:
                kwargs["judge_path"] = run.reward_model.artifact_path
            result = recipe.train(base_model=base_model, train=train, eval=held_out, output_dir=output_dir,
                                  hyperparameters=run.hyperparameters, callbacks=all_callbacks, metadata=metadata,
                                  **kwargs)
    except Exception as exc:
        logger.exception("training run %s failed", run.pk)
        message = exc.message if isinstance(exc, DomainError) else f"{type(exc).__name__}: {exc}"
        training_run_fail(run_id=run.pk, error=message, details=traceback.format_exc(limit=8))
        return TrainingRun.objects.get(pk=run.pk)

    if progress.cancelled or TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists():
        TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
            status=TrainingRun.Status.CANCELLED, finished_at=timezone.now(), eta_seconds=None,
            metrics_history=progress.history or list(getattr(result, "history", [])),
        )
        shutil.rmtree(output_dir, ignore_errors=True)
        return TrainingRun.objects.get(pk=run.pk)
    return _training_run_succeed(run=run, result=result, base_model=base_model, history=progress.history)


def _hostname() -> str:
    import socket

    return socket.gethostname()


@transaction.atomic
def _training_run_succeed(*, run: TrainingRun, result: Any, base_model: str,
                          history: list[dict[str, Any]]) -> TrainingRun:
    Project.objects.select_for_update().filter(pk=run.project_id).first()
    metrics = {key: _json_value(value) for key, value in dict(result.metrics or {}).items()}
    updated = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
        status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now(), heartbeat_at=timezone.now(),
        eta_seconds=None, eval_metrics=metrics, artifact_path=str(result.artifact),
        metrics_history=history or [_json_dict(entry) for entry in (result.history or [])],
    )
    run.refresh_from_db()
    if not updated:
        # Recovery or an operator finished the run while it trained; its files are left but not registered.
        logger.warning("training run %s finished as %s while it trained; not registering it", run.pk, run.status)
        return run
    fields = {"project": run.project, "training_run": run, "artifact_path": str(result.artifact),
              "base_model": base_model, "metrics": metrics, "created_by": run.created_by,
              "lineage": {**_lineage(run, base_model=base_model, result=result),
                          "extra": _json_dict(getattr(result, "extra", {}) or {})}}
    if run.kind == TrainingRun.Kind.REWARD:
        RewardModel.objects.create(version=_next_version(RewardModel, run.project), **fields)
    else:
        Policy.objects.create(version=_next_version(Policy, run.project), kind=run.kind, **fields)
    return run


def _json_value(value: Any) -> Any:
    """A metric as JSON can hold it; NaN and infinities (a diverged loss) become None."""
    try:
        return json.loads(json.dumps(value, default=str, allow_nan=False))
    except ValueError:
        return None


def _json_dict(entry: dict[str, Any]) -> dict[str, Any]:
    return {str(key): _json_value(value) for key, value in entry.items()}


def _next_version(model: type[RewardModel] | type[Policy], project: Project) -> int:
    """The next version number; the caller holds the project's row lock so two runs never take the same one."""
    return (model.objects.filter(project=project).aggregate(top=Max("version"))["top"] or 0) + 1


# --- cancel, fail, recover ------------------------------------------------------------------------------


@transaction.atomic
def training_run_cancel(*, run: TrainingRun) -> TrainingRun:
    """A queued run is cancelled at once; a running one is asked to stop at its next log step."""
    now = timezone.now()
    if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
            status=TrainingRun.Status.CANCELLED, cancel_requested=True, finished_at=now):
        run.refresh_from_db()
        return run
    if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(cancel_requested=True):
        run.refresh_from_db()
        return run
    run.refresh_from_db()
    raise Conflict(f"Run {run.pk} is already {run.status}; only queued or running runs can be cancelled.",
                   field="status", code="not_cancellable")


def training_run_fail(*, run_id: int, error: str, details: str = "") -> TrainingRun | None:
    """Mark an unfinished run failed with the reason; a finished run is left as it is."""
    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    fields: dict[str, Any] = {"status": TrainingRun.Status.FAILED, "error": error[:10000],
                              "finished_at": timezone.now(), "eta_seconds": None}
    if details:
        fields["log_tail"] = "\n".join(filter(None, [run.log_tail, details]))[-20000:]
    TrainingRun.objects.filter(pk=run_id, status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]) \
        .update(**fields)
    run.refresh_from_db()
    return run


def training_runs_recover_stale(*, older_than: timedelta | None = None) -> int:
    """Fail running runs whose worker stopped writing heartbeats; returns how many were failed."""
    if older_than is None:
        older_than = timedelta(minutes=int(settings.PREFLAB["TRAINING_STALE_MINUTES"]))
    cutoff = timezone.now() - older_than
    recovered = 0
    stale = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff)
    for run_id, heartbeat, worker in stale.values_list("id", "heartbeat_at", "worker_hostname"):
        updated = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING,
                                             heartbeat_at__lt=cutoff).update(
            status=TrainingRun.Status.FAILED, finished_at=timezone.now(), eta_seconds=None,
            error=f"worker lost (no heartbeat since {heartbeat.isoformat()} from {worker or 'unknown worker'})",
        )
        recovered += updated
    return recovered


# --- the registry ---------------------------------------------------------------------------------------


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _import_allowed(path: Path) -> bool:
    roots = [Path(root).resolve() for root in settings.PREFLAB["MODEL_IMPORT_DIRS"]]
    roots.append(Path(settings.PREFLAB["ARTIFACTS_DIR"]).resolve())
    return any(path == root or root in path.parents for root in roots)


def reward_model_folder_check(*, path: str | Path) -> Any:
    """Check that a folder holds a sequence-classification model with a single output; return its config."""
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DomainError(f"No folder at '{path}'.", field="path", code="not_found")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DomainError(f"'{path}' has no readable model config (config.json): {exc}", field="path")
    if config.num_labels != 1:
        raise DomainError(f"A reward model has 1 output label; '{path}' has {config.num_labels}.", field="path",
                          code="not_a_reward_model")
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise DomainError(f"'{path}' is a {architectures[0]}, not a sequence-classification model.", field="path",
                          code="not_a_reward_model")
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        raise DomainError(f"'{path}' has no weights (model.safetensors or pytorch_model.bin).", field="path")
    return config


def reward_model_register(*, project: Project, path: str | Path, created_by: AbstractBaseUser | None = None,
                          restrict_to_import_dirs: bool = False, deploy: bool = False) -> RewardModel:
    """Register a reward model trained elsewhere as the project's next version. The folder is referenced in
    place, not copied; `restrict_to_import_dirs` (the API) only accepts folders under the configured roots."""
    folder = Path(path).expanduser().resolve()
    if restrict_to_import_dirs and not _import_allowed(folder):
        raise DomainError(f"'{path}' is outside the folders models may be registered from "
                          "(PREFLAB_MODEL_IMPORT_DIRS).", field="path", code="path_not_allowed")
    config = reward_model_folder_check(path=folder)
    base_model = str(getattr(config, "_name_or_path", "") or "")
    with transaction.atomic():
        Project.objects.select_for_update().filter(pk=project.pk).first()
        model = RewardModel.objects.create(
            project=project, version=_next_version(RewardModel, project), artifact_path=str(folder),
            base_model=base_model, created_by=created_by,
            lineage={"source": "registered", "path": str(folder), "model_type": config.model_type,
                     "architectures": list(getattr(config, "architectures", None) or [])},
        )
        if deploy:
            model = reward_model_deploy(reward_model=model, deployed_by=created_by)
    return model


@transaction.atomic
def reward_model_deploy(*, reward_model: RewardModel, deployed_by: AbstractBaseUser | None = None) -> RewardModel:
    """Make this version the project's one deployed reward model; the switch is logged."""
    Project.objects.select_for_update().filter(pk=reward_model.project_id).first()
    current = RewardModel.objects.filter(project_id=reward_model.project_id, is_deployed=True).first()
    if current is not None and current.pk == reward_model.pk:
        return current
    if not Path(reward_model.artifact_path).is_dir():
        raise DomainError(f"The files of version {reward_model.version} are gone ({reward_model.artifact_path}).",
                          field="reward_model", code="artifact_missing")
    if current is not None:
        RewardModel.objects.filter(pk=current.pk).update(is_deployed=False)
    now = timezone.now()
    RewardModel.objects.filter(pk=reward_model.pk).update(is_deployed=True, deployed_at=now)
    RewardModelDeployment.objects.create(project_id=reward_model.project_id, reward_model=reward_model,
                                         previous=current, deployed_by=deployed_by)
    reward_model.refresh_from_db()
    return reward_model

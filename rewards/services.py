"""Writes of training runs and the model registry: submit, execute, cancel, fail, recover, register, deploy.

Queueing a run. `training_run_start` commits the run as `queued` and publishes its task in the same request,
after the commit (`transaction.on_commit`), so a worker never sees a run id before its row exists. If the
broker refuses the message, the run is marked `failed` with the reason and the caller gets a 503: the user is
never told a run was accepted that no worker will pick up, and the row keeps a record of the attempt.

Lost workers. A run records the process training it (host, PID namespace, pid) and the attempt, and that
process writes a heartbeat from a thread of its own every PREFLAB["TRAINING_HEARTBEAT_SECONDS"]. A running
run is lost when its process was on this machine and is gone, when three beats were missed, or (whatever
wrote it) after PREFLAB["TRAINING_STALE_MINUTES"] without a heartbeat. `training_runs_recover_stale` finds lost
runs when a worker starts (`worker_ready`) and every minute (Celery beat, see worker/celery.py); a requeued
task of a dead pool process finds its run in `training_run_execute`. A lost run with a complete checkpoint and
attempts left (PREFLAB["TRAINING_MAX_ATTEMPTS"]) is queued again and resumes from the checkpoint with the same
dataset snapshot; any other is failed with the reason. Every write of an attempt is conditional on the run
still running as that attempt, so a process that was given up for lost cannot overwrite its successor.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Max
from django.db.models.functions import Coalesce
from django.utils import timezone
from kombu.exceptions import OperationalError

from labeling.errors import Conflict, DomainError, ServiceUnavailable
from labeling.models import Project
from labeling.selectors import PreferenceRow, preference_rows
from rewards.models import (
    RERANK_LATENCY_BOUNDS_MS,
    RERANK_LATENCY_FIELDS,
    Policy,
    RerankMinute,
    RewardModel,
    RewardModelDeployment,
    TrainingRun,
)
from rewards.training.common import (
    CHECKPOINT_PREFIX,
    EMBEDDED_BASE_MODELS,
    HyperparameterError,
    TrainingCancelled,
    base_model_check,
    base_model_label,
    checkpoint_step,
    latest_checkpoint,
    policy_length_check,
    policy_model_problem,
    resolve_base_model,
)

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
    default_base_name: str
    # Refuses lengths past the base model's positions at submission (HyperparameterError naming the field).
    length_check: Callable[..., None] = lambda **kwargs: None


def _recipe(kind: str) -> Recipe:
    """The training recipe of a kind, imported on use: torch and TRL load only where training happens."""
    from rewards import embedded

    if kind == TrainingRun.Kind.REWARD:
        from rewards.training import reward

        return Recipe(reward.REWARD_DEFAULTS, reward.validate_reward_hyperparameters, reward.train_reward_model,
                      embedded.minilm_path, "minilm", reward.reward_length_check)
    if kind == TrainingRun.Kind.DPO:
        from rewards.training import dpo

        return Recipe(dpo.DPO_DEFAULTS, dpo.validate_dpo_hyperparameters, dpo.train_dpo, embedded.smollm2_path,
                      "smollm2", functools.partial(policy_length_check, dpo.dpo_lengths_fit))
    if kind == TrainingRun.Kind.RLHF:
        from rewards.training import rlhf

        return Recipe(rlhf.RLHF_DEFAULTS, rlhf.validate_rlhf_hyperparameters, rlhf.train_rlhf,
                      embedded.smollm2_path, "smollm2", functools.partial(policy_length_check, rlhf.rlhf_lengths_fit))
    raise DomainError(f"Unknown training kind '{kind}'; use one of {', '.join(TrainingRun.Kind.values)}.",
                      field="kind")


def training_hyperparameters_validate(*, kind: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Check the hyperparameters with the recipe's own validator (TRL config field names); a bad one becomes a
    400 naming the field."""
    recipe = _recipe(kind)
    if not isinstance(hyperparameters, dict):
        raise DomainError("hyperparameters must be an object of TRL config fields.", field="hyperparameters")
    try:
        validated = recipe.validate(dict(hyperparameters))
    except HyperparameterError as exc:
        field = f"hyperparameters.{exc.field}" if exc.field else "hyperparameters"
        # Named in the message too, as the API's other validation errors are: a log line may show only the message.
        raise DomainError(f"{field}: {exc.message}", field=field, code="invalid_hyperparameter")
    return dict(hyperparameters) if validated is None else dict(validated)


def training_base_model_validate(*, base_model: str) -> None:
    """Check the base model with the check the worker's resolver makes (an embedded model's name or a local
    model folder; nothing is downloaded), so that a bad one is a 400 naming `base_model` at submission instead
    of a run that fails in the worker."""
    try:
        base_model_check(base_model)
    except HyperparameterError as exc:
        raise DomainError(exc.message, field="base_model", code="invalid_base_model")
    except OSError as exc:  # a name too long for the file system, a folder this process may not read
        raise DomainError(f"{base_model} cannot be read as a model folder: {exc.strerror or exc}.",
                          field="base_model", code="invalid_base_model")


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
                       eval_fraction: float = 0.1, seed: int = 0, queue: bool = True,
                       restrict_to_import_dirs: bool = False) -> TrainingRun:
    """Validate, snapshot the project's decided pairs, create the run and (with `queue`) publish its task.
    `restrict_to_import_dirs` (the API and the dashboard) takes a base-model folder only from the configured import
    folders or this project's own runs, as registering does.

    Raises DomainError (400) for bad input or an empty dataset and ServiceUnavailable (503) when the broker
    cannot take the task, in which case the run is left `failed` with the reason.
    """
    run = _training_run_create(project=project, kind=kind, created_by=created_by, base_model=base_model.strip(),
                               hyperparameters=hyperparameters or {}, eval_fraction=eval_fraction, seed=seed,
                               restrict_to_import_dirs=restrict_to_import_dirs)
    if queue:
        transaction.on_commit(lambda: _training_run_publish(run=run))
    return run


IDEMPOTENCY_KEY_MAX = 255
SEED_MAX = 2**31 - 1


def training_run_start_once(*, project: Project, idempotency_key: str, kind: str, base_model: str = "",
                            hyperparameters: dict[str, Any] | None = None, eval_fraction: float = 0.1, seed: int = 0,
                            created_by: AbstractBaseUser | None = None, queue: bool = True,
                            restrict_to_import_dirs: bool = False) -> tuple[TrainingRun, bool]:
    """`training_run_start` for a client that may send the same submission again (a retry after a timeout, a
    second click): the first submission with `idempotency_key` starts a run, and every later one with the same key
    in the project returns that run instead of queuing another. Returns (run, created).

    A key sent again with other settings is a 409: it names a request, and that is not the same request. A run
    whose task could not be queued (the 503) gives its key back, so the retry starts it afresh."""
    if not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_MAX or not all(
            "!" <= char <= "~" for char in idempotency_key):
        raise DomainError(f"Idempotency-Key is 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters (a UUID, say).",
                          field="Idempotency-Key")
    request = {"kind": kind, "base_model": base_model.strip(), "eval_fraction": float(eval_fraction),
               "seed": int(seed), "hyperparameters": hyperparameters or {}}
    existing = TrainingRun.objects.filter(project=project, idempotency_key=idempotency_key).first()
    if existing is None:
        try:
            run = _training_run_create(project=project, created_by=created_by, idempotency_key=idempotency_key,
                                       restrict_to_import_dirs=restrict_to_import_dirs, **request)
        except IntegrityError:
            # The same key sent twice at once: both missed the lookup, and the unique constraint let one in.
            existing = TrainingRun.objects.filter(project=project, idempotency_key=idempotency_key).first()
            if existing is None:
                raise
        else:
            if queue:
                transaction.on_commit(lambda: _training_run_publish(run=run))
            return run, True
    if not _same_submission(existing, **request):
        raise Conflict("This Idempotency-Key was already used for a run with other settings "
                       f"(run {existing.pk}); send a new key for a new run.", field="Idempotency-Key",
                       code="idempotency_key_reused")
    return existing, False


def _same_submission(run: TrainingRun, *, kind: str, base_model: str, eval_fraction: float, seed: int,
                     hyperparameters: dict[str, Any]) -> bool:
    if (run.kind, run.base_model, run.eval_fraction, run.split_seed) != (kind, base_model, eval_fraction, seed):
        return False
    try:  # compared as stored: validated, with the recipe's defaults filled in
        return training_hyperparameters_validate(kind=kind, hyperparameters=hyperparameters) == run.hyperparameters
    except DomainError:
        return False


@transaction.atomic
def _training_run_create(*, project: Project, kind: str, created_by: AbstractBaseUser | None, base_model: str,
                         hyperparameters: dict[str, Any], eval_fraction: float, seed: int,
                         idempotency_key: str = "", restrict_to_import_dirs: bool = False) -> TrainingRun:
    if kind not in TrainingRun.Kind.values:
        raise DomainError(f"Unknown training kind '{kind}'; use one of {', '.join(TrainingRun.Kind.values)}.",
                          field="kind")
    if not 0.0 <= eval_fraction < 1.0:
        raise DomainError("eval_fraction must be at least 0 and below 1.", field="eval_fraction")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        # The API's bounds, for every caller (`train --seed`): the run stores it in a 32-bit column.
        raise DomainError(f"seed must be a whole number from 0 to {SEED_MAX}.", field="seed")
    if restrict_to_import_dirs and base_model and base_model.lower() not in EMBEDDED_BASE_MODELS \
            and not ((folder := _absolute(base_model)) and _import_allowed(folder, project=project)):
        # Checked before the folder is looked at, so the answer tells nothing about what else is on the server.
        raise DomainError(f"{base_model} is neither an embedded model (minilm, smollm2) nor a folder under "
                          "PREFLAB_MODEL_IMPORT_DIRS or in one of this project's runs; models are not downloaded.",
                          field="base_model", code="invalid_base_model")
    training_base_model_validate(base_model=base_model)
    validated = training_hyperparameters_validate(kind=kind, hyperparameters=hyperparameters)
    try:
        # A length past the base model's positions (max_length; a policy's generated tokens too): a GPT-2-style
        # model fails with an index error hours into the run, a rotary one trains on text it was not built for.
        _recipe(kind).length_check(base_model=base_model, hyperparameters=validated)
    except HyperparameterError as exc:
        raise DomainError(f"hyperparameters.{exc.field}: {exc.message}", field=f"hyperparameters.{exc.field}",
                          code="invalid_hyperparameter")
    reward_model = None
    if kind != TrainingRun.Kind.REWARD:
        reward_model = RewardModel.objects.filter(project=project, is_deployed=True).first()
        if kind == TrainingRun.Kind.RLHF and reward_model is None:
            raise DomainError("RLHF trains against the project's deployed reward model, and none is deployed.",
                              field="kind", code="no_reward_model")
        if reward_model is not None:
            # RLHF's reward and DPO's judge: files gone since the deploy would fail the run once it had trained.
            try:
                reward_model_folder_check(path=reward_model.artifact_path)
            except DomainError as exc:
                raise DomainError(f"The project's deployed reward model (version {reward_model.version}) cannot be "
                                  f"loaded: {exc.message} Deploy another version.", field="kind",
                                  code="artifact_missing") from exc

    rows = list(preference_rows(project=project))
    if not rows:
        raise DomainError(f"Project '{project.slug}' has no decided pairs to train on: label some pairs first "
                          "(ties, both-bad and split votes are not training data).", field="project",
                          code="empty_dataset")
    if kind != TrainingRun.Kind.REWARD:
        problem = policy_model_problem(base_model, conversational=any(isinstance(row.prompt, list) for row in rows))
        if problem:
            raise DomainError(f"{problem}.", field="base_model", code="invalid_base_model")
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
        idempotency_key=idempotency_key,
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
        # The client is told the run was not started: its retry with the same Idempotency-Key starts a new one.
        TrainingRun.objects.filter(pk=run.pk).update(idempotency_key="")
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


def training_run_checkpoint_dir(*, run: TrainingRun) -> Path:
    """Where the run's trainer keeps its latest checkpoint: outside the artifact, removed when the run ends."""
    return Path(settings.PREFLAB["ARTIFACTS_DIR"]) / "checkpoints" / str(run.pk)


def _lineage(run: TrainingRun, *, base_model: str, base_model_path: str, result: Any) -> dict[str, Any]:
    return {
        "training_run": run.pk, "kind": run.kind, "base_model": base_model, "base_model_path": base_model_path,
        "hyperparameters": run.hyperparameters,
        "dataset_hash": run.dataset_hash, "export_policy": run.export_policy, "split_seed": run.split_seed,
        "eval_fraction": run.eval_fraction, "pair_count": run.pair_count,
        "train_pairs": getattr(result, "train_pairs", run.train_count),
        "eval_pairs": getattr(result, "eval_pairs", run.eval_count),
        "shortened_pairs": getattr(result, "shortened_pairs", 0),
        "reward_model": run.reward_model_id,
    }


def _claim(*, run_id: int, worker: str) -> int | None:
    """Take a queued run for this process; returns the attempt it starts, or None if the run is not queued."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED, cancel_requested=False).update(
        status=TrainingRun.Status.RUNNING, started_at=Coalesce(F("started_at"), now), heartbeat_at=now,
        worker_hostname=worker[:255], worker_host=_this_host(), worker_pid=os.getpid(), attempts=F("attempts") + 1,
    )
    if not claimed:
        return None
    return TrainingRun.objects.filter(pk=run_id).values_list("attempts", flat=True).first()


def training_run_execute(*, run_id: int, worker: str = "", callbacks: Iterable[Any] = ()) -> TrainingRun | None:
    """Train a queued run to the end; a run queued again after its worker was lost resumes from its latest
    checkpoint. Safe to call again: only a `queued` run is claimed, so a redelivered task or a second worker
    leaves a running or finished run alone, except that a running run whose worker is gone is recovered (see
    training_run_recover_lost). Returns the run, or None if it is gone."""
    attempt = _claim(run_id=run_id, worker=worker or _hostname())
    if attempt is None:
        run = TrainingRun.objects.filter(pk=run_id).first()
        if run is None:
            logger.warning("training run %s no longer exists; nothing to do", run_id)
            return None
        reason = _lost_reason(run) if run.status == TrainingRun.Status.RUNNING else None
        if reason is None:
            logger.info("training run %s is %s; not starting it again", run_id, run.status)
            return run
        # Celery requeues the task of a pool process that died (reject_on_worker_lost): recover the run now
        # instead of at the next sweep.
        training_run_recover_lost(run=run, reason=reason)
        run.refresh_from_db()
        return run

    run = TrainingRun.objects.select_related("project", "reward_model").get(pk=run_id)
    # Imported here: it pulls in transformers, which the web process should not load to serve pages.
    from rewards.progress import CheckpointSpacing, RunHeartbeat, RunProgressCallback

    output_dir = _output_dir(run)
    checkpoint_dir = training_run_checkpoint_dir(run=run)
    try:
        resume_from, history, log_lines = _attempt_prepare(run=run, output_dir=output_dir,
                                                           checkpoint_dir=checkpoint_dir)
    except Exception as exc:
        logger.exception("training run %s could not be prepared", run.pk)
        return training_run_fail(run_id=run.pk, error=f"The run could not be prepared: {type(exc).__name__}: {exc}",
                                 attempt=attempt)
    # A folder this attempt makes holds nothing but its own partial artifact if it fails; one that was there before
    # (another database's run under the same id) is not this run's to remove.
    fresh_output = not output_dir.exists()
    progress = RunProgressCallback(run_id=run.pk, attempt=attempt, history=history, log_lines=log_lines)
    heartbeat = RunHeartbeat(run_id=run.pk, attempt=attempt, on_lost=progress.mark_lost,
                             interval=float(settings.PREFLAB["TRAINING_HEARTBEAT_SECONDS"]))
    # Inside an outer transaction the claimed row is not committed, so no other connection could write to it.
    if not transaction.get_connection().in_atomic_block:
        heartbeat.start()
    try:
        rows = _snapshot_rows(run)
        recipe = _recipe(run.kind)
        # Checked again: the folder was there at submission but may have gone since.
        base_model = str(resolve_base_model(run.base_model, default=recipe.default_base_model))
        metadata = {"preflab_training_run": run.pk, "project": run.project.slug, "dataset_hash": run.dataset_hash}
        spacing = CheckpointSpacing(min_seconds=float(settings.PREFLAB["TRAINING_CHECKPOINT_MIN_SECONDS"]))
        common: dict[str, Any] = {"output_dir": output_dir, "hyperparameters": run.hyperparameters,
                                  "callbacks": [progress, spacing, *callbacks], "metadata": metadata,
                                  "checkpoint_dir": checkpoint_dir, "resume_from_checkpoint": resume_from}
        if run.kind == TrainingRun.Kind.RLHF:
            train_ids = set(run.train_pair_ids)
            prompts = list({json.dumps(row.prompt, sort_keys=True): row.prompt
                            for row in rows if row.pair_id in train_ids}.values())
            note = _no_heldout_prompts_message(run, prompts=len(prompts))
            if note and attempt == 1:  # a later attempt carries the first one's log
                _attempt_log(run, progress.log_lines, note)
            result = recipe.train(base_model=base_model, prompts=prompts,
                                  reward_model_path=_run_reward_model_path(run), **common)
        else:
            by_pair = {row.pair_id: row for row in rows}
            train = [_example(by_pair[pk]) for pk in run.train_pair_ids]
            held_out = [_example(by_pair[pk]) for pk in run.eval_pair_ids]
            if run.kind == TrainingRun.Kind.DPO and run.reward_model is not None:
                try:
                    common["judge_path"] = _run_reward_model_path(run)
                except DomainError as exc:
                    # The judge only adds the win rate: the run trains without it rather than fail at its end.
                    _attempt_log(run, progress.log_lines, f"no win rate: {exc.message}")
            result = recipe.train(base_model=base_model, train=train, eval=held_out, **common)
    except TrainingCancelled:
        # Stopped on the cancel request during training: nothing was evaluated or saved after it.
        return _attempt_cancelled(run=run, attempt=attempt, history=progress.history, output_dir=output_dir,
                                  checkpoint_dir=checkpoint_dir)
    except (DomainError, HyperparameterError) as exc:
        # A rule the run broke (its labels changed, its base model folder went away): the reason is the whole
        # story, so the run and the worker's log get it without a traceback.
        if progress.lost:
            logger.warning("training run %s: attempt %s stopped after losing the run (%s)", run.pk, attempt, exc)
            return TrainingRun.objects.get(pk=run.pk)
        message = exc.message if isinstance(exc, DomainError) else str(exc)
        logger.warning("training run %s failed: %s", run.pk, message)
        if fresh_output:
            shutil.rmtree(output_dir, ignore_errors=True)
        return training_run_fail(run_id=run.pk, error=message, attempt=attempt)
    except Exception as exc:
        if progress.lost:
            logger.warning("training run %s: attempt %s stopped after losing the run (%s)", run.pk, attempt, exc)
            return TrainingRun.objects.get(pk=run.pk)
        logger.exception("training run %s failed", run.pk)
        if fresh_output:
            shutil.rmtree(output_dir, ignore_errors=True)
        message = f"{type(exc).__name__}: {exc}"
        return training_run_fail(run_id=run.pk, error=message, details=traceback.format_exc(limit=8),
                                 attempt=attempt)
    finally:
        heartbeat.stop()

    if progress.lost:
        # A sweep gave this attempt up for lost (it was frozen or cut off from the database) and the run went to
        # a later attempt or failed: that decision stands, and the files now belong to the later attempt.
        logger.warning("training run %s is no longer running as attempt %s; leaving it", run.pk, attempt)
        return TrainingRun.objects.get(pk=run.pk)
    history = progress.history or [_json_dict(entry) for entry in (result.history or [])]
    if progress.cancelled or TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists():
        # Asked to stop during the evaluation or saving that follow training.
        return _attempt_cancelled(run=run, attempt=attempt, history=history, output_dir=output_dir,
                                  checkpoint_dir=checkpoint_dir)
    if run.kind == TrainingRun.Kind.REWARD:
        _attempt_log(run, progress.log_lines, _shortened_message(run, result))
    run = _training_run_succeed(run=run, result=result, history=progress.history, attempt=attempt,
                                base_model=base_model_label(run.base_model, default=recipe.default_base_name),
                                base_model_path=base_model)
    if run.status == TrainingRun.Status.RUNNING and run.attempts == attempt and run.cancel_requested:
        # The cancel request landed after the check above and before the run was marked succeeded: the succeed
        # write refuses a run asked to stop, so the user who was told it stops never finds it succeeded.
        return _attempt_cancelled(run=run, attempt=attempt, history=history, output_dir=output_dir,
                                  checkpoint_dir=checkpoint_dir)
    if run.status == TrainingRun.Status.SUCCEEDED and run.attempts == attempt:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return run


def _attempt_cancelled(*, run: TrainingRun, attempt: int, history: list[dict[str, Any]], output_dir: Path,
                       checkpoint_dir: Path) -> TrainingRun:
    """End a run that this attempt stopped on its cancel request, and remove its files; a run that is no longer
    running as this attempt (given up for lost meanwhile) is left to whoever has it, files included."""
    if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempts=attempt).update(
            status=TrainingRun.Status.CANCELLED, finished_at=timezone.now(), eta_seconds=None,
            metrics_history=history):
        logger.info("training run %s: cancelled as requested", run.pk)
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainingRun.objects.get(pk=run.pk)


def _run_reward_model_path(run: TrainingRun) -> str:
    """The folder of the reward model the run was submitted with (RLHF trains against it, DPO is judged by it),
    checked before training: deleted versions and removed folders are told as such, not as a missing attribute or
    file hours into the run."""
    if run.reward_model is None:
        raise DomainError("The reward model this run was submitted with has been deleted from the registry; "
                          "deploy one and start a new run.", code="reward_model_missing")
    if not (Path(run.reward_model.artifact_path) / "config.json").is_file():
        raise DomainError(f"The files of the reward model this run was submitted with (version "
                          f"{run.reward_model.version}, {run.reward_model.artifact_path}) are gone; deploy one whose "
                          "files are there and start a new run.", code="reward_model_missing")
    return run.reward_model.artifact_path


def _shortened_message(run: TrainingRun, result: Any) -> str:
    """How many pairs a reward run kept by shortening them (TRL on its own would have dropped them)."""
    pairs = result.train_pairs + result.eval_pairs
    cut = int((result.extra or {}).get("response_cut_pairs", 0))
    replies = f"; {cut} of them also had a reply longer than that, cut to its start" if cut else ""
    return (f"{result.shortened_pairs} of {pairs} pairs were longer than max_length "
            f"({run.hyperparameters.get('max_length')} tokens) and were kept with the prompt cut from the "
            f"left{replies}; none was dropped")


def _no_eval_message(run: TrainingRun) -> str:
    """Why a run has no held-out pairs, said in its log so that empty evaluation metrics are not a puzzle."""
    if run.eval_fraction == 0:
        pairs = "its one pair" if run.train_count == 1 else f"all {run.train_count} pairs"
        return f"no pairs held out (eval_fraction is 0): the run trains on {pairs} and reports no held-out metrics"
    # split_by_prompt holds out at least one prompt whenever there are two, so this is a single prompt.
    pairs = "the one pair has" if run.pair_count == 1 else f"all {run.pair_count} pairs share"
    return (f"no pairs held out: the split is by prompt, and {pairs} a single prompt, which stays in training; the "
            "run reports no held-out metrics (pairs on other prompts give it some)")


NO_JUDGE_MESSAGE = ("no win rate: a DPO run's answers are judged against the base model's by the project's deployed "
                    "reward model, and none was deployed when the run was submitted; the run reports no "
                    "win_rate_vs_base (deploy a reward model, then start a new run)")


def _no_heldout_prompts_message(run: TrainingRun, *, prompts: int) -> str | None:
    """Why an RLHF run holds out no prompts, said in its log so that missing reward_before/reward_after and
    kl_to_base are not a puzzle; None when it holds some out."""
    from rewards.training.rlhf import heldout_count

    wanted = int(run.hyperparameters.get("heldout_prompts", 0))
    if heldout_count(prompts, heldout=wanted):
        return None
    missing = "the run reports no reward_before, reward_after or kl_to_base"
    if wanted == 0:
        return f"no prompts held out (heldout_prompts is 0): {missing}"
    # heldout_count holds out at most half of the prompts, so this is a run with a single prompt.
    return (f"no prompts held out: at most half of the distinct prompts are held out and the run has one, so "
            f"{missing} (pairs on two or more prompts give it some)")


def _attempt_prepare(*, run: TrainingRun, output_dir: Path,
                     checkpoint_dir: Path) -> tuple[Path | None, list[dict[str, Any]], list[str]]:
    """The checkpoint this attempt resumes from (None: from the start), and the metrics history and log lines
    it carries on with. A later attempt drops what the lost one left half-written (a checkpoint cut off while
    being saved, a partial artifact) and the logs of the steps it will train again."""
    history = [dict(entry) for entry in run.metrics_history or [] if isinstance(entry, dict)]
    log_lines = run.log_tail.splitlines() if run.log_tail else []
    if run.attempts <= 1:
        # Checkpoints under a new run's id can only be another database's (one reset under the same folder).
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if run.eval_count == 0 and run.kind != TrainingRun.Kind.RLHF:
            _attempt_log(run, log_lines, _no_eval_message(run))
        if run.kind == TrainingRun.Kind.DPO and run.reward_model_id is None:
            _attempt_log(run, log_lines, NO_JUDGE_MESSAGE)
        return None, history, log_lines
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if path != checkpoint:
                shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    events = [entry for entry in history if "event" in entry]
    if checkpoint is None:
        # The checkpoint was there when the run was queued again; this worker does not see the same folder.
        step = 0
        message = f"attempt {run.attempts}: no checkpoint in {checkpoint_dir}; training again from the start"
        history = [*events, {"step": 0, "event": "restarted", "attempt": run.attempts, "message": message}]
    else:
        step = checkpoint_step(checkpoint)
        message = f"attempt {run.attempts}: resumed from step {step} after worker lost ({checkpoint.name})"
        history = [entry for entry in history if "event" in entry or _logged_step(entry) <= step]
        history.append({"step": step, "event": "resumed", "attempt": run.attempts, "message": message})
    _attempt_log(run, log_lines, message, level=logging.WARNING, step=step, metrics_history=history)
    return checkpoint, history, log_lines


def _attempt_log(run: TrainingRun, log_lines: list[str], message: str, *, level: int = logging.INFO,
                 **fields: Any) -> None:
    """Add `message` to the run's log (and the process log), written with `fields` while this attempt owns it."""
    from rewards.progress import LOG_TAIL_LINES

    log_lines.append(message)
    logger.log(level, "training run %s: %s", run.pk, message)
    TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempts=run.attempts).update(
        log_tail="\n".join(log_lines[-LOG_TAIL_LINES:]), **fields)


def _logged_step(entry: dict[str, Any]) -> float:
    step = entry.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


def _hostname() -> str:
    return socket.gethostname()


def _this_host() -> str:
    """This machine's host name with its PID namespace: a pid recorded under the same value names a process
    this one can see (containers may share a host name, never a PID namespace)."""
    host = socket.gethostname()
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: the host name alone
        return host[:255]
    return f"{host} pid-ns {namespace}"[:255]


def _process_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # it exists but may not be inspected
        return True


@transaction.atomic
def _training_run_succeed(*, run: TrainingRun, result: Any, base_model: str, base_model_path: str,
                          history: list[dict[str, Any]], attempt: int | None = None) -> TrainingRun:
    Project.objects.select_for_update().filter(pk=run.project_id).first()
    metrics = {key: _json_value(value) for key, value in dict(result.metrics or {}).items()}
    # Not a run asked to stop: a cancel request that landed while training ended wins over the success, and one
    # sent after this write commits finds the run succeeded (a 409), so the two never both take effect.
    mine = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, cancel_requested=False)
    if attempt is not None:
        mine = mine.filter(attempts=attempt)
    updated = mine.update(
        status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now(), heartbeat_at=timezone.now(),
        eta_seconds=None, eval_metrics=metrics, artifact_path=str(result.artifact),
        metrics_history=history or [_json_dict(entry) for entry in (result.history or [])],
    )
    run.refresh_from_db()
    if not updated:
        # Recovery or an operator finished the run while it trained, or it was asked to stop (the caller cancels
        # it); its files are not registered.
        logger.warning("training run %s is %s%s; not registering it", run.pk, run.status,
                       " with a cancel request" if run.cancel_requested else "")
        return run
    fields = {"project": run.project, "training_run": run, "artifact_path": str(result.artifact),
              "base_model": base_model, "metrics": metrics, "created_by": run.created_by,
              "lineage": {**_lineage(run, base_model=base_model, base_model_path=base_model_path, result=result),
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


# How often a cancel looks again at a run that moved between queued and running under it (a worker claiming it,
# a sweep queuing it again) before it gives up; each move is a real event, so two are already rare.
CANCEL_TRIES = 3


@transaction.atomic
def training_run_cancel(*, run: TrainingRun) -> TrainingRun:
    """A queued run is cancelled at once; a running one is asked to stop at its next log step, and never ends
    succeeded after that (see _training_run_succeed): it stops, or is cancelled when it finishes training first.

    Each change is one conditional write, so it cannot interleave with a worker claiming the run (a claim takes
    only a queued run without a cancel request) or marking it succeeded: whichever writes first wins, and the
    other sees it. A run that moved between queued and running under the cancel is looked at again."""
    for _ in range(CANCEL_TRIES):
        if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
                status=TrainingRun.Status.CANCELLED, cancel_requested=True, finished_at=timezone.now(),
                eta_seconds=None):
            # A run queued again after a lost worker still has the checkpoint it would have resumed from, and may
            # have the files the lost attempt was saving.
            shutil.rmtree(training_run_checkpoint_dir(run=run), ignore_errors=True)
            shutil.rmtree(_output_dir(run), ignore_errors=True)
            run.refresh_from_db()
            return run
        if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(cancel_requested=True):
            run.refresh_from_db()
            return run
        run.refresh_from_db()
        if run.status not in (TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING):
            break
    raise Conflict(f"Run {run.pk} is already {run.status}; only queued or running runs can be cancelled.",
                   field="status", code="not_cancellable")


def training_run_interrupt(*, run_id: int) -> TrainingRun | None:
    """Cancel a run that this process was training in the foreground (`train --wait`) when it is interrupted
    (Ctrl-C). Left as it was, the run would stay `running` until a sweep found its process gone and then queue it
    again for a worker to resume, training on after its user stopped it; a run still queued would wait for a task
    that was never published. Only a run queued or running in this very process is changed."""
    from rewards.progress import LOG_TAIL_LINES

    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    message = "interrupted in the foreground (train --wait); cancelled"
    log_lines = [*(run.log_tail.splitlines() if run.log_tail else []), message][-LOG_TAIL_LINES:]
    fields = {"status": TrainingRun.Status.CANCELLED, "cancel_requested": True, "finished_at": timezone.now(),
              "eta_seconds": None, "log_tail": "\n".join(log_lines)}
    queued = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED)
    mine = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING, worker_host=_this_host(),
                                      worker_pid=os.getpid())
    if queued.update(**fields) or mine.update(**fields):
        logger.warning("training run %s: %s", run_id, message)
        shutil.rmtree(training_run_checkpoint_dir(run=run), ignore_errors=True)
        shutil.rmtree(_output_dir(run), ignore_errors=True)
    run.refresh_from_db()
    return run


def training_run_fail(*, run_id: int, error: str, details: str = "", attempt: int | None = None) -> TrainingRun | None:
    """Mark an unfinished run failed with the reason (with `attempt`, only while it runs as that attempt) and
    remove its checkpoints; a finished run is left as it is."""
    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    fields: dict[str, Any] = {"status": TrainingRun.Status.FAILED, "error": error[:10000],
                              "finished_at": timezone.now(), "eta_seconds": None}
    if details:
        fields["log_tail"] = "\n".join(filter(None, [run.log_tail, details]))[-20000:]
    unfinished = TrainingRun.objects.filter(pk=run_id,
                                            status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING])
    if attempt is not None:
        unfinished = unfinished.filter(status=TrainingRun.Status.RUNNING, attempts=attempt)
    if unfinished.update(**fields):
        shutil.rmtree(training_run_checkpoint_dir(run=run), ignore_errors=True)
    run.refresh_from_db()
    return run


# Beats a live process may miss (a slow database write, a busy machine) before its run counts as lost.
HEARTBEATS_MISSED = 3


def _lost_reason(run: TrainingRun, *, now: datetime | None = None,
                 stale_after: timedelta | None = None) -> str | None:
    """Why a running run's worker counts as gone, or None while it may be alive. Lost: its process was on this
    machine (same host and PID namespace) and is gone; or it records a process, whose heartbeat thread then
    writes every TRAINING_HEARTBEAT_SECONDS, and HEARTBEATS_MISSED beats were missed; or, whatever ran it (a
    run claimed before processes were recorded), no heartbeat for `stale_after` (TRAINING_STALE_MINUTES)."""
    now = now or timezone.now()
    if stale_after is None:
        stale_after = timedelta(minutes=int(settings.PREFLAB["TRAINING_STALE_MINUTES"]))
    beat = run.heartbeat_at or run.started_at or run.created_at
    who = run.worker_hostname or "unknown worker"
    if (run.worker_pid is not None and run.worker_host and run.worker_host == _this_host()
            and not _process_alive(run.worker_pid)):
        return f"worker lost (process {run.worker_pid} of {who} is gone; last heartbeat {beat.isoformat()})"
    silent = now - beat
    window = timedelta(seconds=HEARTBEATS_MISSED * float(settings.PREFLAB["TRAINING_HEARTBEAT_SECONDS"]))
    if (run.worker_pid is not None and silent > window) or silent > stale_after:
        return f"worker lost (no heartbeat since {beat.isoformat()} from {who})"
    return None


def training_runs_recover_stale(*, older_than: timedelta | None = None) -> int:
    """Find running runs whose worker is lost (see _lost_reason; `older_than` overrides the absolute
    staleness) and recover each: queued again to resume from its checkpoint, or failed with the reason.
    Returns how many were recovered."""
    now = timezone.now()
    recovered = 0
    running = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING).order_by("pk") \
        .defer("comparison_ids", "train_pair_ids", "eval_pair_ids")
    for run in running:
        reason = _lost_reason(run, now=now, stale_after=older_than)
        if reason is not None and training_run_recover_lost(run=run, reason=reason) is not None:
            recovered += 1
    return recovered


def training_run_recover_lost(*, run: TrainingRun, reason: str) -> TrainingRun | None:
    """Settle a running run whose worker is lost. With a complete checkpoint and fewer than
    PREFLAB["TRAINING_MAX_ATTEMPTS"] attempts it is queued again and its task republished (the next attempt
    resumes from the checkpoint on the same dataset snapshot); a run asked to stop is cancelled; any other is
    failed with `reason`. The change lands only if the run is still exactly as judged (same attempt and
    heartbeat), so two sweeps never both act and a run that just wrote a heartbeat is left alone. Returns the
    run, or None when it had changed."""
    now = timezone.now()
    max_attempts = int(settings.PREFLAB["TRAINING_MAX_ATTEMPTS"])
    checkpoint_dir = training_run_checkpoint_dir(run=run)
    checkpoint = latest_checkpoint(checkpoint_dir)
    outcome: dict[str, Any]
    if run.cancel_requested:
        message = f"{reason}; cancelled as requested"
        outcome = {"status": TrainingRun.Status.CANCELLED, "finished_at": now}
    elif checkpoint is not None and run.attempts < max_attempts:
        message = (f"{reason}; queued again as attempt {run.attempts + 1} of {max_attempts}, to resume from "
                   f"step {checkpoint_step(checkpoint)}")
        outcome = {"status": TrainingRun.Status.QUEUED}
    else:
        why = ("no checkpoint to resume from" if checkpoint is None
               else f"gave up after {run.attempts} attempts (PREFLAB_TRAINING_MAX_ATTEMPTS)")
        message = f"{reason}; {why}"
        outcome = {"status": TrainingRun.Status.FAILED, "finished_at": now, "error": message[:10000]}
    lost = {"step": run.step, "event": "worker_lost", "attempt": run.attempts, "message": message}
    as_judged = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING, attempts=run.attempts,
                                           heartbeat_at=run.heartbeat_at)
    if not as_judged.update(eta_seconds=None, metrics_history=[*(run.metrics_history or []), lost],
                            log_tail="\n".join(filter(None, [run.log_tail, message]))[-20000:], **outcome):
        return None
    logger.warning("training run %s: %s", run.pk, message)
    if outcome["status"] == TrainingRun.Status.QUEUED:
        transaction.on_commit(lambda: _training_run_republish(run_id=run.pk))
    else:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if outcome["status"] == TrainingRun.Status.CANCELLED:
            shutil.rmtree(_output_dir(run), ignore_errors=True)
    return TrainingRun.objects.get(pk=run.pk)


def _training_run_republish(*, run_id: int) -> None:
    run = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).first()
    if run is None:
        return
    try:
        _training_run_publish(run=run)
    except ServiceUnavailable:
        # The run was failed with the broker's error; a sweep has no caller to tell.
        logger.warning("training run %s could not be queued again: the broker is unreachable", run_id)


# --- the registry ---------------------------------------------------------------------------------------


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# A tokenizer's vocabulary is in one of these; without it transformers builds an empty tokenizer that maps every
# word to the unknown token, and the model would score every text alike.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def _absolute(path: str | Path) -> Path | None:
    """The folder a user named, `~` expanded and links followed; None for a name that names no folder at all (the
    home of a user this machine does not have, a loop of links)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _import_allowed(path: Path, *, project: Project) -> bool:
    """A folder under one of the import folders, or inside one of the project's own runs: another project's runs
    are its data, never this one's to register or train from, and neither are their checkpoints, even under an
    import folder that holds the artifacts."""
    for kept in ("runs", "checkpoints"):
        folder = (Path(settings.PREFLAB["ARTIFACTS_DIR"]) / kept).resolve()
        if folder in path.parents:
            run_id = path.relative_to(folder).parts[0]
            if not (run_id.isdigit() and TrainingRun.objects.filter(pk=int(run_id), project=project).exists()):
                return False
            if kept == "runs":
                return True
    roots = [Path(root).resolve() for root in settings.PREFLAB["MODEL_IMPORT_DIRS"]]
    return any(path == root or root in path.parents for root in roots)


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is not one (its header, a length and a JSON table of tensors whose data lies inside
    the file, is read; the tensors are not), or None."""
    try:
        size = file.stat().st_size
        with file.open("rb") as stream:
            head = stream.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                return f"{file.name} is not a safetensors file"
            table = json.loads(stream.read(length))
    except OSError as exc:
        return f"{file.name} could not be read ({exc.strerror or exc})"
    except ValueError:
        return f"{file.name} is not a safetensors file"
    if not isinstance(table, dict):
        return f"{file.name} is not a safetensors file"
    data = size - 8 - length
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{file.name} is not a safetensors file"
        if offsets[1] > data:
            return f"{file.name} is cut short"
    return None


def _weights_problem(folder: Path) -> str | None:
    """Why a model folder's weights cannot be loaded, checked without loading them: a safetensors file's header,
    a sharded index and its shards; None when nothing is wrong. A registered version whose weights fail to load
    would otherwise be found out by the first request that scores with it."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError):
            return f"{index_name} is not a readable index of shards"
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{index_name} lists no shards"
        for shard in sorted({str(name) for name in weight_map.values()}):
            if not (folder / shard).is_file():
                return f"shard {shard} of {index_name} is missing"
            if shard.endswith(".safetensors") and (problem := _safetensors_problem(folder / shard)):
                return problem
        return None
    if (folder / "model.safetensors").exists():
        return _safetensors_problem(folder / "model.safetensors")
    binary = folder / "pytorch_model.bin"
    try:
        with binary.open("rb") as stream:
            start = stream.read(4)
    except OSError as exc:
        return f"pytorch_model.bin could not be read ({exc.strerror or exc})"
    # torch.save writes a zip archive (a pickle, which starts with the protocol byte 0x80, before torch 1.6).
    if start != b"PK\x03\x04" and start[:1] != b"\x80":
        return "pytorch_model.bin is not a PyTorch checkpoint"
    return None


def _safetensors_names(folder: Path) -> set[str] | None:
    """The tensor names of a folder's safetensors weights (one file or the shards of an index), read from the
    headers; None for PyTorch pickles, whose names cannot be read without loading them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {str(name) for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"]}
    file = folder / "model.safetensors"
    if not file.is_file():
        return None
    with file.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        return {name for name in json.loads(stream.read(length)) if name != "__metadata__"}


def _score_head_missing(folder: Path, config: Any) -> list[str]:
    """The parameters of the model's score head (those outside its base model) that its weights lack. A folder
    saved from a bare encoder or decoder, with `num_labels` 1 written into its config, loads without an error,
    only a warning, and scores with a head of random numbers. Built on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    names = _safetensors_names(folder)
    if names is None:
        return []
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:  # a model type transformers cannot score with
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DomainError(f"transformers has no sequence-classification model for this config: {reason}",
                          field="path", code="not_a_reward_model") from exc
    prefix = f"{model.base_model_prefix}."
    return sorted(name for name in model.state_dict() if not name.startswith(prefix) and name not in names)


def reward_model_folder_check(*, path: str | Path) -> Any:
    """Check that a folder holds a sequence-classification model with a single output; return its config."""
    folder = _absolute(path)
    if folder is None:
        raise DomainError(f"No folder at '{path}'.", field="path", code="not_found")
    try:
        return _reward_model_folder_check(folder, path=path)
    except OSError as exc:  # a name too long for the file system, a folder this process may not read
        raise DomainError(f"'{path}' cannot be read: {exc.strerror or exc}.", field="path", code="unreadable")


def _reward_model_folder_check(folder: Path, *, path: str | Path) -> Any:
    from transformers import AutoConfig

    if not folder.is_dir():
        raise DomainError(f"No folder at '{path}'.", field="path", code="not_found")
    if not (folder / "config.json").is_file():
        raise DomainError(f"'{path}' is not a model folder: it has no config.json.", field="path",
                          code="not_a_reward_model")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any file can be named: a wrong type in it fails deep inside transformers
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DomainError(f"'{path}' has no readable model config (config.json): {reason}", field="path")
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise DomainError(f"'{path}' is a {architectures[0]}, not a sequence-classification model.", field="path",
                          code="not_a_reward_model")
    if config.num_labels != 1:
        raise DomainError(f"A reward model has 1 output label; '{path}' has {config.num_labels}.", field="path",
                          code="not_a_reward_model")
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        raise DomainError(f"'{path}' has no weights (model.safetensors or pytorch_model.bin).", field="path")
    unreadable = _weights_problem(folder)
    if unreadable:
        raise DomainError(f"'{path}' has weights that cannot be read: {unreadable}.", field="path",
                          code="unreadable_weights")
    missing = _score_head_missing(folder, config)
    if missing:
        raise DomainError(f"'{path}' has no weights for its score head ({', '.join(missing)}): transformers would "
                          "start the head from random numbers and every score would be noise. Save the model with "
                          "its head (AutoModelForSequenceClassification.save_pretrained).", field="path",
                          code="not_a_reward_model")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DomainError(f"'{path}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it into the folder "
                          "with tokenizer.save_pretrained.", field="path", code="missing_tokenizer")
    return config


def reward_model_register(*, project: Project, path: str | Path, created_by: AbstractBaseUser | None = None,
                          restrict_to_import_dirs: bool = False, deploy: bool = False) -> RewardModel:
    """Register a reward model trained elsewhere as the project's next version. The folder is referenced in
    place, not copied; `restrict_to_import_dirs` (the API) only accepts folders under the configured roots."""
    folder = _absolute(path)
    if restrict_to_import_dirs and not (folder and _import_allowed(folder, project=project)):
        raise DomainError(f"'{path}' is outside the folders models may be registered from "
                          "(PREFLAB_MODEL_IMPORT_DIRS, or this project's runs).", field="path",
                          code="path_not_allowed")
    if folder is None:
        raise DomainError(f"No folder at '{path}'.", field="path", code="not_found")
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
    folder = Path(reward_model.artifact_path)
    if not (folder / "config.json").is_file():
        raise DomainError(f"The files of version {reward_model.version} are gone ({reward_model.artifact_path} "
                          "has no config.json).", field="reward_model", code="artifact_missing")
    # The weights too, as registering checks them: a version whose weights were removed or cut short since would
    # go live and fail every request that scores with it.
    if any((folder / name).exists() for name in WEIGHT_FILES):
        weights = _weights_problem(folder)
    else:
        weights = "no weights (model.safetensors or pytorch_model.bin)"
    if weights:
        raise DomainError(f"The weights of version {reward_model.version} cannot be loaded "
                          f"({reward_model.artifact_path}: {weights}).", field="reward_model",
                          code="artifact_missing")
    if current is not None:
        RewardModel.objects.filter(pk=current.pk).update(is_deployed=False)
    now = timezone.now()
    RewardModel.objects.filter(pk=reward_model.pk).update(is_deployed=True, deployed_at=now)
    RewardModelDeployment.objects.create(project_id=reward_model.project_id, reward_model=reward_model,
                                         previous=current, deployed_by=deployed_by)
    reward_model.refresh_from_db()
    # This process serves the new version on its next request; other server processes within a second.
    from rewards.serving import deployments

    deployments.clear(project_id=reward_model.project_id)
    transaction.on_commit(lambda: deployments.clear(project_id=reward_model.project_id))
    return reward_model


# --- rerank traffic -------------------------------------------------------------------------------------

_RERANK_COUNTED = ("requests", "cache_hits", "errors", "rejected", "latency_ms_sum", *RERANK_LATENCY_FIELDS)


def rerank_latency_bucket(latency_ms: float) -> str:
    """The latency column of RerankMinute that counts a request answered in `latency_ms` (bounds inclusive)."""
    return RERANK_LATENCY_FIELDS[bisect_left(RERANK_LATENCY_BOUNDS_MS, latency_ms)]


def _rerank_upsert_sql() -> str:
    # Django's bulk_create(update_conflicts=True) can only overwrite a column with the new value, not add to it;
    # this statement is plain SQL that PostgreSQL and SQLite (3.24+) both accept.
    quote = connection.ops.quote_name
    table = quote(RerankMinute._meta.db_table)
    columns = ("project_id", "minute", *_RERANK_COUNTED)
    increments = ", ".join(f"{quote(name)} = {table}.{quote(name)} + EXCLUDED.{quote(name)}"
                           for name in _RERANK_COUNTED)
    return (f"INSERT INTO {table} ({', '.join(quote(name) for name in columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))}) "
            f"ON CONFLICT ({quote('project_id')}, {quote('minute')}) DO UPDATE SET {increments}")


def rerank_usage_record(*, project: Project, latency_ms: float, cached: bool = False, error: bool = False,
                        rejected: bool = False, at: datetime | None = None) -> bool:
    """Count one rerank request in its project's row for the minute. A server error (`error`, a 5xx) counts as a
    request and an error only, a request refused for the caller's input (`rejected`, a 4xx) as a request and a
    rejection only: the dashboard tells the service's failures from its callers' mistakes. An answered request
    adds its latency and, when `cached`, a cache hit.

    With PREFLAB["RERANK_USAGE_FLUSH_SECONDS"] > 0 the counts gather in this process and a background thread adds
    them to the rows every that many seconds (one statement per project and minute); otherwise this request
    writes its own. Returns False when a write made here failed. It is logged and swallowed: the request being
    answered must never fail because its statistics could not be written."""
    minute = (at or timezone.now()).astimezone(UTC).replace(second=0, microsecond=0)
    rejected = rejected and not error
    answered = not (error or rejected)
    bucket = rerank_latency_bucket(latency_ms) if answered else None
    counts = (1, int(cached and answered), int(error), int(rejected), float(latency_ms) if answered else 0.0,
              *(int(name == bucket) for name in RERANK_LATENCY_FIELDS))
    if float(settings.PREFLAB["RERANK_USAGE_FLUSH_SECONDS"]) > 0:
        rerank_usage_buffer.add(project_id=project.pk, minute=minute, counts=counts)
        return True
    return _rerank_usage_write({(project.pk, minute): counts})


def _rerank_usage_write(rows: dict[tuple[int, datetime], Sequence[float]]) -> bool:
    """Add counts to their (project, minute) rows: one INSERT ... ON CONFLICT DO UPDATE per row, so concurrent
    writers add up without a read."""
    values = [[project_id, connection.ops.adapt_datetimefield_value(minute), *counts]
              for (project_id, minute), counts in rows.items()]
    own_transaction = not connection.in_atomic_block
    try:
        # A savepoint when the caller is in a transaction, so a failed write does not poison the caller's.
        with transaction.atomic(), connection.cursor() as cursor:
            if own_transaction and connection.vendor == "postgresql":
                # Not waiting for the WAL flush takes about 1.5 ms off every write; a database crash may then lose
                # the last fraction of a second of these counters, nothing else.
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
            cursor.executemany(_rerank_upsert_sql(), values)
    except Exception:
        logger.warning("rerank traffic of project(s) %s was not recorded", sorted({row[0] for row in values}),
                       exc_info=True)
        return False
    return True


class RerankUsageBuffer:
    """This process's rerank counts not yet written, summed per (project, minute), and the thread that writes
    them. The thread starts with the first count of a process (so a forked gunicorn worker starts its own), and
    the counts left are written when the process exits normally; a process killed outright loses at most one
    interval of counts. A failed write keeps its counts for the next try."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, datetime], list[float]] = {}
        self._owner_pid: int | None = None
        self._thread: threading.Thread | None = None

    def add(self, *, project_id: int, minute: datetime, counts: Sequence[float]) -> None:
        with self._lock:
            self._merge((project_id, minute), counts)
            if self._owner_pid != os.getpid():
                self._owner_pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="rerank-usage-flush", daemon=True)
                self._thread.start()

    def _merge(self, key: tuple[int, datetime], counts: Sequence[float]) -> None:
        row = self._pending.get(key)
        if row is None:
            self._pending[key] = list(counts)
        else:
            for index, count in enumerate(counts):
                row[index] += count

    def pending(self) -> dict[tuple[int, datetime], list[float]]:
        with self._lock:
            return {key: list(row) for key, row in self._pending.items()}

    def flush(self) -> bool:
        """Write what has gathered; True when nothing is left pending."""
        with self._lock:
            rows, self._pending = self._pending, {}
        if not rows:
            return True
        if _rerank_usage_write(rows):
            return True
        with self._lock:
            for key, counts in rows.items():
                self._merge(key, counts)
        return False

    def _run(self) -> None:
        from django.db import connection as thread_connection

        pid = os.getpid()
        atexit.register(self.flush)
        try:
            while self._owner_pid == pid:
                time.sleep(float(settings.PREFLAB["RERANK_USAGE_FLUSH_SECONDS"]) or 1.0)
                # This thread has a connection of its own; drop it if the database went away meanwhile.
                thread_connection.close_if_unusable_or_obsolete()
                try:
                    self.flush()
                except Exception:  # never let the writer thread die
                    logger.exception("rerank traffic flush failed")
        finally:
            thread_connection.close()

    def stop(self) -> None:
        """End the writer thread after a last write (the next count starts a new one)."""
        with self._lock:
            self._owner_pid, thread = None, self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.flush()


rerank_usage_buffer = RerankUsageBuffer()

"""Celery tasks: each takes ids and plain values, loads by id and calls one service."""
from __future__ import annotations

from celery import Task, shared_task
from django.conf import settings


class TrainingTask(Task):
    """A training task that dies outside the service's own error handling still leaves its run failed."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        from rewards.services import training_run_fail

        run_id = kwargs.get("run_id", args[0] if args else None)
        if run_id is not None:
            training_run_fail(run_id=run_id, error=f"The training task failed: {type(exc).__name__}: {exc}")


@shared_task(bind=True, base=TrainingTask, acks_late=True, reject_on_worker_lost=True,
             soft_time_limit=settings.PREFLAB["TRAINING_SOFT_TIME_LIMIT"],
             time_limit=settings.PREFLAB["TRAINING_TIME_LIMIT"])
def training_run_execute(self, run_id: int) -> str | None:
    from rewards.services import training_run_execute as execute

    run = execute(run_id=run_id, worker=self.request.hostname or "")
    return run.status if run is not None else None


@shared_task
def training_runs_recover_stale() -> int:
    from rewards.services import training_runs_recover_stale as recover

    return recover()

"""The Celery application shared by the web process (to queue tasks) and the workers (to run them)."""
from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import setup_logging, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

logger = logging.getLogger(__name__)

app = Celery("preflab")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["worker"], related_name="tasks")

# Training holds a process for hours: it gets a queue of its own so short tasks never wait behind it
# (start a worker with `-Q training` for it, and one with `-Q default` for the rest).
app.conf.task_routes = {
    "worker.tasks.training_run_execute": {"queue": "training"},
    "worker.tasks.training_runs_recover_stale": {"queue": "default"},
}
# Runs whose worker died are resumed from their last checkpoint or failed by this sweep (`celery -A worker
# beat`), and at every worker start. It is one indexed query when nothing is lost, and a run on another machine
# counts as lost after three missed heartbeats (a minute by default), so it runs every minute.
app.conf.beat_schedule = {
    # Dropped when not taken within its minute: a worker busy training (one task at a time) would otherwise find
    # hundreds of sweeps queued up when it finishes, each doing the same work.
    "training-runs-recover-stale": {"task": "worker.tasks.training_runs_recover_stale", "schedule": 60.0,
                                    "options": {"expires": 60}},
}


@setup_logging.connect
def _keep_django_logging(**kwargs) -> None:
    """Leave logging to Django's LOGGING, so that the worker writes PREFLAB_LOG_FORMAT (JSON in docker-compose) at
    PREFLAB_LOG_LEVEL like the web server. Without a receiver for this signal Celery replaces the root logger's
    handlers with its own plain-text format at the level of its --loglevel option."""


@worker_ready.connect
def _recover_stale_runs_on_start(sender=None, **kwargs) -> None:
    from rewards.services import training_runs_recover_stale

    try:
        recovered = training_runs_recover_stale()
    except Exception:
        # The worker still serves tasks if the sweep cannot run (the database may be starting too).
        logger.exception("could not sweep stale training runs at worker start")
        return
    if recovered:
        logger.warning("recovered %s training run(s) whose worker was lost (queued again or failed)", recovered)

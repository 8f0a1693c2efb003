"""Training runs outlive their worker: the rule that finds a lost run, resume or failure, the guard that keeps an
attempt that was given up from writing, and real Celery workers SIGKILLed in the middle of a run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection
from django.utils import timezone

from labeling.models import Comparison
from rewards import services
from rewards.models import RewardModel, TrainingRun
from rewards.training.common import latest_checkpoint
from tests.rewards.factories import TrainingRunFactory, labeled_pairs

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    """The pid of a process of this machine that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _running(run: TrainingRun, *, attempts: int = 1, pid: int | None = None, host: str | None = None,
             beat_age: timedelta = timedelta(0)) -> TrainingRun:
    now = timezone.now()
    TrainingRun.objects.filter(pk=run.pk).update(
        status=TrainingRun.Status.RUNNING, started_at=now - beat_age, heartbeat_at=now - beat_age,
        attempts=attempts, worker_hostname="celery@box", worker_pid=pid,
        worker_host=services._this_host() if host is None else host, step=7, total_steps=20,
        metrics_history=[{"step": 5, "loss": 0.6}], log_tail="earlier line")
    run.refresh_from_db()
    return run


def _checkpoint(run: TrainingRun, step: int, *, complete: bool = True) -> Path:
    folder = services.training_run_checkpoint_dir(run=run) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


@pytest.fixture
def artifacts(settings, tmp_path):
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts", "TRAINING_MAX_ATTEMPTS": 3,
                        "TRAINING_HEARTBEAT_SECONDS": 20.0, "TRAINING_STALE_MINUTES": 15}
    return tmp_path / "artifacts"


# --- which runs are lost --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_dead_process_on_this_machine_is_lost_at_once_a_live_or_foreign_one_is_not(project, artifacts):
    dead = _running(TrainingRunFactory(project=project), pid=_dead_pid())
    alive = _running(TrainingRunFactory(project=project), pid=os.getpid())
    # Another machine (or container) with the same pid: only its heartbeat can tell.
    elsewhere = _running(TrainingRunFactory(project=project), pid=_dead_pid(), host="other-box pid-ns 1")
    # A live process that stopped writing heartbeats (frozen, or cut off from the database) for three beats.
    silent = _running(TrainingRunFactory(project=project), pid=os.getpid(), beat_age=timedelta(seconds=61))
    # Claimed before processes were recorded: only the absolute staleness applies.
    legacy = _running(TrainingRunFactory(project=project), beat_age=timedelta(minutes=5))

    assert services.training_runs_recover_stale() == 2
    states = dict(TrainingRun.objects.values_list("pk", "status"))
    assert states[dead.pk] == states[silent.pk] == TrainingRun.Status.FAILED
    assert states[alive.pk] == states[elsewhere.pk] == states[legacy.pk] == TrainingRun.Status.RUNNING
    dead.refresh_from_db()
    assert dead.error.startswith(f"worker lost (process {dead.worker_pid} of celery@box is gone")
    assert dead.error.endswith("no checkpoint to resume from") and dead.finished_at is not None
    assert TrainingRun.objects.get(pk=silent.pk).error.startswith("worker lost (no heartbeat since")


@pytest.mark.django_db
def test_a_lost_run_with_a_checkpoint_is_queued_again_with_its_snapshot(project, artifacts,
                                                                        django_capture_on_commit_callbacks):
    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="reward", queue=False)
    snapshot = (run.comparison_ids, run.dataset_hash, run.train_pair_ids, run.eval_pair_ids)
    run = _running(run, pid=_dead_pid())
    _checkpoint(run, 5)
    _checkpoint(run, 6, complete=False)  # cut off while it was being written
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert services.training_runs_recover_stale() == 1
    assert len(published) == 1  # the task goes back on the queue once the change is committed
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.QUEUED and run.attempts == 1 and run.finished_at is None
    assert (run.comparison_ids, run.dataset_hash, run.train_pair_ids, run.eval_pair_ids) == snapshot
    lost = run.metrics_history[-1]
    assert lost["event"] == "worker_lost" and lost["step"] == 7 and lost["attempt"] == 1
    assert "queued again as attempt 2 of 3, to resume from step 5" in lost["message"] in run.log_tail
    # A second sweep finds nothing: the run is no longer running.
    assert services.training_runs_recover_stale() == 0


@pytest.mark.django_db
def test_out_of_attempts_fails_and_a_cancel_request_cancels(project, artifacts):
    last = _running(TrainingRunFactory(project=project), attempts=3, pid=_dead_pid())
    folder = _checkpoint(last, 5)
    stopping = _running(TrainingRunFactory(project=project, cancel_requested=True), pid=_dead_pid())
    _checkpoint(stopping, 5)
    assert services.training_runs_recover_stale() == 2
    last.refresh_from_db()
    assert last.status == TrainingRun.Status.FAILED and "gave up after 3 attempts" in last.error
    assert not folder.parent.exists()  # the checkpoints of a finished run are removed
    assert TrainingRun.objects.get(pk=stopping.pk).status == TrainingRun.Status.CANCELLED


@pytest.mark.django_db
def test_recovery_lands_only_on_the_run_as_it_was_judged(project, artifacts):
    run = _running(TrainingRunFactory(project=project), pid=_dead_pid())
    judged = TrainingRun.objects.get(pk=run.pk)
    # The run wrote a heartbeat after it was judged lost: it is alive, and recovery leaves it.
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
    assert services.training_run_recover_lost(run=judged, reason="worker lost (test)") is None
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING


@pytest.mark.django_db
def test_an_attempt_that_was_given_up_cannot_write_or_finish_the_run(project, artifacts):
    from types import SimpleNamespace

    from rewards.progress import RunProgressCallback

    run = _running(TrainingRunFactory(project=project), attempts=2)
    stale = RunProgressCallback(run_id=run.pk, attempt=1, interval=0)
    control = SimpleNamespace(should_training_stop=False)
    stale.on_log(None, SimpleNamespace(global_step=9, max_steps=20, epoch=0.5), control, logs={"loss": 0.1})
    assert stale.lost and control.should_training_stop
    run.refresh_from_db()
    assert run.step == 7 and run.metrics_history == [{"step": 5, "loss": 0.6}]
    assert services.training_run_fail(run_id=run.pk, error="late", attempt=1).status == TrainingRun.Status.RUNNING


# --- real workers, killed ---------------------------------------------------------------------------------


class Workers:
    """Celery workers for the `training` queue as subprocesses (prefork, one pool process, as deployed), each in
    a process group of its own so a test can SIGKILL a worker with its pool at once."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "training", "-P", "prefork", "-c", "1",
             "-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "INFO"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append(process)
        return process

    def kill(self, process: subprocess.Popen) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def tail(self) -> str:
        return "\n".join(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:]
                         for path in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                self.kill(process)


def _database_url() -> str:
    db = connection.settings_dict
    credentials = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def workers(artifacts, tmp_path):
    from worker.celery import app

    if connection.vendor != "postgresql" or app.conf.broker_url.startswith("filesystem://"):
        pytest.skip("worker subprocesses share the test database and broker: needs PostgreSQL and a Redis broker")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": _database_url(),
           "CELERY_BROKER_URL": app.conf.broker_url, "PREFLAB_ARTIFACTS_DIR": str(artifacts),
           "PREFLAB_TRAINING_HEARTBEAT_SECONDS": "1", "PREFLAB_TRAINING_MAX_ATTEMPTS": "3"}

    def clear_broker() -> None:
        with app.connection_for_write() as broker:
            channel = broker.default_channel
            try:
                channel.queue_purge("training")
            except Exception:  # the queue may not exist yet
                pass
            # The killed worker's message stays unacknowledged and would come back after the visibility timeout,
            # naming a run id of this test database in a later session.
            if hasattr(channel, "unacked_key"):
                channel.client.delete(channel.unacked_key, channel.unacked_index_key, channel.unacked_mutex_key)

    clear_broker()
    (tmp_path / "logs").mkdir()
    pool = Workers(env, tmp_path / "logs")
    try:
        yield pool
    finally:
        pool.stop_all()
        clear_broker()


def _wait_for(run_id: int, predicate: Callable[[TrainingRun], bool], workers: Workers, *,
              timeout: float = 240.0) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = TrainingRun.objects.get(pk=run_id)
        if predicate(run):
            return run
        time.sleep(0.05)
    run = TrainingRun.objects.get(pk=run_id)
    raise AssertionError(f"run {run_id} stayed {run.status} at step {run.step} for {timeout} s\n{workers.tail()}")


# Enough steps that a run is still training when the test sees its first checkpoint (every 5 steps).
STEPS = 60


def _submit(project, tmp_path, **hyperparameters) -> TrainingRun:
    from tests.rewards.tiny import tiny_reward_model

    labeled_pairs(project, count=8)
    return services.training_run_start(project=project, kind="reward", base_model=str(tiny_reward_model(tmp_path)),
                                       eval_fraction=0.25, hyperparameters={
                                           "max_steps": STEPS, "per_device_train_batch_size": 2, "max_length": 48,
                                           "learning_rate": 1e-3, "logging_steps": 5, **hyperparameters})


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_whose_worker_is_killed_resumes_from_its_checkpoint_in_a_new_worker(project, tmp_path, workers,
                                                                                    figure):
    from transformers import AutoModelForSequenceClassification

    run = _submit(project, tmp_path, save_steps=5)
    comparisons = Comparison.objects.count()
    assert comparisons == len(run.comparison_ids) == 8
    checkpoints = services.training_run_checkpoint_dir(run=run)
    first = workers.start("first")
    _wait_for(run.pk, lambda r: latest_checkpoint(checkpoints) is not None, workers)
    workers.kill(first)
    killed_at = time.monotonic()
    running = TrainingRun.objects.get(pk=run.pk)
    assert running.status == TrainingRun.Status.RUNNING and running.attempts == 1
    assert 0 < running.step < running.total_steps == STEPS, "the run must be killed in the middle"

    workers.start("second")
    lost = _wait_for(run.pk, lambda r: r.status != TrainingRun.Status.RUNNING or r.attempts > 1, workers)
    detection = time.monotonic() - killed_at
    done = _wait_for(run.pk, lambda r: r.is_finished, workers)
    total = time.monotonic() - killed_at

    assert done.status == TrainingRun.Status.SUCCEEDED, done.error + done.log_tail
    assert done.attempts == 2 and lost.attempts <= 2
    assert (done.comparison_ids, done.dataset_hash) == (run.comparison_ids, run.dataset_hash)
    assert Comparison.objects.count() == comparisons
    events = [entry for entry in done.metrics_history if "event" in entry]
    assert [entry["event"] for entry in events] == ["worker_lost", "resumed"]
    assert "is gone" in events[0]["message"] and events[0]["attempt"] == 1
    resumed = events[1]["step"]
    assert resumed >= 5 and resumed % 5 == 0 and resumed <= running.step
    assert f"resumed from step {resumed} after worker lost" in done.log_tail
    # The losses go on from the checkpoint: every logged step once, in order, none trained from 0 again.
    logged = [entry["step"] for entry in done.metrics_history if "loss" in entry]
    assert logged == list(range(5, STEPS + 1, 5))
    after = done.metrics_history.index(events[1])
    assert min(entry["step"] for entry in done.metrics_history[after + 1:] if "loss" in entry) > resumed
    assert done.step == done.total_steps == STEPS

    artifact = Path(done.artifact_path)
    assert AutoModelForSequenceClassification.from_pretrained(artifact).config.num_labels == 1
    assert not list(artifact.glob("checkpoint-*")) and not checkpoints.exists()
    assert RewardModel.objects.filter(training_run=done).count() == 1
    figure(f"[faults] worker killed at step {running.step}/{STEPS} after checkpoint-{resumed}; the new worker found "
           f"the run lost {detection:.1f} s after the kill (its start included) and resumed it from step {resumed}; "
           f"succeeded in {done.attempts} attempts, {total:.1f} s after the kill")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_killed_before_its_first_checkpoint_fails_with_the_reason(project, tmp_path, workers):
    run = _submit(project, tmp_path, save_steps=STEPS * 10)
    first = workers.start("first")
    _wait_for(run.pk, lambda r: r.status == TrainingRun.Status.RUNNING and r.step >= 1, workers)
    workers.kill(first)
    killed_at = time.monotonic()
    workers.start("second")
    failed = _wait_for(run.pk, lambda r: r.status != TrainingRun.Status.RUNNING, workers, timeout=60)
    detection = time.monotonic() - killed_at
    assert failed.status == TrainingRun.Status.FAILED and failed.attempts == 1
    assert failed.error.startswith("worker lost (process ") and failed.error.endswith("no checkpoint to resume from")
    assert not RewardModel.objects.filter(training_run=failed).exists()
    print(f"\nworker killed at step {failed.step}/{STEPS} before any checkpoint; failed as lost {detection:.1f} s "
          "after the kill (the new worker's start included)")

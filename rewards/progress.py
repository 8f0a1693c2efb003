"""Trainer callbacks that report a training run's progress to its row and honour cancel requests, and the
heartbeat that tells the sweeps a run's process is alive."""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError, connections
from django.utils import timezone
from transformers import TrainerCallback

from rewards.models import TrainingRun

LOG_TAIL_LINES = 50
# The most seconds eta_seconds holds (a 32-bit column): a longer estimate is written as this, not refused by the
# database, which would fail the run.
ETA_MAX_SECONDS = 2**31 - 1

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Logged values as JSON can hold them: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class RunProgressCallback(TrainerCallback):
    """Writes step, total, epoch, ETA and heartbeat to the run (at most every `interval` seconds, and on every
    log), appends each log to the metrics history, and stops training when the run's cancel flag is set.

    The row is written with queryset updates of only these columns, so a concurrent cancel request is never
    overwritten, and the flag is read back from the database each time. With `attempt`, writes only land while
    the run is running as that attempt: a process whose run was given up as lost and queued again (or failed)
    stops training instead of overwriting the attempt that took over. `history` and `log_lines` carry on
    from an earlier attempt.
    """

    def __init__(self, *, run_id: int, interval: float = 2.0, attempt: int | None = None,
                 history: list[dict[str, Any]] | None = None, log_lines: list[str] | None = None) -> None:
        self.run_id = run_id
        self.interval = interval
        self.attempt = attempt
        self.cancelled = False
        self.lost = False
        self.history: list[dict[str, Any]] = list(history or [])
        self.log_lines: list[str] = list(log_lines or [])[-LOG_TAIL_LINES:]
        self._last_write = 0.0
        self._started = time.monotonic()
        self._start_step = 0

    def mark_lost(self) -> None:
        """The run is no longer this process's (see RunHeartbeat); training stops at the next step."""
        self.lost = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.monotonic()
        # A resumed run starts at its checkpoint's step; the ETA counts only the steps trained here.
        self._start_step = state.global_step or 0
        self._write(state, force=True)
        return self._check_cancel(control)

    def on_step_end(self, args, state, control, **kwargs):
        if self._write(state) or self.lost:
            return self._check_cancel(control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            entry = {"step": state.global_step, "epoch": _plain(state.epoch),
                     **{key: _plain(value) for key, value in logs.items()}}
            self.history.append(entry)
            self.log_lines.append(json.dumps(entry, sort_keys=True))
            del self.log_lines[:-LOG_TAIL_LINES]
        self._write(state, force=True)
        return self._check_cancel(control)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, force=True)
        return control

    def _eta(self, state) -> int | None:
        done = (state.global_step or 0) - self._start_step
        if done <= 0 or not state.max_steps:
            return None
        elapsed = time.monotonic() - self._started
        remaining = max(state.max_steps - state.global_step, 0)
        return min(int(elapsed / done * remaining), ETA_MAX_SECONDS)

    def _write(self, state, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_write < self.interval:
            return False
        self._last_write = now
        fields: dict[str, Any] = {
            "step": state.global_step or 0, "total_steps": state.max_steps or 0, "epoch": float(state.epoch or 0.0),
            "eta_seconds": self._eta(state), "heartbeat_at": timezone.now(),
        }
        if self.history:
            fields["metrics_history"] = self.history
            fields["log_tail"] = "\n".join(self.log_lines)
        if not _owned(self.run_id, self.attempt).update(**fields):
            self.lost = self.attempt is not None
        return True

    def _check_cancel(self, control):
        if self.lost:
            control.should_training_stop = True
        elif TrainingRun.objects.filter(pk=self.run_id, cancel_requested=True).exists():
            self.cancelled = True
            control.should_training_stop = True
        return control


def _owned(run_id: int, attempt: int | None):
    """The run's row while it is running as `attempt` (any row with the id when attempt is None)."""
    if attempt is None:
        return TrainingRun.objects.filter(pk=run_id)
    return TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING, attempts=attempt)


class RunHeartbeat(threading.Thread):
    """Writes the run's heartbeat every `interval` seconds from a thread of its own, so the heartbeat keeps
    coming during steps, evaluation, generation and saving that take longer than the sweeps' threshold.

    Writes only land while the run is running as `attempt`; when one finds the run gone to a later attempt
    (or failed), `on_lost` is called and the thread ends. A database error skips one beat: the sweeps allow
    several missed beats before they count a run as lost.
    """

    def __init__(self, *, run_id: int, attempt: int, interval: float, on_lost: Callable[[], None]) -> None:
        super().__init__(name=f"training-run-{run_id}-heartbeat", daemon=True)
        self.run_id = run_id
        self.attempt = attempt
        self.interval = interval
        self.on_lost = on_lost
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.wait(self.interval):
                try:
                    alive = _owned(self.run_id, self.attempt).update(heartbeat_at=timezone.now())
                except DatabaseError as exc:
                    logger.warning("training run %s: heartbeat not written: %s", self.run_id, exc)
                    continue
                if not alive:
                    logger.warning("training run %s is no longer running as attempt %s here; stopping",
                                   self.run_id, self.attempt)
                    self.on_lost()
                    return
        finally:
            # The thread's own database connection, which would otherwise stay open until the process exits.
            connections.close_all()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout)


class CheckpointSpacing(TrainerCallback):
    """Keeps a run's checkpoints at least `min_seconds` apart: a checkpoint that `save_steps` asks for sooner
    after the previous one is skipped (the first one is always written). A short run would otherwise spend a
    noticeable share of its time saving (about a second per checkpoint for MiniLM with its optimizer), to
    protect less work than a checkpoint costs; a long run keeps its `save_steps` spacing."""

    def __init__(self, *, min_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_seconds = min_seconds
        self._clock = clock
        self._last_save: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after transformers' DefaultFlowCallback, which sets should_save from save_steps.
        if control.should_save and self._last_save is not None \
                and self._clock() - self._last_save < self.min_seconds:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = self._clock()
        return control


class TqdmProgressCallback(TrainerCallback):
    """A progress bar on stderr for runs trained in the foreground from the command line."""

    def __init__(self, *, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm import tqdm

        self.bar = tqdm(total=state.max_steps or None, file=self.stream, desc="training", unit="step")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control

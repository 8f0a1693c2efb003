"""Trainer callbacks that report a training run's progress to its row and honour cancel requests."""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from django.utils import timezone
from transformers import TrainerCallback

from rewards.models import TrainingRun

LOG_TAIL_LINES = 50


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
    overwritten, and the flag is read back from the database each time.
    """

    def __init__(self, *, run_id: int, interval: float = 2.0) -> None:
        self.run_id = run_id
        self.interval = interval
        self.cancelled = False
        self.history: list[dict[str, Any]] = []
        self.log_lines: list[str] = []
        self._last_write = 0.0
        self._started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.monotonic()
        self._write(state, force=True)
        return self._check_cancel(control)

    def on_step_end(self, args, state, control, **kwargs):
        if self._write(state):
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
        if not state.global_step or not state.max_steps:
            return None
        elapsed = time.monotonic() - self._started
        remaining = max(state.max_steps - state.global_step, 0)
        return int(elapsed / state.global_step * remaining)

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
        TrainingRun.objects.filter(pk=self.run_id).update(**fields)
        return True

    def _check_cancel(self, control):
        if TrainingRun.objects.filter(pk=self.run_id, cancel_requested=True).exists():
            self.cancelled = True
            control.should_training_stop = True
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

"""Cancel against the worker, in every order the two can take: before and right after the claim, during training,
during the final evaluation and saving, between the end of training and the success, and just after it. A run the
user was told is stopping never ends succeeded with a registered model, and a run that succeeded is never shown
cancelled. Each test calls the service functions in the racing order itself (no sleeps, no threads)."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import TrainerCallback

from labeling.errors import Conflict
from rewards import services
from rewards.models import Policy, RewardModel, TrainingRun
from tests.conftest import client_for
from tests.rewards.factories import labeled_pairs
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

URL = "/api/v1/training-runs/"
TINY = {"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1}


@pytest.fixture
def artifacts(settings, tmp_path) -> Path:
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    return tmp_path / "artifacts"


@pytest.fixture(scope="module")
def reward_base(tmp_path_factory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("reward-base"))


@pytest.fixture
def reward_run(project, artifacts, reward_base) -> TrainingRun:
    labeled_pairs(project, count=4)
    return services.training_run_start(project=project, kind="reward", base_model=str(reward_base),
                                       hyperparameters=TINY, eval_fraction=0.25, queue=False)


@pytest.fixture
def final_evaluations(monkeypatch) -> list[int]:
    """Counts the reward recipe's held-out evaluations of its saved folder (what follows training)."""
    from rewards import scoring

    calls: list[int] = []
    real = scoring.evaluate_preferences

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_preferences", counted)
    return calls


def assert_cancelled_without_a_model(run: TrainingRun) -> None:
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED, run.error
    assert run.cancel_requested and run.finished_at is not None and run.artifact_path == ""
    assert not RewardModel.objects.filter(training_run=run).exists()
    assert not Policy.objects.filter(training_run=run).exists()
    assert not services._output_dir(run).exists()
    assert not services.training_run_checkpoint_dir(run=run).exists()


@pytest.mark.django_db
def test_a_cancel_before_the_claim_keeps_the_worker_from_starting_the_run(reward_run, monkeypatch):
    from rewards.training import reward

    def never(**kwargs):
        raise AssertionError("a cancelled run was trained")

    monkeypatch.setattr(reward, "train_reward_model", never)
    told = services.training_run_cancel(run=reward_run)
    assert told.status == TrainingRun.Status.CANCELLED
    # The task was already on its way to a worker (or Celery delivers it again): the claim refuses the run.
    run = services.training_run_execute(run_id=reward_run.pk)
    assert run.status == TrainingRun.Status.CANCELLED and run.attempts == 0 and run.started_at is None
    assert_cancelled_without_a_model(run)


@pytest.mark.django_db
def test_a_cancel_right_after_the_claim_stops_the_run_before_anything_is_evaluated_or_saved(reward_run,
                                                                                           final_evaluations):
    told: list[TrainingRun] = []

    class CancelOnceClaimed(TrainerCallback):
        # The first thing the worker does after the claim is start the trainer: the user's cancel lands there.
        def on_train_begin(self, args, state, control, **kwargs):
            told.append(services.training_run_cancel(run=TrainingRun.objects.get(pk=reward_run.pk)))
            return control

    run = services.training_run_execute(run_id=reward_run.pk, callbacks=[CancelOnceClaimed()])
    assert told[0].status == TrainingRun.Status.RUNNING and told[0].cancel_requested
    assert_cancelled_without_a_model(run)
    assert run.step < TINY["max_steps"]
    # Stopped on the request: the held-out evaluation and the save that follow training were skipped.
    assert final_evaluations == []


@pytest.mark.django_db
def test_a_cancel_after_training_but_before_the_success_ends_cancelled_without_a_model(reward_run, manager,
                                                                                      monkeypatch):
    """The worker checked the cancel flag after training and found none; the user's cancel (through the API, which
    answers "running, cancel requested") lands before the success is written. Before: the run ended succeeded and
    registered a reward model."""
    client = client_for(manager)
    answers: list[dict] = []
    real = services._training_run_succeed

    def cancel_first(**kwargs):
        response = client.post(f"{URL}{reward_run.pk}/cancel/")
        answers.append({"code": response.status_code, **response.json()})
        return real(**kwargs)

    monkeypatch.setattr(services, "_training_run_succeed", cancel_first)
    run = services.training_run_execute(run_id=reward_run.pk)
    assert answers[0]["code"] == 200 and answers[0]["status"] == "running" and answers[0]["cancel_requested"]
    assert_cancelled_without_a_model(run)
    shown = client.get(f"{URL}{run.pk}/").json()
    assert shown["status"] == "cancelled" and shown["produced"] is None and shown["artifact_path"] == ""


@pytest.mark.django_db
def test_a_cancel_just_after_the_success_is_refused_and_the_run_stays_succeeded(reward_run, manager, monkeypatch):
    real = services._training_run_succeed
    refusals: list[Conflict] = []

    def cancel_after(**kwargs):
        run = real(**kwargs)
        try:
            services.training_run_cancel(run=TrainingRun.objects.get(pk=run.pk))
        except Conflict as exc:
            refusals.append(exc)
        return run

    monkeypatch.setattr(services, "_training_run_succeed", cancel_after)
    run = services.training_run_execute(run_id=reward_run.pk)
    assert [exc.code for exc in refusals] == ["not_cancellable"]
    assert "already succeeded" in refusals[0].message
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED and not run.cancel_requested
    model = RewardModel.objects.get(training_run=run)
    assert Path(model.artifact_path).is_dir()
    shown = client_for(manager).get(f"{URL}{run.pk}/").json()
    assert shown["status"] == "succeeded" and shown["cancel_requested"] is False
    assert shown["produced"] == {"type": "reward_model", "id": model.pk, "version": model.version}


def _cancel_when_called(monkeypatch, module, name: str, *, run_id: int) -> list[TrainingRun]:
    """Cancel the run (as the API would, from another request) when the worker calls `module.name`, then let the
    call go on; the list gets the run as the cancel left it."""
    real = getattr(module, name)
    told: list[TrainingRun] = []

    def cancel_then_call(*args, **kwargs):
        told.append(services.training_run_cancel(run=TrainingRun.objects.get(pk=run_id)))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, cancel_then_call)
    return told


@pytest.mark.django_db
def test_a_cancel_during_the_final_evaluation_ends_cancelled_and_removes_the_saved_folder(reward_run, monkeypatch):
    from rewards import scoring

    told = _cancel_when_called(monkeypatch, scoring, "evaluate_preferences", run_id=reward_run.pk)
    run = services.training_run_execute(run_id=reward_run.pk)
    assert told[0].status == TrainingRun.Status.RUNNING and told[0].cancel_requested
    assert_cancelled_without_a_model(run)


@pytest.mark.django_db
def test_a_dpo_cancel_while_the_policy_is_saved_ends_cancelled_without_a_policy(project, artifacts, tmp_path,
                                                                               monkeypatch):
    from rewards.training import dpo

    labeled_pairs(project, count=4)
    run = services.training_run_start(
        project=project, kind="dpo", base_model=str(tiny_causal_lm(tmp_path)), eval_fraction=0.25, queue=False,
        hyperparameters={"max_steps": 1, "max_length": 64, "max_new_tokens": 4, "learning_rate": 1e-3})
    told = _cancel_when_called(monkeypatch, dpo, "save_policy", run_id=run.pk)
    run = services.training_run_execute(run_id=run.pk)
    assert told[0].status == TrainingRun.Status.RUNNING and told[0].cancel_requested
    assert_cancelled_without_a_model(run)


@pytest.mark.django_db
def test_a_run_given_up_for_lost_is_not_cancelled_by_the_attempt_that_lost_it(reward_run):
    """The cancelled ending belongs to the attempt that owns the run: an attempt whose run a sweep already failed
    (or queued again) leaves the run and its files as they are."""
    from django.utils import timezone

    TrainingRun.objects.filter(pk=reward_run.pk).update(status=TrainingRun.Status.FAILED, attempts=1,
                                                        finished_at=timezone.now(), cancel_requested=True)
    folder = services._output_dir(reward_run)
    folder.mkdir(parents=True)
    run = services._attempt_cancelled(run=reward_run, attempt=1, history=[], output_dir=folder,
                                      checkpoint_dir=services.training_run_checkpoint_dir(run=reward_run))
    assert run.status == TrainingRun.Status.FAILED and folder.is_dir()

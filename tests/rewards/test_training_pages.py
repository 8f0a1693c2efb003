"""Training pages: permissions, the start form and its validation, polling of the runs list, the run page's
curves, cancel and deploy buttons, and the curves selector."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from rewards import selectors
from rewards.models import RewardModel, TrainingRun
from rewards.training.dpo import DPO_DEFAULTS
from rewards.training.reward import REWARD_DEFAULTS
from tests.rewards.factories import RewardModelFactory, TrainingRunFactory, labeled_pairs
from worker.celery import app

HISTORY = [
    {"step": 1, "epoch": 0.5, "loss": 0.69, "learning_rate": 5e-5},
    {"step": 2, "epoch": 1.0, "loss": 0.52, "eval_loss": 0.6, "eval_accuracy": 0.75},
    {"step": 3, "loss": None, "note": "text"},
    {"epoch": 1.0, "train_loss": 0.6},
]


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _finished(project, **fields) -> TrainingRun:
    return TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now(),
                              **fields)


@pytest.mark.django_db
def test_pages_answer_by_role(project, manager, labeler, admin_user, outsider):
    run = _finished(project, metrics_history=HISTORY)
    urls = [f"/dashboard/{project.slug}/training/", f"/dashboard/{project.slug}/training/runs/",
            f"/dashboard/runs/{run.pk}/", f"/dashboard/runs/{run.pk}/status/", f"/dashboard/runs/{run.pk}/metrics.json"]
    for url in urls:
        assert _client(manager).get(url).status_code == 200, url
        assert _client(admin_user).get(url).status_code == 200, url
        assert _client(labeler).get(url).status_code == 403, url
        assert _client(outsider).get(url).status_code == 404, url
        response = Client().get(url)
        assert response.status_code == 302 and response.url.startswith("/accounts/login/"), url
    assert _client(manager).get("/dashboard/runs/999999/").status_code == 404


def _field_value(page: str, field_id: str) -> str:
    match = re.search(rf'id="{field_id}" name="[a-z_]+" value="([^"]*)"', page)
    assert match, field_id
    return match.group(1)


@pytest.mark.django_db
def test_start_form_is_filled_with_the_recipe_defaults(project, manager):
    page = _client(manager).get(f"/dashboard/{project.slug}/training/").content.decode()
    for name in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length"):
        assert float(_field_value(page, f"reward-{name}")) == REWARD_DEFAULTS[name]
    assert float(_field_value(page, "dpo-learning_rate")) == DPO_DEFAULTS["learning_rate"]
    assert 'id="dpo-per_device_train_batch_size"' in page
    # The RLHF recipe has no max_length, so its form does not offer one.
    assert 'id="rlhf-learning_rate"' in page and 'id="rlhf-max_length"' not in page


def _purge_training_queue() -> int:
    with app.connection_for_write() as connection:
        return connection.default_channel.queue_purge("training") or 0


@pytest.mark.django_db
def test_start_form_creates_a_queued_run(project, manager, django_capture_on_commit_callbacks):
    # The file-system broker's folders are made by the first worker; a bare checkout has none yet.
    for key, folder in settings.CELERY_BROKER_TRANSPORT_OPTIONS.items():
        if key.endswith("_folder") or key.startswith("data_folder"):
            Path(folder).mkdir(parents=True, exist_ok=True)
    _purge_training_queue()
    labeled_pairs(project, count=6)
    form = {"kind": "reward", "base_model": "", "learning_rate": "0.0001", "num_train_epochs": "2",
            "per_device_train_batch_size": "4", "max_length": "64"}
    client = _client(manager)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post(f"/dashboard/{project.slug}/training/start/", form)
    run = TrainingRun.objects.get()
    assert response.status_code == 302 and response.url == f"/dashboard/runs/{run.pk}/"
    # Publishing ran after the commit and the broker took the task: the run is still queued, not failed.
    assert len(callbacks) == 1
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.QUEUED and run.error == "" and run.created_by == manager
    assert _purge_training_queue() == 1
    assert run.hyperparameters["learning_rate"] == 0.0001 and run.hyperparameters["num_train_epochs"] == 2.0
    assert run.hyperparameters["per_device_train_batch_size"] == 4 and run.hyperparameters["max_length"] == 64
    page = client.get(response.url).content.decode()
    assert f"Run {run.pk} was queued." in page and "Cancel run" in page


@pytest.mark.django_db
def test_start_form_errors_name_the_field_and_keep_the_values(project, manager):
    labeled_pairs(project, count=4)
    client = _client(manager)
    url = f"/dashboard/{project.slug}/training/start/"
    response = client.post(url, {"kind": "reward", "learning_rate": "-1", "max_length": "99"})
    page = response.content.decode()
    assert response.status_code == 400
    assert "Not started (learning_rate)" in page
    assert 'id="reward-learning_rate" name="learning_rate" value="-1" aria-invalid="true"' in page
    assert 'name="max_length" value="99"' in page
    response = client.post(url, {"kind": "dpo", "num_train_epochs": "many"})
    assert response.status_code == 400 and "Not started (num_train_epochs)" in response.content.decode()
    response = client.post(url, {"kind": "bogus"})
    assert response.status_code == 400 and "Not started (kind)" in response.content.decode()
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_start_without_training_data_shows_why(project, manager):
    response = _client(manager).post(f"/dashboard/{project.slug}/training/start/", {"kind": "reward"})
    assert response.status_code == 400 and "no decided pairs" in response.content.decode()
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_runs_list_polls_only_while_a_run_is_active(project, manager):
    client = _client(manager)
    url = f"/dashboard/{project.slug}/training/runs/"
    done = _finished(project)
    partial = client.get(url).content.decode()
    assert f'data-run="{done.pk}"' in partial and "hx-trigger" not in partial
    queued = TrainingRunFactory(project=project, step=3, total_steps=10)
    partial = client.get(url).content.decode()
    assert 'hx-trigger="every 2s"' in partial and f'data-run="{queued.pk}"' in partial
    assert 'max="10" value="3"' in partial and "step 3 of 10" in partial
    assert 'hx-trigger="every 2s"' in client.get(f"/dashboard/{project.slug}/training/").content.decode()


@pytest.mark.django_db
def test_run_page_shows_curves_metrics_and_log(project, manager):
    run = _finished(project, metrics_history=HISTORY, eval_metrics={"eval_accuracy": 0.75, "eval_loss": 0.6},
                    log_tail="step 2 loss 0.52")
    page = _client(manager).get(f"/dashboard/runs/{run.pk}/").content.decode()
    assert 'id="chart-loss"' in page and 'id="chart-accuracy"' in page
    assert "<caption>eval_accuracy</caption>" in page and "<td class=\"num\">0.7500</td>" in page
    assert "<th scope=\"row\">eval_loss</th><td class=\"num\">0.6</td>" in page
    assert "step 2 loss 0.52" in page
    assert "Cancel run" not in page and "hx-trigger" not in page


@pytest.mark.django_db
def test_metrics_json_returns_the_curves_selector_output(project, manager):
    run = _finished(project, metrics_history=HISTORY, step=2, total_steps=2)
    body = _client(manager).get(f"/dashboard/runs/{run.pk}/metrics.json").json()
    assert body["curves"] == selectors.training_run_curves(run=run)
    assert body["status"] == "succeeded" and body["step"] == 2 and body["total_steps"] == 2


def test_curves_group_losses_and_accuracies_by_step():
    curves = selectors.training_run_curves(run=TrainingRun(metrics_history=HISTORY))
    assert curves == {
        "loss": {"loss": [{"step": 1, "value": 0.69}, {"step": 2, "value": 0.52}],
                 "eval_loss": [{"step": 2, "value": 0.6}]},
        "accuracy": {"eval_accuracy": [{"step": 2, "value": 0.75}]},
    }
    assert selectors.training_run_curves(run=TrainingRun(metrics_history=[])) == {"loss": {}, "accuracy": {}}


@pytest.mark.django_db
def test_cancel_button_cancels_a_queued_run_and_reports_a_finished_one(project, manager):
    run = TrainingRunFactory(project=project)
    client = _client(manager)
    response = client.post(f"/dashboard/runs/{run.pk}/cancel/", follow=True)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED and run.cancel_requested
    assert f"Run {run.pk} was cancelled." in response.content.decode()
    response = client.post(f"/dashboard/runs/{run.pk}/cancel/", follow=True)
    assert "already cancelled" in response.content.decode()


@pytest.mark.django_db
def test_a_labeler_cannot_cancel(project, labeler):
    run = TrainingRunFactory(project=project)
    assert _client(labeler).post(f"/dashboard/runs/{run.pk}/cancel/").status_code == 403
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.QUEUED


@pytest.mark.django_db
def test_deploy_button_deploys_the_runs_reward_model(project, manager, tmp_path):
    run = _finished(project)
    model = RewardModelFactory(project=project, training_run=run, artifact_path=str(tmp_path),
                               metrics={"eval_accuracy": 0.9})
    client = _client(manager)
    page = client.get(f"/dashboard/runs/{run.pk}/").content.decode()
    assert f"Deploy reward model v{model.version}" in page
    response = client.post(f"/dashboard/reward-models/{model.pk}/deploy/", {"next": "run"}, follow=True)
    model.refresh_from_db()
    assert model.is_deployed
    assert f"Reward model v{model.version} is now deployed." in response.content.decode()
    assert response.redirect_chain[-1][0] == f"/dashboard/runs/{run.pk}/"
    training = client.get(f"/dashboard/{project.slug}/training/").content.decode()
    assert "<strong>Deployed</strong>" in training and "0.900" in training


@pytest.mark.django_db
def test_deploy_errors_are_shown_and_labelers_are_refused(project, manager, labeler):
    gone = RewardModelFactory(project=project)
    response = _client(manager).post(f"/dashboard/reward-models/{gone.pk}/deploy/", follow=True)
    assert "was not deployed" in response.content.decode() and "are gone" in response.content.decode()
    assert _client(labeler).post(f"/dashboard/reward-models/{gone.pk}/deploy/").status_code == 403
    assert not RewardModel.objects.filter(is_deployed=True).exists()

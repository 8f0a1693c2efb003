"""Training pages: permissions, the start form and its validation, polling of the runs list, the run page's
curves, cancel and deploy buttons, and the curves selector."""
from __future__ import annotations

import json
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
from tests.rewards.tiny import tiny_reward_model
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
def test_a_start_form_posted_twice_starts_one_run(project, manager):
    """Without JavaScript (or with a resend after a timeout) the same rendered form can arrive twice: its token
    makes the second post land on the first run."""
    labeled_pairs(project, count=4)
    client = _client(manager)
    page = client.get(f"/dashboard/{project.slug}/training/").content.decode()
    tokens = re.findall(r'name="submission" value="([0-9a-f]{32})"', page)
    assert len(tokens) == 3  # one per kind's form
    form = {"kind": "reward", "max_length": "64", "submission": tokens[0]}
    first = client.post(f"/dashboard/{project.slug}/training/start/", form)
    second = client.post(f"/dashboard/{project.slug}/training/start/", form)
    run = TrainingRun.objects.get()
    assert first.status_code == second.status_code == 302 and first.url == second.url == f"/dashboard/runs/{run.pk}/"
    # A form rendered afresh carries a new token: starting the same settings again is another run.
    fresh = re.search(r'name="submission" value="([0-9a-f]{32})"',
                      client.get(f"/dashboard/{project.slug}/training/").content.decode()).group(1)
    assert fresh not in tokens
    client.post(f"/dashboard/{project.slug}/training/start/", {**form, "submission": fresh})
    assert TrainingRun.objects.count() == 2


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
    page = response.content.decode()
    assert response.status_code == 400 and "no decided pairs" in page
    # The field is named once, beside "Not started", not again in front of the message.
    assert "Not started (project):</strong> Project" in page.replace("&#x27;", "'")
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
def test_polled_fragment_of_a_running_run_brings_new_curves_and_log_lines(project, manager):
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.RUNNING, started_at=timezone.now(),
                             step=1, total_steps=4,
                             metrics_history=HISTORY[:1], log_tail="step 1 loss 0.69")
    client = _client(manager)
    page = client.get(f"/dashboard/runs/{run.pk}/").content.decode()
    assert f'id="run-live" hx-get="/dashboard/runs/{run.pk}/status/" hx-trigger="every 2s"' in page
    assert "step 2 loss 0.52" not in page
    # The worker logs another step; the next poll carries it without a reload.
    TrainingRun.objects.filter(pk=run.pk).update(step=2, metrics_history=HISTORY[:2],
                                                 log_tail="step 1 loss 0.69\nstep 2 loss 0.52")
    fragment = client.get(f"/dashboard/runs/{run.pk}/status/", HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith("<div id=\"run-live\"") and "<html" not in fragment
    assert 'hx-trigger="every 2s"' in fragment and "step 2 of 4" in fragment
    assert 'id="chart-loss"' in fragment and "<caption>eval_loss</caption>" in fragment
    assert '<td class="num">2</td><td class="num">0.5200</td>' in fragment
    assert "step 2 loss 0.52" in fragment and "Nothing logged yet." not in fragment
    assert "Last logged</dt><dd>step 2, eval_accuracy 0.75, eval_loss 0.6, loss 0.52" in fragment
    # The charts are drawn from the same numbers, embedded in the fragment.
    curves = re.search(r'<script id="run-curves" type="application/json">(.*?)</script>', fragment, re.S)
    assert curves and json.loads(curves.group(1)) == selectors.training_run_curves(run=TrainingRun.objects.get())
    assert "Evaluation metrics appear when the run succeeds." in fragment


@pytest.mark.django_db
def test_polled_fragment_of_a_succeeded_run_shows_evaluation_and_stops_polling(project, manager):
    by_length = {"64-127": {"pairs": 2, "accuracy": 0.5}, "0-63": {"pairs": 6, "accuracy": 0.8333333},
                 "512+": {"pairs": 1, "accuracy": 1.0}}
    run = _finished(project, metrics_history=HISTORY, log_tail="done",
                    eval_metrics={"eval_accuracy": 0.75, "eval_pairs": 9, "eval_by_length": by_length})
    client = _client(manager)
    for url in (f"/dashboard/runs/{run.pk}/status/", f"/dashboard/runs/{run.pk}/"):
        html = client.get(url).content.decode()
        assert "hx-trigger" not in html and "every 2s" not in html and "hx-get" not in html, url
        assert "<th scope=\"row\">eval_accuracy</th><td class=\"num\">0.75</td>" in html
        assert "Evaluation metrics appear" not in html and "{&#x27;" not in html and "eval_by_length</th>" not in html
        table = re.search(r'<table class="data" id="table-eval-by-length">(.*?)</table>', html, re.S)
        assert table, url
        rows = re.findall(r'<tr><th scope="row">([^<]+)</th><td class="num">([^<]+)</td><td class="num">([^<]+)</td>',
                          table.group(1))
        assert rows == [("0-63", "6", "0.833"), ("64-127", "2", "0.500"), ("512+", "1", "1.000")], url
        assert "done" in html and 'id="chart-loss"' in html


@pytest.mark.django_db
def test_queued_notice_shows_only_while_the_run_is_queued(project, manager):
    run = TrainingRunFactory(project=project)
    client = _client(manager)
    assert f"Run {run.pk} was queued." in client.get(f"/dashboard/runs/{run.pk}/").content.decode()
    assert f"Run {run.pk} was queued." in client.get(f"/dashboard/runs/{run.pk}/status/").content.decode()
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.RUNNING, started_at=timezone.now())
    for status in (TrainingRun.Status.RUNNING, TrainingRun.Status.SUCCEEDED, TrainingRun.Status.FAILED,
                   TrainingRun.Status.CANCELLED):
        finished = None if status == TrainingRun.Status.RUNNING else timezone.now()
        TrainingRun.objects.filter(pk=run.pk).update(status=status, finished_at=finished)
        for url in (f"/dashboard/runs/{run.pk}/", f"/dashboard/runs/{run.pk}/status/"):
            assert "was queued" not in client.get(url).content.decode(), (status, url)


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
    model = RewardModelFactory(project=project, training_run=run, artifact_path=str(tiny_reward_model(tmp_path)),
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


@pytest.mark.django_db
def test_cancelling_a_running_run_is_said_by_the_run_page_only_while_it_still_runs(project, manager):
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.RUNNING, started_at=timezone.now())
    client = _client(manager)
    page = client.post(f"/dashboard/runs/{run.pk}/cancel/", follow=True).content.decode()
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING and run.cancel_requested
    said = f"Cancel requested: run {run.pk} stops at its next logging step."
    assert page.count(said) == 1
    # The worker stops it at its next logging step: the page no longer says it will.
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.CANCELLED, finished_at=timezone.now())
    assert said not in client.get(f"/dashboard/runs/{run.pk}/").content.decode()

"""Training runs: submission and its dataset snapshot, the state machine, permissions, queueing, progress,
stale-run recovery, and end-to-end training through a real Celery worker on the configured broker."""
from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import connections
from django.utils import timezone

from labeling.errors import Conflict, DomainError
from labeling.models import Comparison
from rewards import services
from rewards.models import RewardModel, TrainingRun
from rewards.progress import RunProgressCallback
from tests.conftest import client_for
from tests.factories import PairFactory
from tests.rewards.factories import ImportedComparisonFactory, TrainingRunFactory, labeled_pairs

URL = "/api/v1/training-runs/"
TINY = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1}


def _running(run: TrainingRun, **fields) -> TrainingRun:
    now = timezone.now()
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.RUNNING, started_at=now,
                                                 heartbeat_at=now, **fields)
    run.refresh_from_db()
    return run


# --- submission and the dataset snapshot ----------------------------------------------------------------


@pytest.mark.django_db
def test_start_snapshots_the_decided_pairs_and_queues_only_after_commit(project, manager,
                                                                        django_capture_on_commit_callbacks):
    pairs = labeled_pairs(project, count=8)
    tie = PairFactory(project=project)
    ImportedComparisonFactory(pair=tie, choice=Comparison.Choice.TIE)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        run = services.training_run_start(project=project, kind="reward", created_by=manager,
                                          hyperparameters=TINY, eval_fraction=0.25, seed=3)
    assert len(callbacks) == 1
    assert run.status == TrainingRun.Status.QUEUED and run.created_by == manager
    assert run.pair_count == 8 and run.train_count + run.eval_count == 8 and run.eval_count >= 1
    assert sorted(run.train_pair_ids + run.eval_pair_ids) == sorted(p.pk for p in pairs)
    assert run.comparison_ids == sorted(Comparison.objects.filter(pair__in=pairs).values_list("pk", flat=True))
    assert len(run.dataset_hash) == 64 and run.export_policy == TrainingRun.ExportPolicy.MAJORITY
    # The recipe's defaults are filled in and stored with the run.
    assert run.hyperparameters["max_steps"] == 2 and "learning_rate" in run.hyperparameters
    again = services.training_run_start(project=project, kind="reward", hyperparameters=TINY, eval_fraction=0.25,
                                        seed=3, queue=False)
    assert again.dataset_hash == run.dataset_hash and again.eval_pair_ids == run.eval_pair_ids


@pytest.mark.django_db
def test_a_bad_hyperparameter_is_a_400_naming_the_field(project, manager):
    labeled_pairs(project, count=4)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": "reward",
                                              "hyperparameters": {"learning_rate": -1}}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "hyperparameters.learning_rate"
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["reward", "dpo", "rlhf"])
def test_more_steps_than_a_run_can_record_is_a_400_naming_max_steps(project, manager, kind):
    # step and total_steps are 32-bit columns: a run accepted with more steps would fail at its first progress write.
    labeled_pairs(project, count=4)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind,
                                              "hyperparameters": {"max_steps": 3_000_000_000}}, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["field"] == "hyperparameters.max_steps"
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["reward", "dpo"])
@pytest.mark.parametrize("base_model", ["/etc", "some/hub-model"])
def test_a_base_model_that_is_no_local_model_is_a_400_naming_it(project, manager, kind, base_model, settings):
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": ["/"]}  # the folder rule aside: no model there
    labeled_pairs(project, count=4)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind, "base_model": base_model},
                                        format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["field"] == "base_model" and error["code"] == "invalid_base_model"
    assert base_model in error["message"] and "not downloaded" in error["message"]
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_embedded_names_and_model_folders_are_accepted_as_base_models(project, tmp_path):
    from tests.rewards.tiny import tiny_reward_model

    labeled_pairs(project, count=4)
    for base_model in ("", "minilm", " SmolLM2 ", str(tiny_reward_model(tmp_path))):
        run = services.training_run_start(project=project, kind="reward", base_model=base_model, queue=False)
        assert run.base_model == base_model.strip()


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["dpo", "rlhf"])
def test_a_policy_base_model_that_cannot_generate_or_chat_is_a_400_at_submission(project, manager, kind, tmp_path,
                                                                                  settings):
    """Accepted before, these runs failed in the worker once it had loaded the model: an encoder has no language-model
    head, and a tokenizer without a chat template cannot build conversational prompts."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [tmp_path]}
    services.reward_model_register(project=project, path=tiny_reward_model(tmp_path), deploy=True)
    labeled_pairs(project, count=4)
    encoder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(encoder)
    no_template = tiny_causal_lm(tmp_path / "plain")
    tokenizer = AutoTokenizer.from_pretrained(no_template)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    for stale in ("chat_template.jinja", "chat_template.json"):
        (no_template / stale).unlink(missing_ok=True)
    with_template = tiny_causal_lm(tmp_path / "chat")

    def submit(base_model: str):
        return client_for(manager).post(URL, {"project": project.slug, "kind": kind, "base_model": base_model},
                                        format="json")

    for base_model, words in (("minilm", "sentence encoder"), (str(encoder), "BertModel, which does not generate")):
        response = submit(base_model)
        assert response.status_code == 400, response.json()
        error = response.json()["error"]
        assert (error["field"], error["code"]) == ("base_model", "invalid_base_model")
        assert words in error["message"]
    # String prompts need no chat template; conversations do.
    assert submit(str(no_template)).status_code == 202
    PairFactory(project=project, prompt__content=[{"role": "user", "content": "Hello?"}])
    conversation = PairFactory(project=project, prompt__content=[{"role": "user", "content": "How are you?"}])
    ImportedComparisonFactory(pair=conversation, choice=Comparison.Choice.A)
    refused = submit(str(no_template))
    assert refused.status_code == 400, refused.json()
    assert "no chat template" in refused.json()["error"]["message"]
    assert submit(str(with_template)).status_code == 202
    assert submit("").status_code == 202  # the embedded SmolLM2


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["dpo", "rlhf"])
def test_a_deployed_reward_model_whose_files_are_gone_is_a_400_at_submission(project, manager, kind, tmp_path):
    """RLHF's reward and DPO's judge: accepted before, the run failed once it had trained."""
    from tests.rewards.tiny import tiny_reward_model

    labeled_pairs(project, count=4)
    deployed = services.reward_model_register(project=project, path=tiny_reward_model(tmp_path), deploy=True)
    (tmp_path / "tiny-reward-bert" / "model.safetensors").unlink()
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind}, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert (error["field"], error["code"]) == ("kind", "artifact_missing")
    assert f"version {deployed.version}" in error["message"] and "no weights" in error["message"]
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_an_empty_dataset_is_a_400(project, manager):
    tie = PairFactory(project=project)
    ImportedComparisonFactory(pair=tie, choice=Comparison.Choice.TIE)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": "reward"}, format="json")
    assert response.status_code == 400
    body = response.json()["error"]
    assert body["code"] == "empty_dataset" and body["field"] == "project" and "no decided pairs" in body["message"]
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_rlhf_needs_a_deployed_reward_model(project):
    labeled_pairs(project, count=2)
    with pytest.raises(DomainError) as exc:
        services.training_run_start(project=project, kind="rlhf", queue=False)
    assert exc.value.code == "no_reward_model"


@pytest.mark.django_db
def test_permissions_manager_202_labeler_403_outsider_404(project, manager, labeler, outsider, admin_user):
    labeled_pairs(project, count=4)
    body = {"project": project.slug, "kind": "reward", "hyperparameters": TINY}
    assert client_for(labeler).post(URL, body, format="json").status_code == 403
    assert client_for(outsider).post(URL, body, format="json").status_code == 404
    response = client_for(manager).post(URL, body, format="json")
    assert response.status_code == 202
    data = response.json()
    assert data["status"] == "queued" and data["project"] == project.slug
    assert data["dataset"]["pairs"] == 4 and data["progress"]["step"] == 0
    assert client_for(admin_user).post(URL, body, format="json").status_code == 202
    run_url = f"{URL}{data['id']}/"
    # A run carries server paths, the worker's name and tracebacks: for the people who run training only.
    assert client_for(labeler).get(run_url).status_code == 403
    assert client_for(outsider).get(run_url).status_code == 404
    assert client_for(labeler).get(URL).json()["results"] == []
    assert client_for(labeler).get(URL, {"project": project.slug}).status_code == 403
    assert client_for(labeler).post(f"{run_url}cancel/").status_code == 403
    assert client_for(outsider).post(f"{run_url}cancel/").status_code == 404


@pytest.mark.django_db
def test_list_shows_only_runs_of_visible_projects_with_filters(project, manager, outsider):
    mine = TrainingRunFactory(project=project)
    TrainingRunFactory(project=project, kind=TrainingRun.Kind.DPO)
    TrainingRunFactory()  # another project's run
    client = client_for(manager)
    assert {r["id"] for r in client.get(URL).json()["results"]} == set(
        TrainingRun.objects.filter(project=project).values_list("pk", flat=True))
    only = client.get(URL, {"project": project.slug, "kind": "reward", "status": "queued"}).json()["results"]
    assert [r["id"] for r in only] == [mine.pk]
    assert client.get(URL, {"status": "bogus"}).status_code == 400
    assert client_for(outsider).get(URL).json()["results"] == []
    assert client_for(outsider).get(URL, {"project": project.slug}).status_code == 404


@pytest.mark.django_db
def test_a_run_names_the_model_it_registered_as_produced(project, manager):
    from rewards.models import Policy
    from tests.rewards.factories import RewardModelFactory

    judge = RewardModelFactory(project=project, version=1)
    reward_run = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now())
    produced = RewardModelFactory(project=project, version=2, training_run=reward_run)
    dpo_run = TrainingRunFactory(project=project, kind=TrainingRun.Kind.DPO, status=TrainingRun.Status.SUCCEEDED,
                                 finished_at=timezone.now(), reward_model=judge)
    policy = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, training_run=dpo_run,
                                   artifact_path="/nonexistent/policy")
    queued = TrainingRunFactory(project=project)
    client = client_for(manager)
    runs = {run["id"]: run for run in client.get(URL, {"project": project.slug}).json()["results"]}
    assert runs[reward_run.pk]["produced"] == {"type": "reward_model", "id": produced.pk, "version": 2}
    assert runs[reward_run.pk]["reward_model"] is None
    assert runs[dpo_run.pk]["produced"] == {"type": "policy", "id": policy.pk, "version": 1}
    assert runs[dpo_run.pk]["reward_model"] == judge.pk  # what it was judged by, not what it made
    assert runs[queued.pk]["produced"] is None
    assert client.get(f"{URL}{dpo_run.pk}/").json()["produced"] == {"type": "policy", "id": policy.pk, "version": 1}


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_broker_is_a_503_and_the_run_is_not_left_queued(project, manager, monkeypatch):
    labeled_pairs(project, count=4)
    # Nothing listens on port 1 of the loopback: every publish is refused.
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", "redis://127.0.0.1:1/0")
    response = client_for(manager).post(URL, {"project": project.slug, "kind": "reward", "hyperparameters": TINY},
                                        format="json")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.FAILED and "broker is unreachable" in run.error
    assert not TrainingRun.objects.filter(status=TrainingRun.Status.QUEUED).exists()


@pytest.mark.django_db
def test_a_submission_sent_again_with_its_idempotency_key_returns_the_first_run(project, manager):
    labeled_pairs(project, count=4)
    client = client_for(manager)
    body = {"project": project.slug, "kind": "reward", "hyperparameters": TINY, "seed": 3}
    first = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="8f14e45f-retry")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first
    again = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="8f14e45f-retry")
    assert again.status_code == 200 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and TrainingRun.objects.count() == 1
    # The same key with other settings names another request: refused, nothing started.
    other = client.post(URL, {**body, "seed": 4}, format="json", HTTP_IDEMPOTENCY_KEY="8f14e45f-retry")
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Another key, or none, is another run; a key is one run per project.
    assert client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="second").status_code == 202
    assert client.post(URL, body, format="json").status_code == 202
    assert TrainingRun.objects.count() == 3
    for bad in ("has space", "x" * 256, "caf\u00e9"):
        response = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY=bad)
        assert response.status_code == 400 and response.json()["error"]["field"] == "Idempotency-Key", bad
    assert TrainingRun.objects.count() == 3


@pytest.mark.django_db
def test_two_submissions_with_one_key_at_once_start_one_run(project, manager, monkeypatch):
    labeled_pairs(project, count=4)
    create = services._training_run_create

    def racing(**kwargs):
        # Another request with the same key inserts its run after this one looked for it and before it inserts.
        create(**kwargs)
        return create(**kwargs)

    monkeypatch.setattr(services, "_training_run_create", racing)
    run, created = services.training_run_start_once(project=project, idempotency_key="k", kind="reward",
                                                    hyperparameters=TINY, queue=False)
    assert created is False and list(TrainingRun.objects.values_list("pk", flat=True)) == [run.pk]


@pytest.mark.django_db(transaction=True)
def test_a_key_whose_run_could_not_be_queued_starts_a_new_run_when_retried(project, manager, monkeypatch):
    labeled_pairs(project, count=4)
    client = client_for(manager)
    body = {"project": project.slug, "kind": "reward", "hyperparameters": TINY}
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", "redis://127.0.0.1:1/0")
    assert client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-me").status_code == 503
    failed = TrainingRun.objects.get()
    monkeypatch.setattr(services, "_training_run_publish", lambda *, run: None)
    retried = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="retry-me")
    assert retried.status_code == 202 and retried.json()["id"] != failed.pk
    assert TrainingRun.objects.get(pk=retried.json()["id"]).status == TrainingRun.Status.QUEUED
    failed.refresh_from_db()
    assert failed.status == TrainingRun.Status.FAILED and failed.idempotency_key == ""


# --- the state machine ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_a_queued_run_at_once_a_running_one_by_request_and_a_finished_one_never(project, manager):
    queued = TrainingRunFactory(project=project)
    response = client_for(manager).post(f"{URL}{queued.pk}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    queued.refresh_from_db()
    assert queued.finished_at is not None

    running = _running(TrainingRunFactory(project=project))
    running = services.training_run_cancel(run=running)
    assert running.status == TrainingRun.Status.RUNNING and running.cancel_requested

    with pytest.raises(Conflict):
        services.training_run_cancel(run=queued)
    response = client_for(manager).post(f"{URL}{queued.pk}/cancel/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_cancellable"


@pytest.mark.django_db
def test_execute_claims_only_a_queued_run(project):
    cancelled = TrainingRunFactory(project=project)
    services.training_run_cancel(run=cancelled)
    assert services.training_run_execute(run_id=cancelled.pk).status == TrainingRun.Status.CANCELLED
    running = _running(TrainingRunFactory(project=project), worker_hostname="other@host")
    again = services.training_run_execute(run_id=running.pk, worker="me@host")
    assert again.status == TrainingRun.Status.RUNNING and again.worker_hostname == "other@host"
    assert services.training_run_execute(run_id=987654) is None


@pytest.mark.django_db
def test_execute_fails_the_run_when_its_labels_changed(project):
    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="reward", hyperparameters=TINY, queue=False)
    Comparison.objects.filter(pk=run.comparison_ids[0]).delete()
    run = services.training_run_execute(run_id=run.pk, worker="w@h")
    assert run.status == TrainingRun.Status.FAILED and "changed" in run.error
    assert run.started_at is not None and run.finished_at is not None and run.worker_hostname == "w@h"


@pytest.mark.django_db
def test_a_base_model_folder_gone_before_the_run_starts_fails_it_with_the_reason_and_no_traceback(
        project, tmp_path, settings, caplog):
    import shutil

    from tests.rewards.tiny import tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=4)
    base = tiny_reward_model(tmp_path / "base")
    run = services.training_run_start(project=project, kind="reward", base_model=str(base), hyperparameters=TINY,
                                      queue=False)
    shutil.rmtree(base)
    with caplog.at_level("INFO", logger="rewards.services"):
        run = services.training_run_execute(run_id=run.pk, worker="w@h")
    assert run.status == TrainingRun.Status.FAILED and run.finished_at is not None
    assert run.error.startswith(f"base_model: {base} is neither an embedded model")
    assert "Traceback" not in run.log_tail
    warnings = [record for record in caplog.records if record.name == "rewards.services" and record.levelno > 20]
    assert [(record.levelname, record.exc_info) for record in warnings] == [("WARNING", None)]


@pytest.mark.django_db
def test_fail_leaves_a_finished_run_alone(project):
    run = TrainingRunFactory(project=project)
    assert services.training_run_fail(run_id=run.pk, error="boom").status == TrainingRun.Status.FAILED
    assert services.training_run_fail(run_id=run.pk, error="again").error == "boom"


@pytest.mark.django_db
def test_stale_running_runs_are_failed_as_worker_lost(project):
    stale = _running(TrainingRunFactory(project=project), worker_hostname="gone@box")
    old = timezone.now() - timedelta(minutes=30)
    TrainingRun.objects.filter(pk=stale.pk).update(heartbeat_at=old)
    fresh = _running(TrainingRunFactory(project=project))
    queued = TrainingRunFactory(project=project)
    assert services.training_runs_recover_stale(older_than=timedelta(minutes=10)) == 1
    stale.refresh_from_db()
    assert stale.status == TrainingRun.Status.FAILED
    assert stale.error.startswith(f"worker lost (no heartbeat since {old.isoformat()}") and "gone@box" in stale.error
    assert TrainingRun.objects.get(pk=fresh.pk).status == TrainingRun.Status.RUNNING
    assert TrainingRun.objects.get(pk=queued.pk).status == TrainingRun.Status.QUEUED


# --- progress -------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_progress_callback_writes_progress_and_stops_on_cancel(project):
    run = _running(TrainingRunFactory(project=project))
    callback = RunProgressCallback(run_id=run.pk, interval=3600)
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)
    control = SimpleNamespace(should_training_stop=False)
    callback.on_train_begin(None, state, control)
    state.global_step, state.epoch = 4, 0.4
    callback.on_step_end(None, state, control)  # throttled: nothing written
    assert TrainingRun.objects.get(pk=run.pk).step == 0
    callback.on_log(None, state, control, logs={"loss": 0.69, "learning_rate": 1e-4, "grad_norm": float("nan")})
    run.refresh_from_db()
    assert (run.step, run.total_steps, run.epoch) == (4, 10, 0.4) and run.eta_seconds is not None
    assert run.metrics_history == [{"step": 4, "epoch": 0.4, "loss": 0.69, "learning_rate": 1e-4, "grad_norm": None}]
    assert '"loss": 0.69' in run.log_tail and not control.should_training_stop
    services.training_run_cancel(run=run)
    state.global_step = 5
    callback.on_log(None, state, control, logs={"loss": 0.5})
    assert control.should_training_stop and callback.cancelled


# --- end to end through a real worker --------------------------------------------------------------------


@pytest.fixture
def training_worker(settings, tmp_path):
    """A Celery worker in a thread, consuming the `training` queue of the configured broker."""
    from celery.contrib.testing.worker import start_worker
    from celery.signals import task_postrun

    from worker.celery import app

    if app.conf.broker_url.startswith("filesystem://"):
        # Seen here: a second in-process worker on the file-system broker never reports ready.
        pytest.skip("needs a broker server: set CELERY_BROKER_URL=redis://... (CI does)")
    # The tests' base models are built under tmp_path; the API takes folders from the import folders only.
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts", "MODEL_IMPORT_DIRS": [tmp_path]}
    with app.connection_for_write() as connection:
        # Messages left by an interrupted earlier session would name run ids of another database.
        try:
            connection.default_channel.queue_purge("training")
        except Exception:  # the queue may not exist yet
            pass

    def close_connections(**kwargs):
        # The worker thread's connections must not outlive the test, or the test database cannot be dropped.
        connections.close_all()

    task_postrun.connect(close_connections, weak=False)
    try:
        with contextlib.ExitStack() as stack:
            for attempt in (1, 2):
                try:
                    stack.enter_context(start_worker(app, pool="solo", perform_ping_check=False,
                                                     queues=["training"], shutdown_timeout=60))
                    break
                except RuntimeError as exc:
                    # Celery's set-up of an embedded worker reads process-wide registries without a lock, and a
                    # thread an earlier test left running (a live server, a writer) can add to one meanwhile: seen
                    # once as "dictionary changed size during iteration", before the worker thread started.
                    if attempt == 2 or "changed size during iteration" not in str(exc):
                        raise
            yield app
    finally:
        task_postrun.disconnect(close_connections)


def _wait_for(run_id: int, predicate, *, timeout: float = 240.0) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = TrainingRun.objects.get(pk=run_id)
        if predicate(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} stayed {TrainingRun.objects.get(pk=run_id).status} for {timeout} s")


@pytest.mark.django_db(transaction=True)
def test_a_reward_model_trains_end_to_end_through_the_worker(project, manager, tmp_path, training_worker):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.rewards.tiny import tiny_reward_model

    base = tiny_reward_model(tmp_path / "base")
    labeled_pairs(project, count=6)
    response = client_for(manager).post(URL, {
        "project": project.slug, "kind": "reward", "base_model": str(base), "eval_fraction": 0.3,
        "hyperparameters": {**TINY, "max_steps": 3, "learning_rate": 1e-2},
    }, format="json")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    run = _wait_for(response.json()["id"], lambda r: r.is_finished)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.started_at <= run.finished_at and run.worker_hostname
    assert run.step == run.total_steps == 3
    assert [entry["step"] for entry in run.metrics_history if "loss" in entry] == [1, 2, 3]
    assert run.eval_metrics and run.heartbeat_at is not None

    trained = AutoModelForSequenceClassification.from_pretrained(run.artifact_path)
    original = AutoModelForSequenceClassification.from_pretrained(base)
    assert trained.config.num_labels == 1
    assert any(not torch.equal(p, original.state_dict()[name]) for name, p in trained.state_dict().items())

    model = RewardModel.objects.get(training_run=run)
    assert model.version == 1 and model.artifact_path == run.artifact_path and not model.is_deployed
    assert model.lineage["dataset_hash"] == run.dataset_hash and model.base_model == str(base)
    assert model.lineage["base_model"] == model.lineage["base_model_path"] == str(base)
    detail = client_for(manager).get(f"{URL}{run.pk}/").json()
    assert detail["status"] == "succeeded" and detail["progress"]["step"] == 3
    assert detail["produced"] == {"type": "reward_model", "id": model.pk, "version": 1}
    assert detail["reward_model"] is None


def _causal_params_changed(artifact: str, base) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(artifact)
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    return any(not torch.equal(p, original[name]) for name, p in trained.state_dict().items() if name in original)


@pytest.mark.django_db(transaction=True)
def test_dpo_trains_end_to_end_through_the_worker_and_registers_a_policy(project, manager, tmp_path,
                                                                          training_worker):
    from rewards.models import Policy
    from tests.rewards.tiny import tiny_causal_lm

    base = tiny_causal_lm(tmp_path / "policy")
    labeled_pairs(project, count=6)
    response = client_for(manager).post(URL, {
        "project": project.slug, "kind": "dpo", "base_model": str(base), "eval_fraction": 0.3,
        "hyperparameters": {"max_steps": 2, "max_length": 96, "learning_rate": 1e-3, "logging_steps": 1,
                            "win_rate_prompts": 1, "max_new_tokens": 4},
    }, format="json")
    assert response.status_code == 202, response.json()
    run = _wait_for(response.json()["id"], lambda r: r.is_finished)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert any("loss" in entry for entry in run.metrics_history)
    assert "eval_rewards/accuracies" in run.eval_metrics
    assert _causal_params_changed(run.artifact_path, base)
    policy = Policy.objects.get(training_run=run)
    assert policy.kind == "dpo" and policy.version == 1 and policy.artifact_path == run.artifact_path
    # No reward model is deployed in the project, so there is no judge for the win rate: the log says so.
    assert run.reward_model_id is None and "win_rate_vs_base" not in run.eval_metrics
    assert services.NO_JUDGE_MESSAGE in run.log_tail
    detail = client_for(manager).get(f"{URL}{run.pk}/").json()
    assert detail["produced"] == {"type": "policy", "id": policy.pk, "version": 1}


@pytest.mark.django_db(transaction=True)
def test_rlhf_trains_end_to_end_through_the_worker_with_the_deployed_reward_model(project, manager, tmp_path,
                                                                                  training_worker):
    from rewards.models import Policy
    from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

    reward = services.reward_model_register(project=project, path=tiny_reward_model(tmp_path / "reward"))
    services.reward_model_deploy(reward_model=reward)
    base = tiny_causal_lm(tmp_path / "policy")
    labeled_pairs(project, count=6)
    response = client_for(manager).post(URL, {
        "project": project.slug, "kind": "rlhf", "base_model": str(base),
        "hyperparameters": {"max_steps": 2, "learning_rate": 1e-3, "max_completion_length": 8,
                            "heldout_prompts": 2, "logging_steps": 1},
    }, format="json")
    assert response.status_code == 202, response.json()
    run = _wait_for(response.json()["id"], lambda r: r.is_finished)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error + run.log_tail
    assert run.reward_model_id == reward.pk
    assert {"reward_before", "reward_after", "kl_to_base"} <= set(run.eval_metrics)
    assert "no prompts held out" not in run.log_tail
    assert _causal_params_changed(run.artifact_path, base)
    assert Policy.objects.get(training_run=run).kind == "rlhf"


@pytest.mark.django_db(transaction=True)
def test_a_running_run_is_cancelled_through_the_worker(project, manager, tmp_path, training_worker):
    from tests.rewards.tiny import tiny_reward_model

    base = tiny_reward_model(tmp_path / "base")
    labeled_pairs(project, count=6)
    response = client_for(manager).post(URL, {
        "project": project.slug, "kind": "reward", "base_model": str(base),
        "hyperparameters": {**TINY, "max_steps": 5000},
    }, format="json")
    run_id = response.json()["id"]
    _wait_for(run_id, lambda r: r.status == TrainingRun.Status.RUNNING and r.step >= 1)
    response = client_for(manager).post(f"{URL}{run_id}/cancel/")
    assert response.status_code == 200 and response.json()["cancel_requested"]
    run = _wait_for(run_id, lambda r: r.is_finished)
    assert run.status == TrainingRun.Status.CANCELLED, run.error
    assert 1 <= run.step < 5000 and run.finished_at is not None
    assert not RewardModel.objects.filter(training_run=run).exists()


@pytest.mark.django_db
def test_train_command_with_wait_trains_in_the_foreground(project, tmp_path, settings, capsys):
    import json

    from django.core.management import call_command

    from tests.rewards.tiny import tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=4)
    call_command("train", "--project", project.slug, "--kind", "reward", "--base-model",
                 str(tiny_reward_model(tmp_path / "base")), "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "64", "--learning-rate", "0.001", "--hyperparameters", '{"logging_steps": 1}',
                 "--wait")
    captured = capsys.readouterr()
    # The contract: stdout is the one JSON line; the trainer's log dicts ({'loss': ...}) go to stderr.
    assert captured.out.endswith("\n") and len(captured.out.splitlines()) == 1, captured.out
    result = json.loads(captured.out)
    run = TrainingRun.objects.get(pk=result["run"])
    assert result["status"] == "succeeded" == run.status
    assert result["artifact"] == run.artifact_path and result["eval_metrics"] == run.eval_metrics
    assert run.hyperparameters["per_device_train_batch_size"] == 2 and run.hyperparameters["learning_rate"] == 0.001
    assert run.worker_hostname.startswith("cli@") and "training" in captured.err
    assert "'loss'" in captured.err
    model = RewardModel.objects.get(training_run=run)
    assert model.version == 1
    assert result["produced"] == {"type": "reward_model", "id": model.pk, "version": 1}


@pytest.mark.django_db
def test_a_reward_run_says_in_its_log_how_many_pairs_it_kept_by_shortening_them(project, tmp_path, settings):
    from tests.rewards.tiny import tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="reward", base_model=str(tiny_reward_model(tmp_path)),
                                      hyperparameters={**TINY, "max_length": 16}, eval_fraction=0.25, queue=False)
    run = services.training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    lineage = RewardModel.objects.get(training_run=run).lineage
    assert lineage["shortened_pairs"] > 0
    assert (f"{lineage['shortened_pairs']} of 4 pairs were longer than max_length (16 tokens) and were kept with "
            "the prompt cut from the left") in run.log_tail
    assert "none was dropped" in run.log_tail


@pytest.mark.django_db
@pytest.mark.parametrize(("count", "eval_fraction", "held_out", "reason"), [
    (2, 0.0, 0, "no pairs held out (eval_fraction is 0): the run trains on all 2 pairs"),
    (1, 0.2, 0, "no pairs held out: the split is by prompt, and the one pair has a single prompt"),
    (4, 0.25, 1, None),
])
def test_a_run_with_nothing_held_out_says_why_in_its_log(project, tmp_path, settings, count, eval_fraction, held_out,
                                                          reason):
    from tests.rewards.tiny import tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=count)
    run = services.training_run_start(project=project, kind="reward", base_model=str(tiny_reward_model(tmp_path)),
                                      hyperparameters=TINY, eval_fraction=eval_fraction, queue=False)
    assert (run.train_count, run.eval_count) == (count - held_out, held_out)
    run = services.training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.eval_metrics["eval_pairs"] == held_out
    if reason is None:
        assert "no pairs held out" not in run.log_tail
    else:
        assert reason in run.log_tail and run.eval_metrics["eval_accuracy"] is None


@pytest.mark.django_db
@pytest.mark.parametrize(("count", "heldout", "reason"), [
    (1, 8, "no prompts held out: at most half of the distinct prompts are held out and the run has one"),
    (2, 0, "no prompts held out (heldout_prompts is 0)"),
])
def test_an_rlhf_run_with_no_prompt_held_out_says_why_in_its_log(project, tmp_path, settings, count, heldout,
                                                                 reason):
    from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    services.reward_model_register(project=project, path=tiny_reward_model(tmp_path / "reward"), deploy=True)
    labeled_pairs(project, count=count)
    run = services.training_run_start(
        project=project, kind="rlhf", base_model=str(tiny_causal_lm(tmp_path / "policy")), eval_fraction=0.0,
        hyperparameters={"max_steps": 1, "max_completion_length": 4, "num_generations": 2,
                         "per_device_train_batch_size": 2, "heldout_prompts": heldout}, queue=False)
    run = services.training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert not {"reward_before", "reward_after", "kl_to_base"} & set(run.eval_metrics)
    assert reason in run.log_tail and "reports no reward_before, reward_after or kl_to_base" in run.log_tail
    # RLHF holds out prompts of its own, so the pairs' eval split is not what the log talks about.
    assert "no pairs held out" not in run.log_tail


@pytest.mark.django_db
def test_train_command_interrupted_with_ctrl_c_cancels_the_run_instead_of_leaving_it_running(
        project, tmp_path, settings, capsys, monkeypatch):
    import json

    from django.core.management import CommandError, call_command

    from rewards.training import reward

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=4)

    def interrupted(*, checkpoint_dir, **kwargs):
        # Stopped with Ctrl-C after the trainer kept a checkpoint, which a sweep would otherwise resume from.
        (checkpoint_dir / "checkpoint-2").mkdir(parents=True)
        (checkpoint_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(reward, "train_reward_model", interrupted)
    with pytest.raises(CommandError, match="interrupted"):
        call_command("train", "--project", project.slug, "--wait")
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.CANCELLED and run.finished_at is not None
    assert "interrupted" in run.log_tail
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert not services.training_run_checkpoint_dir(run=run).exists()
    # Nothing left for a sweep to find and hand to a worker.
    assert services.training_runs_recover_stale(older_than=timedelta(0)) == 0


@pytest.mark.django_db
def test_train_command_reports_bad_input_as_an_error(project):
    from django.core.management import CommandError, call_command

    labeled_pairs(project, count=2)
    with pytest.raises(CommandError, match="learning_rate"):
        call_command("train", "--project", project.slug, "--learning-rate", "-1", "--wait")
    with pytest.raises(CommandError, match="No project"):
        call_command("train", "--project", "nope")
    with pytest.raises(CommandError, match=r"/etc is neither an embedded model .*\(base_model\)$"):
        call_command("train", "--project", project.slug, "--base-model", "/etc", "--wait")
    with pytest.raises(CommandError, match=r"\(base_model\)$"):
        call_command("train", "--project", project.slug, "--base-model", "some/hub-model")
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize(("base_model", "default", "label"), [
    ("", "minilm", "sentence-transformers/all-MiniLM-L6-v2 (embedded)"),
    ("  ", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)"),
    (" SmolLM2 ", "minilm", "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)"),
    ("all-MiniLM-L6-v2", "smollm2", "sentence-transformers/all-MiniLM-L6-v2 (embedded)"),
    ("/models/my-rm", "minilm", "/models/my-rm"),
])
def test_the_registry_names_an_embedded_base_model_by_its_model_id_not_its_folder(base_model, default, label):
    from rewards.training.common import base_model_label

    assert base_model_label(base_model, default=default) == label


@pytest.mark.django_db
def test_an_eta_past_what_the_run_can_record_is_written_as_the_most_it_holds(project, monkeypatch):
    # eta_seconds is a 32-bit column: a slow first step of a long run (50 minutes, a million steps to go) gave an
    # ETA past it, and the progress write failed the run.
    from rewards import progress

    run = _running(TrainingRunFactory(project=project))
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    callback = RunProgressCallback(run_id=run.pk, interval=0)
    state = SimpleNamespace(global_step=0, max_steps=1_000_000, epoch=0.0)
    control = SimpleNamespace(should_training_stop=False)
    callback.on_train_begin(None, state, control)
    clock[0], state.global_step = 3000.0, 1
    callback.on_log(None, state, control, logs={"loss": 0.69})
    run.refresh_from_db()
    assert run.step == 1 and run.eta_seconds == 2**31 - 1

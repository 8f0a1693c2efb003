"""Training runs from submission to the registry: hyperparameters refused at submission, runs that fail with a
clear reason instead of crashing, cancelling, deploying, registering and evaluating model folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from labeling.errors import Conflict, DomainError
from rewards import services
from rewards.models import RewardModel, RewardModelDeployment, TrainingRun
from tests.conftest import client_for
from tests.factories import ProjectFactory
from tests.rewards.factories import RewardModelFactory, TrainingRunFactory, labeled_pairs
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

URL = "/api/v1/training-runs/"
TINY = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1}


def tiny_roberta(tmp_path: Path) -> Path:
    """A 1-layer RoBERTa-style encoder: 514 position embeddings of which the first two are the padding offset
    (positions are numbered from pad_token_id + 1), so 512 tokens fit, as in roberta-base."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from rewards.embedded import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, num_labels=1, pad_token_id=1)
    path = Path(tmp_path) / "tiny-roberta"
    RobertaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def artifacts(settings, tmp_path) -> Path:
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    return tmp_path / "artifacts"


# --- hyperparameters at submission ----------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["reward", "dpo", "rlhf"])
@pytest.mark.parametrize(("name", "value"), [
    ("learning_rate", "1e-4"), ("learning_rate", True), ("max_length", "64"), ("per_device_train_batch_size", True),
    ("num_train_epochs", 0), ("learning_rate", -1e-5), ("per_device_train_batch_size", 0),
    ("output_dir", "/tmp/elsewhere"), ("report_to", ["wandb"]), ("push_to_hub", True), ("hub_token", "hf_secret"),
    ("resume_from_checkpoint", "/tmp"), ("deepspeed", "ds.json"), ("logging_dir", "/tmp"), ("no_such_field", 1),
])
def test_a_bad_or_service_owned_hyperparameter_is_a_400_naming_it(project, manager, kind, name, value):
    labeled_pairs(project, count=4)
    RewardModelFactory(project=project, is_deployed=True, deployed_at="2024-01-01T00:00:00Z")
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind,
                                              "hyperparameters": {name: value}}, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["field"] == f"hyperparameters.{name}"
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_the_api_takes_base_models_and_registrations_from_import_folders_and_the_projects_own_runs(
        project, manager, tmp_path, settings):
    """Another project's run folder holds weights trained on that project's data: neither its training nor its
    registry may take it through the API, and the answer for it is the one for a folder that does not exist."""
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts",
                        "MODEL_IMPORT_DIRS": [tmp_path / "imports"]}
    labeled_pairs(project, count=4)
    other = ProjectFactory()
    folders = {}
    for name, owner in (("mine", project), ("theirs", other)):
        run = TrainingRunFactory(project=owner)
        folders[name] = tiny_reward_model(tmp_path / "artifacts" / "runs" / str(run.pk))
    folders["imported"] = tiny_reward_model(tmp_path / "imports" / "rm")
    folders["missing"] = tmp_path / "elsewhere" / "rm"
    client = client_for(manager)

    def start(folder) -> dict:
        response = client.post(URL, {"project": project.slug, "kind": "reward", "base_model": str(folder),
                                     "hyperparameters": TINY}, format="json")
        return {"status": response.status_code, **(response.json()["error"] if response.status_code >= 400 else {})}

    runs_before = TrainingRun.objects.count()
    for name in ("theirs", "missing"):
        refused = start(folders[name])
        assert (refused["status"], refused["field"], refused["code"]) == (400, "base_model", "invalid_base_model")
        assert "PREFLAB_MODEL_IMPORT_DIRS" in refused["message"]
    assert TrainingRun.objects.count() == runs_before
    assert start(folders["mine"])["status"] == 202
    assert start(folders["imported"])["status"] == 202
    assert TrainingRun.objects.count() == runs_before + 2

    registered = client.post("/api/v1/reward-models/register/", {"project": project.slug,
                                                                 "path": str(folders["theirs"])}, format="json")
    assert registered.status_code == 400 and registered.json()["error"]["code"] == "path_not_allowed"
    assert client.post("/api/v1/reward-models/register/", {"project": project.slug, "path": str(folders["mine"])},
                       format="json").status_code == 201
    assert RewardModel.objects.filter(project=project).count() == 1
    # An operator's command line (the service without the API's restriction) may name any local folder.
    run = services.training_run_start(project=project, kind="reward", base_model=str(folders["theirs"]),
                                      hyperparameters=TINY, queue=False)
    assert run.base_model == str(folders["theirs"])


@pytest.mark.django_db
def test_a_reward_max_length_past_the_backbones_positions_is_a_400_at_submission(project, manager, tmp_path,
                                                                                   settings):
    """The default MiniLM has 512 positions and the tiny RoBERTa 514; the worker's exact check (RoBERTa numbers
    positions from its padding index) stays for the edge, the plain mistake is refused before a run is queued."""
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [tmp_path]}
    labeled_pairs(project, count=4)
    client = client_for(manager)
    roberta = str(tiny_roberta(tmp_path))
    for base_model, max_length, limit in (("", 1024, "512"), ("minilm", 513, "512"), (roberta, 600, "514")):
        response = client.post(URL, {"project": project.slug, "kind": "reward", "base_model": base_model,
                                     "hyperparameters": {"max_length": max_length}}, format="json")
        assert response.status_code == 400, response.json()
        error = response.json()["error"]
        assert error["field"] == "hyperparameters.max_length" and limit in error["message"], error
        assert error["message"].startswith("hyperparameters.max_length: "), error  # named where only it is shown
    assert not TrainingRun.objects.exists()
    response = client.post(URL, {"project": project.slug, "kind": "reward", "hyperparameters": {"max_length": 512}},
                           format="json")
    assert response.status_code == 202, response.json()


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["reward", "dpo", "rlhf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["learning_rate", "max_length", "max_steps"])
def test_nan_and_infinity_from_the_command_line_are_refused_naming_the_field(project, kind, value, name):
    # Python's json (the train command's --hyperparameters) reads NaN and Infinity; the API's parser refuses them.
    labeled_pairs(project, count=4)
    RewardModelFactory(project=project, is_deployed=True, deployed_at="2024-01-01T00:00:00Z")
    with pytest.raises(DomainError) as caught:
        services.training_run_start(project=project, kind=kind, hyperparameters={name: value}, queue=False)
    assert caught.value.field == f"hyperparameters.{name}"


# --- runs that cannot train fail with the reason ---------------------------------------------------------


@pytest.mark.django_db
def test_bf16_on_a_worker_without_a_bf16_gpu_fails_the_run_naming_bf16(project, tmp_path, artifacts, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="reward", base_model=str(tiny_reward_model(tmp_path)),
                                      hyperparameters={**TINY, "bf16": True}, queue=False)
    run = services.training_run_execute(run_id=run.pk, worker="w@h")
    assert run.status == TrainingRun.Status.FAILED
    assert run.error.startswith("bf16: ") and "GPU" in run.error, run.error
    assert "Traceback" not in run.log_tail
    assert not RewardModel.objects.exists() and not (artifacts / "runs" / str(run.pk)).exists()


def test_max_length_beyond_a_padding_offset_model_positions_is_refused_before_training(tmp_path):
    from rewards.training.common import HyperparameterError
    from rewards.training.data import PreferenceExample
    from rewards.training.reward import train_reward_model

    base = tiny_roberta(tmp_path)
    pairs = [PreferenceExample(prompt="word " * 600, chosen="word " * 600, rejected="no"),
             PreferenceExample(prompt="Hi?", chosen="Hello there.", rejected="no")]
    with pytest.raises(HyperparameterError) as caught:
        train_reward_model(base_model=str(base), train=pairs, eval=[], output_dir=tmp_path / "out",
                           hyperparameters={**TINY, "max_length": 513})
    assert caught.value.field == "max_length" and "512" in caught.value.message
    assert not (tmp_path / "out").exists()
    # The 512 positions it has are all usable.
    result = train_reward_model(base_model=str(base), train=pairs, eval=[], output_dir=tmp_path / "fits",
                                hyperparameters={**TINY, "max_steps": 1, "max_length": 512})
    assert result.shortened_pairs == 1


@pytest.mark.django_db
@pytest.mark.parametrize("gone", ["version", "files"])
def test_an_rlhf_run_whose_reward_model_went_away_fails_with_the_reason(project, tmp_path, artifacts, gone):
    import shutil

    from django.utils import timezone

    labeled_pairs(project, count=4)
    judge = RewardModelFactory(project=project, artifact_path=str(tiny_reward_model(tmp_path / "rm")),
                               is_deployed=True, deployed_at=timezone.now())
    run = services.training_run_start(project=project, kind="rlhf", base_model=str(tiny_causal_lm(tmp_path)),
                                      hyperparameters={"max_steps": 1}, queue=False)
    if gone == "version":
        judge.delete()
    else:
        shutil.rmtree(judge.artifact_path)
    run = services.training_run_execute(run_id=run.pk, worker="w@h")
    assert run.status == TrainingRun.Status.FAILED
    assert "reward model" in run.error and "start a new run" in run.error, run.error
    assert "Traceback" not in run.log_tail


@pytest.mark.django_db
def test_a_dpo_run_whose_judge_files_went_away_trains_without_the_win_rate(project, tmp_path, artifacts):
    import shutil

    from django.utils import timezone

    from rewards.models import Policy

    labeled_pairs(project, count=4)
    judge = RewardModelFactory(project=project, artifact_path=str(tiny_reward_model(tmp_path / "rm")),
                               is_deployed=True, deployed_at=timezone.now())
    run = services.training_run_start(project=project, kind="dpo", base_model=str(tiny_causal_lm(tmp_path)),
                                      hyperparameters={"max_steps": 1, "max_length": 64, "max_new_tokens": 4,
                                                       "win_rate_prompts": 1}, queue=False)
    shutil.rmtree(judge.artifact_path)
    run = services.training_run_execute(run_id=run.pk, worker="w@h")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert "no win rate: The files of the reward model" in run.log_tail
    assert "win_rate_vs_base" not in run.eval_metrics
    assert Policy.objects.get(training_run=run).version == 1


@pytest.mark.django_db
@pytest.mark.parametrize("folder_before", [False, True], ids=["made-by-the-run", "there-before"])
def test_a_failed_run_leaves_no_partial_model_folder_but_keeps_one_it_did_not_make(project, tmp_path, artifacts,
                                                                                    folder_before):
    from transformers import TrainerCallback

    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="dpo", base_model=str(tiny_causal_lm(tmp_path)),
                                      hyperparameters={"max_steps": 2, "max_length": 64, "win_rate_prompts": 0},
                                      queue=False)
    folder = artifacts / "runs" / str(run.pk)
    if folder_before:  # another database's run under the same id
        folder.mkdir(parents=True)
        (folder / "theirs.txt").write_text("kept")

    class Breaks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            (folder / "model").mkdir(parents=True, exist_ok=True)
            (folder / "model" / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("the machine ran out of memory")

    run = services.training_run_execute(run_id=run.pk, worker="w@h", callbacks=[Breaks()])
    assert run.status == TrainingRun.Status.FAILED and "ran out of memory" in run.error
    if folder_before:
        assert (folder / "theirs.txt").read_text() == "kept"
    else:
        assert not folder.exists()


# --- cancel ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_cancelling_a_run_queued_again_after_a_lost_worker_removes_its_partial_files(project, artifacts):
    run = TrainingRunFactory(project=project, attempts=1)
    partial = artifacts / "runs" / str(run.pk)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    checkpoint = artifacts / "checkpoints" / str(run.pk) / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    run = services.training_run_cancel(run=run)
    assert run.status == TrainingRun.Status.CANCELLED
    assert not partial.exists() and not checkpoint.parent.exists()
    with pytest.raises(Conflict) as caught:
        services.training_run_cancel(run=run)
    assert caught.value.code == "not_cancellable"


# --- deploy ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_deploying_a_version_whose_folder_was_emptied_is_refused_and_changes_nothing(project, tmp_path):
    live = RewardModelFactory(project=project, version=1, artifact_path=str(tiny_reward_model(tmp_path / "1")))
    services.reward_model_deploy(reward_model=live)
    emptied = tmp_path / "2"
    emptied.mkdir()
    broken = RewardModelFactory(project=project, version=2, artifact_path=str(emptied))
    with pytest.raises(DomainError) as caught:
        services.reward_model_deploy(reward_model=broken)
    assert caught.value.code == "artifact_missing" and caught.value.status_code == 400
    assert list(RewardModel.objects.filter(is_deployed=True)) == [live]
    assert RewardModelDeployment.objects.count() == 1


# --- register and evaluate ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_registering_a_folder_without_a_tokenizer_is_refused(project, tmp_path):
    folder = tiny_reward_model(tmp_path)
    for path in folder.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    with pytest.raises(DomainError) as caught:
        services.reward_model_register(project=project, path=folder)
    assert caught.value.field == "path" and "tokenizer" in caught.value.message
    assert not RewardModel.objects.exists()


@pytest.mark.django_db
def test_registering_a_causal_lm_names_its_architecture(project, tmp_path):
    with pytest.raises(DomainError) as caught:
        services.reward_model_register(project=project, path=tiny_causal_lm(tmp_path))
    assert caught.value.code == "not_a_reward_model" and "LlamaForCausalLM" in caught.value.message


@pytest.mark.django_db
def test_evaluating_a_folder_that_is_no_reward_model_is_a_command_error(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "no"}) + "\n")
    with pytest.raises(CommandError) as caught:
        call_command("evaluate_reward_model", str(tiny_causal_lm(tmp_path)), str(data), "--format", "trl")
    assert "LlamaForCausalLM" in str(caught.value)


@pytest.mark.django_db
def test_cancel_through_the_api_while_running_twice_and_after_the_end(project, manager):
    from django.utils import timezone

    client = client_for(manager)
    run = TrainingRunFactory(project=project)
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.RUNNING, started_at=timezone.now())
    for _ in range(2):
        response = client.post(f"{URL}{run.pk}/cancel/")
        assert response.status_code == 200 and response.json()["status"] == "running"
        assert response.json()["cancel_requested"] is True
    for status in (TrainingRun.Status.SUCCEEDED, TrainingRun.Status.FAILED):
        done = TrainingRunFactory(project=project, status=status, finished_at=timezone.now())
        response = client.post(f"{URL}{done.pk}/cancel/")
        assert response.status_code == 409 and response.json()["error"]["code"] == "not_cancellable"
        done.refresh_from_db()
        assert done.status == status and not done.cancel_requested


# --- listing --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_runs_page_newest_first_and_another_project_run_is_a_404(project, manager):
    runs = [TrainingRunFactory(project=project) for _ in range(5)]
    hidden = TrainingRunFactory(project=ProjectFactory())
    client = client_for(manager)
    page = client.get(URL, {"project": project.slug, "limit": 2, "offset": 2}).json()
    assert page["count"] == 5 and [r["id"] for r in page["results"]] == [runs[2].pk, runs[1].pk]
    assert client.get(URL, {"kind": "dpo"}).json()["count"] == 0
    for path in (f"{URL}{hidden.pk}/", f"{URL}{hidden.pk}/cancel/", f"{URL}{2**70}/"):
        response = client.post(path) if path.endswith("cancel/") else client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    hidden.refresh_from_db()
    assert not hidden.cancel_requested


# --- the train command ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_train_wait_prints_the_json_line_when_the_run_fails(project, tmp_path, artifacts, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labeled_pairs(project, count=4)
    with pytest.raises(CommandError, match="failed: bf16"):
        call_command("train", "--project", project.slug, "--base-model", str(tiny_reward_model(tmp_path)),
                     "--max-steps", "1", "--max-length", "64", "--hyperparameters", '{"bf16": true}', "--wait")
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == "failed" and result["error"].startswith("bf16: ")
    assert result["artifact"] is None and result["produced"] is None


# --- concurrent deploys ---------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_deploys_leave_one_version_deployed_with_every_switch_logged(tmp_path):
    import threading

    from django.db import connection

    project = ProjectFactory()
    folder = str(tiny_reward_model(tmp_path))
    versions = [RewardModelFactory(project=project, version=n, artifact_path=folder) for n in (1, 2, 3, 4)]
    barrier = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def deploy(model: RewardModel) -> None:
        try:
            barrier.wait()
            services.reward_model_deploy(reward_model=model)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=deploy, args=(model,)) for model in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    deployed = list(RewardModel.objects.filter(project=project, is_deployed=True))
    assert len(deployed) == 1
    history = list(RewardModelDeployment.objects.filter(project=project).order_by("id"))
    assert len(history) == 4 and history[-1].reward_model_id == deployed[0].pk
    # Each switch names the version that was live before it.
    assert [h.previous_id for h in history] == [None, *(h.reward_model_id for h in history[:-1])]

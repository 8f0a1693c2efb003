"""The reward-model registry: versions per project, one deployed model with history, and registering folders."""
from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.test import APIClient
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from labeling.errors import DomainError
from rewards import services
from rewards.embedded import minilm_path
from rewards.models import RewardModel, RewardModelDeployment
from tests.conftest import client_for
from tests.factories import ProjectFactory
from tests.rewards.factories import RewardModelFactory

URL = "/api/v1/reward-models/"


def _classifier(folder, *, num_labels: int = 1):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.mark.django_db
def test_deploying_keeps_one_model_live_per_project_and_logs_history(project, tmp_path):
    first = RewardModelFactory(project=project, version=1, artifact_path=str(_classifier(tmp_path / "v1")))
    second = RewardModelFactory(project=project, version=2, artifact_path=str(_classifier(tmp_path / "v2")))
    other = RewardModelFactory(version=1, artifact_path=str(tmp_path / "v1"))
    services.reward_model_deploy(reward_model=first)
    services.reward_model_deploy(reward_model=other)
    deployed = services.reward_model_deploy(reward_model=second)
    assert deployed.is_deployed and deployed.deployed_at is not None
    first.refresh_from_db()
    assert not first.is_deployed and first.deployed_at is not None
    assert list(RewardModel.objects.filter(project=project, is_deployed=True)) == [second]
    assert RewardModel.objects.get(pk=other.pk).is_deployed
    history = list(RewardModelDeployment.objects.filter(project=project).order_by("id"))
    assert [(h.reward_model_id, h.previous_id) for h in history] == [(first.pk, None), (second.pk, first.pk)]
    # Deploying the live version again changes nothing.
    services.reward_model_deploy(reward_model=second)
    assert RewardModelDeployment.objects.filter(project=project).count() == 2


@pytest.mark.django_db
def test_the_database_refuses_two_deployed_models_or_a_repeated_version(project):
    RewardModelFactory(project=project, version=1, is_deployed=True, deployed_at=timezone.now())
    with pytest.raises(IntegrityError), transaction.atomic():
        RewardModelFactory(project=project, version=2, is_deployed=True, deployed_at=timezone.now())
    with pytest.raises(IntegrityError), transaction.atomic():
        RewardModelFactory(project=project, version=1)


@pytest.mark.django_db
def test_deploying_a_version_whose_files_are_gone_is_refused(project):
    model = RewardModelFactory(project=project, version=1, artifact_path="/nonexistent/model")
    with pytest.raises(DomainError) as exc:
        services.reward_model_deploy(reward_model=model)
    assert exc.value.code == "artifact_missing"


@pytest.mark.django_db
def test_register_checks_the_folder_and_numbers_versions_per_project(project, tmp_path):
    one = services.reward_model_register(project=project, path=_classifier(tmp_path / "a"))
    two = services.reward_model_register(project=project, path=_classifier(tmp_path / "b"), deploy=True)
    elsewhere = services.reward_model_register(project=ProjectFactory(), path=tmp_path / "a")
    assert (one.version, two.version, elsewhere.version) == (1, 2, 1)
    assert two.is_deployed and not RewardModel.objects.get(pk=one.pk).is_deployed
    assert one.lineage["source"] == "registered" and one.lineage["model_type"] == "bert"
    assert one.artifact_path == str((tmp_path / "a").resolve())

    for folder, code in [(_classifier(tmp_path / "two-labels", num_labels=2), "not_a_reward_model"),
                         (tmp_path / "missing", "not_found")]:
        with pytest.raises(DomainError) as exc:
            services.reward_model_register(project=project, path=folder)
        assert exc.value.field == "path" and exc.value.code == code
    empty = tmp_path / "no-weights"
    _classifier(empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(DomainError, match="no weights"):
        services.reward_model_register(project=project, path=empty)
    assert RewardModel.objects.filter(project=project).count() == 2


@pytest.mark.django_db
def test_a_folder_without_the_score_heads_weights_is_refused(project, tmp_path):
    """A bare encoder whose config says `num_labels` 1 and names no architecture loads with only a warning, its head
    drawn at random: every score would be noise. The check reads the weights' names, in one file or across shards."""
    from transformers import BertModel

    bare = tmp_path / "bare"
    model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64, num_labels=1))
    model.save_pretrained(bare)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]  # nothing left in the config says it is not a classifier
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(DomainError) as exc:
        services.reward_model_register(project=project, path=bare)
    assert (exc.value.field, exc.value.code) == ("path", "not_a_reward_model")
    assert "classifier.bias, classifier.weight" in exc.value.message
    sharded = tmp_path / "sharded"
    _classifier(tmp_path / "whole")
    BertForSequenceClassification.from_pretrained(tmp_path / "whole").save_pretrained(sharded, max_shard_size="4KB")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert services.reward_model_register(project=project, path=sharded).version == 1
    assert not RewardModel.objects.filter(artifact_path=str(bare.resolve())).exists()


@pytest.mark.django_db
def test_register_api_only_reads_from_the_import_folders(project, manager, labeler, outsider, tmp_path, import_dir):
    inside = _classifier(import_dir / "rm")
    outside = _classifier(tmp_path / "outside")
    body = {"project": project.slug, "path": str(inside)}
    assert client_for(labeler).post(f"{URL}register/", body, format="json").status_code == 403
    assert client_for(outsider).post(f"{URL}register/", body, format="json").status_code == 404
    response = client_for(manager).post(f"{URL}register/", {**body, "path": str(outside)}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "path_not_allowed"
    response = client_for(manager).post(f"{URL}register/", body, format="json")
    assert response.status_code == 201 and response.json()["version"] == 1
    traversal = str(import_dir / ".." / "outside")
    response = client_for(manager).post(f"{URL}register/", {**body, "path": traversal}, format="json")
    assert response.status_code == 400 and response.json()["error"]["field"] == "path"


@pytest.mark.django_db
def test_list_and_deploy_api_with_permissions(project, manager, labeler, outsider, tmp_path):
    old = RewardModelFactory(project=project, version=1, artifact_path=str(_classifier(tmp_path / "1")))
    new = RewardModelFactory(project=project, version=2, artifact_path=str(_classifier(tmp_path / "2")))
    RewardModelFactory(version=1)
    listed = client_for(manager).get(URL, {"project": project.slug})
    assert listed.status_code == 200 and [m["version"] for m in listed.json()] == [2, 1]
    # Artifact paths and lineage are for the people who run training.
    assert client_for(labeler).get(URL, {"project": project.slug}).status_code == 403
    assert client_for(outsider).get(URL, {"project": project.slug}).status_code == 404
    assert client_for(manager).get(URL).json()["error"]["field"] == "project"
    assert client_for(labeler).post(f"{URL}{new.pk}/deploy/").status_code == 403
    assert client_for(outsider).post(f"{URL}{new.pk}/deploy/").status_code == 404
    assert client_for(manager).post(f"{URL}{old.pk}/deploy/").json()["is_deployed"]
    response = client_for(manager).post(f"{URL}{new.pk}/deploy/")
    assert response.status_code == 200 and response.json()["is_deployed"]
    assert [m["is_deployed"] for m in client_for(manager).get(URL, {"project": project.slug}).json()] == [True, False]


@pytest.mark.django_db
def test_register_command_prints_the_new_version(project, tmp_path, capsys):
    call_command("register_reward_model", str(_classifier(tmp_path / "rm")), "--project", project.slug, "--deploy")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == 1 and out["deployed"] is True
    assert RewardModel.objects.get(project=project).is_deployed


# --- policies -------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_policy_list_api_shows_the_project_versions_newest_first_with_permissions(project, manager, labeler,
                                                                                  outsider, admin_user):
    from rewards.models import Policy, TrainingRun
    from tests.rewards.factories import TrainingRunFactory

    run = TrainingRunFactory(project=project, kind=TrainingRun.Kind.RLHF, status=TrainingRun.Status.SUCCEEDED,
                             finished_at=timezone.now())
    first = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, artifact_path="/p/1",
                                  base_model="tiny-llama")
    second = Policy.objects.create(project=project, version=2, kind=Policy.Kind.RLHF, artifact_path="/p/2",
                                   training_run=run, metrics={"reward_gain": 0.5})
    Policy.objects.create(project=ProjectFactory(), version=1, kind=Policy.Kind.DPO, artifact_path="/p/other")

    url = "/api/v1/policies/"
    listed = client_for(manager).get(url, {"project": project.slug})
    assert listed.status_code == 200
    assert [(p["id"], p["version"], p["kind"]) for p in listed.json()] == [(second.pk, 2, "rlhf"),
                                                                           (first.pk, 1, "dpo")]
    assert listed.json()[0] == {
        "id": second.pk, "project": project.slug, "kind": "rlhf", "version": 2, "training_run": run.pk,
        "artifact_path": "/p/2", "base_model": "", "metrics": {"reward_gain": 0.5}, "lineage": {},
        "is_deployed": False, "deployed_at": None, "created_at": listed.json()[0]["created_at"]}
    assert client_for(labeler).get(url, {"project": project.slug}).status_code == 403
    assert client_for(admin_user).get(url, {"project": project.slug}).status_code == 200
    assert client_for(outsider).get(url, {"project": project.slug}).status_code == 404
    assert client_for(manager).get(url).json()["error"]["field"] == "project"
    assert APIClient().get(url, {"project": project.slug}).status_code == 401


@pytest.mark.django_db
def test_deploying_a_version_whose_weights_are_gone_or_cut_short_is_refused(project, manager, tmp_path):
    live = RewardModelFactory(project=project, version=1, artifact_path=str(_classifier(tmp_path / "live")))
    services.reward_model_deploy(reward_model=live)
    no_weights = _classifier(tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    cut_short = _classifier(tmp_path / "cut-short")
    weights = (cut_short / "model.safetensors").read_bytes()
    (cut_short / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    for version, folder in ((2, no_weights), (3, cut_short)):
        broken = RewardModelFactory(project=project, version=version, artifact_path=str(folder))
        response = client_for(manager).post(f"{URL}{broken.pk}/deploy/")
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "artifact_missing"
        assert response.json()["error"]["field"] == "reward_model"
    assert list(RewardModel.objects.filter(is_deployed=True)) == [live]
    assert RewardModelDeployment.objects.count() == 1

"""Folders named by users (a reward model to register, a base model to train from): a name the file system cannot
take is refused as a 400 naming the field, never a server error."""
from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from labeling.errors import DomainError
from rewards import services
from rewards.models import RewardModel, TrainingRun
from tests.conftest import client_for
from tests.rewards.factories import labeled_pairs


def _unusable_names(root) -> list[str]:
    # A home folder of a user this machine does not have, and a name longer than a file name may be.
    return ["~no-such-user-here/rm", f"{root}/{'a' * 300}/rm"]


@pytest.mark.django_db
def test_registering_a_path_the_file_system_cannot_take_is_a_400_naming_path(project, manager, import_dir):
    client = client_for(manager)
    for path in _unusable_names(import_dir):
        response = client.post("/api/v1/reward-models/register/", {"project": project.slug, "path": path},
                               format="json")
        assert response.status_code == 400, (path, response.content)
        assert response.json()["error"]["field"] == "path"
    assert not RewardModel.objects.exists()


@pytest.mark.django_db
def test_the_register_command_refuses_such_a_path_with_one_line(project):
    for path in _unusable_names("/tmp"):
        with pytest.raises(CommandError):
            call_command("register_reward_model", path, "--project", project.slug)
    assert not RewardModel.objects.exists()


@pytest.mark.django_db
def test_a_base_model_the_file_system_cannot_take_is_a_400_naming_base_model(project, manager, import_dir):
    labeled_pairs(project, count=4)
    client = client_for(manager)
    for base_model in _unusable_names(import_dir):
        response = client.post("/api/v1/training-runs/", {"project": project.slug, "kind": "reward",
                                                          "base_model": base_model}, format="json")
        assert response.status_code == 400, (base_model, response.content)
        assert response.json()["error"]["field"] == "base_model"
        # The command line takes any folder, and is told the same.
        with pytest.raises(DomainError) as refused:
            services.training_run_start(project=project, kind="reward", base_model=base_model, queue=False)
        assert refused.value.field == "base_model"
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_the_start_form_shows_such_a_base_model_as_a_form_error(client, project, manager, import_dir):
    labeled_pairs(project, count=4)
    client.force_login(manager)
    for base_model in _unusable_names(import_dir):
        response = client.post(f"/dashboard/{project.slug}/training/start/", {"kind": "reward",
                                                                               "base_model": base_model})
        assert response.status_code == 400
        assert "Not started (base_model)" in response.content.decode()
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_an_import_folder_that_holds_the_artifacts_still_keeps_other_projects_runs_out(project, manager, settings,
                                                                                        tmp_path):
    """Import folders set to a folder above the artifacts (the whole data volume, say) take every model under it,
    but another project's runs and checkpoints hold weights trained on that project's data."""
    from tests.factories import ProjectFactory
    from tests.rewards.factories import TrainingRunFactory
    from tests.rewards.tiny import tiny_reward_model

    artifacts = tmp_path / "data" / "artifacts"
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": artifacts, "MODEL_IMPORT_DIRS": [tmp_path / "data"]}
    labeled_pairs(project, count=4)
    theirs = TrainingRunFactory(project=ProjectFactory())
    mine = TrainingRunFactory(project=project)
    folders = {"theirs": tiny_reward_model(artifacts / "runs" / str(theirs.pk)),
               "their checkpoint": tiny_reward_model(artifacts / "checkpoints" / str(theirs.pk) / "checkpoint-2"),
               "mine": tiny_reward_model(artifacts / "runs" / str(mine.pk)),
               "imported": tiny_reward_model(tmp_path / "data" / "team-models")}
    client = client_for(manager)

    def register(name: str):
        return client.post("/api/v1/reward-models/register/", {"project": project.slug, "path": str(folders[name])},
                           format="json")

    def start(name: str):
        return client.post("/api/v1/training-runs/", {"project": project.slug, "kind": "reward",
                                                      "base_model": str(folders[name])}, format="json")

    for name in ("theirs", "their checkpoint"):
        refused = register(name)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "path_not_allowed", name
        refused = start(name)
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "base_model", name
    assert not RewardModel.objects.exists()
    for name in ("mine", "imported"):
        assert register(name).status_code == 201, name
        assert start(name).status_code == 202, name


@pytest.mark.django_db
def test_the_evaluate_command_refuses_a_name_too_long_with_one_line(tmp_path):
    from tests.rewards.tiny import tiny_reward_model

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Hi?", "chosen": "Hello.", "rejected": "no"}\n')
    too_long = f"{tmp_path}/{'a' * 300}"
    with pytest.raises(CommandError, match="No folder"):
        call_command("evaluate_reward_model", too_long, str(data), "--format", "trl")
    with pytest.raises(CommandError, match="does not exist"):
        call_command("evaluate_reward_model", str(tiny_reward_model(tmp_path)), too_long, "--format", "trl")

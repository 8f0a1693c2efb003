"""`manage.py evaluate_reward_model VERSION_ID`: a registered reward model by id, checked against --project."""
from __future__ import annotations

import json
import shutil

import pytest
from django.core.management import CommandError, call_command

from rewards import services
from tests.factories import ProjectFactory
from tests.rewards.tiny import tiny_reward_model


def _pairs_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "No idea."},
            {"prompt": "Colour of the sky?", "chosen": "Blue on a clear day.", "rejected": "Loud."}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.django_db
def test_a_version_id_is_scored_like_its_folder_and_named_in_the_report(project, tmp_path, capsys):
    folder = tiny_reward_model(tmp_path)
    data = _pairs_file(tmp_path)
    model = services.reward_model_register(project=project, path=folder)

    call_command("evaluate_reward_model", str(model.pk), str(data), "--format", "trl", "--device", "cpu",
                 "--project", project.slug)
    by_id = _report(capsys)
    call_command("evaluate_reward_model", str(folder), str(data), "--format", "trl", "--device", "cpu")
    by_path = _report(capsys)

    assert by_id["reward_model"] == {"id": model.pk, "version": 1, "project": project.slug}
    assert by_id["model"] == model.artifact_path and "reward_model" not in by_path
    assert by_id["pairs"] == by_path["pairs"] == 3
    assert (by_id["accuracy"], by_id["mean_margin"]) == (by_path["accuracy"], by_path["mean_margin"])


@pytest.mark.django_db
def test_a_version_id_of_another_project_unknown_or_without_files_is_a_clear_error(project, tmp_path):
    folder = tiny_reward_model(tmp_path / "model")
    data = _pairs_file(tmp_path)
    other = ProjectFactory()
    model = services.reward_model_register(project=other, path=folder)

    def evaluate(*target):
        call_command("evaluate_reward_model", *target, str(data), "--format", "trl", "--device", "cpu")

    with pytest.raises(CommandError, match=f"belongs to project '{other.slug}', not '{project.slug}'"):
        evaluate(str(model.pk), "--project", project.slug)
    with pytest.raises(CommandError, match=f"No reward model with id {model.pk + 100}"):
        evaluate(str(model.pk + 100))
    with pytest.raises(CommandError, match="No project with slug 'nope'"):
        evaluate(str(model.pk), "--project", "nope")
    with pytest.raises(CommandError, match="--project checks a VERSION_ID"):
        evaluate(str(folder), "--project", other.slug)
    shutil.rmtree(folder)
    with pytest.raises(CommandError, match=rf"files of reward model {model.pk} \(version 1 of '{other.slug}'\)"):
        evaluate(str(model.pk))

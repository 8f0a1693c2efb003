"""Exported preference files as their users consume them: loaded by `datasets` and trained on by TRL's RewardTrainer,
whatever mix of prompts and margins the project holds."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from labeling import services
from labeling.imports import preferences_import
from labeling.models import Membership, Pair
from tests.factories import ProjectFactory, UserFactory
from tests.labeling.trl_trainer import tiny_reward_trainer


def _import(project, fmt, rows) -> None:
    stream = io.BytesIO("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    report = preferences_import(project=project, stream=stream, format=fmt)
    assert report.bad_line_count == 0, report.bad_lines


@pytest.mark.django_db
def test_a_project_mixing_string_and_chat_prompts_and_margins_exports_a_file_trl_trains_on(tmp_path):
    from datasets import load_dataset

    project = ProjectFactory(labels_per_pair=1, strength_scale="1-3")
    # String prompts first (TRL decides the layout from the first row), chat prompts from an HH file, one pair
    # labeled here with a strength and one without: margins on some rows only.
    _import(project, "trl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                             {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "margin": 1.5}])
    _import(project, "hh", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                             "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}])
    for text_a, text_b, strength in (("Blue.", "Seven.", 2), ("Yes.", "No.", None)):
        pair = services.pair_create(project=project, prompt=[{"role": "user", "content": f"{text_a}?"}],
                                    response_a=text_a, response_b=text_b)
        labeler = UserFactory()
        Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        assert lease.pair_id == pair.pk
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, strength=strength,
                                   choice=services.choice_to_frame("a", swapped=lease.swapped))

    path = tmp_path / "mixed.trl.jsonl"
    call_command("export_preferences", project=project.slug, format="trl", output=str(path), stderr=io.StringIO())
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 5
    assert all(isinstance(row["prompt"], list) and isinstance(row["chosen"], list) for row in dataset)
    assert dataset["margin"] == [0.0, 1.5, 0.0, 2.0, 0.0]

    model, trainer = tiny_reward_trainer(dataset, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert len([entry["loss"] for entry in trainer.state.log_history if "loss" in entry]) == 2
    assert any(not (old == new).all() for old, new in zip(before, model.parameters(), strict=True))
    assert Pair.objects.filter(project=project).count() == 5

"""Export of preference data: TRL and HH rows from the majority vote, raw comparisons, the API, the command,
and the round trip HH file -> import -> TRL export -> TRL's RewardTrainer."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from labeling import services
from labeling.exports import preferences_export
from labeling.imports import preferences_import
from labeling.models import Membership, Pair
from tests.conftest import client_for
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.labeling.trl_trainer import tiny_reward_trainer

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-sample.jsonl"
ROOT = Path(__file__).resolve().parents[2]


def _import_fixture(project) -> None:
    with FIXTURE.open("rb") as stream:
        preferences_import(project=project, stream=stream, format="hh")


def _export(project, fmt) -> list[dict]:
    return [json.loads(line) for line in preferences_export(project=project, format=fmt)]


def _import_rows(project, fmt, *rows) -> None:
    stream = io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())
    report = preferences_import(project=project, stream=stream, format=fmt)
    assert report.bad_line_count == 0


def _label(project, pair, choice) -> None:
    """One labeler labels `pair` with `choice` in the A/B frame."""
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    lease = services.pair_next_for_labeler(project=project, labeler=user)
    assert lease.pair_id == pair.pk
    services.comparison_submit(labeler=user, pair_id=pair.pk,
                               choice=services.choice_to_frame(choice, swapped=lease.swapped), time_ms=900)


@pytest.mark.django_db
def test_hh_export_rebuilds_the_imported_transcripts_exactly(project):
    _import_fixture(project)
    original = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()[:39]]
    assert _export(project, "hh") == original


@pytest.mark.django_db
def test_trl_export_is_conversational_for_chat_prompts_and_standard_for_strings(project):
    _import_fixture(project)
    rows = _export(project, "trl")
    assert len(rows) == 39
    first = rows[0]
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert first["prompt"][-1] == {"role": "user", "content": "Because you\u2019re stuck being a human assistant."}
    assert first["rejected"] == [{"role": "assistant", "content": "What makes you think I\u2019m stuck?"}]

    other = ProjectFactory()
    _import_rows(other, "trl", {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
                 {"prompt": "3+3?", "chosen": "6", "rejected": "7"})
    assert _export(other, "trl") == [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
                                     {"prompt": "3+3?", "chosen": "6", "rejected": "7", "margin": 0.0}]


@pytest.mark.django_db
def test_trl_export_writes_one_layout_and_a_margin_on_every_row_when_the_project_mixes_them(project):
    # TRL reads one layout per file (it looks at the first row) and its reward collator needs a number in every
    # row's margin: a project with string and chat prompts, and margins on some pairs only, must not mix them.
    hi = [{"role": "user", "content": "Hi"}]
    _import_rows(project, "trl", {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                 {"prompt": hi, "chosen": [{"role": "assistant", "content": "Hello."}],
                  "rejected": [{"role": "assistant", "content": "Go."}], "margin": 2.0})
    assert _export(project, "trl") == [
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "margin": 0.0},
        {"prompt": hi, "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go."}], "margin": 2.0},
    ]
    # The HH export is unchanged: a string prompt is already one Human turn there, and no margin is made up.
    assert _export(project, "hh") == [
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go.",
         "margin": 2.0},
    ]


@pytest.mark.django_db
def test_trl_export_follows_the_majority_of_labels_and_leaves_undecided_pairs_out():
    project = ProjectFactory(labels_per_pair=3)
    decided = PairFactory(project=project, priority=2)
    for choice in ("a", "b", "b"):
        _label(project, decided, choice)
    undecided = PairFactory(project=project, priority=1)
    for choice in ("a", "b", "tie"):
        _label(project, undecided, choice)
    rows = _export(project, "trl")
    assert rows == [{"prompt": decided.prompt.content, "chosen": decided.response_b.text,
                     "rejected": decided.response_a.text}]


@pytest.mark.django_db
def test_comparisons_export_holds_every_raw_label_with_its_labeler(project):
    _import_rows(project, "trl", {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 0.5})
    pair = PairFactory(project=project)
    _label(project, pair, "b")
    rows = _export(project, "comparisons")
    assert len(rows) == 2
    imported, labeled = rows
    assert {key: imported[key] for key in ("prompt", "response_a", "response_b", "choice", "margin", "labeler",
                                            "source", "swapped", "flags")} == {
        "prompt": "2+2?", "response_a": "4", "response_b": "5", "choice": "a", "margin": 0.5, "labeler": None,
        "source": "import", "swapped": False, "flags": []}
    assert labeled["pair"] == pair.pk and labeled["choice"] == "b" and labeled["source"] == "label"
    assert labeled["labeler"] == pair.comparisons.get().labeler.username
    assert labeled["time_ms"] == 900 and labeled["strength"] is None and labeled["rationale"] == ""
    assert labeled["created_at"].startswith(str(pair.comparisons.get().created_at.date()))


# --- API -------------------------------------------------------------------------------------------------


def _download(user, project, query="?format=trl"):
    return client_for(user).get(f"/api/v1/projects/{project.slug}/export/{query}")


@pytest.mark.django_db
def test_api_export_streams_jsonl_as_an_attachment(project, manager):
    _import_fixture(project)
    response = _download(manager, project, "?format=hh")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Disposition"] == f'attachment; filename="{project.slug}-hh.jsonl"'
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert [json.loads(line) for line in lines] == _export(project, "hh")
    default = _download(manager, project, "")
    assert default.status_code == 200 and len(b"".join(default.streaming_content).splitlines()) == 39


@pytest.mark.django_db
def test_api_export_is_for_managers_and_names_a_bad_format(project, manager, labeler, outsider):
    assert _download(labeler, project).status_code == 403
    assert _download(outsider, project).status_code == 404
    bad = _download(manager, project, "?format=csv")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "format"


# --- command ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_command_writes_a_file_or_standard_output(project, tmp_path):
    _import_fixture(project)
    target = tmp_path / "out.jsonl"
    err = io.StringIO()
    call_command("export_preferences", project=project.slug, format="trl", output=str(target), stderr=err)
    assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == _export(project, "trl")
    assert "Exported 39 rows" in err.getvalue()
    out = io.StringIO()
    call_command("export_preferences", project=project.slug, format="comparisons", output="-", stdout=out,
                 stderr=io.StringIO())
    assert len(out.getvalue().splitlines()) == 39
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.django_db
def test_command_refuses_a_directory_as_output(project, tmp_path):
    _import_fixture(project)
    with pytest.raises(CommandError, match="is a directory; name the file to write"):
        call_command("export_preferences", project=project.slug, format="trl", output=str(tmp_path),
                     stderr=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_command_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`export_preferences --output - | head -n 1`: the export stops when head does, without a traceback."""
    env = {**os.environ, "PREFLAB_VAR_DIR": str(tmp_path)}
    env.pop("DATABASE_URL", None)  # its own SQLite database, which the commands below fill
    for command in (["migrate", "-v", "0"],
                    ["import_preferences", str(FIXTURE), "--project", "pipe", "--format", "hh", "--create",
                     "--no-progress"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True, capture_output=True,
                       timeout=300)
    result = subprocess.run(
        f"{sys.executable} manage.py export_preferences --project pipe --format trl --output - | head -n 1",
        shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["chosen"]
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


# --- round trip into TRL ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_hh_import_then_trl_export_trains_a_reward_model_with_trl(project, tmp_path):
    from datasets import load_dataset

    _import_fixture(project)
    path = tmp_path / "train.jsonl"
    call_command("export_preferences", project=project.slug, format="trl", output=str(path), stderr=io.StringIO())
    dataset = load_dataset("json", data_files=str(path), split="train")
    assert len(dataset) == 39

    model, trainer = tiny_reward_trainer(dataset, tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    assert any(not (old == new).all() for old, new in zip(before, model.parameters(), strict=True))
    assert Pair.objects.filter(project=project).count() == 39


def test_blocks_join_lines_into_bounded_utf8_chunks_without_changing_a_byte():
    from labeling.exports import blocks

    lines = [f'{{"n": {i}, "text": "é{"x" * (i % 7)}"}}\n' for i in range(1000)]
    chunks = list(blocks(iter(lines), size=256))
    assert b"".join(chunks) == "".join(lines).encode("utf-8")
    assert len(chunks) > 1 and all(len(chunk.decode("utf-8")) < 256 + max(map(len, lines)) for chunk in chunks)
    assert list(blocks(iter([]))) == []

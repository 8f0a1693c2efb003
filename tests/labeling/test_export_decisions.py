"""The data that leaves labeling for training: the majority vote with real labels, margins, the round trip of
exported files through the importer, and exports with nothing decided."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from labeling import services
from labeling.exports import preferences_export
from labeling.imports import preferences_import
from labeling.models import Comparison, Lease, Membership
from labeling.selectors import preference_rows
from tests.conftest import client_for
from tests.factories import PairFactory, ProjectFactory, UserFactory


def _export(project, fmt) -> list[dict]:
    return [json.loads(line) for line in preferences_export(project=project, format=fmt)]


def _import(project, fmt, rows) -> None:
    stream = io.BytesIO("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
    report = preferences_import(project=project, stream=stream, format=fmt)
    assert report.bad_line_count == 0, report.bad_lines


def _label(project, pair, frame: str, *, swapped: bool = False, strength: int | None = None):
    """A new labeler answers `pair` in the frame they were shown (`swapped`: B on the left)."""
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    lease = services.pair_next_for_labeler(project=project, labeler=user)
    assert lease.pair_id == pair.pk
    Lease.objects.filter(pk=lease.pk).update(swapped=swapped)
    services.comparison_submit(labeler=user, pair_id=pair.pk, choice=frame, strength=strength)
    return user


def _decided(project) -> dict[int, tuple[str, str, float | None]]:
    return {row.pair_id: (row.chosen, row.rejected, row.margin) for row in preference_rows(project=project)}


# --- the majority vote -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_labels_shown_swapped_are_counted_for_the_response_the_labeler_picked():
    project = ProjectFactory(labels_per_pair=3, strength_scale="1-3")
    pair = PairFactory(project=project)
    _label(project, pair, "left", swapped=True, strength=3)    # B was on the left: B
    _label(project, pair, "right", swapped=False, strength=1)  # B
    _label(project, pair, "left", swapped=False, strength=2)   # A
    assert sorted(Comparison.objects.values_list("choice", "swapped")) == [("a", False), ("b", False), ("b", True)]
    assert _decided(project) == {pair.pk: (pair.response_b.text, pair.response_a.text, 2.0)}
    assert _export(project, "trl") == [{"prompt": pair.prompt.content, "chosen": pair.response_b.text,
                                        "rejected": pair.response_a.text, "margin": 2.0}]


def _vote(pair, choice: str, *, strength: int | None = None, margin: float | None = None, imported: bool = False):
    """A stored label in the pair's A/B frame: a labeler's, or the imported one."""
    labeler = None if imported else UserFactory()
    return Comparison.objects.create(
        pair=pair, project=pair.project, labeler=labeler, choice=choice, strength=strength, margin=margin,
        source=Comparison.Source.IMPORT if imported else Comparison.Source.LABEL)


@pytest.mark.django_db
@pytest.mark.parametrize(("choices", "winner"), [
    (["a", "b"], None), (["tie", "tie", "a"], None), (["both_bad", "a", "both_bad"], None), (["a", "tie"], None),
    (["a", "b", "tie"], None), (["a", "both_bad", "tie"], None), (["a", "a", "b", "b", "tie"], None),
    (["b", "b", "tie"], "b"), (["a", "a", "b"], "a"), (["a", "tie", "both_bad", "a"], "a"), (["b"], "b"),
])
def test_a_pair_is_decided_by_a_clear_a_or_b_majority_of_all_its_labels(choices, winner):
    pair = PairFactory()
    for choice in choices:
        _vote(pair, choice)
    decided = _decided(pair.project)
    if winner is None:
        assert decided == {}
    else:
        chosen, rejected = (pair.response_a, pair.response_b) if winner == "a" else (pair.response_b, pair.response_a)
        assert decided == {pair.pk: (chosen.text, rejected.text, None)}


@pytest.mark.django_db
def test_an_imported_label_is_one_vote_among_the_labelers_and_its_margin_wins_over_strengths():
    project = ProjectFactory(labels_per_pair=3, strength_scale="1-3")
    outvoted, agreed, strengths_only = (PairFactory(project=project) for _ in range(3))
    _vote(outvoted, "a", margin=0.7, imported=True)
    _vote(outvoted, "b", strength=3)
    _vote(outvoted, "b", strength=2)
    _vote(agreed, "b", margin=0.7, imported=True)
    _vote(agreed, "b", strength=3)
    _vote(agreed, "a", strength=1)
    _vote(strengths_only, "a", strength=3)
    _vote(strengths_only, "a")
    _vote(strengths_only, "b", strength=1)
    assert _decided(project) == {
        outvoted.pk: (outvoted.response_b.text, outvoted.response_a.text, 2.5),
        agreed.pk: (agreed.response_b.text, agreed.response_a.text, 0.7),
        strengths_only.pk: (strengths_only.response_a.text, strengths_only.response_b.text, 3.0),
    }


@pytest.mark.django_db
def test_labels_of_a_removed_labeler_still_count_and_a_skip_is_no_vote(project, manager):
    project.labels_per_pair = 2
    project.save()
    pair = PairFactory(project=project, priority=1)
    skipped = PairFactory(project=project)
    gone = _label(project, pair, "right", swapped=True)  # A
    services.membership_remove(project=project, user=gone)
    _label(project, pair, "left")
    skipper = UserFactory()
    Membership.objects.create(project=project, user=skipper, role=Membership.Role.LABELER)
    assert services.pair_next_for_labeler(project=project, labeler=skipper).pair_id == skipped.pk
    services.lease_release(project=project, labeler=skipper, pair_id=skipped.pk)
    assert _decided(project) == {pair.pk: (pair.response_a.text, pair.response_b.text, None)}


@pytest.mark.django_db
def test_a_gold_pair_is_decided_by_its_labels_like_any_pair():
    gold = PairFactory(gold_choice="a")
    _vote(gold, "a")
    _vote(gold, "a")
    _vote(gold, "b")
    unlabeled_gold = PairFactory(project=gold.project, gold_choice="b")
    assert _decided(gold.project) == {gold.pk: (gold.response_a.text, gold.response_b.text, None)}
    assert unlabeled_gold.pk not in _decided(gold.project)


@pytest.mark.django_db
def test_a_frozen_set_of_more_labels_than_one_statement_can_name_decides_the_same_pairs():
    # A training run's snapshot names every label it trains on; past 65,535 ids one IN list cannot carry them.
    project = ProjectFactory()
    pair, later = PairFactory(project=project), PairFactory(project=project)
    frozen = [_vote(pair, "b").pk, _vote(pair, "b").pk]
    _vote(pair, "a")
    _vote(pair, "a")
    _vote(later, "a")
    frozen += range(10**9, 10**9 + 70_000)  # ids of labels since deleted
    rows = list(preference_rows(project=project, comparison_ids=frozen))
    assert [(row.pair_id, row.chosen, row.comparison_ids) for row in rows] == [
        (pair.pk, pair.response_b.text, tuple(frozen[:2]))]
    assert list(preference_rows(project=project, comparison_ids=[])) == []


# --- exported files import back ------------------------------------------------------------------------


def _round_trip(project, fmt, tmp_path, slug) -> list[dict]:
    """`export_preferences` then `import_preferences --create` into a new project; returns its TRL export."""
    path = tmp_path / f"{slug}.jsonl"
    call_command("export_preferences", project=project.slug, format=fmt, output=str(path), stderr=io.StringIO())
    call_command("import_preferences", str(path), project=slug, format=fmt, create=True, no_progress=True,
                 stdout=io.StringIO(), stderr=io.StringIO())
    from labeling.models import Project

    return _export(Project.objects.get(slug=slug), "trl")


CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": " Привет,\tmonde  "}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "line one\n\nline two\n"}],
     "chosen": [{"role": "assistant", "content": "  leading and trailing \n"}],
     "rejected": [{"role": "assistant", "content": "🙂 \u2028 emoji and a line separator"}], "margin": 1.25},
    {"chosen": [{"role": "user", "content": "Implicit prompt?"}, {"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "user", "content": "Implicit prompt?"}, {"role": "assistant", "content": "No."}]},
]
STANDARD_ROWS = [{"prompt": "  2 + 2 = ?\n", "chosen": "4", "rejected": "«5»\r\n", "margin": -0.5},
                 {"prompt": "naïve", "chosen": "b\u00e9", "rejected": "be\u0301"}]


@pytest.mark.django_db
def test_a_trl_export_imports_back_to_the_same_rows(tmp_path):
    chat, standard, mixed = ProjectFactory(), ProjectFactory(), ProjectFactory()
    _import(chat, "trl", CHAT_ROWS)
    _import(standard, "trl", STANDARD_ROWS)
    _import(mixed, "trl", CHAT_ROWS + STANDARD_ROWS)
    exported = _export(chat, "trl")
    assert exported[0] == CHAT_ROWS[0]
    # A row without a margin, in a file where others have one, carries 0.0: the value training gives it.
    assert exported[1] == {"prompt": [{"role": "user", "content": "Implicit prompt?"}],
                           "chosen": [{"role": "assistant", "content": "Yes."}],
                           "rejected": [{"role": "assistant", "content": "No."}], "margin": 0.0}
    assert _export(standard, "trl") == [STANDARD_ROWS[0], {**STANDARD_ROWS[1], "margin": 0.0}]
    # String and chat prompts in one project: one conversational file, a string prompt as one user message.
    assert _export(mixed, "trl")[2] == {
        "prompt": [{"role": "user", "content": "  2 + 2 = ?\n"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "«5»\r\n"}], "margin": -0.5}
    for project, slug in ((chat, "chat-again"), (standard, "standard-again"), (mixed, "mixed-again")):
        assert _round_trip(project, "trl", tmp_path, slug) == _export(project, "trl")


@pytest.mark.django_db
def test_an_hh_export_imports_back_to_the_same_prompts_and_replies(tmp_path):
    project = ProjectFactory()
    _import(project, "trl", CHAT_ROWS)
    _import(project, "hh", [{"chosen": "\n\nHuman: Hi  \n\nAssistant:\n\nHuman:  two spaces\n\nAssistant: Ok ",
                             "rejected": "\n\nHuman: Hi  \n\nAssistant:\n\nHuman:  two spaces\n\nAssistant: No"}])
    # Margins travel too: the hh export writes them beside the transcripts.
    assert any("margin" in row for row in _export(project, "hh"))
    assert _round_trip(project, "hh", tmp_path, "hh-again") == _export(project, "trl")


# --- nothing decided ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_project_with_no_decided_pair_exports_empty_files_and_the_command_says_why(project, manager, tmp_path):
    pair = PairFactory(project=project)
    _vote(pair, "a")
    _vote(pair, "tie")
    for fmt in ("trl", "hh"):
        response = client_for(manager).get(f"/api/v1/projects/{project.slug}/export/?format={fmt}")
        assert response.status_code == 200 and b"".join(response.streaming_content) == b""
        err = io.StringIO()
        call_command("export_preferences", project=project.slug, format=fmt, output=str(tmp_path / fmt),
                     stderr=err)
        assert (tmp_path / fmt).read_text() == ""
        assert "Exported 0 rows" in err.getvalue() and "No pair has a decided winner yet" in err.getvalue()
    err = io.StringIO()
    call_command("export_preferences", project=project.slug, format="comparisons", output="-",
                 stdout=io.StringIO(), stderr=err)
    assert "Exported 2 rows" in err.getvalue() and "decided" not in err.getvalue()

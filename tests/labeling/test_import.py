"""Import of preference data: every format with good and bad lines, deduplication, the API and the command."""
from __future__ import annotations

import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from labeling import imports
from labeling.errors import DomainError
from labeling.imports import preferences_import
from labeling.models import Comparison, Pair, Project, Prompt, Response
from tests.conftest import client_for
from tests.factories import PairFactory, ProjectFactory

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-sample.jsonl"


def _stream(*lines: dict | str | bytes) -> io.BytesIO:
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out.append(line)
    return io.BytesIO(b"\n".join(out) + b"\n")


def _import(project, fmt, *lines, **kwargs):
    return preferences_import(project=project, stream=_stream(*lines), format=fmt, **kwargs)


def _bad(report) -> list[tuple[int, str]]:
    return [(bad["line"], bad["reason"]) for bad in report.bad_lines]


def _pairs(project) -> set[tuple]:
    """(prompt, response A, response B) of every pair in the project."""
    return {(p.prompt.content if isinstance(p.prompt.content, str) else json.dumps(p.prompt.content),
             p.response_a.text, p.response_b.text)
            for p in Pair.objects.filter(project=project).select_related("prompt", "response_a", "response_b")}


def _hh(human: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"\n\nHuman: {human}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {human}\n\nAssistant: {rejected}"}


# --- hh --------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_hh_fixture_imports_every_good_line_and_reports_the_one_whose_dialogues_differ(project):
    with FIXTURE.open("rb") as stream:
        report = preferences_import(project=project, stream=stream, format="hh")
    assert report.lines_read == 40
    assert report.pairs_created == 39 and report.comparisons_created == 39
    assert report.duplicates_skipped == 0
    assert _bad(report) == [(40, "'chosen' and 'rejected' differ before the last assistant reply")]
    assert Pair.objects.filter(project=project).count() == 39
    pair = Pair.objects.filter(project=project).select_related("prompt", "response_a", "response_b").order_by("id")[0]
    first = json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[0])
    assert pair.prompt.content == [
        {"role": "user", "content": "You wish you could be a robot."},
        {"role": "assistant", "content": "Why do you say that?"},
        {"role": "user", "content": "Because you\u2019re stuck being a human assistant."},
    ]
    assert first["chosen"].endswith(pair.response_a.text)
    assert pair.response_b.text == "What makes you think I\u2019m stuck?"
    assert pair.source == "import" and pair.label_count == 1 and pair.status == Pair.Status.COMPLETE
    comparison = Comparison.objects.get(pair=pair)
    assert (comparison.labeler, comparison.source, comparison.choice, comparison.margin) == (None, "import", "a", None)


@pytest.mark.django_db
def test_reimporting_the_same_file_creates_nothing_and_counts_duplicates(project):
    for _ in range(2):
        with FIXTURE.open("rb") as stream:
            report = preferences_import(project=project, stream=stream, format="hh")
    assert (report.pairs_created, report.comparisons_created, report.duplicates_skipped) == (0, 0, 39)
    assert Pair.objects.filter(project=project).count() == 39
    assert Comparison.objects.filter(pair__project=project).count() == 39
    # Every imported comparison is filed under its pair's project.
    assert Comparison.objects.filter(project=project).count() == 39
    assert Prompt.objects.filter(project=project).count() == 39


@pytest.mark.django_db
def test_hh_transcripts_without_the_leading_blank_line_read_as_the_original(project):
    """Some copies of HH-RLHF start a transcript with "Human:" instead of "\\n\\nHuman:": the same pair, not a bad
    line (and not a second pair beside the original)."""
    stripped = {key: value.lstrip("\n") for key, value in _hh("Hi?", "Hello!", "Go away.").items()}
    assert stripped["chosen"].startswith("Human: Hi?")
    report = _import(project, "hh", stripped, {key: " " + value for key, value in stripped.items()},
                     _hh("Hi?", "Hello!", "Go away."))
    assert _bad(report) == []
    assert (report.pairs_created, report.duplicates_skipped) == (1, 2)
    assert _pairs(project) == {(json.dumps([{"role": "user", "content": "Hi?"}]), "Hello!", "Go away.")}


def test_hh_bad_lines_are_reported_with_their_number_and_the_good_ones_kept(project, settings):
    settings.PREFLAB = {**settings.PREFLAB, "IMPORT_MAX_LINE_BYTES": 300}
    report = _import(
        project, "hh",
        _hh("Hi?", "Hello!", "Go away."),                                       # 1 good
        b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: \xff", "rejected": "y"}',  # 2 bad UTF-8
        '{"chosen": "unterminated',                                             # 3
        "[1, 2]",                                                               # 4
        {"chosen": "\n\nHuman: a\n\nAssistant: b"},                             # 5
        {"chosen": 3, "rejected": "\n\nHuman: a\n\nAssistant: b"},              # 6
        _hh("Same?", "Yes.", "Yes."),                                           # 7
        _hh("Long?", "x" * 400, "short"),                                       # 8 over-long
        "",                                                                     # 9 blank: skipped
        {"chosen": "Assistant: no human", "rejected": "\n\nHuman: a\n\nAssistant: b"},  # 10
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: b"},  # 11
        {"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"},          # 12 no prompt
        _hh("Nul?", "a\u0000b", "ok"),                                           # 13
        _hh("Margin?", "Good.", "Bad."),                                         # 14 good
    )
    assert report.lines_read == 14
    reasons = dict(_bad(report))
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert reasons[2] == "invalid UTF-8 at byte offset 39"
    assert reasons[3].startswith("invalid JSON: ")
    assert reasons[4] == "expected a JSON object, got a list"
    assert reasons[5] == "missing field 'rejected'"
    assert reasons[6] == "'chosen' must be a string, got a number"
    assert reasons[7] == "'chosen' and 'rejected' are identical"
    assert reasons[8] == "line is longer than 300 bytes"
    assert reasons[10] == "'chosen' must start with a 'Human:' turn"
    assert reasons[11] == "'chosen' must end with an assistant reply, ends with 'user'"
    assert reasons[12] == "the transcripts have no turns before the last assistant reply"
    assert "NUL" in reasons[13]
    assert report.pairs_created == report.comparisons_created == 2
    assert _pairs(project) == {
        (json.dumps([{"role": "user", "content": "Hi?"}]), "Hello!", "Go away."),
        (json.dumps([{"role": "user", "content": "Margin?"}]), "Good.", "Bad."),
    }


# --- trl -------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_trl_standard_conversational_and_implicit_prompt_rows(project):
    user = {"role": "user", "content": "Name a colour."}
    report = _import(
        project, "trl",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2.5},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Seven."}]},
        {"chosen": [user, {"role": "assistant", "content": "Red."}],
         "rejected": [user, {"role": "assistant", "content": "No."}]},
    )
    assert _bad(report) == []
    assert report.pairs_created == report.comparisons_created == 3
    assert _pairs(project) == {("2+2?", "4", "5"), (json.dumps([user]), "Blue.", "Seven."),
                               (json.dumps([user]), "Red.", "No.")}
    assert Prompt.objects.filter(project=project).count() == 2
    margins = dict(Comparison.objects.filter(pair__project=project).values_list("pair__response_a__text", "margin"))
    assert margins == {"4": 2.5, "Blue.": None, "Red.": None}


@pytest.mark.django_db
def test_trl_bad_lines(project):
    assistant = {"role": "assistant", "content": "Sure."}
    report = _import(
        project, "trl",
        {"prompt": "ok?", "chosen": "yes", "rejected": "no"},                         # 1 good
        {"chosen": "yes", "rejected": "no"},                                           # 2
        {"prompt": "q", "chosen": "yes", "rejected": ["no"]},                          # 3
        {"prompt": "q", "chosen": [assistant], "rejected": [{"role": "user", "content": "x"}]},  # 4
        {"chosen": [{"role": "user", "content": "a"}, assistant],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "No."}]},  # 5
        {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": "big"},            # 6
        '{"prompt": "q", "chosen": "yes", "rejected": "no", "margin": NaN}',            # 7
        {"prompt": "q", "chosen": "same", "rejected": "same"},                          # 8
        {"prompt": "q", "chosen": {"text": "x"}, "rejected": "no"},                     # 9
        {"prompt": [{"role": "user"}], "chosen": [assistant], "rejected": [{"role": "assistant", "content": "N"}]},
        {"prompt": "  ", "chosen": "yes", "rejected": "no"},                            # 11
        {"chosen": [assistant], "rejected": [{"role": "assistant", "content": "N"}]},    # 12
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [assistant],
         "rejected": [{"role": "user", "content": "x"}]},                                 # 13
    )
    assert _bad(report) == [
        (2, "missing field 'prompt' (an implicit prompt needs message lists)"),
        (3, "'rejected' must be a string like 'chosen', got a list"),
        (4, "'prompt' must be a list of messages when 'chosen' is, got a string"),
        (5, "'chosen' and 'rejected' differ before the last assistant reply"),
        (6, "'margin' must be a finite number, got a string"),
        (7, "invalid JSON: NaN is not valid JSON"),
        (8, "'chosen' and 'rejected' are identical"),
        (9, "'chosen' must be a string or a list of messages, got an object"),
        (10, "'prompt[0].content' must be a string, got null"),
        (11, "'prompt' is empty"),
        (12, "missing field 'prompt' and 'chosen'/'rejected' share no messages before the reply"),
        (13, "'rejected' must end with an assistant reply, ends with 'user'"),
    ]
    assert _pairs(project) == {("ok?", "yes", "no")}
    assert Comparison.objects.filter(pair__project=project).count() == 1
    assert Response.objects.filter(project=project).count() == 2


@pytest.mark.django_db
def test_a_margin_written_as_an_integer_too_large_for_a_float_is_a_bad_line(project):
    # JSON reads an integer literal of any length (up to 4,300 digits) as an int, which no float can hold.
    huge = "1" + "0" * 400
    report = _import(
        project, "trl",
        f'{{"prompt": "q", "chosen": "a", "rejected": "b", "margin": {huge}}}',
        {"prompt": "kept", "chosen": "a", "rejected": "b", "margin": 10**20},
    )
    assert _bad(report) == [(1, "'margin' is out of range")]
    assert _pairs(project) == {("kept", "a", "b")}
    assert Comparison.objects.get(project=project).margin == 1e20
    transcript = "\\n\\nHuman: q\\n\\nAssistant: "
    hh = _import(project, "hh", f'{{"chosen": "{transcript}a", "rejected": "{transcript}b", "margin": -{huge}}}')
    assert _bad(hh) == [(1, "'margin' is out of range")]
    assert hh.pairs_created == 0


# --- candidates ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_candidates_pair_every_two_distinct_responses_without_labels(project):
    report = _import(
        project, "candidates",
        {"prompt": "Write a haiku.", "priority": 7,
         "responses": ["one", {"text": "two", "model": "m-2", "metadata": {"temperature": 0.7}}, "three", "one"]},
        {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["hey", "hello"]},
        {"prompt": "Only one?", "responses": ["same", "same"]},
        {"prompt": "Not a list", "responses": "one"},
        {"prompt": "Bad priority", "responses": ["a", "b"], "priority": True},
        {"prompt": "Bad item", "responses": ["a", 3]},
        {"prompt": "No text", "responses": ["a", {"model": "m"}]},
        {"prompt": "Too many", "responses": [str(i) for i in range(imports.MAX_CANDIDATES + 1)]},
    )
    assert _bad(report) == [
        (3, "'responses' needs at least two distinct responses"),
        (4, "'responses' must be a list, got a string"),
        (5, "'priority' must be an integer between -2147483648 and 2147483647"),
        (6, "'responses[1]' must be a string or an object with 'text', got a number"),
        (7, "missing field 'text'"),
        (8, f"'responses' has {imports.MAX_CANDIDATES + 1} items; at most {imports.MAX_CANDIDATES} are allowed"),
    ]
    assert report.pairs_created == 4 and report.comparisons_created == 0
    pairs = Pair.objects.filter(project=project)
    assert pairs.count() == 4
    assert {p.priority for p in pairs.filter(prompt__content="Write a haiku.")} == {7}
    assert all(p.label_count == 0 and p.status == Pair.Status.OPEN for p in pairs)
    assert not Comparison.objects.filter(pair__project=project).exists()
    two = Response.objects.get(project=project, text="two")
    assert (two.model_name, two.metadata) == ("m-2", {"temperature": 0.7})


# --- deduplication and batches ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_pairs_are_deduplicated_whatever_the_order_across_batches_and_against_existing_pairs(project):
    existing = PairFactory(project=project)
    report = _import(
        project, "trl",
        {"prompt": "p", "chosen": "x", "rejected": "y"},
        {"prompt": "p", "chosen": "y", "rejected": "x"},
        {"prompt": "p", "chosen": "x", "rejected": "z"},
        {"prompt": existing.prompt.content, "chosen": existing.response_b.text, "rejected": existing.response_a.text},
        {"prompt": "p", "chosen": "z", "rejected": "x"},
        batch_lines=2,
    )
    assert _bad(report) == []
    # The pair already in the project (unlabeled) takes the row's label; the other repeats are duplicates.
    assert (report.pairs_created, report.comparisons_created, report.duplicates_skipped) == (2, 3, 2)
    assert _pairs(project) - {(existing.prompt.content, existing.response_a.text, existing.response_b.text)} == {
        ("p", "x", "y"), ("p", "x", "z")}
    assert Response.objects.filter(project=project, text__in=["x", "y", "z"]).count() == 3
    existing.refresh_from_db()
    assert existing.label_count == 1 and existing.status == Pair.Status.COMPLETE
    assert list(existing.comparisons.values_list("source", "choice", "labeler")) == [("import", "b", None)]


@pytest.mark.django_db
def test_labels_imported_after_their_pairs_are_added_to_those_pairs(project, labeler):
    project.labels_per_pair = 2
    project.save()
    candidates = _import(project, "candidates", {"prompt": "p", "responses": ["x", "y"]},
                         {"prompt": "q", "responses": ["u", "v"]}, {"prompt": "r", "responses": ["s", "t"]})
    assert (candidates.pairs_created, candidates.comparisons_created) == (3, 0)
    by_prompt = {pair.prompt.content: pair for pair in Pair.objects.filter(project=project).select_related("prompt")}
    # A labeler already answered q's pair; r's pair is gold (the manager's answer stands).
    Comparison.objects.create(pair=by_prompt["q"], project=project, labeler=labeler, choice="a")
    Pair.objects.filter(pk=by_prompt["q"].pk).update(label_count=1)
    Pair.objects.filter(pk=by_prompt["r"].pk).update(gold_choice="a")

    labels = [{"prompt": "p", "chosen": "y", "rejected": "x", "margin": 2.0},
              {"prompt": "q", "chosen": "u", "rejected": "v"}, {"prompt": "r", "chosen": "s", "rejected": "t"}]
    report = _import(project, "trl", *labels)
    assert _bad(report) == []
    assert (report.pairs_created, report.comparisons_created, report.duplicates_skipped) == (0, 2, 1)
    p, q, r = (Pair.objects.get(pk=by_prompt[name].pk) for name in "pqr")
    chosen_side = "a" if p.response_a.text == "y" else "b"
    assert list(p.comparisons.values_list("source", "choice", "margin")) == [("import", chosen_side, 2.0)]
    assert (p.label_count, p.status) == (1, Pair.Status.OPEN)
    assert sorted(q.comparisons.values_list("source", flat=True)) == ["import", "label"]
    assert (q.label_count, q.status) == (2, Pair.Status.COMPLETE)
    assert (r.label_count, r.comparisons.count()) == (0, 0)

    # The same labels again, or the opposite label, add nothing: a pair takes one imported label.
    again = _import(project, "trl", *labels, {"prompt": "p", "chosen": "x", "rejected": "y"})
    assert (again.pairs_created, again.comparisons_created, again.duplicates_skipped) == (0, 0, 4)
    assert Comparison.objects.filter(project=project).count() == 3


@pytest.mark.django_db
def test_imported_labels_keep_the_pair_open_until_the_overlap_is_reached():
    project = ProjectFactory(labels_per_pair=3)
    _import(project, "trl", {"prompt": "p", "chosen": "x", "rejected": "y"})
    pair = Pair.objects.get(project=project)
    assert pair.label_count == 1 and pair.status == Pair.Status.OPEN


@pytest.mark.django_db
def test_the_stored_bad_line_list_is_capped_but_every_bad_line_is_counted(project, monkeypatch):
    monkeypatch.setattr(imports, "MAX_BAD_LINES_STORED", 3)
    report = _import(project, "trl", *["not json"] * 5, {"prompt": "p", "chosen": "x", "rejected": "y"})
    assert report.bad_line_count == 5 and [line for line, _ in _bad(report)] == [1, 2, 3]
    assert report.as_dict()["bad_lines_truncated"] is True
    assert report.pairs_created == 1



@pytest.mark.django_db
def test_the_line_limit_counts_the_same_bytes_whatever_the_line_ending(project, settings):
    row = json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}).encode()
    settings.PREFLAB = {**settings.PREFLAB, "IMPORT_MAX_LINE_BYTES": len(row)}
    longer = json.dumps({"prompt": "p2", "chosen": "x", "rejected": "y"}).encode()
    stream = io.BytesIO(row + b"\r\n" + longer + b"\r\n" + row.replace(b'"x"', b'"z"') + b"\n")
    report = preferences_import(project=project, stream=stream, format="trl")
    assert report.lines_read == 3
    assert _bad(report) == [(2, f"line is longer than {len(row)} bytes")]
    assert report.pairs_created == 2


@pytest.mark.django_db
def test_a_byte_order_mark_on_an_otherwise_blank_first_line_is_not_a_bad_line(project):
    row = json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}).encode()
    report = preferences_import(project=project, stream=io.BytesIO(b"\xef\xbb\xbf\r\n" + row + b"\r\n"),
                                format="trl")
    assert (report.lines_read, report.bad_line_count, report.pairs_created) == (2, 0, 1)

@pytest.mark.django_db
def test_an_unknown_format_is_refused(project):
    with pytest.raises(DomainError) as exc:
        _import(project, "csv", {"prompt": "p"})
    assert exc.value.field == "format"


# --- API -------------------------------------------------------------------------------------------------


def _upload(user, project, *, fmt="hh", content: bytes | None = None):
    data = {"format": fmt}
    if content is not None:
        data["file"] = SimpleUploadedFile("data.jsonl", content, content_type="application/jsonl")
    return client_for(user).post(f"/api/v1/projects/{project.slug}/import/", data, format="multipart")


@pytest.mark.django_db
def test_api_upload_by_a_manager_returns_the_report(project, manager):
    response = _upload(manager, project, content=FIXTURE.read_bytes())
    assert response.status_code == 201
    body = response.json()
    assert body["lines_read"] == 40 and body["pairs_created"] == 39 and body["comparisons_created"] == 39
    assert body["bad_line_count"] == 1 and body["bad_lines"][0]["line"] == 40
    again = _upload(manager, project, content=FIXTURE.read_bytes())
    assert again.status_code == 200 and again.json()["duplicates_skipped"] == 39


@pytest.mark.django_db
def test_api_upload_is_for_managers_and_admins_only(project, labeler, outsider, admin_user):
    content = json.dumps(_hh("Hi?", "Hello!", "Go away.")).encode()
    assert _upload(labeler, project, content=content).status_code == 403
    assert _upload(outsider, project, content=content).status_code == 404
    assert not Pair.objects.filter(project=project).exists()
    assert _upload(admin_user, project, content=content).status_code == 201


@pytest.mark.django_db
def test_api_upload_names_the_missing_file_or_the_unknown_format(project, manager):
    missing = _upload(manager, project)
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "file"
    unknown = _upload(manager, project, fmt="csv", content=b"{}\n")
    assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "format"


@pytest.mark.django_db
def test_api_upload_over_the_size_limit_is_refused(project, manager, settings):
    settings.PREFLAB = {**settings.PREFLAB, "IMPORT_MAX_BYTES": 10}
    response = _upload(manager, project, content=FIXTURE.read_bytes())
    assert response.status_code == 413 and response.json()["error"]["field"] == "file"
    assert not Pair.objects.filter(project=project).exists()


# --- command ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_command_creates_the_project_on_request_and_prints_the_report():
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="--create"):
        call_command("import_preferences", str(FIXTURE), project="hh-new", format="hh", stdout=out, stderr=err)
    call_command("import_preferences", str(FIXTURE), project="hh-new", format="hh", create=True, no_progress=True,
                 stdout=out, stderr=err)
    project = Project.objects.get(slug="hh-new")
    assert Pair.objects.filter(project=project).count() == 39
    assert "40 lines read: 39 pairs created, 39 comparisons created, 0 duplicates skipped, 1 bad lines." in (
        out.getvalue())
    assert "line 40: 'chosen' and 'rejected' differ before the last assistant reply" in err.getvalue()


@pytest.mark.django_db
def test_command_reports_an_unreadable_file(project):
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("import_preferences", "/nonexistent/file.jsonl", project=project.slug, format="trl")


@pytest.mark.django_db
def test_command_fails_when_no_line_of_the_file_could_be_imported(project, tmp_path):
    # The HH fixture read as TRL rows: every line is bad, and a script must see a failure, not exit status 0.
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match=r"Nothing was imported: every line was bad\. Is the file in the 'trl'"):
        call_command("import_preferences", str(FIXTURE), project=project.slug, format="trl", no_progress=True,
                     stdout=out, stderr=err)
    assert "0 pairs created" in out.getvalue() and "line 1:" in err.getvalue()
    # One good line among bad ones, or a file already imported (duplicates), is a success with a report.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}\nnot json\n', encoding="utf-8")
    for _ in range(2):
        call_command("import_preferences", str(mixed), project=project.slug, format="trl", no_progress=True,
                     stdout=io.StringIO(), stderr=io.StringIO())
    assert Pair.objects.filter(project=project).count() == 1


@pytest.mark.django_db
def test_a_file_that_only_labels_pairs_already_in_the_project_is_an_import_not_a_failure(project, manager, tmp_path):
    # Candidates first, the team's labels later: the labels file creates comparisons but no pair.
    _import(project, "candidates", {"prompt": "p", "responses": ["x", "y"]}, {"prompt": "q", "responses": ["u", "v"]})
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt": "p", "chosen": "y", "rejected": "x"}\nnot json\n', encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    call_command("import_preferences", str(labels), project=project.slug, format="trl", no_progress=True,
                 stdout=out, stderr=err)
    assert "2 lines read: 0 pairs created, 1 comparisons created, 0 duplicates skipped, 1 bad lines." in out.getvalue()
    assert "line 2: invalid JSON" in err.getvalue()
    response = _upload(manager, project, fmt="trl", content=b'{"prompt": "q", "chosen": "u", "rejected": "v"}\n')
    assert response.status_code == 201
    assert (response.json()["pairs_created"], response.json()["comparisons_created"]) == (0, 1)
    assert Comparison.objects.filter(project=project, source="import").count() == 2


@pytest.mark.django_db
def test_command_creates_no_project_for_a_file_it_cannot_read(tmp_path):
    err = io.StringIO()
    with pytest.raises(CommandError, match=r"^Cannot read /nonexistent\.jsonl: No such file or directory\.$"):
        call_command("import_preferences", "/nonexistent.jsonl", project="ghostproj", format="hh", create=True,
                     no_progress=True, stdout=io.StringIO(), stderr=err)
    assert "Created project" not in err.getvalue()
    assert not Project.objects.filter(slug="ghostproj").exists()

    archive = tmp_path / "hh.jsonl.gz"
    archive.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    with pytest.raises(CommandError, match=r"^The file is a gzip archive; upload the uncompressed JSONL file\.$"):
        call_command("import_preferences", str(archive), project="ghostproj", format="hh", create=True,
                     no_progress=True, stdout=io.StringIO(), stderr=err)
    assert "Created project" not in err.getvalue()
    assert not Project.objects.exists()


@pytest.mark.django_db
def test_a_file_of_long_lines_is_written_in_batches_bounded_by_size_not_only_by_line_count(project, monkeypatch):
    monkeypatch.setattr(imports, "BATCH_BYTES", 1024 * 1024)
    lines = [{"prompt": f"p{i}", "chosen": f"{i}" + "x" * 256 * 1024, "rejected": f"{i}" + "y" * 256 * 1024}
             for i in range(32)]
    stream = _stream(*lines)
    size = len(stream.getvalue())
    tracemalloc.start()
    try:
        report = preferences_import(project=project, stream=stream, format="trl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.pairs_created == 32 and report.bad_line_count == 0
    # The 16 MiB file is held a batch of about 1 MiB at a time, not whole.
    assert peak < size / 2, f"peak {peak} bytes for a file of {size}"

"""Manager dashboard pages: permissions, numbers equal to labeling.stats, charts JSON, import report, export,
members, guidelines and the labeler outlier rule."""
from __future__ import annotations

import gzip
import json
import math
import re
from datetime import UTC, datetime

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.serializers.json import DjangoJSONEncoder
from django.test import Client

from labeling import exports, selectors, services, stats
from labeling.models import Comparison, Membership, Pair, Project
from rewards.models import RewardModel
from tests.factories import PairFactory, ProjectFactory, UserFactory


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _member(project, role=Membership.Role.LABELER, **fields):
    user = UserFactory(**fields)
    Membership.objects.create(project=project, user=user, role=role)
    return user


def _label(pair, labeler, choice, *, swapped=False, time_ms=5000) -> Comparison:
    comparison = Comparison.objects.create(pair=pair, project=pair.project, labeler=labeler, choice=choice,
                                           swapped=swapped, time_ms=time_ms)
    pair.label_count += 1
    if pair.gold_choice is None and pair.label_count >= pair.project.labels_per_pair:
        pair.status = Pair.Status.COMPLETE
    pair.save(update_fields=["label_count", "status"])
    return comparison


@pytest.fixture
def known(project, manager):
    """Two labelers on four pairs (one gold) of a two-labels-per-pair project: ann agrees with gold, bob does
    not, and bob answers in one second."""
    project.labels_per_pair = 2
    project.save()
    ann = _member(project, username="ann")
    bob = _member(project, username="bob")
    pairs = [PairFactory(project=project) for _ in range(3)]
    gold = PairFactory(project=project, gold_choice="a")
    _label(pairs[0], ann, "a"), _label(pairs[0], bob, "a", swapped=True, time_ms=1000)
    _label(pairs[1], ann, "b"), _label(pairs[1], bob, "a", time_ms=1000)
    _label(pairs[2], ann, "tie", time_ms=8000)
    _label(gold, ann, "a"), _label(gold, bob, "b", time_ms=1000)
    return {"ann": ann, "bob": bob, "pairs": pairs, "gold": gold}


def _urls(project) -> list[str]:
    base = f"/dashboard/{project.slug}/"
    return [base, f"{base}charts.json", f"{base}guidelines/"]


# --- permissions ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_pages_answer_by_role(project, manager, labeler, admin_user, outsider):
    for url in ["/dashboard/", *_urls(project)]:
        assert _client(manager).get(url).status_code == 200, url
        assert _client(admin_user).get(url).status_code == 200, url
        assert _client(labeler).get(url).status_code == 403, url
    for url in _urls(project):
        assert _client(outsider).get(url).status_code == 404, url
        response = Client().get(url)
        assert response.status_code == 302 and response.url.startswith("/accounts/login/"), url
    # Someone who manages nothing has no dashboard.
    assert _client(outsider).get("/dashboard/").status_code == 403
    assert Client().get("/dashboard/").status_code == 302


@pytest.mark.django_db
def test_a_labeler_cannot_change_members_or_guidelines(project, labeler):
    client = _client(labeler)
    base = f"/dashboard/{project.slug}/"
    assert client.post(f"{base}members/", {"username": labeler.username, "role": "manager"}).status_code == 403
    assert client.post(f"{base}guidelines/", {"guidelines": "x", "action": "save"}).status_code == 403
    assert Membership.objects.get(user=labeler).role == Membership.Role.LABELER
    assert _guidelines(project) == ""


def _guidelines(project) -> str:
    project.refresh_from_db()
    return project.guidelines


@pytest.mark.django_db
def test_forms_need_the_csrf_token(project, manager):
    client = Client(enforce_csrf_checks=True)
    client.force_login(manager)
    response = client.post(f"/dashboard/{project.slug}/members/", {"username": manager.username, "role": "labeler"})
    assert response.status_code == 403
    assert Membership.objects.get(user=manager).role == Membership.Role.MANAGER
    page = client.get(f"/dashboard/{project.slug}/").content.decode()
    assert page.count('name="csrfmiddlewaretoken"') >= 4


# --- numbers --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_project_page_shows_the_stats_numbers(project, manager, known):
    expected = stats.project_stats(project=project)
    page = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    assert f"{expected['pairs']['complete']} of {expected['pairs']['labelable']} pairs complete" in page
    assert expected["pairs"] == {"total": 4, "gold": 1, "complete": 2, "in_progress": 1, "unlabeled": 0,
                                 "labelable": 3}
    assert f'data-stat="comparisons-total">{expected["comparisons"]["total"]} ' in page
    alpha = expected["agreement"]["krippendorff_alpha"]
    assert f'data-stat="alpha">{alpha:.3f}<' in page
    assert f'data-stat="gold-accuracy">{expected["gold"]["accuracy"]:.3f} ' in page
    for choice, count in expected["choices"].items():
        assert f'data-choice="{choice}">{count}<' in page
    for row in expected["agreement"]["per_labeler"]:
        assert f"<td>{row['labeler']['username']}</td><td class=\"num\">{row['pairs']}</td>" \
               f"<td class=\"num\">{row['agreement']:.3f}</td>" in page
    activity = {row["labeler"]["username"]: row for row in expected["labelers"]}
    assert activity["bob"]["median_seconds"] == 1.0 and activity["ann"]["median_seconds"] == 5.0
    assert f'data-sort-value="{activity["ann"]["left_share"]}">{activity["ann"]["left_share"]:.3f}<' in page
    # bob answers in a second and misses the gold pair, but on 3 timed answers and 1 gold answer: too few to flag
    # (tests/labeling/test_flags.py has labelers with enough of them).
    assert 'data-labeler="bob">' in page and 'data-labeler="ann">' in page and 'class="outlier"' not in page
    assert "over at least 10 gold answers" in page
    hours = expected["throughput"]["buckets"]
    assert page.count("<tr><td>") >= len(hours)
    # Agreement over time: today's row holds every pair with two labels (all were labeled just now).
    today = expected["agreement"]["daily"][-1]
    assert today["pairs"] == expected["agreement"]["with_ties"]["pairs"] > 0
    assert (f'<tr><td>{today["day"]:%Y-%m-%d}</td><td class="num">{today["pairs"]}</td>'
            f'<td class="num">{today["percent_agreement"]:.3f}</td></tr>') in page


@pytest.mark.django_db
def test_charts_json_returns_the_stats_selectors_output(project, manager, known):
    body = _client(manager).get(f"/dashboard/{project.slug}/charts.json").json()
    throughput = stats.comparison_throughput_hourly(project=project)
    assert [b["comparisons"] for b in body["throughput"]] == [b["comparisons"] for b in throughput]
    assert body["throughput"][-1]["comparisons"] == 7
    assert body["choices"] == stats.choice_distribution(project=project)
    agreement = json.loads(json.dumps(stats.labeler_agreement(project=project)["per_labeler"]))
    assert body["agreement_by_labeler"] == agreement
    daily = json.loads(json.dumps(stats.labeler_agreement(project=project)["daily"], cls=DjangoJSONEncoder))
    assert body["agreement_daily"] == daily and len(daily) == stats.AGREEMENT_DAYS


@pytest.mark.django_db
def test_charts_json_rejects_a_bad_hours_value(project, manager):
    client = _client(manager)
    for value in ("abc", "0", "100000"):
        response = client.get(f"/dashboard/{project.slug}/charts.json?hours={value}")
        assert response.status_code == 400
        assert response.json()["error"]["field"] == "hours"
    assert len(client.get(f"/dashboard/{project.slug}/charts.json?hours=6").json()["throughput"]) == 6


@pytest.mark.django_db
def test_overview_shows_progress_activity_agreement_and_reward_model(project, manager, known, tmp_path):
    other = ProjectFactory()
    RewardModel.objects.create(project=project, version=3, artifact_path=str(tmp_path), is_deployed=True,
                               deployed_at="2025-01-01T00:00:00Z", metrics={"eval_accuracy": 0.75})
    page = _client(manager).get("/dashboard/").content.decode()
    activity = selectors.project_recent_activity(projects=[project])[project.pk]
    assert activity.comparisons_today == 7 and activity.active_labelers == 2
    assert f'data-stat="comparisons-today">{activity.comparisons_today}<' in page
    assert f'data-stat="active-labelers">{activity.active_labelers}<' in page
    alpha = stats.labeler_agreement(project=project)["krippendorff_alpha"]
    assert f"\N{GREEK SMALL LETTER ALPHA} = {alpha:.3f}" in page
    assert "v3, held-out accuracy 0.750" in page
    assert "2 of 3 pairs complete" in page
    # Only the projects this manager manages are listed.
    assert other.name not in page


@pytest.mark.django_db
def test_overview_queries_do_not_grow_with_the_number_of_projects(manager, tmp_path):
    """Counts, deployed models and agreement of every project are read at once: 1, 5 or 20 projects, with labels
    on shared pairs and a deployed model each, take the same number of queries."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def overview_queries(projects: int) -> int:
        Project.objects.all().delete()
        for index in range(projects):
            project = ProjectFactory(labels_per_pair=2)
            Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
            ann, bob = _member(project), _member(project)
            pair = PairFactory(project=project)
            _label(pair, ann, "a"), _label(pair, bob, "a" if index % 2 else "b")
            RewardModel.objects.create(project=project, version=1, artifact_path=str(tmp_path), is_deployed=True,
                                       deployed_at="2025-01-01T00:00:00Z", metrics={"eval_accuracy": 0.5 + index / 100})
        client = _client(manager)
        with CaptureQueriesContext(connection) as queries:
            page = client.get("/dashboard/")
        body = page.content.decode()
        assert page.status_code == 200 and body.count("held-out accuracy") == projects
        assert body.count('data-stat="agreement">') == projects and "no overlapping labels yet" not in body
        return len(queries)

    counts = [overview_queries(projects) for projects in (1, 5, 20)]
    assert counts[0] == counts[1] == counts[2], counts


@pytest.mark.django_db
def test_overview_agreement_is_that_of_each_project(manager):
    """The overview's batched agreement gives each project the same numbers as labeling.stats on that project
    alone."""
    projects = []
    for choices in (("a", "a", "b"), ("a", "a", "a"), ("tie", "b", "both_bad"), ()):
        project = ProjectFactory(labels_per_pair=3)
        Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
        people = [_member(project) for _ in range(3)]
        for pair_choices in (choices, choices[::-1], choices[:2]):
            pair = PairFactory(project=project)
            for person, choice in zip(people, pair_choices, strict=False):
                _label(pair, person, choice)
        projects.append(project)
    summaries = stats.agreement_summary_by_project(projects=projects)
    for project in projects:
        alone = stats.labeler_agreement(project=project)
        summary = summaries[project.pk]
        assert summary == {key: alone[key] for key in summary}
        assert {"with_ties", "without_ties", "krippendorff_alpha", "krippendorff_alpha_reason"} <= set(summary)
    page = _client(manager).get("/dashboard/").content.decode()
    shown = {slug: re.sub(r"\s+", " ", text).strip() for slug, text in re.findall(
        r'data-project="([^"]+)".*?data-stat="agreement">(.*?)</dd>', page, re.S)}
    alphas = [stats.labeler_agreement(project=project)["krippendorff_alpha"] for project in projects[::2]]
    assert [shown[project.slug] for project in projects] == [
        f"\N{GREEK SMALL LETTER ALPHA} = {alphas[0]:.3f}",
        "100% agree",  # every label the same choice: alpha is undefined, the share of agreement is shown instead
        f"\N{GREEK SMALL LETTER ALPHA} = {alphas[1]:.3f}",
        '<span class="hint">no overlapping labels yet</span>',
    ]


@pytest.mark.django_db
def test_agreement_over_time_puts_a_label_in_the_day_it_was_made(project, manager):
    """A label half a second before midnight belongs to its own day, not to the next one (nor, on the current
    day, to a day after the series' end)."""
    project.labels_per_pair = 2
    project.save()
    ann, bob = _member(project), _member(project)
    pair = PairFactory(project=project)
    _label(pair, ann, "a"), _label(pair, bob, "a")
    Comparison.objects.filter(pair=pair).update(created_at=datetime(2025, 3, 9, 23, 59, 59, 600_000, tzinfo=UTC))
    daily = stats.labeler_agreement(project=project, now=datetime(2025, 3, 10, 12, tzinfo=UTC))["daily"]
    by_day = {row["day"].isoformat(): row["pairs"] for row in daily}
    assert by_day["2025-03-09"] == 1 and by_day["2025-03-10"] == 0
    daily = stats.labeler_agreement(project=project, now=datetime(2025, 3, 9, 23, 59, 59, 900_000, tzinfo=UTC))["daily"]
    assert daily[-1]["day"].isoformat() == "2025-03-09" and daily[-1]["pairs"] == 1
    # The page's table says the same.
    page = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    today = stats.labeler_agreement(project=project)["daily"][-1]["day"]
    assert f'<tr><td>{today:%Y-%m-%d}</td><td class="num">0</td>' in page


# --- import and export ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_import_shows_the_line_numbered_report(project, manager):
    content = (b'{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away."}\n'
               b'{"prompt": "Hi?", "chosen": "same"\n'
               b'{"prompt": "Bye?", "chosen": "Goodbye.", "rejected": "No."}\n')
    upload = SimpleUploadedFile("prefs.jsonl", content, content_type="application/jsonl")
    response = _client(manager).post(f"/dashboard/{project.slug}/import/", {"file": upload, "format": "trl"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "prefs.jsonl" in page and "3 lines read, 2 pairs and 2 comparisons created" in page
    assert '<tr><td class="num">2</td><td>' in page
    assert Pair.objects.filter(project=project).count() == 2


@pytest.mark.django_db
def test_import_without_a_file_or_with_a_bad_format_names_the_field(project, manager):
    client = _client(manager)
    response = client.post(f"/dashboard/{project.slug}/import/", {"format": "trl"})
    assert response.status_code == 400 and "Not imported (file)" in response.content.decode()
    upload = SimpleUploadedFile("x.jsonl", b"{}\n")
    response = client.post(f"/dashboard/{project.slug}/import/", {"file": upload, "format": "csv"})
    assert response.status_code == 400 and "Not imported (format)" in response.content.decode()
    assert not Pair.objects.exists()


def _selected(page: str, select_id: str) -> list[str]:
    select = re.search(rf'<select id="{select_id}".*?</select>', page, re.S).group(0)
    return re.findall(r'<option value="([^"]+)" selected>', select)


@pytest.mark.django_db
def test_an_import_error_keeps_the_chosen_format(project, manager):
    client = _client(manager)
    assert _selected(client.get(f"/dashboard/{project.slug}/").content.decode(), "import-format") == []
    content = gzip.compress(b'{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away."}\n')
    upload = SimpleUploadedFile("prefs.jsonl.gz", content, content_type="application/gzip")
    response = client.post(f"/dashboard/{project.slug}/import/", {"file": upload, "format": "candidates"})
    assert response.status_code == 400
    assert _selected(response.content.decode(), "import-format") == ["candidates"]
    response = client.post(f"/dashboard/{project.slug}/import/", {"format": "trl"})
    assert response.status_code == 400 and _selected(response.content.decode(), "import-format") == ["trl"]


@pytest.mark.django_db
def test_export_streams_the_export_service(project, manager, known):
    client = _client(manager)
    for fmt in exports.FORMATS:
        response = client.get(f"/dashboard/{project.slug}/export/?format={fmt}")
        assert response.status_code == 200
        assert response["Content-Disposition"] == f'attachment; filename="{project.slug}-{fmt}.jsonl"'
        body = b"".join(response.streaming_content).decode()
        assert body == "".join(exports.preferences_export(project=project, format=fmt))
    response = client.get(f"/dashboard/{project.slug}/export/?format=xml", follow=True)
    assert "format: Unknown format" in response.content.decode()


# --- members and guidelines -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_members_are_added_changed_and_removed(project, manager):
    newcomer = UserFactory(username="newcomer")
    client = _client(manager)
    url = f"/dashboard/{project.slug}/members/"
    response = client.post(url, {"username": "newcomer", "role": "labeler"}, follow=True)
    assert "newcomer was added as labeler." in response.content.decode()
    assert Membership.objects.get(project=project, user=newcomer).role == "labeler"
    response = client.post(url, {"username": "newcomer", "role": "manager"}, follow=True)
    assert "newcomer is now manager." in response.content.decode()
    assert Membership.objects.get(project=project, user=newcomer).role == "manager"
    response = client.post(f"{url}remove/", {"username": "newcomer"}, follow=True)
    assert "newcomer was removed" in response.content.decode()
    assert not Membership.objects.filter(project=project, user=newcomer).exists()


@pytest.mark.django_db
def test_member_errors_are_shown_with_the_field(project, manager):
    client = _client(manager)
    url = f"/dashboard/{project.slug}/members/"
    response = client.post(url, {"username": "nobody", "role": "labeler"})
    page = response.content.decode()
    assert response.status_code == 400 and "Not changed (username)" in page and "nobody" in page
    response = client.post(url, {"username": manager.username, "role": "owner"})
    assert response.status_code == 400 and "Not changed (role)" in response.content.decode()
    response = client.post(f"{url}remove/", {"username": UserFactory().username})
    assert response.status_code == 404 and "Not changed (username)" in response.content.decode()
    assert Membership.objects.get(user=manager).role == "manager"


@pytest.mark.django_db
def test_the_last_manager_demoting_themselves_is_told_why_on_the_page(project, manager):
    client = _client(manager)
    url = f"/dashboard/{project.slug}/members/"
    response = client.post(url, {"username": manager.username, "role": "labeler"})
    page = response.content.decode()
    assert response.status_code == 409 and "Not changed (role)" in page and "last manager" in page
    response = client.post(f"{url}remove/", {"username": manager.username})
    assert response.status_code == 409 and "last manager" in response.content.decode()
    assert Membership.objects.get(user=manager).role == "manager"


@pytest.mark.django_db
def test_a_member_error_keeps_the_chosen_role(project, manager):
    client = _client(manager)
    assert _selected(client.get(f"/dashboard/{project.slug}/").content.decode(), "member-role") == ["labeler"]
    response = client.post(f"/dashboard/{project.slug}/members/", {"username": "nobdy", "role": "manager"})
    page = response.content.decode()
    assert response.status_code == 400 and 'value="nobdy"' in page
    # Fixing the typo and submitting again must not add the user as a labeler instead.
    assert _selected(page, "member-role") == ["manager"]


@pytest.mark.django_db
def test_guidelines_preview_renders_safely_and_save_stores(project, manager):
    client = _client(manager)
    url = f"/dashboard/{project.slug}/guidelines/"
    text = "Prefer **honest** answers.\n\n<script>alert(1)</script>"
    response = client.post(url, {"guidelines": text, "action": "preview"})
    page = response.content.decode()
    assert response.status_code == 200 and "<strong>honest</strong>" in page and "not saved yet" in page
    assert "<script>alert(1)</script>" not in page
    assert _guidelines(project) == ""
    response = client.post(url, {"guidelines": text, "action": "save"})
    assert response.status_code == 302 and response.url == f"/dashboard/{project.slug}/"
    assert _guidelines(project) == text


@pytest.mark.django_db
def test_guidelines_are_compared_and_stored_with_the_line_breaks_typed_not_those_of_the_form_post(project, manager):
    services.project_update(project=project, guidelines="Be honest.\nBe brief.")  # as the API stores them
    client = _client(manager)
    url = f"/dashboard/{project.slug}/guidelines/"
    # A browser posts a textarea's line breaks as CRLF: the same text, unchanged, is not "not saved yet".
    response = client.post(url, {"guidelines": "Be honest.\r\nBe brief.", "action": "preview"})
    assert response.status_code == 200 and "not saved yet" not in response.content.decode()
    response = client.post(url, {"guidelines": "Be honest.\r\nBe kind.", "action": "save"})
    assert response.status_code == 302 and _guidelines(project) == "Be honest.\nBe kind."


# --- the outlier rule -----------------------------------------------------------------------------------


def test_outlier_rule():
    ok = {"side_picks": 200, "left_share": 0.5, "gold_comparisons": 20, "gold_accuracy": 0.9, "timed": 50,
          "median_seconds": 12.0, "agreement_pairs": 40, "agreement": 0.8}
    assert selectors.labeler_outlier_reasons(**ok) == []
    assert selectors.labeler_outlier_reasons(**{**ok, "left_share": 0.65}) == []
    assert selectors.labeler_outlier_reasons(**{**ok, "left_share": 0.66}) == ["picks the left side 66% of the time"]
    assert selectors.labeler_outlier_reasons(**{**ok, "left_share": 0.2}) == ["picks the left side 20% of the time"]
    # Too few picks of a side to judge position bias.
    assert selectors.labeler_outlier_reasons(**{**ok, "side_picks": 19, "left_share": 0.9}) == []
    # Outside the band, but a fair coin lands there often enough: 33 of 50 (p 0.03), 16 of 20 (p 0.01).
    assert selectors.labeler_outlier_reasons(**{**ok, "side_picks": 50, "left_share": 0.66}) == []
    assert selectors.labeler_outlier_reasons(**{**ok, "side_picks": 20, "left_share": 0.8}) == []
    assert selectors.labeler_outlier_reasons(**{**ok, "side_picks": 20, "left_share": 0.85}) == [
        "picks the left side 85% of the time"]
    assert selectors.labeler_outlier_reasons(**{**ok, "gold_accuracy": 0.65}) == ["gold accuracy 65% (13 of 20)"]
    assert selectors.labeler_outlier_reasons(**{**ok, "gold_accuracy": 0.7}) == []
    assert selectors.labeler_outlier_reasons(**{**ok, "median_seconds": 2.5}) == ["median 2.5 s per comparison"]
    assert selectors.labeler_outlier_reasons(**{**ok, "agreement": 0.45}) == ["agrees with the others 45% of the time"]
    assert selectors.labeler_outlier_reasons(**{**ok, "agreement": 0.5}) == []
    none = {"side_picks": 0, "left_share": None, "gold_comparisons": 0, "gold_accuracy": None, "timed": 0,
            "median_seconds": None, "agreement_pairs": 0, "agreement": None}
    assert selectors.labeler_outlier_reasons(**none) == []
    assert len(selectors.labeler_outlier_reasons(side_picks=30, left_share=0.9, gold_comparisons=10, gold_accuracy=0.1,
                                                 timed=30, median_seconds=0.5, agreement_pairs=30,
                                                 agreement=0.2)) == 4


def test_a_fair_labeler_is_flagged_for_position_bias_at_most_one_time_in_a_hundred():
    """The chance that a labeler who picks each side half of the time gets the flag, summed exactly over every
    count of left picks, at each number of side picks from the minimum up."""
    ok = {"gold_comparisons": 0, "gold_accuracy": None, "timed": 0, "median_seconds": None, "agreement_pairs": 0,
          "agreement": None}
    rates = {}
    for picks in [*range(selectors.OUTLIER_MIN_LABELS, 121), 500, 2000]:
        flagged = [left for left in range(picks + 1)
                   if selectors.labeler_outlier_reasons(side_picks=picks, left_share=left / picks, **ok)]
        rates[picks] = sum(math.comb(picks, left) for left in flagged) / 2**picks
        # Flags are the two tails: everything at least as far from half as the least extreme flagged count.
        assert flagged and flagged == [left for left in range(picks + 1) if abs(left - picks / 2) >= abs(
            min(flagged, key=lambda left: abs(left - picks / 2)) - picks / 2)]
    assert max(rates.values()) <= 0.01, max(rates.items(), key=lambda item: item[1])
    assert rates[20] == pytest.approx(2 * sum(math.comb(20, k) for k in range(4)) / 2**20)  # 17 or more of 20


@pytest.mark.django_db
def test_labeler_table_joins_the_stats(project, known):
    rows = {row["labeler"]["username"]: row for row in selectors.labeler_table(stats=stats.project_stats(
        project=project))}
    assert rows["ann"]["comparisons"] == 4 and rows["ann"]["gold_accuracy"] == 1.0 and rows["ann"]["outliers"] == []
    assert rows["bob"]["gold_accuracy"] == 0.0 and rows["bob"]["gold_comparisons"] == 1
    assert rows["ann"]["agreement"] == pytest.approx(1 / 3) and rows["ann"]["agreement_pairs"] == 3
    # One gold answer, three timed ones and three shared pairs: each measure is shown, none is enough to flag.
    assert rows["bob"]["gold_accuracy"] == 0.0 and rows["bob"]["median_seconds"] == 1.0 and rows["bob"]["timed"] == 3
    assert rows["bob"]["outliers"] == []


@pytest.mark.django_db
def test_an_admin_who_labeled_without_a_membership_is_not_shown_as_removed(project, manager, admin_user):
    # Staff may label every project without being a member; only a labeler taken off the project is marked.
    removed = _member(project, username="removed")
    pairs = PairFactory.create_batch(2, project=project)
    _label(pairs[0], admin_user, "a")
    _label(pairs[1], removed, "b")
    Membership.objects.filter(user=removed).delete()
    page = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    rows = {name: page.split(f'data-labeler="{name}"', 1)[1].split("</tr>", 1)[0]
            for name in (admin_user.username, "removed")}
    assert "no longer a member" not in rows[admin_user.username]
    assert "no longer a member" in rows["removed"]


@pytest.mark.django_db
def test_an_archive_is_refused_on_the_form_and_imports_nothing(project, manager):
    PairFactory(project=project)
    before = (Project.objects.count(), Pair.objects.count(), Comparison.objects.count())
    content = gzip.compress(b'{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away."}\n')
    upload = SimpleUploadedFile("prefs.jsonl.gz", content, content_type="application/gzip")
    response = _client(manager).post(f"/dashboard/{project.slug}/import/", {"file": upload, "format": "trl"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "Not imported (file)" in page
    assert "file: The file is a gzip archive; upload the uncompressed JSONL file." in page
    assert (Project.objects.count(), Pair.objects.count(), Comparison.objects.count()) == before

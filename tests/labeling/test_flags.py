"""The labeler table's flags on stored labels: each flag needs a minimum of evidence (gold answers, timed answers,
picks of a side, shared pairs) and fires once it has it; below it the measure is shown but never flags."""
from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import path
from drf_spectacular.generators import SchemaGenerator

from labeling import selectors, stats
from labeling.apis_stats import ProjectStatsApi
from labeling.models import Comparison, Membership, Pair
from tests.conftest import client_for
from tests.factories import PairFactory, UserFactory

pytestmark = pytest.mark.django_db


def _member(project, username: str):
    user = UserFactory(username=username)
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    return user


def _label(pair, labeler, choice, *, swapped=False, time_ms: int | None = 10_000) -> None:
    Comparison.objects.create(pair=pair, project=pair.project, labeler=labeler, choice=choice, swapped=swapped,
                              time_ms=time_ms)
    pair.label_count += 1
    if pair.gold_choice is None and pair.label_count >= pair.project.labels_per_pair:
        pair.status = Pair.Status.COMPLETE
    pair.save(update_fields=["label_count", "status"])


def _rows(project) -> dict[str, dict]:
    return {row["labeler"]["username"]: row
            for row in selectors.labeler_table(stats=stats.project_stats(project=project))}


def _page(project, manager) -> str:
    client = Client()
    client.force_login(manager)
    response = client.get(f"/dashboard/{project.slug}/")
    assert response.status_code == 200
    return response.content.decode()


def _answer_gold(project, labeler, *, right: int, wrong: int) -> None:
    """Gold pairs answered right and wrong, alternating the side shown so that no other flag fires."""
    for index in range(right + wrong):
        pair = PairFactory(project=project, gold_choice="a")
        _label(pair, labeler, "a" if index < right else "b", swapped=index % 2 == 1)


# --- gold accuracy --------------------------------------------------------------------------------------


def test_one_or_two_wrong_gold_answers_do_not_flag_a_labeler(project, manager):
    one, two = _member(project, "one"), _member(project, "two")
    _answer_gold(project, one, right=0, wrong=1)
    _answer_gold(project, two, right=0, wrong=2)
    rows = _rows(project)
    assert (rows["one"]["gold_accuracy"], rows["one"]["gold_comparisons"]) == (0.0, 1)
    assert (rows["two"]["gold_accuracy"], rows["two"]["gold_comparisons"]) == (0.0, 2)
    assert rows["one"]["outliers"] == [] and rows["two"]["outliers"] == []
    page = _page(project, manager)
    assert 'class="outlier"' not in page and "gold accuracy 0%" not in page
    # The measure itself is still on the page, with the count it was taken over.
    assert '0.000 <span class="hint">(2)</span>' in page


def test_gold_accuracy_flags_from_the_documented_number_of_gold_answers(project, manager):
    assert selectors.OUTLIER_GOLD_MIN_ANSWERS == 10
    below, at, fine = _member(project, "below"), _member(project, "at"), _member(project, "fine")
    _answer_gold(project, below, right=0, wrong=9)  # 9 answers, all wrong: still too few
    _answer_gold(project, at, right=6, wrong=4)     # 10 answers, 0.6: flagged
    _answer_gold(project, fine, right=7, wrong=3)   # 10 answers, 0.7: at the threshold, not below it
    rows = _rows(project)
    assert rows["below"]["outliers"] == []
    assert rows["at"]["outliers"] == ["gold accuracy 60% (6 of 10)"]
    assert rows["fine"]["outliers"] == []
    page = _page(project, manager)
    assert 'data-labeler="at" class="outlier"' in page and "gold accuracy 60% (6 of 10)" in page
    assert 'data-labeler="below">' in page and 'data-labeler="fine">' in page
    assert "gold accuracy is below 0.7 over at least 10 gold answers" in page


# --- speed ----------------------------------------------------------------------------------------------


def test_a_fast_median_flags_only_over_enough_timed_comparisons(project, manager):
    assert selectors.OUTLIER_MEDIAN_MIN_TIMED == 10
    few, many = _member(project, "few"), _member(project, "many")
    for index, pair in enumerate(PairFactory.create_batch(14, project=project)):
        # Nine answers in a second each, and five sent without a time (as through the API): nine timed answers.
        _label(pair, few, "a", swapped=index % 2 == 1, time_ms=1000 if index < 9 else None)
    for index, pair in enumerate(PairFactory.create_batch(10, project=project)):
        _label(pair, many, "a", swapped=index % 2 == 1, time_ms=1000)
    rows = _rows(project)
    assert (rows["few"]["median_seconds"], rows["few"]["timed"], rows["few"]["comparisons"]) == (1.0, 9, 14)
    assert rows["few"]["outliers"] == []
    assert (rows["many"]["median_seconds"], rows["many"]["timed"]) == (1.0, 10)
    assert rows["many"]["outliers"] == ["median 1.0 s per comparison"]
    page = _page(project, manager)
    assert 'data-labeler="many" class="outlier"' in page and 'data-labeler="few">' in page
    assert "under 3.0 s over at least 10 timed comparisons" in page


# --- agreement ------------------------------------------------------------------------------------------


def test_low_agreement_with_the_others_flags_over_enough_shared_pairs(project, manager):
    assert (selectors.OUTLIER_AGREEMENT_MIN, selectors.OUTLIER_AGREEMENT_MIN_PAIRS) == (0.5, 20)
    project.labels_per_pair = 2
    project.save()
    ann, bob = _member(project, "ann"), _member(project, "bob")
    cid, dan = _member(project, "cid"), _member(project, "dan")
    # ann and bob disagree on every one of 20 shared pairs; cid and dan on 19.
    for index, pair in enumerate(PairFactory.create_batch(20, project=project)):
        _label(pair, ann, "a", swapped=index % 2 == 1)
        _label(pair, bob, "b", swapped=index % 2 == 1)
    for index, pair in enumerate(PairFactory.create_batch(19, project=project)):
        _label(pair, cid, "a", swapped=index % 2 == 1)
        _label(pair, dan, "b", swapped=index % 2 == 1)
    rows = _rows(project)
    for name, pairs in (("ann", 20), ("bob", 20), ("cid", 19), ("dan", 19)):
        assert (rows[name]["agreement"], rows[name]["agreement_pairs"]) == (0.0, pairs), name
    assert rows["ann"]["outliers"] == rows["bob"]["outliers"] == ["agrees with the others 0% of the time"]
    assert rows["cid"]["outliers"] == rows["dan"]["outliers"] == []
    page = _page(project, manager)
    assert 'data-labeler="ann" class="outlier"' in page and 'data-labeler="cid">' in page
    assert "agreement with others is below 0.5 over at least 20 shared pairs" in page


def test_agreement_at_the_threshold_does_not_flag(project):
    project.labels_per_pair = 2
    project.save()
    ann, bob = _member(project, "ann"), _member(project, "bob")
    for index, pair in enumerate(PairFactory.create_batch(20, project=project)):
        _label(pair, ann, "a", swapped=index % 2 == 1)
        _label(pair, bob, "a" if index < 10 else "b", swapped=index % 2 == 1)
    rows = _rows(project)
    assert rows["ann"]["agreement"] == rows["bob"]["agreement"] == 0.5
    assert rows["ann"]["outliers"] == rows["bob"]["outliers"] == []


# --- position -------------------------------------------------------------------------------------------


def test_position_bias_flags_from_twenty_picks_of_a_side(project):
    nineteen, twenty = _member(project, "nineteen"), _member(project, "twenty")
    for pair in PairFactory.create_batch(19, project=project):
        _label(pair, nineteen, "a")  # A shown on the left every time
    for pair in PairFactory.create_batch(20, project=project):
        _label(pair, twenty, "a")
    rows = _rows(project)
    assert (rows["nineteen"]["left_share"], rows["nineteen"]["side_picks"]) == (1.0, 19)
    assert rows["nineteen"]["outliers"] == []
    assert rows["twenty"]["outliers"] == ["picks the left side 100% of the time"]


# --- the page with nothing to flag ----------------------------------------------------------------------


def test_a_project_with_only_gold_pairs_and_a_member_with_no_labels(project, manager):
    _member(project, "idle")
    busy = _member(project, "busy")
    _answer_gold(project, busy, right=1, wrong=1)
    page = _page(project, manager)
    assert "0 of 0 pairs complete" in page and 'data-stat="pairs-gold">2<' in page
    assert 'data-stat="gold-accuracy">0.500 <span class="hint">(1 of 2)</span>' in page
    assert 'data-labeler="busy">' in page and 'data-member="idle"' in page
    # A labeler who has not labeled yet has a row too: zero counts, and a dash for every measure that is undefined.
    idle = re.search(r'<tr data-labeler="idle">(.*?)</tr>', page, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", idle, re.S)
    assert cells[:6] == ["0"] + ["\N{EN DASH}"] * 5
    assert "none" in cells[6]


def test_a_labeler_with_no_labels_is_in_the_table_and_the_api_with_zeros(project, manager):
    idle = _member(project, "idle")
    row = _rows(project)["idle"]
    assert (row["comparisons"], row["timed"], row["side_picks"], row["gold_comparisons"], row["agreement_pairs"]) == (
        0, 0, 0, 0, 0)
    assert (row["median_seconds"], row["left_share"], row["tie_rate"], row["gold_accuracy"], row["agreement"]) == (
        None, None, None, None, None)
    assert row["member"] and row["outliers"] == []
    body = client_for(manager).get(f"/api/v1/projects/{project.slug}/stats/").json()
    assert body["labelers"] == [{
        "labeler": {"id": idle.pk, "username": "idle"}, "comparisons": 0, "median_seconds": None, "timed": 0,
        "side_picks": 0, "left_share": None, "tie_rate": None, "both_bad_rate": None,
    }]


def test_managers_who_have_not_labeled_are_not_listed_as_labelers(project, manager):
    # Every project has a manager; listing them as labelers who did nothing would only be noise.
    assert stats.labeler_activity(project=project) == []
    pair = PairFactory(project=project)
    _label(pair, manager, "a")
    assert [row["labeler"]["id"] for row in stats.labeler_activity(project=project)] == [manager.pk]


# --- the API gives the evidence behind every flag -------------------------------------------------------


def test_the_api_carries_the_counts_that_the_flags_are_judged_on(project, manager):
    """A client that applies the documented rule to the API's numbers flags the same labelers as the page."""
    project.labels_per_pair = 2
    project.save()
    fast, hasty, slow = _member(project, "fast"), _member(project, "hasty"), _member(project, "slow")
    # fast: ten timed answers in a second each (flagged); hasty: nine timed and five sent without a time.
    for index, pair in enumerate(PairFactory.create_batch(14, project=project)):
        _label(pair, hasty, "a", swapped=index % 2 == 1, time_ms=1000 if index < 9 else None)
        if index < 10:
            _label(pair, fast, "b", swapped=index % 2 == 1, time_ms=1000)
    # slow disagrees with fast on 10 more pairs: fast shares 20 pairs in all, slow 10.
    for index, pair in enumerate(PairFactory.create_batch(10, project=project)):
        _label(pair, fast, "a", swapped=index % 2 == 1, time_ms=None)
        _label(pair, slow, "b", swapped=index % 2 == 1)
    _answer_gold(project, slow, right=6, wrong=4)
    body = client_for(manager).get(f"/api/v1/projects/{project.slug}/stats/").json()
    activity = {row["labeler"]["username"]: row for row in body["labelers"]}
    assert (activity["fast"]["timed"], activity["hasty"]["timed"], activity["hasty"]["comparisons"]) == (10, 9, 14)
    agreement = {row["labeler"]["username"]: row for row in body["agreement"]["per_labeler"]}
    assert (agreement["fast"]["pairs"], agreement["hasty"]["pairs"], agreement["slow"]["pairs"]) == (20, 10, 10)
    gold = {row["labeler"]["username"]: row for row in body["gold"]["labelers"]}
    from_api = {}
    for name, row in activity.items():
        shared = agreement.get(name, {"pairs": 0, "agreement": None})
        answers = gold.get(name, {"comparisons": 0, "accuracy": None})
        from_api[name] = selectors.labeler_outlier_reasons(
            side_picks=row["side_picks"], left_share=row["left_share"], gold_comparisons=answers["comparisons"],
            gold_accuracy=answers["accuracy"], timed=row["timed"], median_seconds=row["median_seconds"],
            agreement_pairs=shared["pairs"], agreement=shared["agreement"])
    assert from_api == {name: row["outliers"] for name, row in _rows(project).items()}
    assert from_api["fast"] == ["median 1.0 s per comparison", "agrees with the others 0% of the time"]
    assert from_api["hasty"] == [] and from_api["slow"] == ["gold accuracy 60% (6 of 10)"]


def test_the_schema_documents_the_counts_behind_the_flags():
    schema = SchemaGenerator(patterns=[path("api/v1/projects/<slug:slug>/stats/", ProjectStatsApi.as_view())]
                             ).get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    activity = components["LabelerActivityOutput"]["properties"]
    assert "timed" in components["LabelerActivityOutput"]["required"]
    assert activity["timed"]["type"] == "integer" and "median_seconds" in activity["timed"]["description"]
    assert "at least 10" in activity["timed"]["description"]
    shared = components["LabelerAgreementOutput"]["properties"]["pairs"]
    assert "at least 20" in shared["description"] and "agreement" in shared["description"]
    gold = components["GoldLabelerOutput"]["properties"]["comparisons"]
    assert "at least 10" in gold["description"] and "accuracy" in gold["description"]

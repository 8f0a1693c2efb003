"""Labeling statistics: counts, labeler behaviour, agreement and gold accuracy on hand-checked data, and the API."""
from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from django.urls import path
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient
from sklearn.metrics import cohen_kappa_score

from labeling import services, stats
from labeling.apis_stats import ProjectStatsApi
from labeling.errors import DomainError
from labeling.models import Comparison, Lease, Membership, Pair
from tests.conftest import client_for
from tests.factories import PairFactory, ProjectFactory, UserFactory

NOW = datetime(2026, 1, 10, 12, 30, tzinfo=UTC)


def _member(project, role=Membership.Role.LABELER, username=None):
    user = UserFactory(**({"username": username} if username else {}))
    Membership.objects.create(project=project, user=user, role=role)
    return user


def _label(pair, labeler, choice, *, swapped=False, time_ms=None, at=None):
    comparison = Comparison.objects.create(pair=pair, project=pair.project, labeler=labeler,
                                           source=Comparison.Source.LABEL, choice=choice, swapped=swapped,
                                           time_ms=time_ms)
    if at is not None:
        Comparison.objects.filter(pk=comparison.pk).update(created_at=at)
    return comparison


def _imported(pair, choice, *, at=None):
    comparison = Comparison.objects.create(pair=pair, project=pair.project, labeler=None,
                                           source=Comparison.Source.IMPORT, choice=choice)
    if at is not None:
        Comparison.objects.filter(pk=comparison.pk).update(created_at=at)
    return comparison


def _url(project, **query):
    suffix = "".join(f"?{key}={value}" for key, value in query.items())
    return f"/api/v1/projects/{project.slug}/stats/{suffix}"


# --- selectors ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_empty_project_has_zero_counts_and_null_rates(project):
    result = stats.project_stats(project=project, now=NOW)
    assert result["pairs"] == {"total": 0, "gold": 0, "labelable": 0, "complete": 0, "in_progress": 0,
                               "unlabeled": 0}
    assert result["comparisons"] == {"total": 0, "human": 0, "imported": 0}
    assert result["choices"] == {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    assert result["labelers"] == []
    assert len(result["throughput"]["buckets"]) == 48
    assert {bucket["comparisons"] for bucket in result["throughput"]["buckets"]} == {0}
    agreement = result["agreement"]
    assert agreement["labels"] == 0 and agreement["labelers"] == 0
    assert agreement["with_ties"] == {"pairs": 0, "percent_agreement": None, "unanimous_share": None}
    assert agreement["without_ties"] == {"pairs": 0, "percent_agreement": None, "unanimous_share": None}
    assert agreement["krippendorff_alpha"] is None and agreement["cohen_kappa"] is None
    assert agreement["pairwise_kappa"] == [] and agreement["per_labeler"] == []
    assert result["gold"] == {"comparisons": 0, "correct": 0, "accuracy": None, "labelers": []}


@pytest.mark.django_db
def test_pair_counts_split_gold_from_complete_in_progress_and_unlabeled(project):
    PairFactory.create_batch(2, project=project, gold_choice="a", label_count=3)
    PairFactory(project=project, label_count=2, status=Pair.Status.COMPLETE)
    PairFactory(project=project, label_count=1)
    PairFactory.create_batch(3, project=project)
    PairFactory(project=ProjectFactory(), label_count=2, status=Pair.Status.COMPLETE)
    assert stats.pair_counts(project=project) == {"total": 7, "gold": 2, "labelable": 5, "complete": 1,
                                                  "in_progress": 1, "unlabeled": 3}


@pytest.mark.django_db
def test_comparison_counts_and_choice_distribution_cover_human_and_imported(project):
    first, second = _member(project), _member(project)
    pairs = PairFactory.create_batch(3, project=project)
    _label(pairs[0], first, "a")
    _label(pairs[0], second, "tie")
    _label(pairs[1], first, "a")
    _imported(pairs[2], "b")
    _imported(PairFactory(project=ProjectFactory()), "a")
    assert stats.comparison_counts(project=project) == {"total": 4, "human": 3, "imported": 1}
    assert stats.choice_distribution(project=project) == {"a": 2, "b": 1, "tie": 1, "both_bad": 0}


@pytest.mark.django_db
def test_labeler_activity_reconstructs_the_shown_side_and_medians_times(project):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    pairs = PairFactory.create_batch(4, project=project)
    _label(pairs[0], ann, "a", swapped=False, time_ms=1000)  # A shown on the left: a left pick
    _label(pairs[1], ann, "b", swapped=True, time_ms=3000)   # B shown on the left: a left pick
    _label(pairs[2], ann, "a", swapped=True, time_ms=2000)   # A shown on the right
    _label(pairs[3], ann, "tie")
    _label(pairs[0], bob, "both_bad", time_ms=1000)
    _label(pairs[1], bob, "both_bad", time_ms=2000)
    _imported(pairs[2], "a")
    rows = stats.labeler_activity(project=project)
    assert rows == [
        {"labeler": {"id": ann.pk, "username": "ann"}, "comparisons": 4, "median_seconds": 2.0, "timed": 3,
         "side_picks": 3, "left_share": pytest.approx(2 / 3), "tie_rate": 0.25, "both_bad_rate": 0.0},
        {"labeler": {"id": bob.pk, "username": "bob"}, "comparisons": 2, "median_seconds": 1.5, "timed": 2,
         "side_picks": 0, "left_share": None, "tie_rate": 0.0, "both_bad_rate": 1.0},
    ]


@pytest.mark.django_db
def test_left_share_matches_what_the_queue_showed(project, labeler):
    for swapped in (False, True, False):
        pair = PairFactory(project=project)
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        assert lease.pair_id == pair.pk
        Lease.objects.filter(pk=lease.pk).update(swapped=swapped)
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="right")
    [row] = stats.labeler_activity(project=project)
    assert row["comparisons"] == 4
    assert row["left_share"] == 0.75


@pytest.mark.django_db
def test_throughput_buckets_human_comparisons_by_utc_hour_with_empty_hours(project, labeler):
    pairs = PairFactory.create_batch(5, project=project)
    _label(pairs[0], labeler, "a", at=NOW.replace(minute=10))
    _label(pairs[1], labeler, "a", at=NOW.replace(minute=29))
    _label(pairs[2], labeler, "a", at=NOW.replace(hour=10, minute=59))
    _label(pairs[3], labeler, "a", at=NOW.replace(hour=9, minute=59))
    _imported(pairs[4], "a", at=NOW.replace(minute=5))
    buckets = stats.comparison_throughput_hourly(project=project, hours=3, now=NOW)
    assert buckets == [
        {"hour": datetime(2026, 1, 10, 10, tzinfo=UTC), "comparisons": 1},
        {"hour": datetime(2026, 1, 10, 11, tzinfo=UTC), "comparisons": 0},
        {"hour": datetime(2026, 1, 10, 12, tzinfo=UTC), "comparisons": 2},
    ]


@pytest.mark.django_db
def test_two_labelers_on_four_pairs_give_hand_computed_kappa_and_alpha(project):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    pairs = PairFactory.create_batch(4, project=project)
    for pair, (first, second) in zip(pairs, [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")], strict=True):
        _label(pair, ann, first)
        _label(pair, bob, second)
    lonely = PairFactory(project=project)
    _label(lonely, ann, "a")
    _imported(lonely, "b")

    result = stats.labeler_agreement(project=project)
    # Observed agreement 3/4; chance agreement 1/2 * 1/4 + 1/2 * 3/4 = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2).
    assert result["cohen_kappa"] == pytest.approx(0.5)
    assert result["pairwise_kappa"] == [{"labeler_a": {"id": ann.pk, "username": "ann"},
                                         "labeler_b": {"id": bob.pk, "username": "bob"},
                                         "pairs": 4, "kappa": pytest.approx(0.5),
                                         "kappa_reason": None}]
    # Coincidences: a-a 2, a-b 1, b-a 1, b-b 4 (n_a 3, n_b 5, n 8): alpha = 1 - (2/8) / (30/56) = 8/15.
    assert result["krippendorff_alpha"] == pytest.approx(8 / 15)
    assert result["labels"] == 8 and result["labelers"] == 2
    assert result["with_ties"] == {"pairs": 4, "percent_agreement": 0.75, "unanimous_share": 0.75}
    assert result["without_ties"] == result["with_ties"]
    assert result["per_labeler"] == [
        {"labeler": {"id": ann.pk, "username": "ann"}, "pairs": 4, "agreement": 0.75},
        {"labeler": {"id": bob.pk, "username": "bob"}, "pairs": 4, "agreement": 0.75},
    ]


@pytest.mark.django_db
def test_agreement_over_time_counts_each_pair_on_the_utc_day_of_its_latest_label(project):
    ann, bob, cid = (_member(project, username=name) for name in ("ann", "bob", "cid"))
    agreed, split, three, late, single, old = PairFactory.create_batch(6, project=project)
    # Two labelers agree; the second label comes the next day, so the pair counts on that day.
    _label(agreed, ann, "a", at=datetime(2026, 1, 8, 23, 50, tzinfo=UTC))
    _label(agreed, bob, "a", at=datetime(2026, 1, 9, 0, 10, tzinfo=UTC))
    # Same day: a disagreement (0) and three labels with one dissent (a-a-b: 2 of 6 label pairs agree, 1/3).
    _label(split, ann, "a", at=datetime(2026, 1, 9, 8, tzinfo=UTC))
    _label(split, bob, "b", at=datetime(2026, 1, 9, 9, tzinfo=UTC))
    for labeler, choice in ((ann, "a"), (bob, "a"), (cid, "b")):
        _label(three, labeler, choice, at=datetime(2026, 1, 9, 10, tzinfo=UTC))
    # Today, agreeing on a tie; a pair with one label never counts; one completed before the window is left out.
    _label(late, ann, "tie", at=NOW.replace(hour=1))
    _label(late, cid, "tie", at=NOW.replace(hour=2))
    _label(single, bob, "a", at=NOW)
    _label(old, ann, "b", at=datetime(2026, 1, 1, tzinfo=UTC))
    _label(old, bob, "b", at=datetime(2026, 1, 1, tzinfo=UTC))

    daily = stats.labeler_agreement(project=project, days=3, now=NOW)["daily"]
    assert [row["day"].isoformat() for row in daily] == ["2026-01-08", "2026-01-09", "2026-01-10"]
    assert [row["pairs"] for row in daily] == [0, 3, 1]
    assert daily[0]["percent_agreement"] is None
    assert daily[1]["percent_agreement"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert daily[2]["percent_agreement"] == 1.0
    # The window defaults to AGREEMENT_DAYS and is part of the project's statistics.
    assert len(stats.project_stats(project=project, now=NOW)["agreement"]["daily"]) == stats.AGREEMENT_DAYS


@pytest.mark.django_db
def test_three_labelers_with_ties_separate_decisive_pairs_and_pairwise_kappa(project):
    ann, bob, cid = (_member(project, username=name) for name in ("ann", "bob", "cid"))
    x, y, z = PairFactory.create_batch(3, project=project)
    _label(x, ann, "a")
    _label(x, bob, "a")
    _label(x, cid, "tie")
    _label(y, ann, "b")
    _label(y, bob, "b")
    _label(z, ann, "a")
    _label(z, cid, "b")

    result = stats.labeler_agreement(project=project)
    # Agreeing label pairs: x 1 of 3, y 1 of 1, z 0 of 1.
    assert result["with_ties"] == {"pairs": 3, "percent_agreement": pytest.approx(4 / 9),
                                   "unanimous_share": pytest.approx(1 / 3)}
    assert result["without_ties"] == {"pairs": 2, "percent_agreement": 0.5, "unanimous_share": 0.5}
    # Coincidences: a-a 1, a-tie 1, tie-a 1, b-b 2, a-b 1, b-a 1 (n_a 3, n_b 3, n_tie 1, n 7):
    # alpha = 1 - (4/7) / (30/42) = 0.2.
    assert result["krippendorff_alpha"] == pytest.approx(0.2)
    assert result["cohen_kappa"] is None
    kappas = {(row["labeler_a"]["username"], row["labeler_b"]["username"]): (row["pairs"], row["kappa"])
              for row in result["pairwise_kappa"]}
    assert kappas == {("ann", "bob"): (2, pytest.approx(1.0)), ("ann", "cid"): (2, pytest.approx(0.0)),
                      ("bob", "cid"): (1, pytest.approx(0.0))}
    per_labeler = {row["labeler"]["username"]: (row["pairs"], row["agreement"]) for row in result["per_labeler"]}
    assert per_labeler == {"ann": (3, 0.5), "bob": (2, pytest.approx(2 / 3)), "cid": (2, 0.0)}


def test_batched_kappa_matches_scikit_learn_on_random_labels():
    rng = np.random.default_rng(7)
    firsts = [rng.choice(stats.CHOICES, size=size, p=[0.4, 0.3, 0.2, 0.1]) for size in (3, 10, 57)]
    seconds = [np.where(rng.random(len(first)) < 0.6, first, rng.choice(stats.CHOICES, size=len(first)))
               for first in firsts]
    tables = np.zeros((len(firsts), 4, 4))
    for k, (first, second) in enumerate(zip(firsts, seconds, strict=True)):
        for a, b in zip(first, second, strict=True):
            tables[k, stats.CHOICE_INDEX[a], stats.CHOICE_INDEX[b]] += 1
    expected = [cohen_kappa_score(first, second, labels=list(stats.CHOICES))
                for first, second in zip(firsts, seconds, strict=True)]
    assert stats.cohen_kappas(tables) == pytest.approx(expected)


@pytest.mark.django_db
def test_agreement_measures_are_null_where_chance_agreement_is_certain(project):
    ann, bob = _member(project), _member(project)
    for pair in PairFactory.create_batch(2, project=project):
        _label(pair, ann, "a")
        _label(pair, bob, "a")
    result = stats.labeler_agreement(project=project)
    assert result["with_ties"]["percent_agreement"] == 1.0
    assert result["krippendorff_alpha"] is None
    assert result["cohen_kappa"] is None
    assert result["pairwise_kappa"][0]["kappa"] is None


@pytest.mark.django_db
def test_gold_accuracy_per_labeler_and_overall(project):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    gold_a = PairFactory(project=project, gold_choice="a")
    gold_tie = PairFactory(project=project, gold_choice="tie")
    regular = PairFactory(project=project)
    _label(gold_a, ann, "a")
    _label(gold_tie, ann, "b")
    _label(gold_a, bob, "a")
    _label(regular, bob, "b")
    result = stats.gold_accuracy(project=project)
    assert result == {
        "comparisons": 3, "correct": 2, "accuracy": pytest.approx(2 / 3),
        "labelers": [
            {"labeler": {"id": ann.pk, "username": "ann"}, "comparisons": 2, "correct": 1, "accuracy": 0.5},
            {"labeler": {"id": bob.pk, "username": "bob"}, "comparisons": 1, "correct": 1, "accuracy": 1.0},
        ],
    }


@pytest.mark.django_db
def test_query_count_does_not_grow_with_labelers_or_pairs(project, django_assert_max_num_queries):
    labelers = [_member(project) for _ in range(6)]
    for index, pair in enumerate(PairFactory.create_batch(12, project=project, gold_choice=None)):
        for offset in range(3):
            _label(pair, labelers[(index + offset) % 6], ("a", "b", "tie")[(index * offset) % 3], time_ms=500 * offset)
    with django_assert_max_num_queries(9):
        result = stats.project_stats(project=project)
    assert len(result["labelers"]) == 6
    assert result["agreement"]["labels"] == 36


@pytest.mark.django_db
def test_throughput_window_out_of_range_is_refused(project):
    with pytest.raises(DomainError) as exc:
        stats.comparison_throughput_hourly(project=project, hours=0)
    assert exc.value.field == "hours"


# --- API ------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_returns_stats_to_managers_and_admins(project, manager, admin_user):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    pair = PairFactory(project=project)
    _label(pair, ann, "a", time_ms=4000)
    _label(pair, bob, "b", swapped=True, time_ms=2000)
    for user in (manager, admin_user):
        response = client_for(user).get(_url(project, hours=6))
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["project"] == project.slug
        assert body["comparisons"] == {"total": 2, "human": 2, "imported": 0}
        assert [row["labeler"]["username"] for row in body["labelers"]] == ["ann", "bob"]
        assert body["labelers"][1]["left_share"] == 1.0 and body["labelers"][1]["median_seconds"] == 2.0
        assert body["throughput"]["hours"] == 6 and len(body["throughput"]["buckets"]) == 6
        assert sum(bucket["comparisons"] for bucket in body["throughput"]["buckets"]) == 2
        assert body["agreement"]["with_ties"] == {"pairs": 1, "percent_agreement": 0.0, "unanimous_share": 0.0}
        daily = body["agreement"]["daily"]
        # The pair counts on the UTC day of its latest label: today, or yesterday for a test that spans midnight.
        latest = Comparison.objects.filter(pair=pair).latest("created_at").created_at.astimezone(UTC).date()
        assert len(daily) == stats.AGREEMENT_DAYS and sum(row["pairs"] for row in daily) == 1
        assert daily[-1]["day"] >= latest.isoformat()
        day = next(row for row in daily if row["day"] == latest.isoformat())
        assert day["pairs"] == 1 and day["percent_agreement"] == 0.0 and daily[0]["percent_agreement"] is None
        assert body["gold"]["accuracy"] is None


@pytest.mark.django_db
def test_api_on_an_empty_project_returns_nulls(project, manager):
    response = client_for(manager).get(_url(project))
    assert response.status_code == 200
    body = response.json()
    assert body["pairs"]["total"] == 0
    assert len(body["throughput"]["buckets"]) == 48
    assert body["agreement"]["krippendorff_alpha"] is None
    assert body["agreement"]["with_ties"]["percent_agreement"] is None


@pytest.mark.django_db
def test_api_refuses_labelers_hides_the_project_from_others(project, labeler, outsider):
    response = client_for(labeler).get(_url(project))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    response = client_for(outsider).get(_url(project))
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "project"
    assert APIClient().get(_url(project)).status_code in (401, 403)


@pytest.mark.django_db
@pytest.mark.parametrize("hours", ["0", "745", "soon"])
def test_api_names_the_field_of_a_bad_window(project, manager, hours):
    response = client_for(manager).get(_url(project, hours=hours))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "hours"


def test_openapi_schema_describes_the_stats_response():
    generator = SchemaGenerator(patterns=[path("api/v1/projects/<slug:slug>/stats/", ProjectStatsApi.as_view())])
    schema = generator.get_schema(request=None, public=True)
    operation = schema["paths"]["/api/v1/projects/{slug}/stats/"]["get"]
    assert [parameter["name"] for parameter in operation["parameters"] if parameter["in"] == "query"] == ["hours"]
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ProjectStatsOutput")
    component = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert {"pairs", "comparisons", "choices", "labelers", "throughput", "agreement", "gold"} <= set(
        component["properties"])
    agreement_ref = component["properties"]["agreement"]["$ref"].rsplit("/", 1)[-1]
    assert "krippendorff_alpha" in schema["components"]["schemas"][agreement_ref]["properties"]


@pytest.mark.django_db
def test_agreement_ignores_other_projects(project):
    other = ProjectFactory()
    ann, bob = _member(other), _member(other)
    pair = PairFactory(project=other)
    _label(pair, ann, "a")
    _label(pair, bob, "b")
    assert stats.labeler_agreement(project=project)["labels"] == 0
    assert stats.labeler_agreement(project=other)["labels"] == 2


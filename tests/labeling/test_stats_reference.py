"""Project statistics held to plain reference computations written out here (Cohen's kappa, Krippendorff's alpha,
percent agreement, gold accuracy, medians, counts), and their edge cases: one labeler, one category, ties,
swapped display, imports, gold pairs, removed labelers, large projects, and the dashboard against the API."""
from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from itertools import combinations, permutations
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from django.db import connection
from django.test import Client

from labeling import selectors, services, stats
from labeling.models import Comparison
from tests.conftest import client_for
from tests.factories import PairFactory, PromptFactory
from tests.labeling.test_stats import _label, _member

CHOICES = ["a", "b", "tie", "both_bad"]
NOW = datetime(2026, 3, 4, 15, 20, tzinfo=UTC)


def _imported(pair, choice):
    return Comparison.objects.create(pair=pair, project=pair.project, labeler=None,
                                     source=Comparison.Source.IMPORT, choice=choice)


# --- reference computations ------------------------------------------------------------------------------


def ref_cohen_kappa(first: list[str], second: list[str]) -> float | None:
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second, strict=True)) / n
    a, b = Counter(first), Counter(second)
    expected = sum(a[c] * b[c] for c in CHOICES) / n**2
    return None if expected == 1 else (observed - expected) / (1 - expected)


def ref_krippendorff_nominal(units: list[list[str]]) -> float | None:
    """Krippendorff (2011), nominal: coincidences within units of two or more values (missing values dropped)."""
    coincidence: dict[tuple[str, str], float] = defaultdict(float)
    for values in units:
        if len(values) < 2:
            continue
        for i, j in permutations(range(len(values)), 2):
            coincidence[values[i], values[j]] += 1 / (len(values) - 1)
    n_c = {c: sum(coincidence[c, k] for k in CHOICES) for c in CHOICES}
    n = sum(n_c.values())
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in CHOICES for k in CHOICES if c != k)
    if n == 0 or expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


def ref_percent_agreement(units: list[list[str]]) -> float | None:
    shares = [sum(x == y for x, y in permutations(values, 2)) / (len(values) * (len(values) - 1))
              for values in units if len(values) >= 2]
    return sum(shares) / len(shares) if shares else None


def _labels(project):
    """Human labels of a project as {pair_id: {labeler_id: choice}}."""
    by_pair: dict[int, dict[int, str]] = defaultdict(dict)
    for pair_id, labeler_id, choice in Comparison.objects.filter(
            project=project, source=Comparison.Source.LABEL).values_list("pair_id", "labeler_id", "choice"):
        by_pair[pair_id][labeler_id] = choice
    return by_pair


def _random_project(project, *, seed: int, labelers: int = 5, pairs: int = 40):
    rng = random.Random(seed)
    people = [_member(project) for _ in range(labelers)]
    biases = [rng.choice([[4, 3, 2, 1], [1, 1, 1, 1], [6, 1, 1, 1], [1, 5, 1, 0]]) for _ in people]
    for index in range(pairs):
        gold = rng.choice([None, None, None, "a", "b", "tie"])
        pair = PairFactory(project=project, gold_choice=gold)
        truth = rng.choice(CHOICES)
        for person, bias in zip(people, biases, strict=True):
            if rng.random() < 0.45:
                continue
            choice = truth if rng.random() < 0.6 else rng.choices(CHOICES, weights=bias)[0]
            _label(pair, person, choice, swapped=rng.random() < 0.5,
                   time_ms=rng.choice([None, rng.randint(500, 60_000)]),
                   at=NOW - timedelta(hours=rng.randint(0, 80), minutes=rng.randint(0, 59)))
        if index % 7 == 0:
            _imported(pair, rng.choice(CHOICES))
    return people


# --- agreement and quality against the references --------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_agreement_matches_reference_formulas_on_random_labels(project, seed):
    _random_project(project, seed=seed)
    by_pair = _labels(project)
    units = [list(labels.values()) for labels in by_pair.values()]
    result = stats.labeler_agreement(project=project, now=NOW)

    assert result["krippendorff_alpha"] == pytest.approx(ref_krippendorff_nominal(units))
    assert result["with_ties"]["percent_agreement"] == pytest.approx(ref_percent_agreement(units))
    assert result["with_ties"]["pairs"] == sum(len(values) >= 2 for values in units)
    decisive = [values for values in units if set(values) <= {"a", "b"}]
    assert result["without_ties"]["percent_agreement"] == pytest.approx(ref_percent_agreement(decisive))
    assert result["without_ties"]["unanimous_share"] == pytest.approx(
        sum(len(set(v)) == 1 for v in decisive if len(v) >= 2) / sum(len(v) >= 2 for v in decisive))

    kappas = {(row["labeler_a"]["id"], row["labeler_b"]["id"]): (row["pairs"], row["kappa"])
              for row in result["pairwise_kappa"]}
    labeler_ids = sorted({labeler for labels in by_pair.values() for labeler in labels})
    expected = {}
    for first, second in combinations(labeler_ids, 2):
        shared = [labels for labels in by_pair.values() if first in labels and second in labels]
        if shared:
            kappa = ref_cohen_kappa([labels[first] for labels in shared], [labels[second] for labels in shared])
            expected[first, second] = (len(shared), pytest.approx(kappa) if kappa is not None else None)
    assert kappas == expected

    agreement = {row["labeler"]["id"]: (row["pairs"], row["agreement"]) for row in result["per_labeler"]}
    reference = {}
    for labeler_id in labeler_ids:
        mine = [labels for labels in by_pair.values() if labeler_id in labels and len(labels) >= 2]
        if mine:
            matches = sum(other == labels[labeler_id] for labels in mine
                          for who, other in labels.items() if who != labeler_id)
            total = sum(len(labels) - 1 for labels in mine)
            reference[labeler_id] = (len(mine), pytest.approx(matches / total))
    assert agreement == reference


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [4, 5])
def test_labeler_activity_and_gold_match_reference_on_random_labels(project, seed):
    _random_project(project, seed=seed)
    comparisons = list(Comparison.objects.filter(project=project, source=Comparison.Source.LABEL)
                       .select_related("pair"))
    activity = {row["labeler"]["id"]: row for row in stats.labeler_activity(project=project)}
    gold = stats.gold_accuracy(project=project)
    by_labeler = defaultdict(list)
    for comparison in comparisons:
        by_labeler[comparison.labeler_id].append(comparison)
    assert set(activity) == set(by_labeler)
    for labeler_id, mine in by_labeler.items():
        row = activity[labeler_id]
        times = [c.time_ms for c in mine if c.time_ms is not None]
        sided = [c for c in mine if c.choice in ("a", "b")]
        left = [c for c in sided if (c.choice == "a") != c.swapped]
        assert row["comparisons"] == len(mine)
        assert row["median_seconds"] == (pytest.approx(statistics.median(times) / 1000) if times else None)
        assert row["left_share"] == (pytest.approx(len(left) / len(sided)) if sided else None)
        assert row["tie_rate"] == pytest.approx(sum(c.choice == "tie" for c in mine) / len(mine))
        assert row["both_bad_rate"] == pytest.approx(sum(c.choice == "both_bad" for c in mine) / len(mine))
    on_gold = [c for c in comparisons if c.pair.gold_choice is not None]
    assert gold["comparisons"] == len(on_gold)
    assert gold["correct"] == sum(c.choice == c.pair.gold_choice for c in on_gold)
    for row in gold["labelers"]:
        mine = [c for c in on_gold if c.labeler_id == row["labeler"]["id"]]
        assert row["accuracy"] == pytest.approx(sum(c.choice == c.pair.gold_choice for c in mine) / len(mine))



# --- a large project -------------------------------------------------------------------------------------


def _bulk_project(project, *, pairs: int, labelers: int):
    """`pairs` pairs (every 50th gold), each labeled by every one of `labelers` labelers, written by the database
    itself (PostgreSQL): choices, sides and times vary with the pair and the labeler."""
    people = [_member(project, username=f"bulk{i:02d}") for i in range(labelers)]
    prompt = PromptFactory(project=project)
    with connection.cursor() as cursor:
        cursor.execute("""
            INSERT INTO labeling_response (project_id, text, model_name, metadata, content_hash, created_at)
            SELECT %s, 'r' || i, '', '{}', md5('r' || i), now() FROM generate_series(0, %s) i""",
                       [project.pk, pairs])
        cursor.execute("""
            INSERT INTO labeling_pair (project_id, prompt_id, response_a_id, response_b_id, priority, gold_choice,
                                       label_count, status, source, created_at)
            SELECT %s, %s, r.id, r.id + 1, 0, CASE WHEN r.rank %% 50 = 0 THEN 'a' END, %s, 'complete', 'manual', now()
            FROM (SELECT id, row_number() OVER (ORDER BY id) - 1 AS rank FROM labeling_response
                  WHERE project_id = %s) r WHERE r.rank < %s""",
                       [project.pk, prompt.pk, labelers, project.pk, pairs])
        cursor.execute("""
            INSERT INTO labeling_comparison (pair_id, project_id, labeler_id, source, choice, rationale, flags,
                                             swapped, time_ms, created_at)
            SELECT p.id, %s, u.id, 'label',
                   (ARRAY['a', 'a', 'a', 'b', 'b', 'tie', 'both_bad'])[1 + (p.id * 7 + u.id * (p.id %% 5)) %% 7],
                   '', '[]', (p.id + u.id) %% 3 = 0, 1000 + (p.id * u.id) %% 29000, now()
            FROM labeling_pair p CROSS JOIN auth_user u WHERE p.project_id = %s AND u.id = ANY(%s)""",
                       [project.pk, project.pk, [person.pk for person in people]])
    return people


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_100k_comparison_project_takes_a_fixed_number_of_queries(project, manager,
                                                                 django_assert_max_num_queries):
    _bulk_project(project, pairs=25_000, labelers=4)
    assert Comparison.objects.filter(project=project).count() == 100_000
    with django_assert_max_num_queries(9):
        result = stats.project_stats(project=project)
    assert result["comparisons"]["human"] == 100_000
    assert result["pairs"] == {"total": 25_000, "gold": 500, "labelable": 24_500, "complete": 24_500,
                               "in_progress": 0, "unlabeled": 0}
    units = [list(labels.values()) for labels in _labels(project).values()]
    agreement = result["agreement"]
    assert agreement["labels"] == 100_000 and len(agreement["pairwise_kappa"]) == 6
    assert agreement["krippendorff_alpha"] == pytest.approx(ref_krippendorff_nominal(units))
    assert agreement["with_ties"]["percent_agreement"] == pytest.approx(ref_percent_agreement(units))
    # The API and the page read the same numbers in a fixed number of queries too.
    api = client_for(manager)
    with django_assert_max_num_queries(12):
        body = _strict_json(api.get(f"/api/v1/projects/{project.slug}/stats/"))
    assert body["agreement"]["krippendorff_alpha"] == pytest.approx(agreement["krippendorff_alpha"])
    client = _logged_in(manager)
    # 17: the page also asks which of the labelers are staff (who label without a membership), in one query.
    with django_assert_max_num_queries(17):
        _page(client, f"/dashboard/{project.slug}/")


# --- kappa on many shared pairs ----------------------------------------------------------------------------


def test_kappa_stays_defined_when_chance_agreement_is_close_to_but_not_certain():
    # Two labelers share 200k pairs; the first always says A, the second says B once. Chance agreement is
    # 1 - 1/200000, not 1: kappa is defined (and 0, observed agreement being exactly chance).
    n = 200_000
    tables = np.zeros((2, 4, 4))
    tables[0, 0, 0], tables[0, 0, 1] = n - 1, 1
    tables[1, 0, 0] = n
    first = ["a"] * n
    second = ["a"] * (n - 1) + ["b"]
    assert ref_cohen_kappa(first, second) == pytest.approx(0.0)
    assert stats.cohen_kappas(tables) == [pytest.approx(0.0), None]


# --- the outlier rule --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_position_bias_is_judged_on_enough_picks_of_a_side_not_on_ties(project):
    """Three left picks among 30 labels, the rest ties, say nothing about position bias; 20 left picks do."""
    careful, biased = _member(project, username="careful"), _member(project, username="biased")
    # Pairs of their own: on shared pairs the two would disagree on 17 of 30, a flag of its own.
    for index, pair in enumerate(PairFactory.create_batch(30, project=project)):
        _label(pair, careful, "a" if index < 3 else "tie", time_ms=10_000)
    for index, pair in enumerate(PairFactory.create_batch(30, project=project)):
        _label(pair, biased, "a" if index < 20 else "tie", time_ms=10_000)
    rows = {row["labeler"]["username"]: row for row in selectors.labeler_table(
        stats=stats.project_stats(project=project))}
    assert rows["careful"]["left_share"] == 1.0 and rows["careful"]["side_picks"] == 3
    assert rows["careful"]["outliers"] == []
    assert rows["biased"]["side_picks"] == 20
    assert rows["biased"]["outliers"] == ["picks the left side 100% of the time"]


# --- undefined measures: null, with the reason ----------------------------------------------------------


def _strict_json(response):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(response.content, parse_constant=refuse)


@pytest.mark.django_db
def test_every_label_in_one_category_gives_null_kappa_and_alpha_with_the_reason(project, manager):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    for pair in PairFactory.create_batch(3, project=project):
        _label(pair, ann, "both_bad", swapped=True)
        _label(pair, bob, "both_bad")
    body = _strict_json(client_for(manager).get(f"/api/v1/projects/{project.slug}/stats/"))
    agreement = body["agreement"]
    assert agreement["with_ties"]["percent_agreement"] == 1.0
    assert agreement["krippendorff_alpha"] is None and agreement["cohen_kappa"] is None
    assert "same choice" in agreement["krippendorff_alpha_reason"]
    assert "both_bad" in agreement["krippendorff_alpha_reason"]
    [row] = agreement["pairwise_kappa"]
    assert row["kappa"] is None and "chance agreement is certain" in row["kappa_reason"]
    assert agreement["cohen_kappa_reason"] == row["kappa_reason"]
    # Nothing undefined, nothing to explain.
    _label(PairFactory(project=project), ann, "a")
    pair = PairFactory(project=project)
    _label(pair, ann, "a")
    _label(pair, bob, "b")
    agreement = stats.labeler_agreement(project=project)
    assert agreement["krippendorff_alpha"] is not None and agreement["krippendorff_alpha_reason"] is None
    assert agreement["cohen_kappa"] is not None and agreement["cohen_kappa_reason"] is None
    assert agreement["pairwise_kappa"][0]["kappa_reason"] is None


@pytest.mark.django_db
def test_a_single_labeler_and_imported_labels_give_no_agreement_and_say_why(project, manager):
    ann = _member(project, username="ann")
    for pair in PairFactory.create_batch(3, project=project):
        _label(pair, ann, "a")
        _imported(pair, "b")
    body = _strict_json(client_for(manager).get(f"/api/v1/projects/{project.slug}/stats/"))
    agreement = body["agreement"]
    assert agreement["labels"] == 0 and agreement["with_ties"]["pairs"] == 0
    assert agreement["krippendorff_alpha"] is None and agreement["cohen_kappa"] is None
    assert agreement["krippendorff_alpha_reason"] == "No pair has two or more human labels."
    assert agreement["cohen_kappa_reason"] == "No two labelers labeled the same pair."
    assert body["comparisons"] == {"total": 6, "human": 3, "imported": 3}
    assert [row["labeler"]["username"] for row in body["labelers"]] == ["ann"]


@pytest.mark.django_db
def test_cohen_kappa_of_more_than_two_labelers_points_to_the_pairwise_list(project):
    people = [_member(project) for _ in range(3)]
    for pair in PairFactory.create_batch(2, project=project):
        for person, choice in zip(people, ["a", "b", "a"], strict=True):
            _label(pair, person, choice)
    agreement = stats.labeler_agreement(project=project)
    assert agreement["cohen_kappa"] is None and len(agreement["pairwise_kappa"]) == 3
    assert agreement["cohen_kappa_reason"] == "3 couples of labelers share pairs: see pairwise_kappa."


# --- the dashboard says what the API says ---------------------------------------------------------------


def _page(user, url):
    client = user if isinstance(user, Client) else _logged_in(user)
    response = client.get(url)
    assert response.status_code == 200
    return response.content.decode()


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _shown(value, digits=3):
    return "\N{EN DASH}" if value is None else f"{value:.{digits}f}"


@pytest.mark.django_db
def test_project_page_shows_the_numbers_of_the_api(project, manager):
    _random_project(project, seed=21, labelers=4, pairs=30)
    body = _strict_json(client_for(manager).get(f"/api/v1/projects/{project.slug}/stats/"))
    page = _page(manager, f"/dashboard/{project.slug}/")
    pairs, agreement, gold = body["pairs"], body["agreement"], body["gold"]
    assert f"{pairs['complete']} of {pairs['labelable']} pairs complete" in page
    for key in ("total", "in-progress", "unlabeled", "gold"):
        assert f'data-stat="pairs-{key}">{pairs[key.replace("-", "_")]}<' in page
    assert (f'data-stat="comparisons-total">{body["comparisons"]["total"]} <span class="hint">('
            f'{body["comparisons"]["human"]} labeled here, {body["comparisons"]["imported"]} imported)') in page
    assert f'data-stat="alpha">{_shown(agreement["krippendorff_alpha"])}<' in page
    assert (f'data-stat="percent-agreement">{_shown(agreement["with_ties"]["percent_agreement"])} '
            f'<span class="hint">over {agreement["with_ties"]["pairs"]} pairs') in page
    assert f'data-stat="gold-accuracy">{_shown(gold["accuracy"])} ' in page
    for choice, count in body["choices"].items():
        assert f'data-choice="{choice}">{count}<' in page
    gold_by_id = {row["labeler"]["id"]: row for row in gold["labelers"]}
    agreement_by_id = {row["labeler"]["id"]: row for row in agreement["per_labeler"]}
    for row in body["labelers"]:
        start = page.index(f'<tr data-labeler="{row["labeler"]["username"]}"')
        cells = page[start:page.index("</tr>", start)]
        assert f'>{row["comparisons"]}</td>' in cells
        assert f'>{_shown(row["median_seconds"], 1)}</td>' in cells
        assert f'>{_shown(row["left_share"])}</td>' in cells
        assert f'>{_shown(row["tie_rate"])}</td>' in cells
        labeler_gold = gold_by_id.get(row["labeler"]["id"])
        if labeler_gold:
            assert f'>{_shown(labeler_gold["accuracy"])} <span class="hint">({labeler_gold["comparisons"]})' in cells
        labeler_agreement = agreement_by_id[row["labeler"]["id"]]
        if labeler_agreement["agreement"] is None:
            assert f'>{_shown(None)}</td>' in cells
        else:
            assert (f'>{_shown(labeler_agreement["agreement"])} <span class="hint">({labeler_agreement["pairs"]})'
                    in cells)
    charts = _strict_json_text(_page(manager, f"/dashboard/{project.slug}/charts.json"))
    assert charts["agreement_by_labeler"] == agreement["per_labeler"]
    assert charts["choices"] == body["choices"]
    assert [b["comparisons"] for b in charts["throughput"]] == [b["comparisons"] for b in body["throughput"]["buckets"]]


def _strict_json_text(text):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.django_db
def test_dashboard_pages_say_why_agreement_is_undefined(project, manager):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    for pair in PairFactory.create_batch(2, project=project):
        _label(pair, ann, "tie")
        _label(pair, bob, "tie")
    reason = stats.labeler_agreement(project=project)["krippendorff_alpha_reason"]
    page = _page(manager, f"/dashboard/{project.slug}/")
    assert 'data-stat="alpha">\N{EN DASH}' in page and reason.replace("'", "&#x27;") in page
    # The overview falls back to percent agreement, as before.
    assert "100% agree" in _page(manager, "/dashboard/")


# --- removed labelers, skipped pairs, time ---------------------------------------------------------------


@pytest.mark.django_db
def test_a_removed_labeler_keeps_their_numbers(project, manager):
    ann, bob = _member(project, username="ann"), _member(project, username="bob")
    gold = PairFactory(project=project, gold_choice="b")
    regular = PairFactory(project=project)
    for pair in (gold, regular):
        _label(pair, ann, "b", time_ms=4000)
        _label(pair, bob, "a", swapped=True, time_ms=6000)
    before = stats.project_stats(project=project, now=NOW)
    services.membership_remove(project=project, user=bob)
    after = stats.project_stats(project=project, now=NOW)
    assert after == before
    assert [row["labeler"]["username"] for row in after["labelers"]] == ["ann", "bob"]
    assert after["gold"]["labelers"][1]["accuracy"] == 0.0
    # The page keeps bob's row and says he is no longer in the project; ann's row says nothing of the kind.
    page = _page(manager, f"/dashboard/{project.slug}/")
    rows = {name: page.split(f'data-labeler="{name}"', 1)[1].split("</tr>", 1)[0] for name in ("ann", "bob")}
    assert "no longer a member" in rows["bob"] and "no longer a member" not in rows["ann"]


@pytest.mark.django_db
def test_skipped_pairs_stay_unlabeled_and_leave_the_skipper_s_progress(project, labeler):
    PairFactory.create_batch(2, project=project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    services.lease_release(project=project, labeler=labeler, pair_id=lease.pair_id)
    assert stats.pair_counts(project=project) == {"total": 2, "gold": 0, "labelable": 2, "complete": 0,
                                                  "in_progress": 0, "unlabeled": 2}
    progress = selectors.labeler_progress(projects=[project], user=labeler)[project.pk]
    assert (progress.done, progress.remaining) == (0, 1)


@pytest.mark.django_db
def test_throughput_buckets_are_utc_hours_whatever_the_zone_of_now(project, labeler):
    pairs = PairFactory.create_batch(4, project=project)
    start = datetime(2026, 3, 4, 13, tzinfo=UTC)
    _label(pairs[0], labeler, "a", at=start)                                 # first bucket, first instant
    _label(pairs[1], labeler, "a", at=start - timedelta(microseconds=1))     # just before the window
    _label(pairs[2], labeler, "a", at=NOW)                                   # the current hour
    _label(pairs[3], labeler, "a", at=NOW.replace(minute=0) + timedelta(hours=1))  # the future: not counted
    now = NOW.astimezone(ZoneInfo("Asia/Kolkata"))  # +05:30: local hours are not UTC hours
    buckets = stats.comparison_throughput_hourly(project=project, hours=3, now=now)
    assert [bucket["hour"] for bucket in buckets] == [start, start + timedelta(hours=1), start + timedelta(hours=2)]
    assert [bucket["comparisons"] for bucket in buckets] == [1, 0, 1]

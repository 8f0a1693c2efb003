"""Races through the HTTP stack on PostgreSQL: identical submits, many labelers with overlap, expired leases."""
from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import close_old_connections, connection
from django.db.models import Count
from django.utils import timezone
from rest_framework.test import APIClient

from labeling.models import Comparison, Lease, Membership, Pair
from labeling.services import api_token_create, choice_to_frame
from tests.factories import PairFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

COMPARISONS = "/api/v1/comparisons/"


def _labeler(project) -> tuple:
    """A labeler of the project and the API key of their token (each racing thread builds its own client)."""
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    _, key = api_token_create(user=user, name="race")
    return user, key


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _race(workers: int, target: Callable[[int], object]) -> list:
    """Run `target(i)` in `workers` threads released together by a barrier. Each thread uses its own database
    connection (Django's are per thread) and closes it, so the races happen between real transactions."""
    barrier = threading.Barrier(workers)
    results: list = [None] * workers

    def run(i: int) -> None:
        close_old_connections()
        try:
            barrier.wait(timeout=60)
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,), name=f"race-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a racing request never returned"
    return results


def _next(client: APIClient, slug: str):
    return client.get(f"/api/v1/projects/{slug}/next/")


def _submit(client: APIClient, pair_id: int, choice: str, rationale: str = ""):
    return client.post(COMPARISONS, {"pair": pair_id, "choice": choice, "rationale": rationale}, format="json")


def test_fifty_simultaneous_posts_of_the_same_comparison_store_exactly_one(figure):
    project = ProjectFactory(labels_per_pair=3)
    pair = PairFactory(project=project)
    labeler, key = _labeler(project)
    assert _next(_client(key), project.slug).json()["pair"] == pair.pk

    def post(i: int):
        response = _submit(_client(key), pair.pk, "right", "The right one explains why.")
        return response.status_code, response.json()

    results = _race(50, post)
    assert all(isinstance(r, tuple) for r in results), [r for r in results if not isinstance(r, tuple)]
    statuses = Counter(status for status, _ in results)
    assert statuses == {201: 1, 200: 49}, statuses
    stored = Comparison.objects.get(pair=pair)
    assert {body["id"] for _, body in results} == {stored.pk}
    assert {body["shown_choice"] for _, body in results} == {"right"}
    pair.refresh_from_db()
    assert pair.label_count == 1 and pair.status == Pair.Status.OPEN
    assert not Lease.objects.filter(pair=pair, labeler=labeler).exists()
    figure(f"[concurrency] 50 identical posts: {statuses[201]} created, {statuses[200]} answered as repeats, "
          f"{Comparison.objects.filter(pair=pair).count()} stored")


def test_fifty_simultaneous_posts_with_different_answers_keep_the_first_and_refuse_the_others():
    project = ProjectFactory()
    pair = PairFactory(project=project)
    _, key = _labeler(project)
    _next(_client(key), project.slug)
    choices = ["left", "right"] * 25

    def post(i: int):
        response = _submit(_client(key), pair.pk, choices[i])
        return choices[i], response.status_code, response.json()

    results = _race(50, post)
    assert all(isinstance(r, tuple) for r in results), [r for r in results if not isinstance(r, tuple)]
    stored = Comparison.objects.get(pair=pair)
    won = choice_to_frame(stored.choice, swapped=stored.swapped)
    for choice, status, body in results:
        if choice == won:
            assert status in (200, 201) and body["id"] == stored.pk, (choice, status, body)
        else:
            assert status == 409 and body["error"]["code"] == "already_labeled", (choice, status, body)
    assert [status for _, status, _ in results].count(201) == 1
    pair.refresh_from_db()
    assert pair.label_count == 1


@pytest.mark.parametrize("one_request", [False, True], ids=["next-then-submit", "submit-with-next"])
def test_twenty_labelers_racing_over_overlap_three_never_make_a_fourth_label_or_a_duplicate(figure, one_request):
    project = ProjectFactory(labels_per_pair=3)
    pairs = [PairFactory(project=project) for _ in range(15)]
    labelers = [_labeler(project) for _ in range(20)]
    rng = random.Random(20)
    answers = [rng.choice(["left", "right", "tie", "both_bad"]) for _ in range(len(pairs) * 3)]

    def label_until_empty(i: int) -> list[tuple[int, int]]:
        client = _client(labelers[i][1])
        seen: list[tuple[int, int]] = []
        def offer():
            response = _next(client, project.slug)
            return response.status_code, response.json() if response.status_code == 200 else None

        status, offered = offer()
        while True:
            seen.append((status, 0))
            if status != 200:
                return seen
            pair_id = offered["pair"]
            answer = {"pair": pair_id, "choice": answers[(pair_id + i) % len(answers)], "next": one_request}
            submitted = client.post(COMPARISONS, answer, format="json")
            seen.append((submitted.status_code, pair_id))
            if submitted.status_code != 201:
                return seen
            if not one_request:
                status, offered = offer()
            else:
                offered = submitted.json()["next"]
                status = 204 if offered is None else 200

    results = _race(len(labelers), label_until_empty)
    assert all(isinstance(r, list) for r in results), [r for r in results if not isinstance(r, list)]
    statuses = Counter(status for seen in results for status, _ in seen)
    # Every labeler stopped on an empty queue (204), after submits that were all accepted.
    assert set(statuses) <= {200, 201, 204}, statuses
    assert statuses[204] == len(labelers)
    assert statuses[201] == len(pairs) * 3
    per_pair = dict(Comparison.objects.filter(pair__project=project).values_list("pair").annotate(n=Count("id")))
    assert per_pair == {pair.pk: 3 for pair in pairs}
    duplicates = (Comparison.objects.filter(pair__project=project).values("pair", "labeler")
                  .annotate(n=Count("id")).filter(n__gt=1))
    assert not duplicates.exists()
    for pair in Pair.objects.filter(project=project):
        assert pair.label_count == 3 and pair.status == Pair.Status.COMPLETE
    assert not Lease.objects.filter(pair__project=project).exists()
    busiest = Counter(pair_id for seen in results for status, pair_id in seen if status == 201)
    mode = "submit with next" if one_request else "next then submit"
    figure(f"[concurrency] 20 labelers, overlap 3, {len(pairs)} pairs, {mode}: {statuses[201]} labels stored "
          f"(max {max(busiest.values())} per pair), {statuses[200]} pairs offered, 0 fourth labels, 0 duplicates")


def _expire(labeler) -> None:
    Lease.objects.filter(labeler=labeler).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_an_expired_lease_returns_the_pair_to_the_queue_and_the_late_submit_is_refused():
    project = ProjectFactory(labels_per_pair=3)
    pair = PairFactory(project=project)
    (late, late_key), *holders = [_labeler(project) for _ in range(3)]
    newcomer, newcomer_key = _labeler(project)
    for key in (late_key, *(key for _, key in holders)):
        assert _next(_client(key), project.slug).json()["pair"] == pair.pk
    # Three active leases fill the three slots.
    assert _next(_client(newcomer_key), project.slug).status_code == 204

    _expire(late)
    offered = _next(_client(newcomer_key), project.slug)
    assert offered.status_code == 200 and offered.json()["pair"] == pair.pk
    refused = _submit(_client(late_key), pair.pk, "left")
    assert refused.status_code == 409
    assert refused.json()["error"] == {"code": "lease_expired", "field": "pair",
                                       "message": "Your lease on this pair expired and its slot went to another "
                                                  "labeler."}
    for key in (newcomer_key, *(key for _, key in holders)):
        assert _submit(_client(key), pair.pk, "right").status_code == 201
    # The late labeler asking again finds nothing: the pair is complete.
    assert _next(_client(late_key), project.slug).status_code == 204
    pair.refresh_from_db()
    assert pair.label_count == 3 and pair.status == Pair.Status.COMPLETE
    assert set(pair.comparisons.values_list("labeler", flat=True)) == {newcomer.pk, *(user.pk for user, _ in holders)}


def test_a_late_submit_is_accepted_while_nobody_took_the_expired_slot():
    project = ProjectFactory(labels_per_pair=3)
    pair = PairFactory(project=project)
    late, late_key = _labeler(project)
    _next(_client(late_key), project.slug)
    _expire(late)
    accepted = _submit(_client(late_key), pair.pk, "left")
    assert accepted.status_code == 201
    pair.refresh_from_db()
    assert pair.label_count == 1


def test_a_late_submit_racing_a_newcomer_for_the_expired_slot_never_makes_a_fourth_label(figure):
    rounds = 6
    outcomes = Counter()
    for _ in range(rounds):
        project = ProjectFactory(labels_per_pair=3)
        pair = PairFactory(project=project)
        (late, late_key), *holders = [_labeler(project) for _ in range(3)]
        _, newcomer_key = _labeler(project)
        for key in (late_key, *(key for _, key in holders)):
            _next(_client(key), project.slug)
        _expire(late)

        def act(i: int, slug=project.slug, pair_id=pair.pk, late_key=late_key, newcomer_key=newcomer_key):
            if i == 0:
                return _submit(_client(late_key), pair_id, "left").status_code
            response = _next(_client(newcomer_key), slug)
            return response.status_code, response.json()["pair"] if response.status_code == 200 else None

        late_status, (offer_status, offered) = _race(2, act)
        # Exactly one of the two gets the freed slot: the late labeler's label or the newcomer's lease.
        assert (late_status, offer_status) in {(201, 204), (409, 200)}, (late_status, offer_status)
        outcomes["late label kept" if late_status == 201 else "slot re-leased"] += 1
        if offer_status == 200:
            assert offered == pair.pk
            assert _submit(_client(newcomer_key), pair.pk, "tie").status_code == 201
        for _, key in holders:
            assert _submit(_client(key), pair.pk, "right").status_code == 201
        pair.refresh_from_db()
        assert pair.label_count == 3 == pair.comparisons.count()
    figure(f"[concurrency] late submit vs newcomer, {rounds} rounds: {dict(outcomes)}; never a fourth label")

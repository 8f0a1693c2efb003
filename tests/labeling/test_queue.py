"""The labeling queue and comparison submission: leases, A/B frames, idempotency and races."""
from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest
from django.db import close_old_connections, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from labeling import services
from labeling.errors import Conflict, DomainError
from labeling.models import Comparison, Lease, Membership, Pair, Project
from tests.conftest import client_for
from tests.factories import PairFactory, ProjectFactory, UserFactory


def _member(project, role=Membership.Role.LABELER):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=role)
    return user


@pytest.mark.django_db
def test_next_gives_highest_priority_first_and_same_pair_again_until_submitted(project, labeler):
    low = PairFactory(project=project, priority=0)
    high = PairFactory(project=project, priority=5)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    assert lease.pair_id == high.pk
    again = services.pair_next_for_labeler(project=project, labeler=labeler)
    assert again.pk == lease.pk and again.pair_id == high.pk
    services.comparison_submit(labeler=labeler, pair_id=high.pk, choice="left")
    assert services.pair_next_for_labeler(project=project, labeler=labeler).pair_id == low.pk


@pytest.mark.django_db
@pytest.mark.parametrize("gold", [False, True])
def test_a_lease_comes_with_its_prompt_and_responses_new_or_held(project, labeler, gold):
    project.gold_rate = 1.0 if gold else 0.0
    project.save()
    pair = PairFactory(project=project, gold_choice="a" if gold else None)
    for _ in ("new", "held"):
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        assert lease.pair_id == pair.pk
        with CaptureQueriesContext(connection) as captured:
            shown = (lease.pair.project.slug, lease.pair.prompt.content, lease.pair.response_a.text,
                     lease.pair.response_b.text)
        assert captured.captured_queries == []
        assert shown == (project.slug, pair.prompt.content, pair.response_a.text, pair.response_b.text)


@pytest.mark.django_db
@pytest.mark.parametrize("swapped", [False, True])
def test_submit_translates_the_labelers_frame_back_to_a_b(project, labeler, swapped):
    pair = PairFactory(project=project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    Lease.objects.filter(pk=lease.pk).update(swapped=swapped)
    result = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left", time_ms=1200)
    assert result.created
    stored = Comparison.objects.get(pk=result.comparison.pk)
    assert stored.choice == ("b" if swapped else "a")
    assert stored.swapped is swapped
    assert stored.time_ms == 1200
    pair.refresh_from_db()
    assert pair.label_count == 1 and pair.status == Pair.Status.COMPLETE
    assert not Lease.objects.filter(pair=pair).exists()


@pytest.mark.django_db
def test_ab_order_is_randomized_across_assignments(project):
    pairs = [PairFactory(project=project) for _ in range(40)]
    labeler = _member(project)
    seen = set()
    for _ in pairs:
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        seen.add(lease.swapped)
        services.comparison_submit(labeler=labeler, pair_id=lease.pair_id, choice="tie")
    assert seen == {True, False}


@pytest.mark.django_db
def test_resubmitting_the_same_comparison_is_idempotent_and_a_different_one_conflicts(project, labeler):
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    first = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="right", rationale="clearer")
    second = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="right", rationale="clearer")
    assert first.created and not second.created
    assert first.comparison.pk == second.comparison.pk
    with pytest.raises(Conflict) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    assert exc.value.code == "already_labeled"
    assert Comparison.objects.filter(pair=pair).count() == 1


@pytest.mark.django_db
def test_submit_without_a_lease_is_refused(project, labeler):
    pair = PairFactory(project=project)
    other = _member(project)
    services.pair_next_for_labeler(project=project, labeler=other)
    with pytest.raises(Conflict) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    assert exc.value.code == "not_leased"
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_overlap_gives_each_pair_to_distinct_labelers_up_to_the_limit(db):
    project = ProjectFactory(labels_per_pair=3)
    pair = PairFactory(project=project)
    labelers = [_member(project) for _ in range(4)]
    for labeler in labelers[:3]:
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        assert lease.pair_id == pair.pk
    # Three active leases fill the three slots: the fourth labeler gets nothing.
    assert services.pair_next_for_labeler(project=project, labeler=labelers[3]) is None
    for labeler in labelers[:3]:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    pair.refresh_from_db()
    assert pair.label_count == 3 and pair.status == Pair.Status.COMPLETE
    assert services.pair_next_for_labeler(project=project, labeler=labelers[3]) is None


@pytest.mark.django_db
def test_expired_lease_returns_the_pair_to_the_queue(project, labeler):
    pair = PairFactory(project=project)
    other = _member(project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    assert services.pair_next_for_labeler(project=project, labeler=other) is None
    Lease.objects.filter(labeler=labeler).update(expires_at=timezone.now() - timedelta(seconds=1))
    lease = services.pair_next_for_labeler(project=project, labeler=other)
    assert lease.pair_id == pair.pk
    # The first labeler's lease expired and the slot went to someone else: their late submit is refused.
    with pytest.raises(Conflict) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    assert exc.value.code == "lease_expired"


@pytest.mark.django_db
def test_a_labelers_own_expired_lease_is_renewed_in_place_when_the_slot_is_still_free(project, labeler):
    pair = PairFactory(project=project)
    first = services.pair_next_for_labeler(project=project, labeler=labeler)
    Lease.objects.filter(pk=first.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    again = services.pair_next_for_labeler(project=project, labeler=labeler)
    assert again.pk == first.pk and again.pair_id == pair.pk
    stored = Lease.objects.get(pair=pair)
    assert stored.pk == first.pk and stored.expires_at > timezone.now() and stored.swapped == again.swapped
    result = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    assert result.created and result.comparison.swapped == again.swapped


class _Draw(random.Random):
    """An rng whose draw is fixed: the gold rate decides on `random()` alone."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.django_db
@pytest.mark.parametrize(("rate", "draw", "gets_gold"), [
    (1.0, 0.99, True), (0.5, 0.49, True), (0.5, 0.51, False), (0.0, 0.0, False)])
def test_gold_pairs_are_served_at_the_gold_rate(db, rate, draw, gets_gold):
    # The gold pair has the lower priority: only the rate's draw can put it first.
    project = ProjectFactory(gold_rate=rate)
    plain = PairFactory(project=project, priority=10)
    gold = PairFactory(project=project, gold_choice="a")
    lease = services.pair_next_for_labeler(project=project, labeler=_member(project), rng=_Draw(draw))
    assert lease.pair_id == (gold.pk if gets_gold else plain.pk)


@pytest.mark.django_db
def test_a_labeler_is_not_served_a_gold_pair_twice(db):
    project = ProjectFactory(gold_rate=1.0)
    plain = PairFactory(project=project)
    gold = PairFactory(project=project, gold_choice="a")
    labeler = _member(project)
    assert services.pair_next_for_labeler(project=project, labeler=labeler, rng=_Draw(0.0)).pair_id == gold.pk
    services.comparison_submit(labeler=labeler, pair_id=gold.pk, choice="tie")
    # The draw still asks for gold; with none left for this labeler the queue serves an open pair.
    assert services.pair_next_for_labeler(project=project, labeler=labeler, rng=_Draw(0.0)).pair_id == plain.pk


@pytest.mark.django_db
def test_project_rules_on_choice_and_strength(db):
    project = ProjectFactory(allow_tie=False, strength_scale="1-3")
    pair = PairFactory(project=project)
    labeler = _member(project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    with pytest.raises(DomainError) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="tie")
    assert exc.value.field == "choice"
    with pytest.raises(DomainError) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="both_bad", strength=2)
    assert exc.value.field == "strength"
    ok = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left", strength=3, flags=["unsafe"])
    assert ok.comparison.strength == 3 and ok.comparison.flags == ["unsafe"]


@pytest.mark.django_db
def test_a_refused_submit_keeps_the_lease_and_stores_nothing(db):
    # The submit takes the lease as it starts; a refusal further on must give it back untouched.
    project = ProjectFactory(allow_tie=False, labels_per_pair=1)
    pair = PairFactory(project=project)
    labeler = _member(project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    for kwargs in ({"choice": "tie"}, {"choice": "left", "strength": 2}):
        with pytest.raises(DomainError):
            services.comparison_submit(labeler=labeler, pair_id=pair.pk, **kwargs)
        kept = Lease.objects.get(pair=pair, labeler=labeler)
        assert (kept.pk, kept.swapped, kept.skipped) == (lease.pk, lease.swapped, False)
    assert not Comparison.objects.filter(pair=pair).exists()
    assert Pair.objects.get(pk=pair.pk).label_count == 0
    assert services.pair_next_for_labeler(project=project, labeler=labeler).pk == lease.pk
    result = services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="right")
    assert result.created and not Lease.objects.filter(pair=pair).exists()


@pytest.mark.django_db
def test_a_pair_outside_the_labelers_projects_is_unknown_to_the_service(project, labeler):
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    Membership.objects.filter(project=project, user=labeler).delete()
    with pytest.raises(DomainError) as exc:
        services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="left")
    assert exc.value.status_code == 404 and exc.value.field == "pair"
    assert Lease.objects.filter(pair=pair, labeler=labeler).exists()
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_identical_responses_are_refused(project):
    with pytest.raises(DomainError) as exc:
        services.pair_create(project=project, prompt="hi", response_a="same", response_b="same")
    assert exc.value.field == "response_b"
    assert not Pair.objects.exists()


@pytest.mark.django_db
def test_a_pair_is_the_same_whichever_response_is_a(project):
    services.pair_create(project=project, prompt="hi", response_a="one", response_b="two")
    with pytest.raises(Conflict):
        services.pair_create(project=project, prompt="hi", response_a="two", response_b="one")
    assert Pair.objects.count() == 1


def _race(workers: int, target) -> list:
    """Run `target(i)` in `workers` threads released at once; each thread has its own connection."""
    barrier = threading.Barrier(workers)
    results: list = [None] * workers

    def run(i: int) -> None:
        close_old_connections()
        try:
            barrier.wait()
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_labelers_racing_for_the_last_slot_only_one_gets_it():
    project = ProjectFactory(labels_per_pair=2)
    pair = PairFactory(project=project)
    first, a, b = _member(project), _member(project), _member(project)
    services.pair_next_for_labeler(project=project, labeler=first)
    services.comparison_submit(labeler=first, pair_id=pair.pk, choice="left")
    racers = [a, b]
    results = _race(2, lambda i: services.pair_next_for_labeler(project=project, labeler=racers[i]))
    granted = [r for r in results if isinstance(r, Lease)]
    assert len(granted) == 1, results
    assert results.count(None) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_many_labelers_racing_with_overlap_never_overfill_a_pair():
    project = ProjectFactory(labels_per_pair=3)
    for _ in range(10):
        PairFactory(project=project)
    labelers = [_member(project) for _ in range(12)]

    def label_all(i: int) -> int:
        done = 0
        while True:
            lease = services.pair_next_for_labeler(project=project, labeler=labelers[i])
            if lease is None:
                return done
            services.comparison_submit(labeler=labelers[i], pair_id=lease.pair_id, choice="left")
            done += 1

    results = _race(len(labelers), label_all)
    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 30
    for pair in Pair.objects.filter(project=project):
        assert pair.label_count == 3
        assert pair.comparisons.count() == 3
        assert pair.comparisons.values("labeler").distinct().count() == 3


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_simultaneous_identical_submits_store_one_comparison():
    project = ProjectFactory()
    pair = PairFactory(project=project)
    labeler = _member(project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    results = _race(8, lambda i: services.comparison_submit(labeler=labeler, pair_id=pair.pk, choice="right"))
    assert all(isinstance(r, services.SubmitResult) for r in results), results
    assert sum(r.created for r in results) == 1
    assert Comparison.objects.filter(pair=pair).count() == 1


@pytest.mark.django_db
def test_next_and_submit_over_http(project, labeler, outsider):
    pair = PairFactory(project=project)
    client = client_for(labeler)
    response = client.get(f"/api/v1/projects/{project.slug}/next/")
    assert response.status_code == 200
    body = response.json()
    assert body["pair"] == pair.pk
    assert {body["left"], body["right"]} == {pair.response_a.text, pair.response_b.text}
    shown_left_is_a = body["left"] == pair.response_a.text
    response = client.post("/api/v1/comparisons/", {"pair": pair.pk, "choice": "left"}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["choice"] == ("a" if shown_left_is_a else "b")
    assert response.json()["shown_choice"] == "left"
    again = client.post("/api/v1/comparisons/", {"pair": pair.pk, "choice": "left"}, format="json")
    assert again.status_code == 200
    assert client.get(f"/api/v1/projects/{project.slug}/next/").status_code == 204

    stranger = client_for(outsider)
    assert stranger.get(f"/api/v1/projects/{project.slug}/next/").status_code == 404
    bad = client.post("/api/v1/comparisons/", {"pair": pair.pk, "choice": "up"}, format="json")
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "choice"


@pytest.mark.django_db
def test_a_skipped_pair_goes_to_others_but_not_back_to_the_skipper(project, labeler):
    first = PairFactory(project=project, priority=1)
    second = PairFactory(project=project, priority=0)
    other = _member(project)
    assert services.pair_next_for_labeler(project=project, labeler=labeler).pair_id == first.pk
    services.lease_release(project=project, labeler=labeler, pair_id=first.pk)
    assert services.pair_next_for_labeler(project=project, labeler=labeler).pair_id == second.pk
    assert services.pair_next_for_labeler(project=project, labeler=other).pair_id == first.pk
    with pytest.raises(Conflict):
        services.comparison_submit(labeler=labeler, pair_id=first.pk, choice="left")
    with pytest.raises(DomainError):
        services.lease_release(project=project, labeler=labeler, pair_id=first.pk)


@pytest.mark.django_db
def test_next_and_submit_over_the_api_run_a_fixed_small_number_of_statements(project, labeler, settings,
                                                                            django_assert_max_num_queries):
    # The labeling loop is the service's busiest path: its cost per request is mostly the statements it runs.
    # Counted with the token read from the database (the shared cache, when on, saves that one).
    settings.PREFLAB = {**settings.PREFLAB, "AUTH_CACHE_SECONDS": 0}
    PairFactory.create_batch(3, project=project)
    client = client_for(labeler)
    first = client.get(f"/api/v1/projects/{project.slug}/next/").json()
    client.post("/api/v1/comparisons/", {"pair": first["pair"], "choice": "left"}, format="json")

    # Token, project with role; savepoint, held lease, candidate, the conditional lease upsert, the pair's
    # content, release.
    with django_assert_max_num_queries(8):
        assignment = client.get(f"/api/v1/projects/{project.slug}/next/")
    assert assignment.status_code == 200 and assignment.json()["left"] and assignment.json()["prompt"]
    # Token; savepoint, locked pair with its project and role, lease taken, comparison insert, pair update, release.
    with django_assert_max_num_queries(7):
        submitted = client.post("/api/v1/comparisons/", {"pair": assignment.json()["pair"], "choice": "right"},
                                format="json")
    assert submitted.status_code == 201
    pair = Pair.objects.get(pk=assignment.json()["pair"])
    assert pair.label_count == 1 and pair.status == Pair.Status.COMPLETE
    assert not Lease.objects.filter(pair=pair).exists()


@pytest.mark.django_db
def test_a_submitted_comparison_carries_its_pairs_project(project, labeler):
    PairFactory(project=project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    result = services.comparison_submit(labeler=labeler, pair_id=lease.pair_id, choice="left")
    assert result.comparison.project_id == project.pk == Comparison.objects.get().project_id


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_the_database_refuses_a_comparison_filed_under_another_project_than_its_pair(project, labeler):
    from django.db import IntegrityError, transaction

    pair = PairFactory(project=project)
    other = ProjectFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        # The foreign key on (pair, project) is checked at commit (deferred, like Django's own).
        Comparison.objects.create(pair=pair, project=other, labeler=labeler, choice="a")
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_a_held_pair_completed_by_a_lower_overlap_is_not_handed_back(db):
    project = ProjectFactory(labels_per_pair=2)
    first = PairFactory(project=project, priority=1)
    second = PairFactory(project=project, priority=0)
    early, late = _member(project), _member(project)
    for labeler in (early, late):
        assert services.pair_next_for_labeler(project=project, labeler=labeler).pair_id == first.pk
    services.comparison_submit(labeler=early, pair_id=first.pk, choice="left")
    # The manager lowers the overlap: the one label `first` has is now all it needs.
    services.project_update(project=project, labels_per_pair=1)
    with pytest.raises(Conflict) as refused:
        services.comparison_submit(labeler=late, pair_id=first.pk, choice="left")
    assert refused.value.code == "pair_complete"
    # The queue moves the labeler on instead of handing the completed pair back at every request.
    assert services.pair_next_for_labeler(project=project, labeler=late).pair_id == second.pk


@pytest.mark.django_db
def test_a_held_gold_pair_is_handed_back_until_answered(db):
    project = ProjectFactory(gold_rate=1.0)
    gold = PairFactory(project=project, gold_choice="a")
    PairFactory(project=project)
    labeler = _member(project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler, rng=random.Random(0))
    assert lease.pair_id == gold.pk
    assert services.pair_next_for_labeler(project=project, labeler=labeler).pk == lease.pk


@pytest.mark.django_db
def test_a_settings_update_from_an_older_copy_keeps_what_changed_since(db):
    project = ProjectFactory(labels_per_pair=1)
    earlier_copy = Project.objects.get(pk=project.pk)  # e.g. the guidelines page loaded before the change
    pair = PairFactory(project=project, label_count=1, status=Pair.Status.COMPLETE)
    services.project_update(project=project, labels_per_pair=3)
    updated = services.project_update(project=earlier_copy, guidelines="Prefer the shorter answer.")
    stored = Project.objects.get(pk=project.pk)
    assert (stored.labels_per_pair, stored.guidelines) == (3, "Prefer the shorter answer.")
    assert (updated.labels_per_pair, updated.guidelines) == (3, "Prefer the shorter answer.")
    # The pair reopened for the raised overlap stays open.
    assert Pair.objects.get(pk=pair.pk).status == Pair.Status.OPEN

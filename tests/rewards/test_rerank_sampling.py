"""Close reranks sampled back into the labeling queue as pairs: rate, margin, cache hits and deduplication."""
from __future__ import annotations

import random

import pytest
from django.core.cache import cache
from django.db import IntegrityError
from rest_framework.test import APIClient

from labeling.models import ApiToken, Pair
from labeling.services import api_token_create
from rewards import serving
from rewards.scoring import rerank_order, rerank_sample_into_queue
from rewards.services import reward_model_register
from tests.factories import ProjectFactory, UserFactory

URL = "/api/v1/rerank/"
PROMPT = "How do I boil an egg?"
CANDIDATES = ["Eight minutes in boiling water.", "no idea", "Ask a chicken."]


@pytest.fixture(autouse=True)
def fresh_state():
    serving.pool.clear()
    cache.clear()
    yield
    serving.pool.clear()
    cache.clear()


def _results(scores, reasons=None):
    return rerank_order(scores, reasons or [[]] * len(scores))


@pytest.mark.django_db
def test_a_close_call_becomes_one_rerank_pair_and_a_repeat_is_deduplicated():
    project = ProjectFactory(rerank_sample_rate=1.0, rerank_sample_margin=0.5)
    results = _results([0.1, 0.5, 0.3])
    pair = rerank_sample_into_queue(project=project, prompt=PROMPT, candidates=CANDIDATES, results=results,
                                    rng=random.Random(0))
    assert pair is not None and pair.source == "rerank"
    assert (pair.prompt.content, pair.response_a.text, pair.response_b.text) == (PROMPT, CANDIDATES[1],
                                                                                CANDIDATES[2])
    again = rerank_sample_into_queue(project=project, prompt=PROMPT, candidates=CANDIDATES, results=results,
                                     rng=random.Random(0))
    assert again is None and Pair.objects.filter(project=project).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(("rate", "margin", "scores", "reasons"), [
    (0.0, 0.5, [0.1, 0.5, 0.3], None),                      # sampling off
    (1.0, 0.5, [0.1, 1.5, 0.3], None),                      # the best is clearly better
    (1.0, 0.5, [0.1, 0.5, 0.4], [["regex"], [], ["regex"]]),  # only one candidate passes
    (1.0, 0.5, [0.5], None),                                 # nothing to compare
])
def test_no_pair_when_off_not_close_or_not_two_passing(rate, margin, scores, reasons):
    project = ProjectFactory(rerank_sample_rate=rate, rerank_sample_margin=margin)
    pair = rerank_sample_into_queue(project=project, prompt=PROMPT, candidates=CANDIDATES[:len(scores)],
                                    results=_results(scores, reasons), rng=random.Random(0))
    assert pair is None and not Pair.objects.filter(project=project).exists()


@pytest.mark.django_db
def test_the_rate_is_a_probability_drawn_from_the_rng():
    project = ProjectFactory(rerank_sample_rate=0.5, rerank_sample_margin=10.0)

    class Fixed(random.Random):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def random(self):
            return self.value

    results = _results([0.1, 0.5, 0.3])
    assert rerank_sample_into_queue(project=project, prompt=PROMPT, candidates=CANDIDATES, results=results,
                                    rng=Fixed(0.5)) is None
    assert rerank_sample_into_queue(project=project, prompt=PROMPT, candidates=CANDIDATES, results=results,
                                    rng=Fixed(0.49)) is not None


@pytest.mark.django_db
def test_the_database_refuses_a_rate_outside_zero_to_one():
    project = ProjectFactory()
    project.rerank_sample_rate = 1.5
    with pytest.raises(IntegrityError):
        project.save()


def _client_and_project(rm_dir, **fields):
    project = ProjectFactory(**fields)
    reward_model_register(project=project, path=rm_dir, deploy=True)
    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client, project


@pytest.mark.django_db
def test_rerank_traffic_feeds_the_queue_once_per_pair(rm_dir):
    client, project = _client_and_project(rm_dir, rerank_sample_rate=1.0, rerank_sample_margin=1e6)
    body = {"project": project.slug, "prompt": PROMPT, "candidates": CANDIDATES}
    first = client.post(URL, body, format="json").json()
    pairs = list(Pair.objects.filter(project=project))
    assert len(pairs) == 1 and pairs[0].source == "rerank"
    best, runner_up = first["results"][0]["index"], first["results"][1]["index"]
    assert {pairs[0].response_a.text, pairs[0].response_b.text} == {CANDIDATES[best], CANDIDATES[runner_up]}
    # The same request is a cache hit: no model work, no new pair.
    assert client.post(URL, body, format="json").json()["cached"] is True
    # Another request (not cached) whose best two are the same pair: deduplicated, and the rerank still succeeds.
    other = client.post(URL, {**body, "constraints": {"max_chars": 500}}, format="json")
    assert other.status_code == 200 and other.json()["cached"] is False
    assert Pair.objects.filter(project=project).count() == 1


@pytest.mark.django_db
def test_rerank_traffic_adds_nothing_when_sampling_is_off_or_scores_are_apart(rm_dir):
    client, project = _client_and_project(rm_dir)
    assert client.post(URL, {"project": project.slug, "prompt": PROMPT, "candidates": CANDIDATES},
                       format="json").status_code == 200
    client, apart = _client_and_project(rm_dir, rerank_sample_rate=1.0, rerank_sample_margin=0.0)
    body = client.post(URL, {"project": apart.slug, "prompt": PROMPT, "candidates": CANDIDATES},
                       format="json").json()
    assert body["results"][0]["score"] > body["results"][1]["score"]
    assert not Pair.objects.filter(project__in=[project, apart]).exists()

"""The same request, or an equivalent one, gives the same answer: derived seeds, rerank scores and order, the cache.

Float32 logits move in their last bits with the shape of the batch a sequence is scored in (its batchmates, its
row, the padded width), and five decimals of rounding hide that only away from a rounding boundary. So the score
tests here turn the rounding off (SCORE_DECIMALS = 17) and ask for bit-for-bit equality.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading

import pytest
from django.core.cache import cache
from transformers import AutoTokenizer

from rewards import generation, scoring, serving
from rewards.generation import cut_at_stop, request_seed
from rewards.scoring import RewardScorer, rerank_cache_key
from rewards.services import reward_model_register

RERANK = "/api/v1/rerank/"
GENERATE = "/api/v1/generate/"
PROMPT = "How do I boil an egg?"
CANDIDATES = ["Put it in boiling water for eight minutes.", "no idea", "Eggs are birds.",
              "Boil water, lower the egg in gently, wait nine minutes, then cool it in cold water.",
              "Ask someone else.", "Eggs.", "Eight minutes in boiling water, then cold water.", "Boil it."]
WORDS = "the a egg boil water minutes hot cold pan salt pepper quickly slowly gently".split()

pytestmark = pytest.mark.usefixtures("fresh_model_pools")


@pytest.fixture(scope="module")
def scorer(rm_dir):
    return RewardScorer.load(rm_dir, device="cpu")


@pytest.fixture
def unrounded(monkeypatch):
    """Scores as the model computed them, so that float noise of any size would show in the body."""
    monkeypatch.setattr(scoring, "SCORE_DECIMALS", 17)


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("timing_ms", "cached")}


def _texts(body: dict) -> list[str]:
    return [c["text"] for c in sorted(body["candidates"], key=lambda c: c["index"])]


def _random_texts(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 3, 5, 12, 12, 30]))) for _ in range(count)]


# --- derived seeds ----------------------------------------------------------------------------------------

BASE = {"policy_key": "policy-1", "messages": [{"role": "user", "content": "hi"}], "n": 4, "temperature": 0.7,
        "top_k": None, "top_p": None, "max_new_tokens": 16, "stop": None, "vocabulary": 100}


def _seed(**change) -> int:
    return request_seed(**{**BASE, **change})


@pytest.mark.parametrize("group", [
    # Unset settings and their defaults: top_k 50, top_p 1 (every token), no stop string.
    [{}, {"top_k": 50}, {"top_p": 1}, {"top_p": 1.0}, {"stop": []}, {"top_k": 50, "top_p": 1.0, "stop": []}],
    # top_k 0 turns top-k off, as does any top_k that keeps the whole vocabulary.
    [{"top_k": 0}, {"top_k": 100}, {"top_k": 10_000}],
    # A whole-number temperature is the float it stands for.
    [{"temperature": 1}, {"temperature": 1.0}],
    # Stop strings are a set; one that begins with another never cuts first.
    [{"stop": ["b", "a"]}, {"stop": ["a", "b"]}, {"stop": ["a", "b", "a"]}, {"stop": ["ab", "a", "b", "bc"]}],
])
def test_equivalent_sampling_settings_derive_one_seed(group):
    assert len({_seed(**change) for change in group}) == 1


def test_settings_that_sample_or_cut_differently_derive_other_seeds():
    changes = [{}, {"n": 5}, {"temperature": 0.8}, {"top_k": 49}, {"top_k": 99}, {"top_k": 0}, {"top_p": 0.99},
               {"max_new_tokens": 17}, {"stop": ["a"]}, {"stop": ["ab"]}, {"stop": ["xab", "ab"]},
               {"policy_key": "default"}, {"messages": [{"role": "system", "content": "hi"}]},
               {"messages": [{"role": "user", "content": "hi "}]}]
    seeds = [_seed(**change) for change in changes]
    assert len(set(seeds)) == len(changes)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_a_stop_string_is_dropped_only_behind_a_prefix_of_it():
    from rewards.generation import stop_canonical

    # "ab" always begins where an "a" does, so "a" cuts at or before it; "xab" can begin before any "ab".
    assert stop_canonical(["ab", "a", "a"]) == ["a"]
    assert stop_canonical(["xab", "ab"]) == ["ab", "xab"]
    assert stop_canonical([]) is None and stop_canonical(None) is None
    text = "zxab and more"
    assert cut_at_stop(text, ["xab", "ab"]) == "z" != cut_at_stop(text, ["ab"])
    for stop in (["ab", "a"], ["xab", "ab"], ["q", "ab", "a b", "a"]):
        for probe in ("a b ab xab", "qab", "nothing", "xxab", "b a"):
            assert cut_at_stop(probe, stop) == cut_at_stop(probe, stop_canonical(stop))


def test_a_request_in_its_plain_spelling_keeps_the_seed_it_was_given_before():
    # Seeds already handed out for requests that name no setting twice still reproduce their candidates.
    shape = json.dumps(["policy-1", BASE["messages"], 4, 0.7, None, None, 16, None], ensure_ascii=False,
                       separators=(",", ":"))
    earlier = int.from_bytes(hashlib.sha256(shape.encode()).digest()[:8], "big") >> 1
    assert _seed() == earlier


def _generate(client, project, policy_row, **body):
    payload = {"project": project.slug, "prompt": PROMPT, "policy": policy_row.pk, "n": 3, "temperature": 1.0,
               "max_new_tokens": 8, "rerank": False, **body}
    response = client.post(GENERATE, payload, format="json")
    assert response.status_code == 200, response.json()
    return response.json()


@pytest.mark.django_db
def test_equivalent_generate_requests_give_one_seed_and_the_same_candidates(project, policy, key_client):
    vocabulary = len(AutoTokenizer.from_pretrained(policy.artifact_path))
    groups = [
        [{}, {"stop": []}, {"stop": None}, {"top_p": 1}, {"top_p": 1.0}, {"top_k": 50}, {"top_k": None},
         {"prompt": [{"role": "user", "content": PROMPT}]},
         {"prompt": [{"role": "user", "content": PROMPT, "name": "ada"}]}],
        [{"top_k": 0}, {"top_k": vocabulary}, {"top_k": vocabulary + 7}],
    ]
    seeds = []
    for group in groups:
        bodies = [_generate(key_client, project, policy, **change) for change in group]
        assert len({body["seed"] for body in bodies}) == 1, group
        assert all(_stable(body) == _stable(bodies[0]) for body in bodies), group
        seeds.append(bodies[0]["seed"])
    assert seeds[0] != seeds[1]


@pytest.mark.django_db
def test_settings_sharing_a_seed_do_sample_the_same_candidates(project, policy, key_client):
    # The canonical spelling is sound: with one explicit seed, each spelling of a class samples the same texts.
    vocabulary = len(AutoTokenizer.from_pretrained(policy.artifact_path))
    default = _texts(_generate(key_client, project, policy, seed=3))
    for change in ({"top_k": 50}, {"top_p": 1}, {"stop": []}, {"temperature": 1}):
        assert _texts(_generate(key_client, project, policy, seed=3, **change)) == default, change
    off = _texts(_generate(key_client, project, policy, seed=3, top_k=0))
    assert off != default
    assert _texts(_generate(key_client, project, policy, seed=3, top_k=vocabulary + 7)) == off
    # Stop strings as a set, with one behind a prefix of it, cut alike.
    text = max(default, key=len)
    short, long = text[1:3], text[1:4]
    cut = _texts(_generate(key_client, project, policy, seed=3, stop=[short]))
    assert cut != default
    for stop in ([long, short], [short, short], [short, long, short]):
        assert _texts(_generate(key_client, project, policy, seed=3, stop=stop)) == cut, stop


@pytest.mark.django_db
def test_greedy_decoding_derives_no_seed_whatever_sampling_settings_come_with_it(project, policy, key_client):
    bodies = [_generate(key_client, project, policy, temperature=0, **change)
              for change in ({}, {"top_k": 3, "top_p": 0.5}, {"top_k": 0}, {"seed": 9})]
    assert all(_stable(body) == _stable(bodies[0]) for body in bodies) and bodies[0]["seed"] is None


# --- scores that do not depend on batching ----------------------------------------------------------------


def test_scores_of_a_set_of_sequences_do_not_depend_on_their_order_or_repeats(scorer):
    # Before, 121 of 200 such shuffles moved some score in its last bits (batch_size 4 cuts between sequences
    # of one length, and which of them shared a batch, and on which row, followed the order given).
    for trial in range(40):
        rng = random.Random(trial)
        sequences = [scorer.encode(PROMPT, text).input_ids for text in _random_texts(rng, rng.randint(4, 16))]
        expected = scorer.score_ids(sequences, batch_size=4)
        order = list(range(len(sequences)))
        rng.shuffle(order)
        shuffled = scorer.score_ids([sequences[i] for i in order], batch_size=4)
        assert [shuffled[order.index(i)] for i in range(len(sequences))] == expected, trial
        repeated = scorer.score_ids([*sequences, *sequences[::2]], batch_size=4)
        assert repeated == [*expected, *expected[::2]], trial


def test_a_set_of_sequences_is_run_in_the_same_forward_batches_whatever_its_order(scorer, monkeypatch):
    forward = scorer.model.forward
    batches: list[list[list[int]]] = []

    def recording(*args, **kwargs):
        batches.append(kwargs["input_ids"].tolist())
        return forward(*args, **kwargs)

    monkeypatch.setattr(scorer.model, "forward", recording)
    rng = random.Random(5)
    sequences = [scorer.encode(PROMPT, text).input_ids for text in _random_texts(rng, 12)]
    runs = []
    for _ in range(4):
        batches.clear()
        rng.shuffle(sequences)
        scorer.score_ids(sequences, batch_size=4)
        runs.append([list(batch) for batch in batches])
    assert all(run == runs[0] for run in runs)


class _BatchDependentScorer:
    """A stand-in model whose scores depend on what else shares the call, as float noise does, only larger."""

    def __init__(self):
        self.calls = []

    def __call__(self, sequences, *, batch_size):
        self.calls.append(len(sequences))
        return [len(ids) + len(sequences) / 1000 for ids in sequences]


def _gathered(batcher, requests: list[list[list[int]]]) -> dict[int, list[float]]:
    """Each request's scores, the requests sent at once from threads of their own (gathered in the window)."""
    got: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(requests))

    def call(number: int) -> None:
        barrier.wait()
        got[number] = batcher.score(requests[number])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


def test_by_default_gathered_requests_share_one_scoring_call_and_each_gets_its_own_scores():
    """The throughput setting: the distinct candidates of every gathered request are scored in one call (so, on a
    real model, in shared forward batches), which is what makes their scores depend on the traffic."""
    fake = _BatchDependentScorer()
    batcher = serving.MicroBatcher(fake, window_ms=300, max_items=256, forward_batch=16)
    requests = [[[7] * n for n in range(1, size + 1)] for size in (1, 2, 3, 5)]
    try:
        got = _gathered(batcher, requests)
    finally:
        batcher.stop()
    assert batcher.passes[0] == (4, 11) and fake.calls == [5]
    assert got == {n: [len(ids) + 5 / 1000 for ids in sequences] for n, sequences in enumerate(requests)}


def test_without_sharing_the_batcher_never_scores_one_request_beside_another():
    fake = _BatchDependentScorer()
    batcher = serving.MicroBatcher(fake, window_ms=300, max_items=256, forward_batch=16, across_requests=False)
    requests = [[[7] * n for n in range(1, size + 1)] for size in (1, 2, 3, 5, 8)]
    try:
        got = _gathered(batcher, requests)
        alone = {n: fake(sequences, batch_size=16) for n, sequences in enumerate(requests)}
    finally:
        batcher.stop()
    assert got == alone
    assert max(gathered for gathered, _ in batcher.passes) > 1


def test_the_same_request_gathered_twice_is_scored_once_and_both_get_its_scores():
    fake = _BatchDependentScorer()
    batcher = serving.MicroBatcher(fake, window_ms=300, max_items=256)
    sequences = [[1, 2], [1, 2, 3], [1]]
    got = []
    barrier = threading.Barrier(3)

    def call(order):
        barrier.wait()
        got.append((order, batcher.score([sequences[i] for i in order])))

    try:
        threads = [threading.Thread(target=call, args=(order,)) for order in ([0, 1, 2], [2, 1, 0], [1, 1, 0, 2])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batcher.stop()
    assert len(got) == 3 and sum(fake.calls) == 3 * len(batcher.passes)
    expected = {tuple(ids): len(ids) + 0.003 for ids in sequences}
    for order, scores in got:
        assert scores == [expected[tuple(sequences[i])] for i in order]


@pytest.mark.django_db
def test_concurrent_requests_get_exactly_the_scores_they_get_alone(deployed, settings):
    served = serving.pool.get(reward_model_id=deployed.pk, artifact_path=deployed.artifact_path,
                              registered=deployed.created_at)
    rng = random.Random(0)
    requests = [(f"Question {n}?", _random_texts(rng, rng.randint(2, 12))) for n in range(6)]
    alone = [served.score(prompt, candidates) for prompt, candidates in requests]
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_BATCH_WINDOW_MS": 300, "RERANK_BATCH_ACROSS_REQUESTS": False}
    serving.pool.clear()
    served = serving.pool.get(reward_model_id=deployed.pk, artifact_path=deployed.artifact_path,
                              registered=deployed.created_at)
    got: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(requests))

    def call(number: int) -> None:
        barrier.wait()
        got[number] = served.score(*requests[number])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(gathered for gathered, _ in served.batcher.passes) > 1
    assert [got[n] for n in range(len(requests))] == alone


# --- the same rerank answer -----------------------------------------------------------------------------


def _rerank(client, project, **body):
    response = client.post(RERANK, {"project": project.slug, "prompt": PROMPT, "candidates": CANDIDATES, **body},
                           format="json")
    assert response.status_code == 200, response.json()
    return response.json()


def _by_text(body: dict, candidates: list[str]) -> dict[str, float]:
    return {candidates[row["index"]]: row["score"] for row in body["results"]}


@pytest.mark.django_db
def test_a_rerank_answer_holds_bit_for_bit_however_the_request_is_served(project, deployed, key_client, settings,
                                                                         unrounded):
    first = _rerank(key_client, project)
    assert first["cached"] is False
    expected = _by_text(first, CANDIDATES)
    assert len(set(expected.values())) > 1
    assert _stable(_rerank(key_client, project)) == _stable(first)
    # Scored again from scratch, and with the model loaded again.
    cache.clear()
    serving.pool.clear()
    assert _stable(_rerank(key_client, project)) == _stable(first)
    # The candidates in another order, or one given twice: the same score for each text.
    rng = random.Random(3)
    for _ in range(4):
        shuffled = rng.sample(CANDIDATES, len(CANDIDATES))
        assert _by_text(_rerank(key_client, project, candidates=shuffled), shuffled) == expected
    repeated = [*CANDIDATES, CANDIDATES[2], CANDIDATES[0]]
    body = _rerank(key_client, project, candidates=repeated)
    assert _by_text(body, repeated) == expected and len(body["results"]) == len(repeated)
    # While other requests are being scored in the same window, each request scored on its own.
    cache.clear()
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_BATCH_WINDOW_MS": 300, "RERANK_BATCH_ACROSS_REQUESTS": False}
    serving.pool.clear()
    served = serving.pool.get(reward_model_id=deployed.pk, artifact_path=deployed.artifact_path,
                              registered=deployed.created_at)
    others = [[" ".join(["x"] * 60), "a"], ["A much longer reply than any of the others, " * 4], CANDIDATES[::-1]]
    threads = [threading.Thread(target=served.score, args=(PROMPT, texts)) for texts in others]
    for thread in threads:
        thread.start()
    body = _rerank(key_client, project)
    for thread in threads:
        thread.join()
    assert body["cached"] is False and _stable(body) == _stable(first)


@pytest.mark.django_db
def test_equivalent_rerank_requests_share_one_cache_entry(project, deployed, key_client, unrounded):
    first = _rerank(key_client, project, top_k=2)
    assert first["cached"] is False and len(first["results"]) == 2
    # top_k only cuts the answer: the full answer is the same entry, and the cut one is its beginning.
    full = _rerank(key_client, project)
    assert full["cached"] is True and full["results"][:2] == first["results"]
    assert full["best_index"] == first["best_index"]
    assert _rerank(key_client, project, top_k=len(CANDIDATES) + 5)["cached"] is True
    equivalents = [{"prompt": [{"role": "user", "content": PROMPT}]},
                   {"prompt": [{"role": "user", "content": PROMPT, "name": "ada"}]},
                   {"constraints": {}}, {"constraints": None},
                   {"constraints": {"max_chars": None, "regex": None, "json": False}}]
    for change in equivalents:
        body = _rerank(key_client, project, **change)
        assert body["cached"] is True and _stable(body) == _stable(full), change


def _key(reward_model, **change):
    inputs = {"prompt": PROMPT, "candidates": CANDIDATES, "constraints": None, **change}
    return rerank_cache_key(reward_model=reward_model, **inputs)


@pytest.mark.django_db
def test_the_cache_key_names_what_shapes_the_answer_and_nothing_else(project, deployed, rm_dir):
    same = [{}, {"prompt": [{"role": "user", "content": PROMPT}]},
            {"prompt": [{"content": PROMPT, "role": "user", "name": "ada"}]},
            {"constraints": {}}, {"constraints": {"min_chars": None, "json_schema": None}},
            {"constraints": {"json": False}}]
    assert len({_key(deployed, **change) for change in same}) == 1
    with_schema = {"json_schema": {"type": "object"}}
    assert _key(deployed, constraints={**with_schema, "json": True}) == _key(deployed, constraints=with_schema)
    other = [{}, {"prompt": PROMPT + " "}, {"prompt": [{"role": "system", "content": PROMPT}]},
             {"prompt": [{"role": "user", "content": PROMPT}, {"role": "user", "content": "and?"}]},
             {"candidates": CANDIDATES[::-1]}, {"candidates": CANDIDATES[:-1]},
             {"candidates": [*CANDIDATES, CANDIDATES[0]]}, {"constraints": {"max_chars": 40}},
             {"constraints": {"max_chars": 41}}, {"constraints": {"json": True}}, {"constraints": with_schema}]
    assert len({_key(deployed, **change) for change in other}) == len(other)
    again = reward_model_register(project=project, path=rm_dir)
    assert _key(again) != _key(deployed)


@pytest.mark.django_db
def test_equal_scores_rank_in_request_order_and_a_permuted_request_scores_each_text_alike(project, deployed,
                                                                                          key_client):
    candidates = ["same", "other", "same", "third"]
    body = _rerank(key_client, project, candidates=candidates)
    tied = [row["index"] for row in body["results"] if candidates[row["index"]] == "same"]
    assert tied == [0, 2]
    permuted = ["third", "same", "other", "same"]
    again = _rerank(key_client, project, candidates=permuted)
    assert _by_text(again, permuted) == _by_text(body, candidates)
    assert [row["index"] for row in again["results"] if permuted[row["index"]] == "same"] == [1, 3]


# --- generate: the same request, the same answer -----------------------------------------------------------


@pytest.mark.django_db
def test_equivalent_generate_requests_rerank_to_the_same_answer(project, policy, deployed, key_client, unrounded):
    first = _generate(key_client, project, policy, rerank=True, n=4)
    assert first["best_index"] is not None
    for change in ({"stop": []}, {"top_p": 1}, {"top_k": 50},
                   {"prompt": [{"role": "user", "content": PROMPT}]}):
        assert _stable(_generate(key_client, project, policy, rerank=True, n=4, **change)) == _stable(first)
    cache.clear()
    generation.pool.clear()
    serving.pool.clear()
    assert _stable(_generate(key_client, project, policy, rerank=True, n=4)) == _stable(first)

"""Best-of-N reranking: scores as plain transformers computes them, constraints, limits, keys, cache and batching."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
from django.core.cache import cache
from rest_framework.test import APIClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from labeling.models import ApiToken, Membership
from labeling.services import api_token_create
from rewards import serving
from rewards.apis_rerank import RerankThrottle
from rewards.models import RewardModel
from rewards.scoring import RewardScorer, rerank_order
from rewards.selectors import rerank_usage
from rewards.services import reward_model_register
from rewards.training.data import RewardEncoder, RewardFormat
from tests.conftest import client_for
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.tiny import tiny_reward_model, with_strict_chat_template

URL = "/api/v1/rerank/"
PROMPT = "How do I boil an egg?"
CANDIDATES = ["Put it in boiling water for eight minutes.", "no idea", "Eggs are birds.",
              "Boil water, lower the egg in gently, wait nine minutes, then cool it in cold water.",
              "Ask someone else."]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return [tiny_reward_model(tmp_path_factory.mktemp(f"rm{seed}"), seed=seed) for seed in (0, 1)]


@pytest.fixture(autouse=True)
def fresh_state():
    serving.pool.clear()
    cache.clear()
    yield
    serving.pool.clear()
    cache.clear()


@pytest.fixture
def deployed(project, model_dirs):
    return reward_model_register(project=project, path=model_dirs[0], deploy=True)


@pytest.fixture
def rerank_client(project):
    owner = UserFactory()
    _, key = api_token_create(user=owner, scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _post(client, project, **body):
    return client.post(URL, {"project": project.slug, "prompt": PROMPT, "candidates": CANDIDATES, **body},
                       format="json")


def _plain_scores(folder, prompt, candidates) -> list[float]:
    """What plain transformers computes from the folder, one unpadded sequence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    encoder = RewardEncoder(tokenizer, RewardFormat.for_tokenizer(tokenizer, max_length=512))
    scores = []
    with torch.inference_mode():
        for candidate in candidates:
            ids = torch.tensor([encoder.encode(prompt, candidate).input_ids])
            scores.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item())
    return scores


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("timing_ms", "cached")}


# --- scores and ranking ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_scores_and_ranking_match_plain_transformers(project, deployed, rerank_client, model_dirs):
    response = _post(rerank_client, project)
    assert response.status_code == 200, response.json()
    body = response.json()
    expected = _plain_scores(model_dirs[0], PROMPT, CANDIDATES)
    by_index = {row["index"]: row for row in body["results"]}
    assert sorted(by_index) == list(range(len(CANDIDATES)))
    for index, score in enumerate(expected):
        assert by_index[index]["score"] == pytest.approx(score, abs=1e-4)
    order = sorted(range(len(expected)), key=lambda i: (-round(expected[i], 5), i))
    assert [row["index"] for row in body["results"]] == order
    assert [row["rank"] for row in body["results"]] == [1, 2, 3, 4, 5]
    assert body["best_index"] == order[0]
    assert body["model"] == {"id": deployed.pk, "version": 1, "base_model": deployed.base_model}
    assert all(row["passed"] and row["reasons"] == [] for row in body["results"])
    assert body["cached"] is False and body["timing_ms"] >= 0


def test_ties_are_broken_by_index_and_failing_candidates_come_last():
    results = rerank_order([0.5, 0.9, 0.5, 0.9, 2.0], [[], [], [], [], ["max_chars: too long"]])
    assert [r["index"] for r in results] == [1, 3, 0, 2, 4]
    assert [r["passed"] for r in results] == [True, True, True, True, False]


@pytest.mark.django_db
def test_chat_prompts_are_scored_like_the_plain_encoding(project, deployed, rerank_client, model_dirs):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": PROMPT}]
    body = rerank_client.post(URL, {"project": project.slug, "prompt": chat, "candidates": CANDIDATES[:3]},
                              format="json").json()
    expected = _plain_scores(model_dirs[0], chat, CANDIDATES[:3])
    assert {r["index"]: r["score"] for r in body["results"]} == {
        i: pytest.approx(s, abs=1e-4) for i, s in enumerate(expected)}


@pytest.mark.django_db
def test_top_k_returns_only_the_best(project, deployed, rerank_client):
    full = _post(rerank_client, project).json()
    top = _post(rerank_client, project, top_k=2).json()
    assert top["results"] == full["results"][:2] and top["best_index"] == full["best_index"]


# --- determinism and the cache --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_same_request_gives_the_same_body_and_a_cache_hit_does_no_model_work(
        project, deployed, rerank_client, monkeypatch):
    forward_passes = []
    original = RewardScorer.score_ids

    def counting(self, sequences, **kwargs):
        forward_passes.append(len(sequences))
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(RewardScorer, "score_ids", counting)
    first = _post(rerank_client, project).json()
    assert first["cached"] is False and forward_passes == [len(CANDIDATES)]
    second = _post(rerank_client, project).json()
    assert second["cached"] is True and forward_passes == [len(CANDIDATES)]
    assert _stable(second) == _stable(first)
    # Scored again from scratch, the body is the same.
    cache.clear()
    third = _post(rerank_client, project).json()
    assert third["cached"] is False and len(forward_passes) == 2
    assert _stable(third) == _stable(first)
    # Other inputs are another cache entry; top_k only cuts the cached answer.
    assert _post(rerank_client, project, constraints={"max_chars": 500}).json()["cached"] is False
    assert _post(rerank_client, project, top_k=1).json()["cached"] is True


@pytest.mark.django_db
def test_a_version_registered_again_under_the_same_id_does_not_get_the_cached_answer(
        project, deployed, rerank_client):
    # The cache outlives a database reset (Redis, or the file cache of the embedded default): a new version that
    # gets the same id must not be answered with the old one's scores.
    first = _post(rerank_client, project).json()
    assert first["cached"] is False and _post(rerank_client, project).json()["cached"] is True
    RewardModel.objects.filter(pk=deployed.pk).update(created_at=deployed.created_at + timedelta(seconds=1))
    serving.deployments.clear()
    assert _post(rerank_client, project).json()["cached"] is False


@pytest.mark.django_db
def test_reranking_works_when_the_cache_server_is_down(project, deployed, rerank_client, settings):
    settings.CACHES = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": "redis://127.0.0.1:9/0"}}
    first = _post(rerank_client, project)
    second = _post(rerank_client, project)
    assert first.status_code == second.status_code == 200
    assert first.json()["cached"] is False and second.json()["cached"] is False
    assert _stable(first.json()) == _stable(second.json())


# --- constraints ----------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("constraints", "candidates", "passing", "reason"), [
    ({"max_chars": 5}, ["short", "much too long", "tiny"], {0, 2}, "max_chars"),
    ({"min_chars": 5}, ["short", "much too long", "tiny"], {0, 1}, "min_chars"),
    ({"regex": r"[A-Z][a-z ]+\."}, ["Yes it is.", "no it is not", "Fine."], {0, 2}, "regex"),
    ({"json": True}, ['{"answer": 4}', "four", "[1, 2"], {0}, "json"),
    ({"json_schema": {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}},
     ['{"answer": 4}', '{"answer": "four"}', "4", '{"other": 1}'], {0}, "json_schema"),
])
def test_each_constraint_marks_failures_and_ranks_them_last(project, deployed, rerank_client, constraints,
                                                            candidates, passing, reason):
    response = rerank_client.post(URL, {"project": project.slug, "prompt": PROMPT, "candidates": candidates,
                                        "constraints": constraints}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    flags = [row["passed"] for row in body["results"]]
    assert flags == sorted(flags, reverse=True)
    assert {row["index"] for row in body["results"] if row["passed"]} == passing
    assert body["best_index"] in passing
    for row in body["results"]:
        if not row["passed"]:
            assert row["reasons"] and row["reasons"][0].startswith(reason)


@pytest.mark.django_db
def test_best_index_is_a_passing_candidate_even_when_a_failing_one_scores_higher(project, deployed,
                                                                                 rerank_client):
    scores = _post(rerank_client, project).json()["results"]
    top, bottom = scores[0]["index"], scores[-1]["index"]
    pattern = "|".join(__import__("re").escape(CANDIDATES[i]) for i in range(len(CANDIDATES)) if i != top)
    body = _post(rerank_client, project, constraints={"regex": pattern}).json()
    assert body["best_index"] != top and body["results"][-1]["index"] == top
    assert body["results"][-1]["passed"] is False and bottom != top


@pytest.mark.django_db
@pytest.mark.parametrize(("constraints", "field"), [
    ({"regex": "(unclosed"}, "constraints.regex"),
    ({"regex": "a" * 501}, "constraints.regex"),
    ({"regex": 5}, "constraints.regex"),
    ({"json_schema": {"type": "no-such-type"}}, "constraints.json_schema"),
    ({"json_schema": "object"}, "constraints.json_schema"),
    ({"json": "yes"}, "constraints.json"),
    ({"max_chars": -1}, "constraints.max_chars"),
    ({"min_chars": 10, "max_chars": 5}, "constraints.min_chars"),
    ({"maxchars": 5}, "constraints.maxchars"),
    ([1, 2], "constraints"),
])
def test_bad_constraints_are_400_naming_the_field(project, deployed, rerank_client, constraints, field):
    response = _post(rerank_client, project, constraints=constraints)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field


@pytest.mark.django_db
@pytest.mark.parametrize("schema", [
    {"$ref": "http://x/y"},
    {"type": "object", "properties": {"answer": {"$ref": "#/$defs/missing"}}},
    {"$defs": {"inner": {"$id": "http://example.com/inner.json", "$ref": "other.json"}}, "type": "object"},
    # A property may be named like a keyword whose value is data: its schema is a schema all the same.
    {"type": "object", "properties": {"enum": {"$ref": "http://x/y"}}},
])
@pytest.mark.parametrize("candidates", [["a", "b"], ["a", "{}"]])
def test_a_json_schema_reference_that_cannot_be_resolved_is_a_400_whatever_the_candidates(
        project, deployed, rerank_client, schema, candidates):
    # Whether a candidate parses as JSON used to decide whether the schema's references were ever looked at.
    response = rerank_client.post(URL, {"project": project.slug, "prompt": PROMPT, "candidates": candidates,
                                        "constraints": {"json_schema": schema}}, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["field"] == "constraints.json_schema" and "cannot be resolved" in error["message"]


@pytest.mark.django_db
def test_json_schema_references_inside_the_schema_resolve(project, deployed, rerank_client):
    schema = {"$defs": {"answer": {"type": "integer"}}, "type": "object",
              "properties": {"answer": {"$ref": "#/$defs/answer"}, "note": {"enum": [{"$ref": "not a reference"}]}}}
    response = rerank_client.post(URL, {"project": project.slug, "prompt": PROMPT,
                                        "candidates": ['{"answer": 4}', '{"answer": "four"}'],
                                        "constraints": {"json_schema": schema}}, format="json")
    assert response.status_code == 200, response.json()
    assert [row["passed"] for row in response.json()["results"]] == [True, False]


# --- limits and bad input -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("changes", "status", "field"), [
    ({"candidates": []}, 400, "candidates"),
    ({"candidates": ["fine", ""]}, 400, "candidates[1]"),
    ({"candidates": ["a", "b", "c", "d"]}, 400, "candidates"),
    ({"candidates": ["x" * 60, "y" * 50]}, 400, "candidates"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [{"role": "user"}]}, 400, "prompt"),
    ({"top_k": 0}, 400, "top_k"),
    ({"model": 999_999}, 404, "model"),
    ({"model": "latest"}, 400, "model"),
    ({"project": "no-such-project"}, 403, "project"),
])
def test_limits_and_bad_input_are_4xx_naming_the_field(project, deployed, rerank_client, settings, changes,
                                                        status, field):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_MAX_CANDIDATES": 3, "RERANK_MAX_CHARS": 100}
    body = {"project": project.slug, "prompt": "hi", "candidates": ["a", "b"], **changes}
    response = rerank_client.post(URL, body, format="json")
    assert response.status_code == status, response.json()
    assert response.json()["error"]["field"] == field


@pytest.mark.django_db
def test_a_version_of_another_project_is_404(project, deployed, rerank_client, model_dirs):
    elsewhere = reward_model_register(project=ProjectFactory(), path=model_dirs[1], deploy=True)
    response = _post(rerank_client, project, model=elsewhere.pk)
    assert response.status_code == 404 and response.json()["error"]["field"] == "model"
    assert _post(rerank_client, project, model=deployed.pk).json()["model"]["id"] == deployed.pk


@pytest.mark.django_db
def test_a_prompt_the_models_chat_template_refuses_is_a_400_naming_the_prompt(project, rerank_client, tmp_path):
    folder = with_strict_chat_template(tiny_reward_model(tmp_path))
    reward_model_register(project=project, path=folder, deploy=True)

    refused = _post(rerank_client, project, prompt=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": PROMPT}])
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["field"] == "prompt"
    assert "Only user and assistant roles are supported" in refused.json()["error"]["message"]
    assert _post(rerank_client, project, prompt=[{"role": "user", "content": PROMPT}]).status_code == 200


@pytest.mark.django_db
def test_a_project_without_a_deployed_model_is_409(project, rerank_client, model_dirs):
    reward_model_register(project=project, path=model_dirs[0])
    response = _post(rerank_client, project)
    assert response.status_code == 409
    assert response.json()["error"]["field"] == "model" and "no deployed" in response.json()["error"]["message"]


# --- who may call it ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_key_scope(project, deployed, rerank_client, labeler, outsider):
    other = ProjectFactory()
    _, other_key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=other)
    foreign = APIClient()
    foreign.credentials(HTTP_AUTHORIZATION=f"Bearer {other_key}")
    assert _post(foreign, project).status_code == 403
    # A rerank key reaches no other endpoint.
    assert rerank_client.get("/api/v1/projects/").status_code == 403
    assert rerank_client.get(f"/api/v1/projects/{project.slug}/").status_code == 403
    assert rerank_client.get("/api/v1/reward-models/").status_code == 403
    # Members' own tokens may rerank; outsiders and anonymous callers may not.
    assert _post(client_for(labeler), project).status_code == 200
    assert _post(client_for(outsider), project).status_code == 404
    assert _post(APIClient(), project).status_code in (401, 403)


@pytest.mark.django_db
def test_rerank_is_throttled_per_key(project, deployed, rerank_client, settings):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_RATE": "2/min"}
    assert [_post(rerank_client, project).status_code for _ in range(2)] == [200, 200]
    limited = _post(rerank_client, project)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "throttled"
    # The dashboard counts the refusal against the key's project, as the caller's doing.
    usage = rerank_usage(project=project)
    assert (usage["requests"], usage["answered"], usage["rejected"], usage["errors"]) == (3, 2, 1, 0)
    # Another key has its own allowance.
    manager = UserFactory()
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    assert _post(client_for(manager), project).status_code == 200


@pytest.mark.django_db
def test_the_throttle_window_slides_and_a_refusal_says_when_to_retry(project, deployed, rerank_client, settings,
                                                                    monkeypatch, fresh_caches):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_RATE": "10/min"}
    clock = {"now": 6_000_000.0}  # the start of a 60-second window
    monkeypatch.setattr(RerankThrottle, "timer", lambda self: clock["now"])
    assert [_post(rerank_client, project).status_code for _ in range(10)] == [200] * 10
    clock["now"] += 30
    refused = _post(rerank_client, project)  # the 11th in the window
    assert refused.status_code == 429 and int(refused["Retry-After"]) == 30
    # Halfway through the next window, half of the last one's 11 still count: 5.5 + 4 fit in 10, a fifth does not.
    clock["now"] += 60
    assert [_post(rerank_client, project).status_code for _ in range(5)] == [200] * 4 + [429]
    # Two windows later the old counts are gone.
    clock["now"] += 120
    assert _post(rerank_client, project).status_code == 200


# --- serving --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_model_evicted_between_taking_and_scoring_it_is_loaded_again(project, rerank_client, model_dirs,
                                                                        settings, monkeypatch):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_MODEL_CACHE_SIZE": 1}
    deployed = reward_model_register(project=project, path=model_dirs[0], deploy=True)
    other = reward_model_register(project=project, path=model_dirs[1])
    take = serving.pool.get
    raced = []

    def take_then_evicted(**kwargs):
        served = take(**kwargs)
        if kwargs["reward_model_id"] == deployed.pk and not raced:
            # Another request loads a second version meanwhile, which evicts this one from a pool of one.
            raced.append(take(reward_model_id=other.pk, artifact_path=other.artifact_path))
        return served

    monkeypatch.setattr(serving.pool, "get", take_then_evicted)
    loads = serving.pool.loads
    response = _post(rerank_client, project)
    assert response.status_code == 200, response.content
    assert response.json()["model"]["id"] == deployed.pk
    assert serving.pool.loaded_ids() == [deployed.pk] and serving.pool.loads == loads + 3
    cache.clear()
    assert _stable(_post(rerank_client, project).json()) == _stable(response.json())


@pytest.mark.django_db
def test_deploying_a_new_version_is_served_without_restart(project, rerank_client, model_dirs):
    reward_model_register(project=project, path=model_dirs[0], deploy=True)
    first = _post(rerank_client, project).json()
    reward_model_register(project=project, path=model_dirs[1], deploy=True)
    second = _post(rerank_client, project).json()
    assert (first["model"]["version"], second["model"]["version"]) == (1, 2)
    assert [r["score"] for r in first["results"]] != [r["score"] for r in second["results"]]


@pytest.mark.django_db
def test_the_pool_loads_once_and_evicts_the_least_recently_used(settings, model_dirs):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_MODEL_CACHE_SIZE": 2}
    serving.pool.clear()
    loads_before = serving.pool.loads
    threads = [threading.Thread(target=serving.pool.get,
                                kwargs={"reward_model_id": 1, "artifact_path": str(model_dirs[0])})
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert serving.pool.loads - loads_before == 1 and serving.pool.loaded_ids() == [1]
    serving.pool.get(reward_model_id=2, artifact_path=str(model_dirs[1]))
    # Using 1 again makes 2 the least recently used: the third model evicts 2, though 1 was loaded first.
    first = serving.pool.get(reward_model_id=1, artifact_path=str(model_dirs[0]))
    serving.pool.get(reward_model_id=3, artifact_path=str(model_dirs[0]))
    assert serving.pool.loaded_ids() == [1, 3] and serving.pool.loads - loads_before == 3
    assert serving.pool.get(reward_model_id=1, artifact_path=str(model_dirs[0])) is first


def test_concurrent_requests_are_gathered_and_each_gets_its_own_scores(settings, model_dirs):
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_BATCH_WINDOW_MS": 300, "RERANK_MAX_BATCH": 64}
    served = serving.pool.get(reward_model_id=1, artifact_path=str(model_dirs[0]))
    scorer = RewardScorer.load(model_dirs[0])
    inputs = [(f"Question {n}: what is {n} plus {n}?", [f"It is {2 * n}.", f"maybe {n}", "No idea at all." * (n + 1)])
              for n in range(8)]
    expected = [scorer.score(prompt, candidates, batch_size=1) for prompt, candidates in inputs]
    barrier = threading.Barrier(len(inputs))
    got: dict[int, list[float]] = {}

    def call(n: int) -> None:
        barrier.wait()
        got[n] = served.score(*inputs[n])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(len(inputs)):
        assert got[n] == pytest.approx(expected[n], abs=1e-5)
    assert sum(items for _, items in served.batcher.passes) == sum(len(c) for _, c in inputs)
    assert max(requests for requests, _ in served.batcher.passes) > 1


def test_a_failed_forward_pass_reaches_every_caller_and_the_batcher_keeps_going():
    calls = []

    def score_ids(sequences, *, batch_size):
        calls.append(len(sequences))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [float(len(ids)) for ids in sequences]

    batcher = serving.MicroBatcher(score_ids, window_ms=0, max_items=8)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.score([[1, 2]])
        assert batcher.score([[1, 2, 3], [1]]) == [3.0, 1.0]
    finally:
        batcher.stop()


def test_a_pass_hands_the_scorer_all_its_candidates_with_the_forward_batch_size():
    calls = []

    def score_ids(sequences, *, batch_size):
        calls.append(([len(ids) for ids in sequences], batch_size))
        return [float(len(ids)) for ids in sequences]

    batcher = serving.MicroBatcher(score_ids, window_ms=0, max_items=64, forward_batch=4)
    try:
        lengths = [7, 2, 9, 4, 1, 8]
        assert batcher.score([[0] * n for n in lengths]) == [float(n) for n in lengths]
    finally:
        batcher.stop()
    # The scorer sorts the pass by length and plans its forward batches (tests/rewards/test_scoring.py).
    assert calls == [([7, 2, 9, 4, 1, 8], 4)]


@pytest.mark.django_db
def test_the_deployed_version_is_kept_per_process_and_a_deployment_replaces_it_at_once(
        project, rerank_client, model_dirs, settings, django_assert_num_queries):
    from django.utils import timezone

    from rewards.models import RewardModel
    from rewards.services import reward_model_deploy

    settings.PREFLAB = {**settings.PREFLAB, "RERANK_DEPLOYMENT_TTL_SECONDS": 3600}
    first = reward_model_register(project=project, path=model_dirs[0], deploy=True)
    second = reward_model_register(project=project, path=model_dirs[1])
    assert _post(rerank_client, project).json()["model"]["id"] == first.pk
    # Another server process switching the rows directly is seen once the entry expires, not before.
    RewardModel.objects.filter(pk=first.pk).update(is_deployed=False)
    RewardModel.objects.filter(pk=second.pk).update(is_deployed=True, deployed_at=timezone.now())
    with django_assert_num_queries(0):
        assert serving.deployments.get(project_id=project.pk, load=lambda: None).pk == first.pk
    assert _post(rerank_client, project).json()["model"]["id"] == first.pk
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_DEPLOYMENT_TTL_SECONDS": 0}
    assert _post(rerank_client, project).json()["model"]["id"] == second.pk
    # A deployment through the service is served by this process on its very next request, whatever the TTL.
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_DEPLOYMENT_TTL_SECONDS": 3600}
    assert _post(rerank_client, project).json()["model"]["id"] == second.pk
    reward_model_deploy(reward_model=first)
    assert _post(rerank_client, project).json()["model"]["id"] == first.pk


# --- traffic counted for the dashboard --------------------------------------------------------------------


@pytest.mark.django_db
def test_client_errors_are_counted_as_rejected_and_server_errors_as_errors(project, deployed, rerank_client,
                                                                          monkeypatch):
    from django.db.models import Sum

    from rewards.models import RerankMinute
    from rewards.selectors import rerank_usage

    assert _post(rerank_client, project).status_code == 200
    assert _post(rerank_client, project, constraints={"regex": "(unclosed"}).status_code == 400
    assert _post(rerank_client, project, model=999_999).status_code == 404

    def unloadable(**kwargs):
        raise OSError("the files are gone")

    monkeypatch.setattr(serving.pool, "get", unloadable)
    assert _post(rerank_client, project, constraints={"max_chars": 500}).status_code == 503

    usage = rerank_usage(project=project)
    assert (usage["requests"], usage["answered"], usage["rejected"], usage["errors"]) == (4, 1, 2, 1)
    assert usage["error_rate"] == pytest.approx(1 / 4) and usage["rejected_rate"] == pytest.approx(2 / 4)
    assert sum(point["rejected"] for point in usage["series"]) == 2
    assert sum(bucket["requests"] for bucket in usage["latency_buckets"]) == 1  # only the answered one
    # Summed: the minute may turn over between the requests.
    totals = RerankMinute.objects.filter(project=project).aggregate(
        requests=Sum("requests"), rejected=Sum("rejected"), errors=Sum("errors"), cache_hits=Sum("cache_hits"))
    assert totals == {"requests": 4, "rejected": 2, "errors": 1, "cache_hits": 0}

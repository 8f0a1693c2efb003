"""Generation: N candidates from one batched generate call, seeds, greedy decoding, stop strings, reranking."""
from __future__ import annotations

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from labeling.models import Membership
from rewards import generation
from rewards.generation import cut_at_stop
from rewards.models import Policy
from rewards.services import reward_model_register
from tests.conftest import client_for
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.test_rerank_real import minilm_reward_model
from tests.rewards.tiny import tiny_causal_lm, with_strict_chat_template

URL = "/api/v1/generate/"
PROMPT = "Write a haiku about eggs."


pytestmark = pytest.mark.usefixtures("fresh_model_pools")


def _post(client, project, policy_row, **body):
    payload = {"project": project.slug, "prompt": PROMPT, "policy": policy_row.pk, "n": 4, "temperature": 1.0,
               "max_new_tokens": 12, "seed": 7, **body}
    return client.post(URL, payload, format="json")


def _texts(body: dict) -> list[str]:
    return [c["text"] for c in sorted(body["candidates"], key=lambda c: c["index"])]


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timing_ms"}


@pytest.mark.django_db
def test_n_candidates_come_from_one_generate_call_and_are_reranked(project, policy, deployed, key_client,
                                                                   monkeypatch):
    calls = []
    original = generation.PolicyPool._load

    def load_and_count(self, **kwargs):
        loaded = original(self, **kwargs)
        inner = loaded.model.generate

        def counting(*args, **options):
            calls.append(options["input_ids"].shape[0])
            return inner(*args, **options)

        loaded.model.generate = counting
        return loaded

    monkeypatch.setattr(generation.PolicyPool, "_load", load_and_count)
    response = _post(key_client, project, policy, n=5)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert calls == [5]
    assert body["policy"] == {"id": policy.pk, "version": 1, "kind": "dpo", "base_model": "tiny-llama"}
    assert sorted(c["index"] for c in body["candidates"]) == [0, 1, 2, 3, 4]
    scored = [c for c in body["candidates"] if "score" in c]
    assert [c["rank"] for c in scored] == list(range(1, len(scored) + 1))
    assert [c["score"] for c in scored] == sorted((c["score"] for c in scored), reverse=True)
    assert body["best_index"] == scored[0]["index"]
    assert 5 <= body["tokens_generated"] <= 5 * 12 and body["timing_ms"] >= 0
    # The warm pool serves the next request without loading again.
    _post(key_client, project, policy, n=2)
    assert calls == [5, 2] and generation.pool.loaded_keys() == [f"policy-{policy.pk}"]


@pytest.mark.django_db
def test_a_seed_makes_sampling_reproducible(project, policy, deployed, key_client):
    first = _post(key_client, project, policy).json()
    second = _post(key_client, project, policy).json()
    assert _stable(second) == _stable(first)
    other = _post(key_client, project, policy, seed=8).json()
    assert _texts(other) != _texts(first) and (first["seed"], other["seed"]) == (7, 8)
    # Sampled candidates differ from one another (random weights make ties between rows very unlikely).
    assert len(set(_texts(first))) > 1


@pytest.mark.django_db
def test_without_a_seed_the_same_request_gives_the_same_answer(project, policy, deployed, key_client):
    first = _post(key_client, project, policy, seed=None).json()
    second = _post(key_client, project, policy, seed=None).json()
    assert _stable(second) == _stable(first)
    # The seed was derived from the request, and is the one it sampled with: sent explicitly, it gives the same.
    assert isinstance(first["seed"], int) and 0 <= first["seed"] < 2**63
    assert _texts(_post(key_client, project, policy, seed=first["seed"]).json()) == _texts(first)
    # Anything that shapes the candidates shapes the seed.
    for change in ({"temperature": 0.9}, {"top_k": 5}, {"n": 3}, {"max_new_tokens": 11},
                   {"prompt": [{"role": "user", "content": "Something else."}]}):
        assert _post(key_client, project, policy, seed=None, **change).json()["seed"] != first["seed"], change


@pytest.mark.django_db
def test_temperature_zero_is_greedy_and_every_candidate_is_the_same(project, policy, key_client):
    first = _post(key_client, project, policy, temperature=0, seed=None, n=3, rerank=False).json()
    second = _post(key_client, project, policy, temperature=0, seed=None, n=3, rerank=False).json()
    assert first["candidates"] == second["candidates"] and first["seed"] is None
    assert len(set(_texts(first))) == 1
    assert all(set(c) == {"index", "text"} for c in first["candidates"]) and "best_index" not in first


@pytest.mark.django_db
def test_stop_strings_cut_the_text(project, policy, key_client):
    plain = _texts(_post(key_client, project, policy, temperature=0, n=1, max_new_tokens=16, rerank=False).json())[0]
    assert len(plain) > 4
    stop = plain[3:5]
    cut = _texts(_post(key_client, project, policy, temperature=0, n=1, max_new_tokens=16, rerank=False,
                       stop=[stop, "never-occurs"]).json())[0]
    assert cut == plain[:plain.find(stop)]


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("one. two! three", ["!", "."]) == "one"
    assert cut_at_stop("one two", ["x"]) == "one two"
    assert cut_at_stop("one two", None) == "one two"


@pytest.mark.django_db
def test_rerank_without_a_deployed_model_is_a_conflict_naming_rerank(project, policy, key_client):
    response = _post(key_client, project, policy)
    assert response.status_code == 409
    assert response.json()["error"]["field"] == "rerank"
    assert _post(key_client, project, policy, rerank=False).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "field"), [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"temperature": -0.1}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 513}, "max_new_tokens"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"), ({"seed": "x"}, "seed"),
    ({"stop": "abc"}, "stop"), ({"stop": [""]}, "stop"), ({"prompt": ""}, "prompt"), ({"prompt": [{"role": 1}]},
                                                                                       "prompt"),
    ({"prompt": 5}, "prompt"), ({"policy": "best"}, "policy"), ({"policy": 999999}, "policy"),
    ({"rerank": "maybe"}, "rerank"),
])
def test_bad_inputs_are_4xx_naming_the_field(project, policy, deployed, key_client, body, field):
    response = _post(key_client, project, policy, **body)
    assert 400 <= response.status_code < 500, response.json()
    assert response.json()["error"]["field"].startswith(field)
    assert generation.pool.loaded_keys() == []


@pytest.mark.django_db
def test_a_prompt_the_policys_chat_template_refuses_is_a_400_naming_the_prompt(project, key_client, tmp_path):
    folder = with_strict_chat_template(tiny_causal_lm(tmp_path))
    strict = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, artifact_path=str(folder))

    refused = _post(key_client, project, strict, rerank=False, n=1,
                    prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["field"] == "prompt"
    assert "Only user and assistant roles are supported" in refused.json()["error"]["message"]
    assert _post(key_client, project, strict, rerank=False, n=1).status_code == 200


@pytest.mark.django_db
def test_permissions(project, policy, deployed, key_client):
    other_project = ProjectFactory()
    assert _post(key_client, other_project, policy).status_code == 403
    assert APIClient().post(URL, {"project": project.slug, "prompt": PROMPT}, format="json").status_code in (401, 403)
    assert _post(client_for(UserFactory()), project, policy, rerank=False).status_code == 404
    member = UserFactory()
    Membership.objects.create(project=project, user=member, role=Membership.Role.LABELER)
    assert _post(client_for(member), project, policy, rerank=False, n=1).status_code == 200
    # Another project's policy is not reachable through this project.
    foreign = Policy.objects.create(project=other_project, version=1, kind=Policy.Kind.DPO,
                                    artifact_path=policy.artifact_path)
    response = _post(key_client, project, foreign)
    assert response.status_code == 404 and response.json()["error"]["field"] == "policy"


@pytest.mark.slow
@pytest.mark.django_db
def test_the_embedded_smollm2_generates_reproducibly_and_the_real_minilm_reranks(project, key_client,
                                                                               tmp_path_factory):
    minilm = reward_model_register(project=project, deploy=True,
                                   path=minilm_reward_model(tmp_path_factory.mktemp("minilm-rm")))
    body = {"project": project.slug, "prompt": "What is the capital of France?", "n": 2, "max_new_tokens": 8,
            "temperature": 0.7, "seed": 1}
    response = key_client.post(URL, body, format="json")
    assert response.status_code == 200, response.json()
    first = response.json()
    assert first["policy"]["kind"] == "embedded" and len(first["candidates"]) == 2
    assert any(c["text"].strip() for c in first["candidates"])
    assert first["best_index"] in (0, 1) and 2 <= first["tokens_generated"] <= 16
    assert first["reward_model"]["id"] == minilm.pk
    # The same body again, with the rerank cache emptied so the MiniLM scores the candidates afresh.
    cache.clear()
    second = key_client.post(URL, body, format="json").json()
    assert _stable(second) == _stable(first)

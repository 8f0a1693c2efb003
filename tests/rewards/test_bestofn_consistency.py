"""Best-of-N at inference: the same request gives the same answer; input, scope and cache rules."""
from __future__ import annotations

import json
import shutil
import threading
from datetime import timedelta

import pytest
import torch
from django.core.cache import cache
from rest_framework.test import APIClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from labeling.models import ApiToken
from labeling.services import api_token_create, api_token_revoke
from rewards import generation, serving
from rewards.models import Policy, RewardModel
from rewards.scoring import SCORE_DECIMALS
from rewards.services import reward_model_deploy, reward_model_register
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

RERANK = "/api/v1/rerank/"
GENERATE = "/api/v1/generate/"
PROMPT = "How do I boil an egg?"
CANDIDATES = ["Put it in boiling water for eight minutes.", "no idea", "Eggs are birds.",
              "Boil water, lower the egg in gently, wait nine minutes, then cool it in cold water."]


pytestmark = pytest.mark.usefixtures("fresh_model_pools")


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    return [tiny_reward_model(tmp_path_factory.mktemp(f"rm{seed}"), seed=seed) for seed in (0, 1)]


@pytest.fixture
def deployed(project, rm_dirs):
    return reward_model_register(project=project, path=rm_dirs[0], deploy=True)


def _key_client(project) -> tuple[APIClient, ApiToken]:
    token, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client, token


@pytest.fixture
def key_client(project):
    return _key_client(project)[0]


def _rerank(client, project, **body):
    return client.post(RERANK, {"project": project.slug, "prompt": PROMPT, "candidates": CANDIDATES, **body},
                       format="json")


def _generate(client, project, policy_row, **body):
    payload = {"project": project.slug, "prompt": PROMPT, "policy": policy_row.pk, "n": 4, "temperature": 1.0,
               "max_new_tokens": 8, **body}
    return client.post(GENERATE, payload, format="json")


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("timing_ms", "cached")}


def _texts(body: dict) -> list[str]:
    return [c["text"] for c in sorted(body["candidates"], key=lambda c: c["index"])]


# --- unknown fields ------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("extra", "field"), [({"temprature": 0.2}, "temprature"), ({"topk": 3}, "topk"),
                                              ({"top_k": 2, "modle": None}, "modle")])
def test_rerank_refuses_an_unknown_field_naming_it(project, deployed, key_client, extra, field):
    response = _rerank(key_client, project, **extra)
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["field"] == field
    assert error["message"].startswith(f"{field}: Unknown field") and "candidates" in error["message"]
    assert list(error["fields"]) == [field]
    assert serving.pool.loaded_ids() == []


@pytest.mark.django_db
@pytest.mark.parametrize(("extra", "field"), [({"temprature": 0.2}, "temprature"), ({"topk": 3}, "topk"),
                                              ({"seeds": [1, 2]}, "seeds")])
def test_generate_refuses_an_unknown_field_naming_it(project, policy, deployed, key_client, extra, field):
    response = _generate(key_client, project, policy, **extra)
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["field"] == field and error["message"].startswith(f"{field}: Unknown field")
    assert generation.pool.loaded_keys() == []


@pytest.mark.django_db
def test_known_fields_sent_as_null_keep_their_meaning(project, policy, deployed, key_client):
    assert _rerank(key_client, project, top_k=None, constraints=None).status_code == 200
    assert _rerank(key_client, project, model=None).status_code == 400
    response = _generate(key_client, project, policy, seed=None, top_k=None, top_p=None, stop=None, n=1)
    assert response.status_code == 200, response.json()


# --- the same request, the same answer ------------------------------------------------------------------


def _plain_scores(folder, prompt, candidates, *, max_length: int = 512) -> list[float]:
    """Plain transformers on the plain template's text, cut from the left, one unpadded sequence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    scores = []
    with torch.inference_mode():
        for candidate in candidates:
            inputs = tokenizer(f"user: {prompt}\n\nassistant: {candidate}", truncation=True, max_length=max_length,
                               return_tensors="pt")
            scores.append(model(**inputs).logits[0, 0].item())
    return scores


def _scores(body: dict) -> dict[int, float]:
    return {row["index"]: row["score"] for row in body["results"]}


@pytest.mark.django_db
def test_a_rerank_answer_is_the_same_from_the_cache_without_it_after_a_reload_and_batched_with_others(
        project, deployed, key_client, settings):
    first = _rerank(key_client, project).json()
    assert first["cached"] is False
    assert _stable(_rerank(key_client, project).json()) == _stable(first)
    serving.pool.clear()
    cache.clear()
    reloaded = _rerank(key_client, project).json()
    assert reloaded["cached"] is False and _stable(reloaded) == _stable(first)
    # Gathered with other requests' candidates of other lengths (each request is scored on its own).
    settings.PREFLAB = {**settings.PREFLAB, "RERANK_BATCH_WINDOW_MS": 300}
    serving.pool.clear()
    served = serving.pool.get(reward_model_id=deployed.pk, artifact_path=deployed.artifact_path,
                              registered=deployed.created_at)
    others = [["x " * 60, "a"], ["A much longer reply than any of the others, " * 4], CANDIDATES[::-1]]
    threads = [threading.Thread(target=served.score, args=(PROMPT, texts)) for texts in others]
    for thread in threads:
        thread.start()
    batched = served.score(PROMPT, CANDIDATES)
    for thread in threads:
        thread.join()
    assert max(requests for requests, _ in served.batcher.passes) > 1
    assert {i: round(s, SCORE_DECIMALS) for i, s in enumerate(batched)} == _scores(first)


@pytest.mark.django_db
def test_scores_equal_plain_transformers_with_the_left_truncation_of_training(project, key_client, rm_dirs,
                                                                             tmp_path):
    folder = tmp_path / "short-rm"
    shutil.copytree(rm_dirs[0], folder)
    (folder / "preflab.json").write_text(json.dumps({"format": {"max_length": 24, "template": "plain"}}))
    reward_model_register(project=project, path=folder, deploy=True)
    prompt = "Tell me everything about eggs, from the hen to the plate, in as much detail as you can. " * 3
    body = _rerank(key_client, project, prompt=prompt).json()
    expected = _plain_scores(folder, prompt, CANDIDATES, max_length=24)
    assert _scores(body) == {i: pytest.approx(s, abs=1e-5) for i, s in enumerate(expected)}


@pytest.mark.django_db
def test_duplicates_tie_in_index_order_top_k_beyond_n_returns_all_and_empty_candidates_are_named(
        project, deployed, key_client):
    body = _rerank(key_client, project, candidates=["same", "other", "same", "same"], top_k=10).json()
    scores = _scores(body)
    assert scores[0] == scores[2] == scores[3] and len(body["results"]) == 4
    same = [row["index"] for row in body["results"] if row["index"] != 1]
    assert same == [0, 2, 3]
    empty = _rerank(key_client, project, candidates=["fine", ""])
    assert empty.status_code == 400 and empty.json()["error"]["field"] == "candidates[1]"


@pytest.mark.django_db
def test_deploying_another_version_is_never_answered_from_the_old_versions_cache(project, key_client, rm_dirs):
    old = reward_model_register(project=project, path=rm_dirs[0], deploy=True)
    first = _rerank(key_client, project).json()
    assert _rerank(key_client, project).json()["cached"] is True
    new = reward_model_register(project=project, path=rm_dirs[1], deploy=True)
    second = _rerank(key_client, project).json()
    assert second["cached"] is False and second["model"]["id"] == new.pk
    assert _scores(second) == {i: pytest.approx(s, abs=1e-5)
                               for i, s in enumerate(_plain_scores(rm_dirs[1], PROMPT, CANDIDATES))}
    reward_model_deploy(reward_model=RewardModel.objects.get(pk=old.pk))
    assert _stable(_rerank(key_client, project).json()) == _stable(first)


@pytest.mark.django_db
def test_a_version_registered_again_under_a_reused_id_is_scored_with_its_own_weights(project, key_client, rm_dirs,
                                                                                      tmp_path):
    # A database reset while the server runs: run 1 writes its model into the same folder again, and the new
    # version gets the id the loaded one had.
    folder = tmp_path / "runs-1"
    shutil.copytree(rm_dirs[0], folder)
    version = reward_model_register(project=project, path=folder, deploy=True)
    assert _rerank(key_client, project).status_code == 200
    shutil.rmtree(folder)
    shutil.copytree(rm_dirs[1], folder)
    RewardModel.objects.filter(pk=version.pk).update(created_at=version.created_at + timedelta(seconds=1))
    serving.deployments.clear()
    body = _rerank(key_client, project).json()
    assert body["cached"] is False
    assert _scores(body) == {i: pytest.approx(s, abs=1e-5)
                             for i, s in enumerate(_plain_scores(rm_dirs[1], PROMPT, CANDIDATES))}


def test_the_pool_does_not_serve_another_folder_under_a_loaded_id(rm_dirs):
    first = serving.pool.get(reward_model_id=1, artifact_path=str(rm_dirs[0]))
    other = serving.pool.get(reward_model_id=1, artifact_path=str(rm_dirs[1]))
    assert other is not first and other.artifact_path == str(rm_dirs[1])
    assert serving.pool.loaded_ids() == [1]
    assert serving.pool.get(reward_model_id=1, artifact_path=str(rm_dirs[1])) is other


# --- sampling --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_derived_seed_sent_back_gives_the_same_body_and_other_seeds_or_temperatures_other_samples(
        project, policy, deployed, key_client):
    derived = _generate(key_client, project, policy).json()
    assert _stable(_generate(key_client, project, policy).json()) == _stable(derived)
    cache.clear()
    generation.pool.clear()
    serving.pool.clear()
    assert _stable(_generate(key_client, project, policy, seed=derived["seed"]).json()) == _stable(derived)
    seeded = _texts(_generate(key_client, project, policy, seed=11).json())
    assert seeded != _texts(derived)
    assert _texts(_generate(key_client, project, policy, seed=11, temperature=0.5).json()) != seeded


@pytest.mark.django_db
def test_greedy_decoding_ignores_seed_and_sampling_settings(project, policy, key_client):
    bodies = [_generate(key_client, project, policy, temperature=0, rerank=False, **change).json()
              for change in ({}, {"seed": 5}, {"seed": 6, "top_k": 3, "top_p": 0.5})]
    assert all(_stable(body) == _stable(bodies[0]) for body in bodies) and bodies[0]["seed"] is None
    assert len(set(_texts(bodies[0]))) == 1


@pytest.mark.django_db
def test_sampling_edges(project, policy, deployed, key_client):
    vocabulary = len(AutoTokenizer.from_pretrained(policy.artifact_path))
    # top_k 0 turns top-k off: the same samples as keeping the whole vocabulary.
    off = _generate(key_client, project, policy, seed=3, top_k=0, rerank=False).json()
    whole = _generate(key_client, project, policy, seed=3, top_k=vocabulary, rerank=False).json()
    assert _texts(off) == _texts(whole)
    # top_p 1.0 is the default; a tiny top_p keeps only the likeliest token, as greedy decoding does.
    default = _generate(key_client, project, policy, seed=3, rerank=False).json()
    assert _texts(_generate(key_client, project, policy, seed=3, top_p=1.0, rerank=False).json()) == _texts(default)
    greedy = _texts(_generate(key_client, project, policy, temperature=0, n=1, rerank=False).json())[0]
    assert set(_texts(_generate(key_client, project, policy, seed=3, top_p=1e-9, rerank=False).json())) == {greedy}
    one = _generate(key_client, project, policy, seed=3, n=1, max_new_tokens=1, rerank=False).json()
    assert one["tokens_generated"] == 1 and len(one["candidates"]) == 1
    assert one["candidates"][0]["text"] == _texts(default)[0][:len(one["candidates"][0]["text"])]
    # A stop string at position 0 leaves every candidate empty: returned unscored, nothing chosen.
    stopped = _generate(key_client, project, policy, temperature=0, n=2, stop=[greedy[:1]])
    assert stopped.status_code == 200
    assert _texts(stopped.json()) == ["", ""] and stopped.json()["best_index"] is None


# --- who may call it ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_reaches_only_its_own_projects_models_and_policies(project, deployed, policy, rm_dirs, lm_dir):
    other = ProjectFactory()
    foreign_model = reward_model_register(project=other, path=rm_dirs[1], deploy=True)
    foreign_policy = Policy.objects.create(project=other, version=1, kind=Policy.Kind.DPO, artifact_path=str(lm_dir))
    client, _ = _key_client(project)
    assert _rerank(client, other).status_code == 403
    by_id = _rerank(client, project, model=foreign_model.pk)
    assert by_id.status_code == 404 and by_id.json()["error"]["field"] == "model"
    assert _generate(client, other, policy).status_code == 403
    assert _generate(client, project, foreign_policy, rerank=False).status_code == 404
    assert serving.pool.loaded_ids() == [] and generation.pool.loaded_keys() == []


@pytest.mark.django_db
def test_a_revoked_key_or_a_deactivated_owner_stops_at_once_with_the_token_cache_on(project, deployed, settings):
    settings.PREFLAB = {**settings.PREFLAB, "AUTH_CACHE_SECONDS": 60}
    client, token = _key_client(project)
    assert _rerank(client, project).status_code == 200
    assert _rerank(client, project).json()["cached"] is True  # the token is read from the cache now
    api_token_revoke(token=token)
    assert _rerank(client, project).status_code == 401
    client, token = _key_client(project)
    assert _rerank(client, project).status_code == 200
    token.user.is_active = False
    token.user.save()
    assert _rerank(client, project).status_code == 401


@pytest.mark.django_db
def test_a_policy_registered_again_under_a_reused_id_generates_with_its_own_weights(project, key_client, lm_dir,
                                                                                    tmp_path):
    folder = tmp_path / "runs-1-model"
    shutil.copytree(lm_dir, folder)
    row = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, artifact_path=str(folder))
    before = _texts(_generate(key_client, project, row, seed=3, n=2, rerank=False).json())
    shutil.rmtree(folder)
    shutil.copytree(tiny_causal_lm(tmp_path / "other", seed=1), folder)
    Policy.objects.filter(pk=row.pk).update(created_at=row.created_at + timedelta(seconds=1))
    after = _texts(_generate(key_client, project, row, seed=3, n=2, rerank=False).json())
    generation.pool.clear()
    fresh = _texts(_generate(key_client, project, row, seed=3, n=2, rerank=False).json())
    assert fresh != before and after == fresh

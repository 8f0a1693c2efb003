"""Fixtures shared by the rewards tests: a tiny policy and reward model, fresh model pools and caches."""
from __future__ import annotations

import pytest
from django.core.cache import cache

from rewards import generation, serving
from rewards.models import Policy
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return tiny_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture
def deployed(project, rm_dir):
    """A tiny reward model registered and deployed for the project: what reranks, RLHF's reward, DPO's judge."""
    from rewards.services import reward_model_register

    return reward_model_register(project=project, path=rm_dir, deploy=True)


@pytest.fixture
def policy(project, lm_dir):
    return Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, artifact_path=str(lm_dir),
                                 base_model="tiny-llama")


@pytest.fixture
def fresh_model_pools():
    """Empty generation and reward-model pools and cache before and after the test."""
    generation.pool.clear()
    serving.pool.clear()
    cache.clear()
    yield
    generation.pool.clear()
    serving.pool.clear()
    cache.clear()


@pytest.fixture
def import_dir(settings, tmp_path):
    """A folder the API may register models from (PREFLAB_MODEL_IMPORT_DIRS), and artifacts beside it."""
    root = tmp_path / "models"
    root.mkdir()
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [root], "ARTIFACTS_DIR": tmp_path / "artifacts"}
    return root


@pytest.fixture
def key_client(project):
    """An API client with a rerank key of the project."""
    from rest_framework.test import APIClient

    from labeling.models import ApiToken
    from labeling.services import api_token_create
    from tests.factories import UserFactory

    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client

"""Rerank keys: managers list, create and revoke them; the command prints a key once and stores its hash."""
from __future__ import annotations

import io

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from labeling.models import ApiToken
from rewards import serving
from rewards.services import reward_model_register
from tests.conftest import client_for
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.tiny import tiny_reward_model


def _url(project, prefix: str | None = None) -> str:
    base = f"/api/v1/projects/{project.slug}/api-keys/"
    return f"{base}{prefix}/" if prefix else base


def _bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture(autouse=True)
def fresh_state():
    serving.pool.clear()
    cache.clear()
    yield
    serving.pool.clear()


@pytest.mark.django_db
def test_a_manager_creates_lists_and_revokes_rerank_keys(project, manager, tmp_path):
    reward_model_register(project=project, path=tiny_reward_model(tmp_path), deploy=True)
    client = client_for(manager)
    created = client.post(_url(project), {"name": "production"}, format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    key = body["key"]
    assert body["scope"] == "rerank" and body["name"] == "production" and key.startswith(body["prefix"])
    stored = ApiToken.objects.get(prefix=body["prefix"])
    assert stored.project == project and stored.key_hash == ApiToken.hash_key(key) and key not in stored.key_hash

    rerank = {"project": project.slug, "prompt": "hi", "candidates": ["hello", "go away"]}
    assert _bearer(key).post("/api/v1/rerank/", rerank, format="json").status_code == 200

    listed = client.get(_url(project)).json()
    assert [row["prefix"] for row in listed] == [body["prefix"]]
    assert "key" not in listed[0] and key not in str(listed)
    assert listed[0]["last_used_at"] is not None and listed[0]["revoked_at"] is None
    # The manager's own user token is not a project key and is not listed.
    assert all(row["scope"] == "rerank" for row in listed)

    revoked = client.delete(_url(project, body["prefix"]))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert _bearer(key).post("/api/v1/rerank/", rerank, format="json").status_code == 401
    assert client.get(_url(project)).json()[0]["revoked_at"] is not None


@pytest.mark.django_db
def test_only_managers_and_admins_handle_keys(project, labeler, outsider, admin_user):
    assert client_for(labeler).get(_url(project)).status_code == 403
    assert client_for(labeler).post(_url(project), {}, format="json").status_code == 403
    assert client_for(outsider).get(_url(project)).status_code == 404
    assert client_for(outsider).post(_url(project), {}, format="json").status_code == 404
    assert client_for(admin_user).post(_url(project), {}, format="json").status_code == 201
    assert APIClient().get(_url(project)).status_code in (401, 403)


@pytest.mark.django_db
def test_a_rerank_key_cannot_manage_keys_and_unknown_prefixes_are_404(project, manager):
    key = client_for(manager).post(_url(project), {}, format="json").json()["key"]
    assert _bearer(key).get(_url(project)).status_code == 403
    assert _bearer(key).post(_url(project), {}, format="json").status_code == 403
    response = client_for(manager).delete(_url(project, "pfl_nothing"))
    assert response.status_code == 404 and response.json()["error"]["field"] == "prefix"
    # Another project's key cannot be revoked through this project.
    other = ProjectFactory()
    other_token = ApiToken.objects.create(key_hash="0" * 64, prefix="pfl_other", scope="rerank",
                                          user=manager, project=other)
    assert client_for(manager).delete(_url(project, other_token.prefix)).status_code == 404


@pytest.mark.django_db
def test_bad_scope_is_400(project, manager):
    response = client_for(manager).post(_url(project), {"scope": "user"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["field"] == "scope"


@pytest.mark.django_db
def test_create_api_key_command_prints_the_key_once_and_stores_its_hash(project, manager):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", "--project", project.slug, "--scope", "rerank", "--name", "batch",
                 stdout=out, stderr=err)
    key = out.getvalue().strip()
    token = ApiToken.objects.get(key_hash=ApiToken.hash_key(key))
    assert (token.scope, token.project, token.user, token.name) == ("rerank", project, manager, "batch")
    assert token.prefix in err.getvalue()

    other = UserFactory()
    call_command("create_api_key", "--project", project.slug, "--scope", "rerank", "--user", other.username,
                 stdout=io.StringIO(), stderr=io.StringIO())
    assert ApiToken.objects.filter(project=project, user=other, scope="rerank").count() == 1


@pytest.mark.django_db
def test_create_api_key_command_reports_bad_arguments(project):
    with pytest.raises(CommandError, match="does not exist"):
        call_command("create_api_key", "--project", "nope", "--scope", "rerank")
    with pytest.raises(CommandError, match="no manager"):
        call_command("create_api_key", "--project", project.slug, "--scope", "rerank")
    with pytest.raises(CommandError, match="User 'ghost' does not exist"):
        call_command("create_api_key", "--project", project.slug, "--scope", "rerank", "--user", "ghost")
    with pytest.raises(CommandError):
        call_command("create_api_key", "--project", project.slug, "--scope", "user")

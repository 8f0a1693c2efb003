"""Token authentication through the shared cache: hits skip the database, and every change to a token, its
user or its project reaches the next request at once, even one racing with the change."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from labeling import authentication
from labeling.authentication import STALE, api_token_for_key
from labeling.models import ApiToken
from labeling.services import api_token_create, api_token_revoke
from tests.factories import ProjectFactory, UserFactory

PASSWORD = "correct-horse-battery"


@pytest.fixture
def cached_auth(settings):
    settings.PREFLAB = {**settings.PREFLAB, "AUTH_CACHE_SECONDS": 60}
    cache.clear()
    yield
    cache.clear()


def _entry(token: ApiToken):
    return cache.get(authentication.CACHE_PREFIX + token.key_hash)


def _queries(key: str) -> tuple[ApiToken | None, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        token = api_token_for_key(key)
    return token, [query["sql"] for query in captured.captured_queries]


@pytest.mark.django_db
def test_a_second_request_reads_the_token_from_the_cache_without_the_password(cached_auth):
    user = UserFactory()
    project = ProjectFactory()
    token, key = api_token_create(user=user, scope=ApiToken.Scope.RERANK, project=project, name="prod")

    first, sql = _queries(key)
    assert first.pk == token.pk and any("labeling_apitoken" in statement for statement in sql)
    second, sql = _queries(key)
    assert sql == []
    assert (second.pk, second.user.pk, second.user.username, second.project.slug) == (
        token.pk, user.pk, user.username, project.slug)
    assert second.scope == ApiToken.Scope.RERANK and second.user.is_active
    assert "password" not in _entry(token)["user"]


@pytest.mark.django_db
def test_an_entry_from_before_a_migration_puts_each_value_in_its_own_field(cached_auth):
    user = UserFactory(first_name="Ada")
    project = ProjectFactory()
    token, key = api_token_create(user=user, scope=ApiToken.Scope.RERANK, project=project)
    api_token_for_key(key)
    entry = _entry(token)
    # A column the model no longer has, and one the entry never held.
    del entry["user"]["first_name"]
    entry["user"] = {"nickname": "x", **entry["user"]}
    cache.set(authentication.CACHE_PREFIX + token.key_hash, entry, 60)
    cached = api_token_for_key(key)
    assert (cached.user.username, cached.user.email, cached.project.slug) == (user.username, user.email, project.slug)
    assert "first_name" in cached.user.get_deferred_fields() and cached.user.first_name == "Ada"
    assert not hasattr(cached.user, "nickname")


@pytest.mark.django_db
def test_the_cached_user_loads_its_password_on_demand_and_saving_it_keeps_the_password(cached_auth):
    user = UserFactory()
    _, key = api_token_create(user=user)
    api_token_for_key(key)
    cached = api_token_for_key(key).user
    assert "password" in cached.get_deferred_fields()
    cached.first_name = "Ada"
    cached.save()
    user.refresh_from_db()
    assert user.first_name == "Ada" and user.check_password(PASSWORD)
    assert api_token_for_key(key).user.check_password(PASSWORD)


@pytest.mark.django_db
def test_a_revoked_token_is_refused_at_once_and_never_cached_again(cached_auth):
    token, key = api_token_create(user=UserFactory())
    assert api_token_for_key(key) is not None and isinstance(_entry(token), dict)
    api_token_revoke(token=token)
    assert _entry(token) == STALE
    assert api_token_for_key(key) is None
    assert _entry(token) == STALE


@pytest.mark.django_db
def test_a_request_that_read_the_row_before_a_revocation_cannot_cache_it(cached_auth):
    token, key = api_token_create(user=UserFactory())
    # What a request in another process holds: the row as it was before the revocation committed.
    before = ApiToken.objects.select_related("user", "project").get(pk=token.pk)
    api_token_revoke(token=token)
    authentication._cache_add(token.key_hash, before, seconds=60)
    assert _entry(token) == STALE
    assert api_token_for_key(key) is None


@pytest.mark.django_db
def test_deactivating_the_user_refuses_the_token_at_once_and_reactivating_restores_it(cached_auth):
    user = UserFactory()
    _, key = api_token_create(user=user)
    assert api_token_for_key(key) is not None
    user.is_active = False
    user.save()
    assert api_token_for_key(key) is None
    user.is_active = True
    user.save()
    assert api_token_for_key(key).user.is_active


@pytest.mark.django_db
def test_deleting_the_user_refuses_the_token(cached_auth):
    user = UserFactory()
    _, key = api_token_create(user=user)
    assert api_token_for_key(key) is not None
    user.delete()
    assert api_token_for_key(key) is None


@pytest.mark.django_db
def test_a_changed_project_is_seen_by_the_next_request_of_its_key(cached_auth):
    project = ProjectFactory(rerank_sample_rate=0.0)
    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project)
    assert api_token_for_key(key).project.rerank_sample_rate == 0.0
    project.rerank_sample_rate = 0.25
    project.save()
    assert api_token_for_key(key).project.rerank_sample_rate == 0.25


@pytest.mark.django_db
def test_an_entry_expires_when_the_last_use_is_due_for_its_write(cached_auth):
    token, key = api_token_create(user=UserFactory())
    now = timezone.now()
    token.last_used_at = now - timedelta(seconds=50)
    assert authentication._entry_seconds(token, now=now, limit=60) == 10
    assert authentication._entry_seconds(token, now=now, limit=5) == 5
    # A request finds the row's last use over a minute old: it writes the time once, then serves from the cache.
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=now - timedelta(minutes=5))
    _, sql = _queries(key)
    assert sum(statement.lstrip().startswith("UPDATE") for statement in sql) == 1
    token.refresh_from_db()
    assert (timezone.now() - token.last_used_at).total_seconds() < 60
    _, sql = _queries(key)
    assert sql == []


@pytest.mark.django_db
def test_without_a_reachable_cache_the_database_authenticates(cached_auth):
    _, key = api_token_create(user=UserFactory())
    unreachable = {"default": {"BACKEND": "config.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0",
                               "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
    with override_settings(CACHES=unreachable):
        token, sql = _queries(key)
        assert token is not None and any("labeling_apitoken" in statement for statement in sql)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        assert client.get("/api/v1/projects/").status_code == 200
        client.credentials(HTTP_AUTHORIZATION="Bearer pfl_not-a-key")
        assert client.get("/api/v1/projects/").status_code == 401


@pytest.mark.django_db
def test_with_the_cache_off_nothing_is_cached(settings):
    settings.PREFLAB = {**settings.PREFLAB, "AUTH_CACHE_SECONDS": 0}
    cache.clear()
    token, key = api_token_create(user=UserFactory())
    api_token_for_key(key)
    _, sql = _queries(key)
    assert any("labeling_apitoken" in statement for statement in sql)
    assert _entry(token) is None

"""Shared fixtures: API clients per role, projects with members, and database helpers."""
from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from django.db import connection
from rest_framework.test import APIClient

from labeling.models import Membership
from labeling.services import api_token_create
from tests.factories import ProjectFactory, UserFactory


def pytest_collection_modifyitems(config, items):
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL); SQLite has no row locks")
    if connection.vendor != "postgresql":
        for item in items:
            if "postgres" in item.keywords:
                item.add_marker(skip_pg)


@pytest.fixture(autouse=True)
def _fresh_deployment_cache():
    # Rolled-back tests can hand the next test the same project id (SQLite reuses row ids), and a deployed
    # version cached per process for a second must not leak from one test into the next.
    from rewards.serving import deployments

    deployments.clear()
    yield
    deployments.clear()


@pytest.fixture(autouse=True)
def _own_login_counters(monkeypatch):
    # Wrong passwords are counted in the cache for 15 minutes (config.middleware.LoginThrottleMiddleware): each test
    # counts its own, so a test's failed logins never throttle another test, or the same test run again.
    from config import middleware

    monkeypatch.setattr(middleware, "LOGIN_CACHE_PREFIX", f"test-login-{uuid.uuid4().hex}:")


@pytest.fixture
def figure(capsys) -> Callable[[str], None]:
    """Prints a suite's measured figure to the terminal even while pytest captures output, so every run shows it."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}")

    return emit


@pytest.fixture
def fresh_caches():
    """No loaded model pool or cached answer carried into or out of the test."""
    from django.core.cache import cache

    from rewards import generation, serving

    def clear() -> None:
        serving.pool.clear()
        generation.pool.clear()
        cache.clear()

    clear()
    yield
    clear()


@pytest.fixture
def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def client_for(user) -> APIClient:
    client = APIClient()
    _, key = api_token_create(user=user, name="test")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def project(db):
    return ProjectFactory()


@pytest.fixture
def manager(project):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.MANAGER)
    return user


@pytest.fixture
def labeler(project):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    return user


@pytest.fixture
def admin_user(db):
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def outsider(db):
    return UserFactory()

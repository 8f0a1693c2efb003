"""Creating the same project or pair twice at once: the second request is a 409, not a database error (a 500).

Each test holds the first insert open in a transaction of its own, so the request's check before its insert cannot
see it and its insert waits on the unique index: the race, made deterministic."""
from __future__ import annotations

import threading

import psycopg
import pytest
from django.db import close_old_connections, connection
from rest_framework.test import APIClient

from labeling.models import Pair, Project
from labeling.services import api_token_create
from tests.factories import ProjectFactory, UserFactory

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _other_connection() -> psycopg.Connection:
    settings = connection.settings_dict
    return psycopg.connect(host=settings["HOST"], port=settings["PORT"] or 5432, user=settings["USER"],
                           password=settings["PASSWORD"] or None, dbname=settings["NAME"])


def _request_while_held(insert: str, params: tuple, request) -> object:
    """Open a transaction that inserts the row, send `request` from a thread while it is open (the request waits on
    the unique index), then commit it; returns the request's response."""
    result: list = []

    def send() -> None:
        close_old_connections()
        try:
            result.append(request())
        except Exception as exc:  # the test asserts on it
            result.append(exc)
        finally:
            connection.close()

    with _other_connection() as other:
        other.execute(insert, params)
        thread = threading.Thread(target=send)
        thread.start()
        thread.join(timeout=3)
        assert thread.is_alive(), f"the request did not wait for the open insert: {result}"
        other.commit()
        thread.join(timeout=60)
    assert not thread.is_alive() and len(result) == 1
    return result[0]


def _client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=user, name='t')[1]}")
    return client


def test_a_project_created_at_the_same_moment_by_another_request_is_a_409_naming_the_slug():
    admin = UserFactory(is_staff=True, is_superuser=True)
    client = _client(admin)
    columns = ("name, slug, guidelines, labels_per_pair, allow_tie, allow_both_bad, strength_scale, gold_rate, "
               "rerank_sample_rate, rerank_sample_margin, created_at")
    response = _request_while_held(
        f"INSERT INTO {Project._meta.db_table} ({columns}) "
        "VALUES (%s, %s, '', 1, true, true, 'none', 0, 0, 0.5, now())",
        ("First", "race"),
        lambda: client.post("/api/v1/projects/create/", {"name": "Second", "slug": "race"}, format="json"))
    assert response.status_code == 409, response.content
    assert response.json()["error"]["field"] == "slug"
    assert list(Project.objects.values_list("name", flat=True)) == ["First"]


def test_a_pair_created_at_the_same_moment_by_another_request_is_a_409():
    project = ProjectFactory()
    manager = UserFactory()
    project.memberships.create(user=manager, role="manager")
    client = _client(manager)
    body = {"prompt": "Which is kinder?", "response_a": "Thank you.", "response_b": "Go away."}
    # The prompt and responses exist (as an earlier pair of them would leave them); the pair row is what races.
    first = client.post(f"/api/v1/projects/{project.slug}/pairs/", body, format="json")
    assert first.status_code == 201, first.content
    pair = Pair.objects.get()
    pair_fields = (pair.prompt_id, pair.response_a_id, pair.response_b_id)
    Pair.objects.all().delete()
    columns = "project_id, prompt_id, response_a_id, response_b_id, priority, label_count, status, source, created_at"
    response = _request_while_held(
        f"INSERT INTO {Pair._meta.db_table} ({columns}) VALUES (%s, %s, %s, %s, 0, 0, 'open', 'manual', now())",
        (project.pk, *pair_fields),
        lambda: client.post(f"/api/v1/projects/{project.slug}/pairs/", body, format="json"))
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "duplicate"
    assert Pair.objects.count() == 1

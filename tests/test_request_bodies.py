"""Every request body of the API is strict: a field an operation does not take is a 400 naming it (a misspelt
setting is never dropped silently), and the OpenAPI schema says so with additionalProperties false."""
from __future__ import annotations

import pytest
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from labeling.models import ApiToken, Comparison, Membership, Pair, Project
from labeling.services import api_token_create
from rewards.models import RewardModel, TrainingRun
from tests.conftest import client_for
from tests.factories import PairFactory

KEYED = ("/api/v1/rerank/", "/api/v1/generate/")


def _body_operations() -> list[tuple[str, str, str, dict]]:
    """(method, path, content type, body schema) of every operation of the schema that takes a request body."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    found = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody")
            if body is None:
                continue
            content_type, media = next(iter(body["content"].items()))
            reference = media["schema"].get("$ref", "")
            found.append((method, path, content_type,
                          components[reference.rsplit("/", 1)[-1]] if reference else media["schema"]))
    return found


def test_every_request_body_of_the_schema_takes_no_other_fields():
    operations = _body_operations()
    paths = {path for _, path, _, _ in operations}
    assert {"/api/v1/comparisons/", "/api/v1/training-runs/", "/api/v1/rerank/",
            "/api/v1/projects/{slug}/import/"} <= paths
    assert [(method, path) for method, path, _, body in operations if body.get("additionalProperties") is not False] \
        == []


@pytest.mark.django_db
def test_a_field_an_operation_does_not_take_is_a_400_naming_it_and_changes_nothing(project, admin_user):
    PairFactory(project=project)
    _, key = api_token_create(user=admin_user, scope=ApiToken.Scope.RERANK, project=project, name="prod")
    keyed = APIClient()
    keyed.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    staff = client_for(admin_user)
    tables = (Project, Pair, Comparison, Membership, ApiToken, TrainingRun, RewardModel)
    before = [model.objects.count() for model in tables]
    operations = _body_operations()
    for method, path, content_type, _ in operations:
        client = keyed if path in KEYED else staff
        url = path.replace("{slug}", project.slug)
        if content_type == "multipart/form-data":
            response = client.post(url, {"format": "hh", "unexpected_field": "1"}, format="multipart")
        else:
            response = getattr(client, method)(url, {"unexpected_field": 1}, format="json")
        assert response.status_code == 400, (method, path, response.content)
        error = response.json()["error"]
        assert error["field"] == "unexpected_field", (method, path, error)
        assert error["message"].startswith("unexpected_field: Unknown field"), (method, path, error)
    assert [model.objects.count() for model in tables] == before
    assert len(operations) >= 13

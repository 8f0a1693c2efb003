"""Django admin pages of the labeling tables load for staff with their lists and filters."""
from __future__ import annotations

import pytest

from labeling.models import Comparison
from labeling.services import api_token_create, pair_next_for_labeler
from tests.factories import PairFactory


@pytest.mark.django_db
@pytest.mark.parametrize("model", ["project", "membership", "prompt", "response", "pair", "comparison", "lease",
                                   "apitoken"])
def test_admin_changelists_load_for_staff(client, admin_user, project, labeler, model):
    pair = PairFactory(project=project)
    Comparison.objects.create(pair=pair, project=project, labeler=labeler, choice="a")
    PairFactory(project=project)
    pair_next_for_labeler(project=project, labeler=labeler)
    api_token_create(user=admin_user, name="ops")
    client.force_login(admin_user)
    response = client.get(f"/admin/labeling/{model}/")
    assert response.status_code == 200
    # The result table is only drawn when the list has rows.
    assert b'id="result_list"' in response.content


@pytest.mark.django_db
def test_admin_is_closed_to_labelers(client, labeler):
    client.force_login(labeler)
    response = client.get("/admin/labeling/pair/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]

"""Query parameters of the run and registry lists: every one is checked, none is dropped silently."""
from __future__ import annotations

import pytest

from tests.conftest import client_for
from tests.rewards.factories import TrainingRunFactory

URL = "/api/v1/training-runs/"


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "field"), [
    ({"offset": "99999999999999999999999"}, "offset"),
    ({"limit": "99999999999999999999999"}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"limit": "0"}, "limit"),
    ({"limit": "-5"}, "limit"),
    ({"limit": "100000"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"offset": "x"}, "offset"),
])
def test_a_bad_limit_or_offset_is_a_400_naming_it(project, manager, params, field):
    TrainingRunFactory(project=project)
    response = client_for(manager).get(URL, params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == field


@pytest.mark.django_db
@pytest.mark.parametrize(("params", "field"), [
    ({"stauts": "failed"}, "stauts"),
    ({"project_slug": "x"}, "project_slug"),
    ({"status": ""}, "status"),
    ({"kind": ""}, "kind"),
    ({"project": ""}, "project"),
    ({"status": ["queued", "failed"]}, "status"),
])
def test_a_misspelt_blank_or_repeated_filter_is_a_400_not_the_whole_list(project, manager, params, field):
    TrainingRunFactory(project=project)
    response = client_for(manager).get(URL, params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == field


@pytest.mark.django_db
def test_the_largest_page_and_offset_are_answered(project, manager):
    runs = [TrainingRunFactory(project=project) for _ in range(3)]
    client = client_for(manager)
    page = client.get(URL, {"project": project.slug, "limit": 200, "offset": 1})
    assert page.status_code == 200 and [r["id"] for r in page.json()["results"]] == [runs[1].pk, runs[0].pk]
    far = client.get(URL, {"limit": 1, "offset": 2**63 - 1})
    assert far.status_code == 200 and far.json()["results"] == [] and far.json()["count"] == 3


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/v1/reward-models/", "/api/v1/policies/"])
def test_registry_lists_refuse_a_filter_they_do_not_take(project, manager, url):
    response = client_for(manager).get(url, {"project": project.slug, "deployed": "true"})
    assert response.status_code == 400 and response.json()["error"]["field"] == "deployed"
    assert client_for(manager).get(url, {"project": project.slug}).status_code == 200


@pytest.mark.django_db
def test_runs_are_read_without_their_snapshot_id_lists_and_still_count_comparisons(project, manager):
    """A run's snapshot keeps every comparison and pair id (a hundred thousand each on a large project): a page of
    50 runs, which the training page polls every 2 s, read them all to show one count."""
    from rewards import selectors

    run = TrainingRunFactory(project=project, comparison_ids=[5, 6, 7], train_pair_ids=[1, 2], eval_pair_ids=[3])
    listed = list(selectors.training_run_list_for_user(user=manager, project_slug=project.slug))
    one = selectors.training_run_get_for_user(run_id=run.pk, user=manager)
    for loaded in (listed[0], one):
        assert {"comparison_ids", "train_pair_ids", "eval_pair_ids"} <= loaded.get_deferred_fields()
    client = client_for(manager)
    assert client.get(URL).json()["results"][0]["dataset"]["comparisons"] == 3
    assert client.get(f"{URL}{run.pk}/").json()["dataset"]["comparisons"] == 3
    assert client.post(f"{URL}{run.pk}/cancel/").json()["dataset"]["comparisons"] == 3


@pytest.mark.django_db
def test_registry_lists_name_the_training_run_without_reading_it(project, manager):
    """The registry lists show a version's run by id only: joining the run in read its snapshot id lists too, for
    every version of the project, on every training page and registry list."""
    from rewards import selectors
    from rewards.models import Policy
    from tests.rewards.factories import RewardModelFactory

    run = TrainingRunFactory(project=project, comparison_ids=list(range(1000)))
    policy_run = TrainingRunFactory(project=project, kind="dpo")
    RewardModelFactory(project=project, training_run=run)
    Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, training_run=policy_run,
                          artifact_path="/nonexistent/policy")
    for entry in [*selectors.reward_model_list(project=project), *selectors.policy_list(project=project)]:
        assert not entry._state.fields_cache
    client = client_for(manager)
    assert client.get("/api/v1/reward-models/", {"project": project.slug}).json()[0]["training_run"] == run.pk
    assert client.get("/api/v1/policies/", {"project": project.slug}).json()[0]["training_run"] == policy_run.pk


@pytest.mark.django_db
def test_drf_format_parameter_still_picks_the_renderer(project, manager):
    TrainingRunFactory(project=project)
    response = client_for(manager).get(URL, {"project": project.slug, "format": "json"})
    assert response.status_code == 200 and response.json()["count"] == 1

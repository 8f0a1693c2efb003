"""API of projects, members, pairs and tokens: status codes, bodies and permissions per role."""
from __future__ import annotations

import json

import pytest
from django import forms
from rest_framework import serializers
from rest_framework.test import APIClient

from labeling.models import ApiToken, Comparison, Lease, Membership, Pair, Project
from tests.conftest import client_for
from tests.factories import PairFactory, UserFactory


@pytest.mark.django_db
def test_token_from_password_works_once_shown_and_is_stored_hashed(labeler):
    anonymous = APIClient()
    response = anonymous.post("/api/v1/auth/token/", {"username": labeler.username,
                                                      "password": "correct-horse-battery"}, format="json")
    assert response.status_code == 201
    key = response.json()["token"]
    assert not ApiToken.objects.filter(key_hash=key).exists()
    assert ApiToken.objects.filter(key_hash=ApiToken.hash_key(key), user=labeler).exists()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/projects/").status_code == 200
    prefix = response.json()["prefix"]
    assert client.delete(f"/api/v1/auth/tokens/{prefix}/").status_code == 204
    revoked = client.get("/api/v1/projects/")
    assert revoked.status_code == 401
    assert revoked.json()["error"]["code"] == "authentication_failed"


@pytest.mark.django_db
def test_wrong_password_is_a_401_naming_the_field(labeler):
    response = APIClient().post("/api/v1/auth/token/", {"username": labeler.username, "password": "nope"},
                                format="json")
    assert response.status_code == 401
    assert response.json()["error"]["field"] == "password"


@pytest.mark.django_db
def test_anonymous_requests_are_refused_with_json(project):
    response = APIClient().get("/api/v1/projects/")
    assert response.status_code == 401
    assert response.json()["error"]["message"]


@pytest.mark.django_db
def test_labelers_see_only_their_projects_admins_see_all(project, labeler, admin_user):
    other = Project.objects.create(name="Other", slug="other")
    mine = client_for(labeler).get("/api/v1/projects/").json()
    assert [p["slug"] for p in mine] == [project.slug]
    everything = client_for(admin_user).get("/api/v1/projects/").json()
    assert {p["slug"] for p in everything} == {project.slug, other.slug}
    assert client_for(labeler).get("/api/v1/projects/other/").status_code == 404


@pytest.mark.django_db
def test_only_admins_create_projects_and_the_creator_manages_it(labeler, admin_user):
    body = {"name": "Helpfulness", "slug": "helpful", "labels_per_pair": 3, "gold_rate": 0.1}
    assert client_for(labeler).post("/api/v1/projects/create/", body, format="json").status_code == 403
    response = client_for(admin_user).post("/api/v1/projects/create/", body, format="json")
    assert response.status_code == 201
    assert response.json()["labels_per_pair"] == 3
    assert Membership.objects.get(project__slug="helpful").user == admin_user
    again = client_for(admin_user).post("/api/v1/projects/create/", body, format="json")
    assert again.status_code == 409 and again.json()["error"]["field"] == "slug"
    bad = client_for(admin_user).post("/api/v1/projects/create/", {**body, "slug": "x2", "gold_rate": 2},
                                      format="json")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "gold_rate"


@pytest.mark.django_db
def test_managers_update_settings_and_overlap_changes_reopen_pairs(project, manager, labeler):
    pair = PairFactory(project=project, label_count=1, status=Pair.Status.COMPLETE)
    url = f"/api/v1/projects/{project.slug}/"
    assert client_for(labeler).patch(url, {"labels_per_pair": 2}, format="json").status_code == 403
    response = client_for(manager).patch(url, {"labels_per_pair": 2, "guidelines": "Prefer honest answers."},
                                         format="json")
    assert response.status_code == 200
    assert response.json()["guidelines"] == "Prefer honest answers."
    pair.refresh_from_db()
    assert pair.status == Pair.Status.OPEN


@pytest.mark.django_db
def test_managers_manage_members(project, manager, labeler):
    newcomer = UserFactory()
    client = client_for(manager)
    url = f"/api/v1/projects/{project.slug}/members/"
    assert client_for(labeler).get(url).status_code == 403
    response = client.post(f"{url}set/", {"username": newcomer.username, "role": "labeler"}, format="json")
    assert response.status_code == 200
    assert {m["username"] for m in client.get(url).json()} == {manager.username, labeler.username,
                                                                 newcomer.username}
    missing = client.post(f"{url}set/", {"username": "nobody", "role": "labeler"}, format="json")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "username"
    assert client.delete(f"{url}{newcomer.username}/").status_code == 204
    assert not Membership.objects.filter(user=newcomer).exists()
    again = client.delete(f"{url}{newcomer.username}/")
    assert again.status_code == 404 and again.json()["error"]["field"] == "username"
    # A removed member loses access at once.
    assert client_for(newcomer).get(f"/api/v1/projects/{project.slug}/next/").status_code == 404


@pytest.mark.django_db
def test_the_last_manager_can_be_neither_demoted_nor_removed(project, manager, labeler):
    client = client_for(manager)
    url = f"/api/v1/projects/{project.slug}/members/"
    demoted = client.post(f"{url}set/", {"username": manager.username, "role": "labeler"}, format="json")
    assert demoted.status_code == 409 and demoted.json()["error"]["field"] == "role"
    assert demoted.json()["error"]["code"] == "last_manager"
    removed = client.delete(f"{url}{manager.username}/")
    assert removed.status_code == 409 and removed.json()["error"]["field"] == "username"
    assert Membership.objects.get(project=project, user=manager).role == Membership.Role.MANAGER
    # With a second manager, either may step down; labelers are removed as before.
    assert client.post(f"{url}set/", {"username": labeler.username, "role": "manager"},
                       format="json").status_code == 200
    assert client.post(f"{url}set/", {"username": manager.username, "role": "labeler"},
                       format="json").status_code == 200
    assert client_for(labeler).delete(f"{url}{manager.username}/").status_code == 204
    assert client_for(labeler).delete(f"{url}{labeler.username}/").status_code == 409
    assert list(Membership.objects.filter(project=project).values_list("user__username", "role")) == [
        (labeler.username, Membership.Role.MANAGER)]


@pytest.mark.django_db
def test_managers_add_pairs_with_chat_prompts_and_bad_pairs_are_refused(project, manager, labeler):
    url = f"/api/v1/projects/{project.slug}/pairs/"
    body = {"prompt": [{"role": "user", "content": "Hi"}], "response_a": "Hello!", "response_b": "Go away."}
    assert client_for(labeler).post(url, body, format="json").status_code == 403
    response = client_for(manager).post(url, body, format="json")
    assert response.status_code == 201
    assert response.json()["prompt"] == body["prompt"]
    same = client_for(manager).post(url, {**body, "response_a": "Go away.", "response_b": "Hello!"}, format="json")
    assert same.status_code == 409
    identical = client_for(manager).post(url, {**body, "response_b": "Hello!"}, format="json")
    assert identical.status_code == 400 and identical.json()["error"]["field"] == "response_b"
    broken = client_for(manager).post(url, {**body, "prompt": [{"role": "user"}]}, format="json")
    assert broken.status_code == 400 and broken.json()["error"]["field"] == "prompt[0]"
    assert Pair.objects.filter(project=project).count() == 1


@pytest.mark.django_db
def test_skip_over_http_releases_and_moves_on(project, labeler):
    first = PairFactory(project=project, priority=2)
    second = PairFactory(project=project, priority=1)
    client = client_for(labeler)
    assert client.get(f"/api/v1/projects/{project.slug}/next/").json()["pair"] == first.pk
    assert client.post(f"/api/v1/projects/{project.slug}/skip/", {"pair": first.pk}, format="json").status_code == 204
    assert client.get(f"/api/v1/projects/{project.slug}/next/").json()["pair"] == second.pk
    again = client.post(f"/api/v1/projects/{project.slug}/skip/", {"pair": first.pk}, format="json")
    assert again.status_code == 404 and again.json()["error"]["field"] == "pair"


@pytest.mark.django_db
def test_submit_with_next_labels_a_project_in_one_request_per_pair(project, labeler):
    pairs = [PairFactory(project=project, priority=priority) for priority in (3, 2, 1)]
    client = client_for(labeler)
    shown = client.get(f"/api/v1/projects/{project.slug}/next/").json()
    assert shown["pair"] == pairs[0].pk
    plain = client.post("/api/v1/comparisons/", {"pair": pairs[0].pk, "choice": "left"}, format="json")
    assert plain.status_code == 201 and "next" not in plain.json()
    shown = client.get(f"/api/v1/projects/{project.slug}/next/").json()
    assert shown["pair"] == pairs[1].pk
    for current, following in ((pairs[1], pairs[2]), (pairs[2], None)):
        response = client.post("/api/v1/comparisons/", {"pair": current.pk, "choice": "right", "next": True},
                               format="json")
        assert response.status_code == 201
        body = response.json()
        assert body["pair"] == current.pk and body["shown_choice"] == "right"
        if following is None:
            assert body["next"] is None
            continue
        # The pair in `next` is leased, and shown as the next-pair endpoint shows it (which renews the lease).
        assert body["next"]["pair"] == following.pk
        assert Lease.objects.filter(pair=following, labeler=labeler, skipped=False).count() == 1
        again = client.get(f"/api/v1/projects/{project.slug}/next/").json()
        assert again.pop("expires_at") >= body["next"].pop("expires_at")
        assert again == body["next"] and set(again) == {"pair", "prompt", "left", "right"}
    assert Comparison.objects.filter(labeler=labeler).count() == 3
    assert not Lease.objects.filter(labeler=labeler).exists()


@pytest.mark.django_db
def test_submit_with_next_repeated_returns_the_same_next_and_refused_leases_nothing(project, labeler):
    first, second, third = (PairFactory(project=project, priority=priority) for priority in (3, 2, 1))
    client = client_for(labeler)
    client.get(f"/api/v1/projects/{project.slug}/next/")
    answer = {"pair": first.pk, "choice": "tie", "next": True}
    created = client.post("/api/v1/comparisons/", answer, format="json")
    assert created.status_code == 201 and created.json()["next"]["pair"] == second.pk
    # The client lost the response and sends it again: the stored answer and the pair it already holds.
    repeated = client.post("/api/v1/comparisons/", answer, format="json")
    assert repeated.status_code == 200
    assert repeated.json()["id"] == created.json()["id"]
    assert repeated.json()["next"]["pair"] == second.pk
    assert repeated.json()["next"]["left"] == created.json()["next"]["left"]
    leases = list(Lease.objects.filter(labeler=labeler).values_list("pair_id", flat=True))
    assert leases == [second.pk]
    changed = client.post("/api/v1/comparisons/", {**answer, "choice": "left"}, format="json")
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "already_labeled"
    not_leased = client.post("/api/v1/comparisons/", {"pair": third.pk, "choice": "left", "next": True},
                             format="json")
    assert not_leased.status_code == 409 and not_leased.json()["error"]["code"] == "not_leased"
    bad = client.post("/api/v1/comparisons/", {"pair": second.pk, "choice": "left", "next": "soon"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "next"
    assert list(Lease.objects.filter(labeler=labeler).values_list("pair_id", flat=True)) == leases
    assert Comparison.objects.filter(labeler=labeler).count() == 1


@pytest.mark.django_db
def test_submit_for_another_projects_pair_is_hidden(project, labeler):
    other = Project.objects.create(name="Other", slug="other")
    foreign = PairFactory(project=other)
    response = client_for(labeler).post("/api/v1/comparisons/", {"pair": foreign.pk, "choice": "left"},
                                        format="json")
    assert response.status_code == 404
    assert not foreign.comparisons.exists()


@pytest.mark.django_db
def test_schema_and_docs_are_served_without_a_cdn(client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/v1/comparisons/" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"cdn" not in docs.content.lower()



@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
@pytest.mark.parametrize("path", ["/api/v1/nothing/", "/api/v1/nothing/here/42/", "/api/", "/api/v1/projects/a/b/c/"])
def test_an_api_url_no_route_matches_is_a_json_404_whatever_debug_says(client, settings, debug, path):
    settings.DEBUG = debug
    response = client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": {"code": "not_found", "message": "Not found.", "field": None}}


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_outside_the_api_no_route_is_djangos_page_and_a_missing_slash_still_redirects(client, settings, debug):
    settings.DEBUG = debug
    page = client.get("/nothing/here/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
    # CommonMiddleware's APPEND_SLASH still finds the route with the slash added.
    redirect = client.get("/api/v1/projects")
    assert redirect.status_code == 301 and redirect["Location"] == "/api/v1/projects/"
    schema = client.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/v1/projects/" in schema.content
    assert client.get("/api/docs/").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_an_api_request_with_a_body_to_a_path_missing_its_slash_is_a_json_404_naming_the_path(
        client, settings, debug, method):
    # A redirect would lose the body (clients resend a 301 as a GET), and under DEBUG Django raised instead: a 500.
    settings.DEBUG = debug
    response = getattr(client, method)("/api/v1/auth/token", {"username": "u", "password": "p"},
                                       content_type="application/json")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json()["error"] == {"code": "not_found", "field": None,
                                        "message": "Not found. API paths end in a slash: /api/v1/auth/token/"}
    # Reads still follow the redirect; a path that is wrong with the slash too says only "Not found."
    assert client.get("/api/v1/projects").status_code == 301
    assert client.post("/api/v1/nothing", {}, content_type="application/json").json()["error"]["message"] == (
        "Not found.")


# Larger than any id PostgreSQL's bigint or SQLite's INTEGER can hold: the database would refuse the query.
HUGE_ID = 99999999999999999999999


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/comparisons/", {"pair": HUGE_ID, "choice": "left"}),
    ("/api/v1/projects/{slug}/skip/", {"pair": HUGE_ID}),
    ("/api/v1/comparisons/", {"pair": 2**63, "choice": "left"}),
], ids=["submit", "skip", "submit-just-past-bigint"])
def test_an_id_too_large_for_the_database_is_a_400_naming_the_field(project, labeler, path, body):
    response = client_for(labeler).post(path.format(slug=project.slug), body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid", "pair")
    assert error["message"] == f"pair: Ensure this value is less than or equal to {2**63 - 1}."
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_the_largest_id_the_database_holds_is_looked_up_and_not_found(project, labeler):
    client = client_for(labeler)
    submit = client.post("/api/v1/comparisons/", {"pair": 2**63 - 1, "choice": "left"}, format="json")
    assert submit.status_code == 404 and submit.json()["error"]["field"] == "pair"
    skip = client.post(f"/api/v1/projects/{project.slug}/skip/", {"pair": 2**63 - 1}, format="json")
    assert skip.status_code == 404 and skip.json()["error"]["field"] == "pair"


def _input_integer_fields(module) -> list[tuple[str, object]]:
    """(class.field, field) of every integer field a request fills in the module: the nested input serializers
    and forms of its views, and its module-level forms."""
    found = []
    for owner in vars(module).values():
        if not isinstance(owner, type) or owner.__module__ != module.__name__:
            continue
        inputs = [getattr(owner, name) for name in ("InputSerializer", "UpdateSerializer", "InputForm")
                  if hasattr(owner, name)]
        if issubclass(owner, forms.Form):
            inputs.append(owner)
        for cls in inputs:
            fields = cls.base_fields if issubclass(cls, forms.Form) else cls().fields
            found += [(f"{cls.__qualname__}.{name}", field) for name, field in fields.items()
                      if isinstance(field, (serializers.IntegerField, forms.IntegerField))]
    return found


def test_every_integer_input_of_the_labeling_views_has_an_upper_bound():
    from labeling import apis, apis_io, apis_stats, dashboard_views, views

    fields = [found for module in (apis, apis_io, apis_stats, views, dashboard_views)
              for found in _input_integer_fields(module)]
    assert "ComparisonSubmitApi.InputSerializer.pair" in {name for name, _ in fields}
    assert "LabelSkipView.InputForm.pair" in {name for name, _ in fields}
    unbounded = [name for name, field in fields if field.max_value is None]
    assert unbounded == []


@pytest.mark.django_db
@pytest.mark.parametrize(("prompt", "field"), [
    ("Hi\u0000there", "prompt"),
    ("Hi \ud800", "prompt"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\u0000"}], "prompt[1].content"),
    ([{"role": "us\ud83d", "content": "Hi"}], "prompt[0].role"),
    # The importer's rules for a message, so that an exported pair imports back as it was.
    ([{"role": "user", "content": "Hi"}, {"role": "", "content": "Hello"}], "prompt[1].role"),
    ([{"role": "user", "content": "Hi", "name": "ann", "id": 3}], "prompt[0].id"),
], ids=["nul", "surrogate", "nul-in-message", "surrogate-in-role", "empty-role", "other-keys"])
def test_a_prompt_the_database_cannot_store_is_a_400_naming_the_field(project, manager, prompt, field):
    # json.dumps escapes a lone surrogate as "\ud800", as a client's JSON body carries it.
    body = json.dumps({"prompt": prompt, "response_a": "One.", "response_b": "Two."})
    response = client_for(manager).post(f"/api/v1/projects/{project.slug}/pairs/", body,
                                        content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == field
    assert not Pair.objects.exists()


@pytest.mark.django_db
def test_a_nul_in_a_username_or_token_prefix_of_the_path_is_a_404_naming_the_field(project, manager, labeler):
    client = client_for(manager)
    member = client.delete(f"/api/v1/projects/{project.slug}/members/{labeler.username}%00/")
    assert member.status_code == 404 and member.json()["error"]["field"] == "username"
    token = client.delete("/api/v1/auth/tokens/pfl_%00/")
    assert token.status_code == 404 and token.json()["error"]["field"] == "prefix"
    assert Membership.objects.filter(project=project, user=labeler).exists()

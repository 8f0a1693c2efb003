"""Dashboard forms for projects: an admin creates one from the overview, its managers change its settings on its
page; who may, what is stored, and how refused input comes back."""
from __future__ import annotations

import re

import pytest
from django.test import Client

from labeling import services
from labeling.models import Comparison, Membership, Pair, Project
from tests.factories import PairFactory, ProjectFactory

CREATE = {
    "name": "Helpful answers", "slug": "helpful-answers", "labels_per_pair": "3", "allow_tie": "on",
    "strength_scale": "1-3", "gold_rate": "0.1", "guidelines": "Prefer **honest** answers.",
}
CREATE_FIELDS = ("name", "slug", "labels_per_pair", "allow_tie", "allow_both_bad", "strength_scale", "gold_rate",
                 "guidelines")
SETTINGS_FIELDS = ("name", "labels_per_pair", "allow_tie", "allow_both_bad", "strength_scale", "gold_rate")


def _client(user=None, **kwargs) -> Client:
    client = Client(**kwargs)
    if user is not None:
        client.force_login(user)
    return client


def _field_error(page: str, form: str, field: str) -> str | None:
    """The error shown next to a field of a form ("new-project" or "settings"), or None."""
    found = re.search(rf'<p class="field-error" id="{form}-{field}_error">(.*?)</p>', page, re.S)
    return found.group(1) if found else None


def _input(page: str, form: str, field: str) -> str:
    """The HTML tag of a field's input, select or textarea."""
    return re.search(rf'<(?:input|select|textarea)\b[^>]*\bid="{form}-{field}"[^>]*>', page).group(0)


def _shown(project: Project) -> dict[str, str]:
    """What the settings form posts when sent as shown: each value, and beside it the value it was shown with."""
    data = {"name": project.name, "labels_per_pair": str(project.labels_per_pair),
            "strength_scale": project.strength_scale, "gold_rate": str(project.gold_rate)}
    data.update({name: "on" for name in ("allow_tie", "allow_both_bad") if getattr(project, name)})
    data.update({f"initial-{name}": str(getattr(project, name)) for name in SETTINGS_FIELDS})
    return data


def _settings(project: Project) -> dict:
    project.refresh_from_db()
    return {name: getattr(project, name) for name in SETTINGS_FIELDS}


def _label(pair: Pair, labeler, choice: str) -> Comparison:
    comparison = Comparison.objects.create(pair=pair, project=pair.project, labeler=labeler, choice=choice,
                                           swapped=False, time_ms=4000)
    pair.label_count += 1
    if pair.label_count >= pair.project.labels_per_pair:
        pair.status = Pair.Status.COMPLETE
    pair.save(update_fields=["label_count", "status"])
    return comparison


# --- creating a project: who may ------------------------------------------------------------------------


@pytest.mark.django_db
def test_only_admins_see_the_new_project_form_and_each_label_names_its_input(project, manager, admin_user):
    page = _client(manager).get("/dashboard/").content.decode()
    assert 'id="new-project"' not in page and "Create project" not in page
    response = _client(admin_user).get("/dashboard/")
    page = response.content.decode()
    assert response.status_code == 200 and 'href="#new-project"' in page and "Create project" in page
    for field in CREATE_FIELDS:
        assert f'<label for="new-project-{field}">' in page, field
        assert _input(page, "new-project", field)
    # The defaults of a new project (services.project_create's) are filled in.
    assert 'value="1"' in _input(page, "new-project", "labels_per_pair")
    assert "checked" in _input(page, "new-project", "allow_tie")
    assert "checked" in _input(page, "new-project", "allow_both_bad")


@pytest.mark.django_db
def test_an_admin_without_projects_still_gets_the_overview_with_the_form(admin_user):
    page = _client(admin_user).get("/dashboard/").content.decode()
    assert "There are no projects yet." in page and "Create project" in page


@pytest.mark.django_db
def test_no_one_but_an_admin_creates_a_project(project, manager, labeler, outsider):
    before = Project.objects.count()
    response = _client().post("/dashboard/", CREATE)
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")
    for user in (labeler, manager, outsider):
        assert _client(user).post("/dashboard/", CREATE).status_code == 403, user
    assert Project.objects.count() == before
    assert not Project.objects.filter(slug=CREATE["slug"]).exists()


@pytest.mark.django_db
def test_creating_a_project_needs_the_csrf_token(admin_user):
    client = _client(admin_user, enforce_csrf_checks=True)
    assert client.post("/dashboard/", CREATE).status_code == 403
    assert not Project.objects.filter(slug=CREATE["slug"]).exists()
    page = client.get("/dashboard/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    assert client.post("/dashboard/", {**CREATE, "csrfmiddlewaretoken": token}).status_code == 302
    assert Project.objects.filter(slug=CREATE["slug"]).exists()


# --- creating a project: what is stored -----------------------------------------------------------------


@pytest.mark.django_db
def test_an_admin_creates_a_project_and_lands_on_its_page_as_its_manager(admin_user):
    client = _client(admin_user)
    response = client.post("/dashboard/", CREATE)
    assert response.status_code == 302 and response.url == "/dashboard/helpful-answers/"
    project = Project.objects.get(slug="helpful-answers")
    assert project.name == "Helpful answers" and project.labels_per_pair == 3
    assert project.allow_tie and not project.allow_both_bad  # an unticked box is off
    assert project.strength_scale == "1-3" and project.gold_rate == 0.1
    assert project.guidelines == "Prefer **honest** answers."
    assert Membership.objects.get(project=project, user=admin_user).role == Membership.Role.MANAGER
    page = client.get(response.url).content.decode()
    assert "The project Helpful answers was created; you are its manager." in page


@pytest.mark.django_db
def test_a_blank_slug_is_made_from_the_name(admin_user):
    response = _client(admin_user).post("/dashboard/", {**CREATE, "name": "Helpful & Harmless: v2", "slug": ""})
    assert response.status_code == 302 and response.url == "/dashboard/helpful-harmless-v2/"
    long_name = ("word " * 40).strip()  # 199 characters: its slug is cut to the column's 100
    response = _client(admin_user).post("/dashboard/", {**CREATE, "name": long_name, "slug": ""})
    slug = response.url.split("/")[2]
    assert len(slug) <= 100 and not slug.endswith("-") and Project.objects.filter(slug=slug).exists()


@pytest.mark.django_db
def test_guidelines_typed_with_crlf_line_breaks_are_stored_with_line_feeds(admin_user):
    _client(admin_user).post("/dashboard/", {**CREATE, "guidelines": "Be honest.\r\nBe brief."})
    assert Project.objects.get(slug=CREATE["slug"]).guidelines == "Be honest.\nBe brief."


# --- creating a project: refused input ------------------------------------------------------------------


INVALID = [
    ("name", "", "This field is required."),
    ("name", "   ", "This field is required."),
    ("name", "n" * 201, "at most 200 characters"),
    ("name", "nul\x00name", "Null characters are not allowed."),
    ("slug", "not a slug!", "Enter a valid “slug”"),
    ("slug", "s" * 101, "at most 100 characters"),
    ("labels_per_pair", "0", "greater than or equal to 1"),
    ("labels_per_pair", "51", "less than or equal to 50"),
    ("labels_per_pair", "two", "Enter a whole number."),
    ("labels_per_pair", "", "This field is required."),
    ("strength_scale", "1-5", "Select a valid choice."),
    ("gold_rate", "-0.1", "greater than or equal to 0"),
    ("gold_rate", "1.5", "less than or equal to 1"),
    ("gold_rate", "nan", "Enter a number."),
    ("gold_rate", "inf", "Enter a number."),
    ("guidelines", "g" * 100_001, "at most 100000 characters"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value", "message"), INVALID, ids=[f"{f}-{m[:20]}" for f, _, m in INVALID])
def test_invalid_input_comes_back_with_the_error_next_to_the_field_and_what_was_typed(admin_user, field, value,
                                                                                    message):
    data = {**CREATE, field: value}
    response = _client(admin_user).post("/dashboard/", data)
    page = response.content.decode()
    assert response.status_code == 400
    assert message in _field_error(page, "new-project", field)
    tag = _input(page, "new-project", field)
    assert 'aria-invalid="true"' in tag and f"new-project-{field}_error" in tag and "autofocus" in tag
    assert 'role="alert"' in page and f'href="#new-project-{field}"' in page
    # Everything else comes back as typed, the refused value too (where it can be shown).
    kept = {name: CREATE[name] for name in ("name", "slug", "gold_rate") if name != field}
    for name, typed in kept.items():
        assert f'value="{typed}"' in _input(page, "new-project", name), name
    if field != "guidelines":
        assert CREATE["guidelines"].replace("*", "") in page.replace("*", "")
    assert 'selected>1 (slight) to 3 (strong)' in page or field == "strength_scale"
    assert "checked" in _input(page, "new-project", "allow_tie")
    assert "checked" not in _input(page, "new-project", "allow_both_bad")
    assert not Project.objects.exists()


@pytest.mark.django_db
def test_a_taken_slug_is_an_error_next_to_the_slug(admin_user):
    existing = ProjectFactory(slug="helpful-answers", name="The first one")
    response = _client(admin_user).post("/dashboard/", {**CREATE, "name": "Second try"})
    page = response.content.decode()
    assert response.status_code == 409
    error = _field_error(page, "new-project", "slug")
    assert error == "A project with slug &#x27;helpful-answers&#x27; already exists."
    assert 'value="Second try"' in _input(page, "new-project", "name")
    assert 'value="helpful-answers"' in _input(page, "new-project", "slug")
    assert Project.objects.count() == 1 and Project.objects.get().name == existing.name


@pytest.mark.django_db
def test_a_slug_made_from_the_name_that_is_taken_is_an_error_next_to_the_slug(admin_user):
    ProjectFactory(slug="helpful-answers")
    response = _client(admin_user).post("/dashboard/", {**CREATE, "slug": ""})
    assert response.status_code == 409
    assert "already exists" in _field_error(response.content.decode(), "new-project", "slug")
    assert Project.objects.count() == 1


@pytest.mark.django_db
def test_the_reserved_slug_is_an_error_next_to_the_slug(admin_user):
    response = _client(admin_user).post("/dashboard/", {**CREATE, "slug": "create"})
    assert response.status_code == 400
    assert _field_error(response.content.decode(), "new-project", "slug") == "The slug &#x27;create&#x27; is reserved."
    assert not Project.objects.exists()


@pytest.mark.django_db
def test_a_name_without_letters_or_digits_needs_a_slug_typed(admin_user):
    response = _client(admin_user).post("/dashboard/", {**CREATE, "name": "!!! ???", "slug": ""})
    assert response.status_code == 400
    assert "enter one" in _field_error(response.content.decode(), "new-project", "slug")
    assert not Project.objects.exists()
    response = _client(admin_user).post("/dashboard/", {**CREATE, "name": "!!! ???", "slug": "punctuation"})
    assert response.status_code == 302 and Project.objects.get().name == "!!! ???"


# --- settings: who may ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_settings_form_is_on_the_project_page_with_the_current_values(project, manager):
    services.project_update(project=project, labels_per_pair=2, allow_both_bad=False, gold_rate=0.25)
    page = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    assert 'id="settings"' in page and 'href="#settings"' in page
    for field in SETTINGS_FIELDS:
        assert f'<label for="settings-{field}">' in page, field
    assert 'value="2"' in _input(page, "settings", "labels_per_pair")
    assert 'value="0.25"' in _input(page, "settings", "gold_rate")
    assert "checked" in _input(page, "settings", "allow_tie")
    assert "checked" not in _input(page, "settings", "allow_both_bad")
    assert f"<code>{project.slug}</code>" in page  # shown, not editable
    assert 'id="settings-slug"' not in page


@pytest.mark.django_db
def test_only_managers_and_admins_change_settings(project, manager, labeler, outsider, admin_user):
    before = _settings(project)
    url = f"/dashboard/{project.slug}/settings/"
    data = {**_shown(project), "labels_per_pair": "4"}
    response = _client().post(url, data)
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")
    assert _client(labeler).post(url, data).status_code == 403
    response = _client(outsider).post(url, data)
    assert response.status_code == 404 and project.name.encode() not in response.content
    assert _settings(project) == before
    assert _client(manager).post(url, data).status_code == 302
    assert _settings(project)["labels_per_pair"] == 4
    assert _client(admin_user).post(url, {**_shown(project), "gold_rate": "0.5"}).status_code == 302
    assert _settings(project)["gold_rate"] == 0.5


@pytest.mark.django_db
def test_changing_settings_needs_the_csrf_token(project, manager):
    client = _client(manager, enforce_csrf_checks=True)
    response = client.post(f"/dashboard/{project.slug}/settings/", {**_shown(project), "gold_rate": "0.5"})
    assert response.status_code == 403
    assert _settings(project)["gold_rate"] == 0.0


# --- settings: what is stored ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_settings_are_saved_and_the_page_says_which(project, manager):
    client = _client(manager)
    data = {**_shown(project), "name": "Renamed", "labels_per_pair": "3", "strength_scale": "1-3",
            "gold_rate": "0.2"}
    del data["allow_tie"]
    response = client.post(f"/dashboard/{project.slug}/settings/", data)
    assert response.status_code == 302 and response.url == f"/dashboard/{project.slug}/"
    assert _settings(project) == {"name": "Renamed", "labels_per_pair": 3, "allow_tie": False,
                                  "allow_both_bad": True, "strength_scale": "1-3", "gold_rate": 0.2}
    page = client.get(response.url).content.decode()
    assert "Settings saved (name, labels per pair, allow “tie”, strength scale, gold rate)." in page


@pytest.mark.django_db
def test_a_new_number_of_labels_per_pair_reopens_or_completes_pairs(project, manager):
    pair = PairFactory(project=project)
    _label(pair, manager, "a")
    assert Pair.objects.get(pk=pair.pk).status == Pair.Status.COMPLETE
    url = f"/dashboard/{project.slug}/settings/"
    assert _client(manager).post(url, {**_shown(project), "labels_per_pair": "2"}).status_code == 302
    assert Pair.objects.get(pk=pair.pk).status == Pair.Status.OPEN
    project.refresh_from_db()  # the page shown again, with 2
    assert _client(manager).post(url, {**_shown(project), "labels_per_pair": "1"}).status_code == 302
    assert Pair.objects.get(pk=pair.pk).status == Pair.Status.COMPLETE


@pytest.mark.django_db
def test_a_setting_changed_elsewhere_since_the_page_was_shown_is_kept(project, manager):
    data = {**_shown(project), "labels_per_pair": "2"}  # the page as shown, one setting changed
    services.project_update(project=project, gold_rate=0.5, name="Renamed by the API")
    response = _client(manager).post(f"/dashboard/{project.slug}/settings/", data)
    assert response.status_code == 302
    settings = _settings(project)
    assert settings["labels_per_pair"] == 2
    assert settings["gold_rate"] == 0.5 and settings["name"] == "Renamed by the API"


@pytest.mark.django_db
def test_a_post_without_the_shown_values_writes_what_differs_from_the_stored_ones(project, manager):
    data = {"name": project.name, "labels_per_pair": "5", "strength_scale": "none", "gold_rate": "0"}
    response = _client(manager).post(f"/dashboard/{project.slug}/settings/", data)
    assert response.status_code == 302
    assert _settings(project) == {"name": project.name, "labels_per_pair": 5, "allow_tie": False,
                                  "allow_both_bad": False, "strength_scale": "none", "gold_rate": 0.0}


@pytest.mark.django_db
def test_saving_unchanged_settings_writes_nothing_and_says_so(project, manager):
    client = _client(manager)
    response = client.post(f"/dashboard/{project.slug}/settings/", _shown(project), follow=True)
    assert response.status_code == 200 and "Nothing to save: no setting was changed." in response.content.decode()


# --- settings: refused input and settings with labels ---------------------------------------------------


SETTINGS_INVALID = [
    ("name", "", "This field is required."),
    ("name", "n" * 201, "at most 200 characters"),
    ("labels_per_pair", "0", "greater than or equal to 1"),
    ("labels_per_pair", "51", "less than or equal to 50"),
    ("labels_per_pair", "1.5", "Enter a whole number."),
    ("strength_scale", "1-10", "Select a valid choice."),
    ("gold_rate", "2", "less than or equal to 1"),
    ("gold_rate", "-1", "greater than or equal to 0"),
    ("gold_rate", "half", "Enter a number."),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value", "message"), SETTINGS_INVALID,
                         ids=[f"{f}-{m[:20]}" for f, _, m in SETTINGS_INVALID])
def test_invalid_settings_come_back_on_the_project_page_with_the_error_next_to_the_field(project, manager, field,
                                                                                         value, message):
    before = _settings(project)
    typed = {**_shown(project), "name": "Typed name", "gold_rate": "0.3", field: value}
    response = _client(manager).post(f"/dashboard/{project.slug}/settings/", typed)
    page = response.content.decode()
    assert response.status_code == 400
    assert message in _field_error(page, "settings", field)
    tag = _input(page, "settings", field)
    assert 'aria-invalid="true"' in tag and "autofocus" in tag
    assert 'id="settings-errors"' in page and "Not saved:" in page
    if field not in ("name", "strength_scale"):
        assert 'value="Typed name"' in _input(page, "settings", "name")
    if field != "gold_rate":
        assert 'value="0.3"' in _input(page, "settings", "gold_rate")
    assert "Summary" in page  # the whole project page, not a bare form
    assert _settings(project) == before


@pytest.mark.django_db
def test_with_labels_the_form_says_what_a_change_does_and_changes_still_go_through(project, manager):
    url = f"/dashboard/{project.slug}/"
    assert 'id="settings-labels-note"' not in _client(manager).get(url).content.decode()
    pair = PairFactory(project=project)
    tie = _label(pair, manager, "tie")
    page = _client(manager).get(url).content.decode()
    assert 'id="settings-labels-note"' in page and "This project already has 1 label." in page
    data = {**_shown(project), "labels_per_pair": "3", "strength_scale": "1-3"}
    del data["allow_tie"]
    assert _client(manager).post(f"{url}settings/", data).status_code == 302
    assert _settings(project)["allow_tie"] is False
    assert Comparison.objects.filter(pk=tie.pk, choice="tie").exists()  # labels already given stay


@pytest.mark.django_db
def test_a_hostile_name_is_shown_as_text_in_the_settings_form(project, manager):
    services.project_update(project=project, name='"><script>alert(1)</script>')
    page = _client(manager).get(f"/dashboard/{project.slug}/").content.decode()
    assert "<script>alert(1)" not in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in _input(page, "settings", "name")


@pytest.mark.django_db
def test_the_settings_of_another_project_are_not_reachable_by_its_slug(manager):
    other = ProjectFactory(name="Secret project")
    response = _client(manager).post(f"/dashboard/{other.slug}/settings/", {**_shown(other), "gold_rate": "1"})
    assert response.status_code == 404 and b"Secret project" not in response.content
    assert _settings(other)["gold_rate"] == 0.0

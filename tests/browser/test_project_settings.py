"""An admin in Chromium creates a project from the dashboard overview (first with a slug that is taken) and then
changes its settings on the project's page, with the keyboard where a person would use it."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from labeling.models import Membership, Project
from tests.browser.conftest import login, requires_chromium
from tests.factories import ProjectFactory, UserFactory

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]


def test_an_admin_creates_a_project_and_changes_a_setting(page, shot):
    ProjectFactory(name="Already here", slug="helpfulness")
    admin = UserFactory(is_staff=True)

    login(page, shot, username=admin.username, next_path="/dashboard/")
    page.get_by_role("link", name="New project").click()
    form = page.locator("#new-project form")
    form.get_by_label("Name", exact=True).fill("Helpfulness v2")
    form.get_by_label("Slug", exact=True).fill("helpfulness")
    form.get_by_label("Labels per pair").fill("2")
    form.get_by_label("Allow “both bad”").uncheck()
    form.get_by_label("Strength scale").select_option("1-3")
    form.get_by_label("Gold rate").fill("0.1")
    form.get_by_label("Guidelines").fill("Prefer the honest answer.")
    shot("new-project-form")
    form.get_by_role("button", name="Create project").click()

    # The taken slug comes back next to its field, which has the focus; everything typed is still there.
    slug = page.locator("#new-project-slug")
    expect(page.locator("#new-project-slug_error")).to_have_text("A project with slug 'helpfulness' already exists.")
    expect(page.locator("#new-project-errors")).to_be_visible()
    expect(slug).to_be_focused()
    expect(slug).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#new-project-name")).to_have_value("Helpfulness v2")
    expect(page.locator("#new-project-labels_per_pair")).to_have_value("2")
    expect(page.locator("#new-project-allow_both_bad")).not_to_be_checked()
    expect(page.locator("#new-project-guidelines")).to_have_value("Prefer the honest answer.")
    shot("slug-taken")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("helpfulness-v2")
    page.keyboard.press("Enter")

    page.wait_for_url("**/dashboard/helpfulness-v2/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Helpfulness v2")
    expect(page.locator(".messages")).to_contain_text("The project Helpfulness v2 was created")
    project = Project.objects.get(slug="helpfulness-v2")
    assert (project.labels_per_pair, project.allow_tie, project.allow_both_bad) == (2, True, False)
    assert (project.strength_scale, project.gold_rate, project.guidelines) == ("1-3", 0.1,
                                                                              "Prefer the honest answer.")
    assert Membership.objects.get(project=project, user=admin).role == Membership.Role.MANAGER
    shot("created")

    page.get_by_role("link", name="Settings", exact=True).click()
    settings = page.locator("#settings form")
    expect(settings.get_by_label("Labels per pair")).to_have_value("2")
    settings.get_by_label("Labels per pair").fill("3")
    settings.get_by_label("Allow “tie”").focus()
    page.keyboard.press("Space")  # untick it from the keyboard
    expect(settings.get_by_label("Allow “tie”")).not_to_be_checked()
    shot("settings-form")
    settings.get_by_role("button", name="Save settings").click()

    expect(page.locator(".messages")).to_contain_text("Settings saved (labels per pair, allow “tie”).")
    expect(page.locator("#settings-labels_per_pair")).to_have_value("3")
    expect(page.locator("#settings-allow_tie")).not_to_be_checked()
    project.refresh_from_db()
    assert (project.labels_per_pair, project.allow_tie, project.gold_rate) == (3, False, 0.1)
    shot("settings-saved")

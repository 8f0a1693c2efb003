"""The training page in Chromium: a start button clicked twice in quick succession starts one run."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from labeling.models import Membership
from rewards.models import TrainingRun
from tests.browser.conftest import login, requires_chromium
from tests.factories import ProjectFactory, UserFactory
from tests.rewards.factories import labeled_pairs

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]

# Two clicks a few milliseconds apart, as a double click or an impatient second click sends them.
DOUBLE_CLICK = "selector => { const b = document.querySelector(selector); b.click(); setTimeout(() => b.click(), 5); }"


@pytest.fixture
def manager_project(monkeypatch):
    # No worker takes the runs here: they stay queued instead of being published to the broker.
    monkeypatch.setattr("rewards.services._training_run_publish", lambda *, run: None)
    project = ProjectFactory()
    manager = UserFactory()
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    labeled_pairs(project, count=4)
    return project, manager


def test_a_double_click_on_start_queues_one_run(page, shot, manager_project):
    project, manager = manager_project
    login(page, shot, username=manager.username, next_path=f"/dashboard/{project.slug}/training/")
    page.evaluate(DOUBLE_CLICK, "details.kind-form[open] form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard/runs/\d+/$"))
    expect(page.locator("h1")).to_contain_text("run")
    shot("run-page")
    runs = list(TrainingRun.objects.filter(project=project))
    assert len(runs) == 1
    assert page.url.endswith(f"/dashboard/runs/{runs[0].pk}/")


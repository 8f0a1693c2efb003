"""The Content-Security-Policy in Chromium: the labeling page, the dashboard, the admin and the API docs work under it
with no violation in the browser's console, and the browser does enforce it (an inline script is refused)."""
from __future__ import annotations

import re

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from labeling.models import Comparison, Membership
from rewards.models import TrainingRun
from tests.browser.conftest import CSP_VIOLATION as VIOLATION
from tests.browser.conftest import login, requires_chromium
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.rewards.factories import TrainingRunFactory, labeled_pairs

# Each test here makes the browser refuse an inline script on purpose (the policy is enforced, not only sent), and
# checks the console itself for every other violation.
pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True), pytest.mark.csp_violation_expected]

PAIR_FIELD = "#label-form input[name=pair]"
# An inline script the policy must refuse: it would set window.inlineRan. Resolves with the directive the browser
# names in its securitypolicyviolation event, and whether the script ran.
INLINE_SCRIPT = """() => new Promise(resolve => {
  document.addEventListener("securitypolicyviolation",
                            event => resolve([event.violatedDirective, window.inlineRan === true]), {once: true});
  const script = document.createElement("script");
  script.textContent = "window.inlineRan = true;";
  document.head.appendChild(script);
})"""
# Every chart of the page drawn by Chart.js (a canvas without a chart is a script that did not run), and none of them
# a canvas marked as seen before (MARK_CANVASES): after a poll, the swapped-in ones.
CHARTS_DRAWN = ("() => { const c = [...document.querySelectorAll('canvas')]; return c.length > 0 && "
                "c.every(x => !x.dataset.seen && window.Chart && window.Chart.getChart(x)); }")
MARK_CANVASES = "() => document.querySelectorAll('canvas').forEach(c => { c.dataset.seen = 'yes'; })"


def _console_violations(page) -> list[str]:
    """The console messages of the page that report a refusal by the policy, as they come."""
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text) if VIOLATION.search(message.text) else None)
    return messages


def _policy_of(response) -> dict[str, str]:
    header = response.headers.get("content-security-policy", "")
    return dict(re.split(r"\s+", part.strip(), maxsplit=1) for part in header.split(";") if part.strip())


def _assert_enforced(page) -> None:
    """The policy is in force in this browser, not only sent: an inline script is refused, and the console says so
    in the words the other tests look for."""
    with page.expect_console_message(lambda message: bool(VIOLATION.search(message.text))):
        directive, ran = page.evaluate(INLINE_SCRIPT)
    assert directive.startswith("script-src") and ran is False


def _visit(page, path: str) -> dict[str, str]:
    response = page.goto(path)
    assert response is not None and response.ok, path
    return _policy_of(response)


def test_the_labeling_page_runs_under_the_policy_and_a_key_still_labels_a_pair(page, shot, live_server):
    project = ProjectFactory(guidelines="Prefer the **helpful** answer.")
    for index in range(3):
        PairFactory(project=project, response_a__text=f"A{index}", response_b__text=f"B{index}")
    labeler = UserFactory()
    Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
    messages = _console_violations(page)

    login(page, shot, username=labeler.username, next_path=f"/projects/{project.slug}/label/")
    policy = _visit(page, f"/projects/{project.slug}/label/")
    assert policy["default-src"] == "'self'" and "script-src" not in policy and "style-src" not in policy
    first = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("g")  # the guidelines open and close by key
    expect(page.locator("#guidelines")).to_have_attribute("open", "")
    page.keyboard.press("g")
    page.keyboard.press("1")  # "Left is better"
    expect(page.locator("p.notice")).to_have_text("Saved.")
    expect(page.locator(PAIR_FIELD)).not_to_have_value(first)
    shot("labeled-by-key")
    comparison = Comparison.objects.get(labeler=labeler)
    assert comparison.pair_id == int(first)
    assert messages == []
    _assert_enforced(page)


def test_the_dashboard_draws_its_charts_and_polls_a_run_under_the_policy(page, shot, live_server):
    project = ProjectFactory()
    manager = UserFactory()
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    labeled_pairs(project, count=4)
    now = timezone.now()
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.RUNNING, started_at=now, heartbeat_at=now,
                             created_by=manager, metrics_history=[{"step": 1, "loss": 0.7, "eval_accuracy": 0.5},
                                                                  {"step": 2, "loss": 0.6, "eval_accuracy": 0.6}])
    messages = _console_violations(page)

    login(page, shot, username=manager.username, next_path="/dashboard/")
    policy = _visit(page, "/dashboard/")
    assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
    _visit(page, f"/dashboard/{project.slug}/")
    page.wait_for_function(CHARTS_DRAWN)
    shot("project-charts")
    _visit(page, f"/dashboard/{project.slug}/training/")
    _visit(page, f"/dashboard/runs/{run.pk}/")
    page.wait_for_function(CHARTS_DRAWN)
    # The run page polls itself every 2 s (htmx): a swap brings new canvases, which are drawn again.
    page.evaluate(MARK_CANVASES)
    page.wait_for_function(CHARTS_DRAWN)
    shot("run-after-poll")
    assert messages == []
    _assert_enforced(page)


def test_the_admin_the_browsable_api_and_the_api_docs_work_under_their_policies(page, shot, live_server):
    project = ProjectFactory()
    member = UserFactory(username="member-one")
    Membership.objects.create(project=project, user=member, role=Membership.Role.LABELER)
    admin = UserFactory(is_staff=True, is_superuser=True)
    messages = _console_violations(page)

    login(page, shot, username=admin.username, next_path="/admin/")
    assert _visit(page, "/admin/")["default-src"] == "'self'"
    _visit(page, "/admin/labeling/project/")
    _visit(page, f"/admin/labeling/project/{project.pk}/change/")
    # The membership inline's user field is an autocomplete (select2, jQuery): it opens and searches.
    page.locator(".select2-selection").first.click()
    page.locator(".select2-search__field").fill("member")
    expect(page.locator(".select2-results__option", has_text="member-one")).to_be_visible()
    shot("admin-autocomplete")

    browsable = _visit(page, "/api/v1/projects/")
    assert browsable["style-src"] == "'self' 'unsafe-inline'" and "script-src" not in browsable
    expect(page.locator(".response-info")).to_contain_text(project.slug)
    docs = _visit(page, "/api/docs/")
    assert "script-src" not in docs
    expect(page.locator(".opblock").first).to_be_visible()
    shot("api-docs")
    assert messages == []
    _assert_enforced(page)

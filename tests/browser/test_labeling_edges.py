"""The labeling page's script where the server cannot help: the time to answer it measures and sends."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from labeling.models import Comparison, Membership
from tests.browser.conftest import login, requires_chromium
from tests.factories import PairFactory, ProjectFactory, UserFactory

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]

# The page's clock, shifted at will: performance.now() plus window.preflabClockShiftMs.
SHIFTED_CLOCK = """(() => {
  const now = performance.now.bind(performance);
  window.preflabClockShiftMs = 0;
  performance.now = () => now() + window.preflabClockShiftMs;
})();"""
TIME_MS_MAX = 2**31 - 1


def test_a_pair_left_on_screen_for_weeks_is_answered_with_the_longest_time_stored(page, shot, live_server):
    project = ProjectFactory()
    PairFactory.create_batch(2, project=project)
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    page.add_init_script(SHIFTED_CLOCK)
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    # The labeler comes back to the tab 30 days later: more milliseconds than the server stores.
    page.evaluate("window.preflabClockShiftMs = 30 * 24 * 3600 * 1000")
    page.keyboard.press("1")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    expect(page.locator("#panel-error")).to_have_count(0)
    shot("saved")
    assert Comparison.objects.get(labeler=user).time_ms == TIME_MS_MAX

"""The labeling screen driven by keyboard in Chromium where it is easy to get wrong: keys pressed twice or together,
Enter on a form control, what a screen reader hears, and a session that ends or changes while the page is open."""
from __future__ import annotations

import re

import pytest
from django.contrib.sessions.models import Session
from playwright.sync_api import expect

from labeling.models import Comparison, Lease, Membership
from tests.browser.conftest import PASSWORD, login, requires_chromium
from tests.factories import PairFactory, ProjectFactory, UserFactory

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]

PAIR_FIELD = "#label-form input[name=pair]"
# Longer than the page's settle time after a swap (SETTLE_MS in label.js), shorter than anyone reads a pair.
READ_MS = 600


def _project_with_pairs(count: int, **fields):
    project = ProjectFactory(**fields)
    for index in range(count):
        PairFactory(project=project, response_a__text=f"A{index}", response_b__text=f"B{index}")
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    return project, user


def _wait_for_a_new_pair(page, old: str) -> None:
    page.wait_for_function("old => document.querySelector('#label-form input[name=pair]').value !== old", arg=old)


def test_enter_on_a_strength_or_a_flag_never_answers_and_all_of_them_are_sent(page, shot, live_server):
    project, user = _project_with_pairs(2, strength_scale="1-3")
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    pair = int(page.locator(PAIR_FIELD).get_attribute("value"))
    page.keyboard.press("w")
    expect(page.locator("input[name=strength][value='2']")).to_be_focused()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")  # on to the first flag
    expect(page.locator("input[name=flags]").first).to_be_focused()
    page.keyboard.press("Space")
    page.keyboard.press("Enter")
    page.wait_for_timeout(READ_MS)
    assert not Comparison.objects.exists()
    expect(page.locator(PAIR_FIELD)).to_have_value(str(pair))
    page.keyboard.press("r")
    page.keyboard.type("Clearer and correct.")
    page.keyboard.press("Escape")
    page.keyboard.press("2")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    shot("answered")
    comparison = Comparison.objects.get(labeler=user)
    first_flag = page.locator("input[name=flags]").first.get_attribute("value")
    assert (comparison.pair_id, comparison.strength, comparison.flags, comparison.rationale) == (
        pair, 2, [first_flag], "Clearer and correct.")


def test_a_key_pressed_twice_answers_one_pair_not_the_next(page, shot, live_server):
    project, user = _project_with_pairs(3)
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    first = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("1")
    _wait_for_a_new_pair(page, first)
    second = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("1")  # the same key again, the moment the next pair is in
    page.wait_for_timeout(READ_MS)
    expect(page.locator(PAIR_FIELD)).to_have_value(second)
    assert list(Comparison.objects.filter(labeler=user).values_list("pair_id", flat=True)) == [int(first)]
    page.keyboard.press("1")  # once the labeler has had a look, the key answers again
    _wait_for_a_new_pair(page, second)
    assert Comparison.objects.filter(labeler=user).count() == 2


def test_an_answer_and_a_skip_pressed_together_send_only_the_answer(page, shot, live_server):
    project, user = _project_with_pairs(3)
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    first = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("1")
    page.keyboard.press("s")
    _wait_for_a_new_pair(page, first)
    page.wait_for_timeout(READ_MS)
    shot("after-answer-and-skip")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    expect(page.locator("#panel-error")).to_have_count(0)
    assert list(Comparison.objects.filter(labeler=user).values_list("pair_id", flat=True)) == [int(first)]
    assert not Lease.objects.filter(labeler=user, skipped=True).exists()


def test_a_screen_reader_hears_what_each_key_did_and_the_focus_stays_on_the_panel(page, shot, live_server):
    project, user = _project_with_pairs(3)
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    status = page.locator("#label-status")
    expect(status).to_have_attribute("aria-live", "polite")
    page.keyboard.press("1")
    expect(status).to_have_text("Saved. Next pair shown. My progress: 1 labeled of 3 (2 left)")
    expect(page.locator("#pair-heading")).to_be_focused()
    page.wait_for_timeout(READ_MS)
    page.keyboard.press("s")
    expect(status).to_have_text(re.compile(r"^Pair skipped\. Next pair shown\. My progress: 1 labeled of"))
    expect(page.locator("#pair-heading")).to_be_focused()
    page.wait_for_timeout(READ_MS)
    page.keyboard.press("2")
    expect(status).to_have_text(re.compile(r"^Saved\. All done\. My progress: 2 labeled of"))
    expect(page.locator("#pair-heading")).to_be_focused()
    shot("all-done")


def test_the_time_to_answer_counts_from_when_the_pair_was_shown_across_a_refused_answer(page, shot, live_server):
    project, user = _project_with_pairs(2, allow_tie=True)
    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    pair = page.locator(PAIR_FIELD).get_attribute("value")
    page.wait_for_timeout(READ_MS)
    project.allow_tie = False  # a manager changes the project while the pair is on screen
    project.save()
    page.keyboard.press("3")
    expect(page.locator("#panel-error")).to_contain_text("does not allow ties")
    expect(page.locator(PAIR_FIELD)).to_have_value(pair)
    page.wait_for_timeout(READ_MS)
    page.keyboard.press("1")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    assert Comparison.objects.get(labeler=user).time_ms >= 2 * READ_MS


def _answer_with_a_note_after_the_session_ended(page, note: str, label_path: str) -> None:
    """Type a rationale, lose the session (it ends on the server), answer: the page goes to the login screen."""
    page.keyboard.press("r")
    page.keyboard.type(note)
    page.keyboard.press("Escape")
    Session.objects.all().delete()
    page.keyboard.press("1")
    page.wait_for_url(f"**/accounts/login/?next={label_path}")


def test_a_session_that_ended_sends_the_labeler_to_log_in_and_back_with_what_they_typed(page, shot, live_server):
    project, user = _project_with_pairs(2, strength_scale="1-3")
    label_path = f"/projects/{project.slug}/label/"
    login(page, shot, username=user.username, next_path=label_path)
    pair = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("e")
    _answer_with_a_note_after_the_session_ended(page, "Left cites its source.", label_path)
    expect(page.locator("#label-panel")).to_have_count(0)
    shot("login-again")
    page.keyboard.type(user.username)  # the username field has the focus
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{label_path}")
    expect(page.locator(PAIR_FIELD)).to_have_value(pair)
    expect(page.locator("#rationale")).to_have_value("Left cites its source.")
    expect(page.locator("input[name=strength][value='3']")).to_be_checked()
    shot("back-with-the-draft")
    page.keyboard.press("1")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    comparison = Comparison.objects.get(labeler=user)
    assert (str(comparison.pair_id), comparison.strength, comparison.rationale) == (
        pair, 3, "Left cites its source.")
    # Answered: the next pair starts empty.
    page.reload()
    expect(page.locator("#rationale")).to_have_value("")


def test_a_log_in_in_another_tab_leaves_the_pair_on_screen_with_a_way_on(page, shot, live_server):
    project, user = _project_with_pairs(2)
    label_path = f"/projects/{project.slug}/label/"
    login(page, shot, username=user.username, next_path=label_path)
    pair = page.locator(PAIR_FIELD).get_attribute("value")
    page.keyboard.press("r")
    page.keyboard.type("Shorter.")
    page.keyboard.press("Escape")
    other = page.context.new_page()
    other.goto("/")
    other.get_by_role("button", name="Log out").click()
    other.goto("/accounts/login/")
    other.get_by_label("Username").fill(user.username)
    other.get_by_label("Password").fill(PASSWORD)
    other.get_by_role("button", name="Log in").click()
    other.wait_for_url("**/")
    other.close()
    page.keyboard.press("2")
    error = page.locator("#panel-error")
    expect(error).to_be_focused()
    expect(error).to_contain_text("Not saved: your session changed")
    shot("session-changed")
    # The pair and the typed rationale stay; no page inside the page.
    expect(page.locator(PAIR_FIELD)).to_have_value(pair)
    expect(page.locator("#rationale")).to_have_value("Shorter.")
    expect(page.locator("#label-panel h1")).to_have_count(0)
    page.keyboard.press("Tab")
    expect(error.get_by_role("link", name="Reload the page")).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    expect(page.locator("#rationale")).to_have_value("Shorter.")
    page.keyboard.press("2")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    assert Comparison.objects.get(labeler=user).rationale == "Shorter."


def test_what_one_labeler_typed_never_fills_the_form_of_another_in_the_same_tab(page, shot, live_server):
    project, user = _project_with_pairs(1, labels_per_pair=2)
    other = UserFactory()
    Membership.objects.create(project=project, user=other, role=Membership.Role.LABELER)
    label_path = f"/projects/{project.slug}/label/"
    login(page, shot, username=user.username, next_path=label_path)
    pair = page.locator(PAIR_FIELD).get_attribute("value")
    _answer_with_a_note_after_the_session_ended(page, "My private note.", label_path)
    page.get_by_label("Username").fill(other.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{label_path}")
    expect(page.locator(PAIR_FIELD)).to_have_value(pair)  # the same pair, leased to the other labeler
    expect(page.locator("#rationale")).to_have_value("")


def test_a_failed_skip_says_not_skipped_and_a_failed_answer_not_saved(page, shot, live_server):
    """When the server cannot be reached, the message names what did not happen: a labeler who pressed S must not
    read that an answer was lost, and one who answered must not read that a skip failed."""
    project, user = _project_with_pairs(2)
    label_path = f"/projects/{project.slug}/label/"
    login(page, shot, username=user.username, next_path=label_path)
    pair = page.locator(PAIR_FIELD).get_attribute("value")
    page.route(re.compile(r"/label/(skip|submit)/$"), lambda route: route.abort())
    page.keyboard.press("s")
    error = page.locator("#panel-error")
    expect(error).to_be_focused()
    expect(error).to_contain_text("Not skipped: the server could not be reached")
    shot("skip-unreachable")
    page.keyboard.press("Escape")
    page.keyboard.press("1")
    expect(error).to_contain_text("Not saved: the server could not be reached")
    shot("answer-unreachable")
    # Nothing happened on the server, and the pair is still the labeler's.
    expect(page.locator(PAIR_FIELD)).to_have_value(pair)
    assert not Comparison.objects.exists()
    assert Lease.objects.get(labeler=user).pair_id == int(pair)

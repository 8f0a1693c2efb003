"""A labeler's journey in Chromium: form login, keyboard-only labeling with the A/B frame checked in the database,
and model output that must show as text and never run."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from labeling.models import Comparison, Lease, Membership
from tests.browser.conftest import login, requires_chromium
from tests.factories import PairFactory, ProjectFactory, UserFactory

pytestmark = [requires_chromium, pytest.mark.django_db(transaction=True)]

# Which response each key picks, in the frame the labeler sees.
KEY_CHOICES = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"}
PAUSE_MS = 400


def _labeler_on(project):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=Membership.Role.LABELER)
    return user


def _expected_choice(frame: str, *, left_is_a: bool) -> str:
    if frame == "left":
        return Comparison.Choice.A if left_is_a else Comparison.Choice.B
    if frame == "right":
        return Comparison.Choice.B if left_is_a else Comparison.Choice.A
    return {"tie": Comparison.Choice.TIE, "both_bad": Comparison.Choice.BOTH_BAD}[frame]


def test_a_labeler_labels_five_pairs_with_the_keyboard_only(page, shot, live_server):
    project = ProjectFactory(allow_tie=True, allow_both_bad=True)
    pairs = {pair.pk: pair for pair in (
        PairFactory(project=project, response_a__text=f"Answer A of pair {index}",
                    response_b__text=f"Answer B of pair {index}") for index in range(5))}
    user = _labeler_on(project)
    label_path = f"/projects/{project.slug}/label/"

    login(page, shot, username=user.username, next_path=label_path)
    keys = ["1", "2", "3", "1", "4"]
    expected: dict[int, str] = {}
    progress = page.locator("#progress-mine")
    expect(progress).to_have_attribute("value", "0")
    for step, key in enumerate(keys):
        expect(page.locator("#pair-heading")).to_have_text("Which response is better?")
        pair_id = int(page.locator("#label-form input[name=pair]").get_attribute("value"))
        pair = pairs[pair_id]
        if step in (0, 3):
            # Force both orientations to be exercised: B on the left for these, whatever the queue drew.
            Lease.objects.filter(pair_id=pair_id, labeler=user).update(swapped=True)
            page.reload()
            expect(page.locator("#label-form input[name=pair]")).to_have_value(str(pair_id))
        left_text = page.locator('section[data-side="left"] .markdown').inner_text().strip()
        assert left_text in (pair.response_a.text, pair.response_b.text)
        left_is_a = left_text == pair.response_a.text
        if step in (0, 3):
            assert not left_is_a
        expected[pair_id] = _expected_choice(KEY_CHOICES[key], left_is_a=left_is_a)
        shot(f"pair-{step + 1}")
        # The labeler reads each pair for at least PAUSE_MS (the page ignores answer keys pressed faster than anyone
        # reads, as a double press would): the time the page reports must cover that.
        page.wait_for_timeout(PAUSE_MS)
        page.keyboard.press(key)
        expect(progress).to_have_attribute("value", str(step + 1))
        expect(page.locator("p.notice")).to_have_text("Saved.")

    expect(page.locator("#pair-heading")).to_have_text("All done")
    expect(page.get_by_text("My progress: 5 labeled of 5")).to_be_visible()
    shot("all-done")
    saved = {c.pair_id: c for c in Comparison.objects.filter(labeler=user)}
    assert {pair_id: c.choice for pair_id, c in saved.items()} == expected
    assert sum(c.swapped for c in saved.values()) >= 2
    assert all(c.time_ms is not None and c.time_ms >= PAUSE_MS for c in saved.values())


def test_a_script_in_a_response_shows_as_text_and_never_runs(page, shot, live_server):
    payload = "<script>window.__pwned=1</script>"
    project = ProjectFactory()
    PairFactory(project=project, response_a__text=f"Try this: {payload}", response_b__text=payload,
                prompt__content=f"Explain {payload}")
    user = _labeler_on(project)

    login(page, shot, username=user.username, next_path=f"/projects/{project.slug}/label/")
    expect(page.locator("#pair-heading")).to_have_text("Which response is better?")
    shot("pair-with-script")
    for side in ("left", "right"):
        expect(page.locator(f'section[data-side="{side}"]')).to_contain_text(payload)
    expect(page.locator("section.prompt")).to_contain_text(payload)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # Nothing in the rendered panel is a script element built from the model's text.
    assert page.locator("#label-panel script").count() == 0


def test_back_after_an_answer_shows_the_current_pair_not_the_answered_one(page, shot, live_server):
    project = ProjectFactory()
    for index in range(3):
        PairFactory(project=project, response_a__text=f"A{index}", response_b__text=f"B{index}")
    user = _labeler_on(project)
    label_path = f"/projects/{project.slug}/label/"

    login(page, shot, username=user.username, next_path=label_path)
    pair_field = page.locator("#label-form input[name=pair]")
    answered = pair_field.get_attribute("value")
    page.keyboard.press("1")
    expect(page.locator("p.notice")).to_have_text("Saved.")
    current = pair_field.get_attribute("value")
    assert current != answered
    page.goto("/")
    page.go_back()
    # The page comes from the server again, not from the browser's memory of the answered pair.
    expect(pair_field).to_have_value(current)
    expect(page.locator("#progress-mine")).to_have_attribute("value", "1")
    shot("back-shows-current-pair")

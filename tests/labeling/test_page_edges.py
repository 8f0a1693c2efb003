"""The labeling page where a labeler gets it wrong or the world moves under them: line breaks in a rationale, the
same page in two tabs, answers sent twice, a lease that ran out, a pair of another project, values out of range.
Each refusal names the field, keeps the labeler's pair and stores nothing; each repeat stores one label."""
from __future__ import annotations

import html as html_text
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from labeling import services
from labeling.models import Comparison, Lease, Membership
from tests.factories import PairFactory, ProjectFactory
from tests.labeling.test_pages import _client, _member

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def _submit_url(project) -> str:
    return f"/projects/{project.slug}/label/submit/"


def _skip_url(project) -> str:
    return f"/projects/{project.slug}/label/skip/"


def _error(html: str) -> str:
    """The panel's error box as one line of text ('' when there is none)."""
    found = re.search(r'<div class="error" id="panel-error"[^>]*>(.*?)</div>', html, re.S)
    return " ".join(html_text.unescape(re.sub(r"<[^>]+>", "", found.group(1))).split()) if found else ""


def _shown_pair(html: str) -> int | None:
    found = re.search(r'<input type="hidden" name="pair" value="(\d+)">', html)
    return int(found.group(1)) if found else None


# --- line breaks in the rationale -----------------------------------------------------------------------


def _rationale_of(length: int) -> str:
    """Text of `length` characters as the browser counts them for the box's maxlength (a line break is one)."""
    line = "x" * 49 + "\n"
    return (line * (length // len(line) + 1))[:length - 1] + "."


def test_a_rationale_that_fits_the_box_is_saved_though_the_form_post_doubles_its_line_breaks(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    typed = _rationale_of(10_000)
    assert len(typed) == 10_000 and typed.count("\n") == 199
    # A plain form post (JavaScript off) sends each line break as CRLF: 10,199 characters on the wire.
    response = _client(labeler).post(_submit_url(project), {"pair": pair.pk, "choice": "left",
                                                             "rationale": typed.replace("\n", "\r\n")})
    assert response.status_code == 302 and response.url == f"/projects/{project.slug}/label/"
    assert Comparison.objects.get(pair=pair, labeler=labeler).rationale == typed


def test_a_rationale_over_the_box_is_refused_by_its_count_of_characters_as_typed(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    typed = _rationale_of(10_001)
    response = _client(labeler).post(_submit_url(project), {"pair": pair.pk, "choice": "left",
                                                             "rationale": typed.replace("\n", "\r\n")}, **HTMX)
    assert response.status_code == 400
    assert _error(response.content.decode()) == (
        "Not saved (rationale): Ensure this value has at most 10000 characters (it has 10001).")
    assert not Comparison.objects.exists()
    assert Lease.objects.filter(pair=pair, labeler=labeler, skipped=False).exists()


def test_the_same_rationale_sent_by_htmx_and_by_a_plain_post_is_the_same_answer(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    client = _client(labeler)
    answer = {"pair": pair.pk, "choice": "right", "rationale": "Shorter.\nAnd correct."}
    assert client.post(_submit_url(project), answer, **HTMX).status_code == 200  # htmx sends line feeds
    # The same answer again from a page without JavaScript (CRLF): a repeat, not a different answer.
    again = client.post(_submit_url(project), {**answer, "rationale": "Shorter.\r\nAnd correct."}, **HTMX)
    assert again.status_code == 200 and "This answer was already saved." in again.content.decode()
    assert list(Comparison.objects.values_list("pair_id", "rationale")) == [(pair.pk, "Shorter.\nAnd correct.")]


# --- the same page in two tabs, and answers sent twice --------------------------------------------------


def test_two_tabs_show_the_same_pair_and_store_one_label(labeler):
    project = labeler.projects.get()
    first, second = PairFactory(project=project, priority=2), PairFactory(project=project, priority=1)
    tab_a, tab_b = _client(labeler), _client(labeler)
    assert _shown_pair(tab_a.get(f"/projects/{project.slug}/label/").content.decode()) == first.pk
    assert _shown_pair(tab_b.get(f"/projects/{project.slug}/label/").content.decode()) == first.pk
    Lease.objects.filter(pair=first).update(swapped=False)  # left is A
    saved = tab_a.post(_submit_url(project), {"pair": first.pk, "choice": "left"}, **HTMX)
    assert saved.status_code == 200 and _shown_pair(saved.content.decode()) == second.pk
    # The same key in the other tab: a repeat of the stored answer.
    repeat = tab_b.post(_submit_url(project), {"pair": first.pk, "choice": "left"}, **HTMX)
    assert repeat.status_code == 200 and "This answer was already saved." in repeat.content.decode()
    assert _shown_pair(repeat.content.decode()) == second.pk
    # Another key in the other tab: refused, and the stored answer stays as it was.
    other = tab_b.post(_submit_url(project), {"pair": first.pk, "choice": "right"}, **HTMX)
    html = other.content.decode()
    assert other.status_code == 409
    assert _error(html) == "Not saved (pair): You already labeled this pair with a different answer."
    assert _shown_pair(html) == second.pk
    assert list(Comparison.objects.values_list("pair_id", "choice")) == [(first.pk, "a")]


def test_an_answer_to_a_pair_skipped_in_another_tab_says_so_and_stores_nothing(labeler):
    project = labeler.projects.get()
    first, second = PairFactory(project=project, priority=2), PairFactory(project=project, priority=1)
    tab_a, tab_b = _client(labeler), _client(labeler)
    tab_a.get(f"/projects/{project.slug}/label/")
    tab_b.get(f"/projects/{project.slug}/label/")
    assert tab_a.post(_skip_url(project), {"pair": first.pk}, **HTMX).status_code == 200
    response = tab_b.post(_submit_url(project), {"pair": first.pk, "choice": "left"}, **HTMX)
    html = response.content.decode()
    assert response.status_code == 409
    # Said for the page, where the labeler's current pair is already shown: not "ask the queue".
    assert _error(html) == ("Not saved (pair): You no longer hold this pair: it was skipped (perhaps in another "
                            "tab) or went back to the queue.")
    assert _shown_pair(html) == second.pk
    assert not Comparison.objects.exists()


def test_a_skip_of_a_pair_answered_in_another_tab_says_not_skipped_not_not_saved(labeler):
    project = labeler.projects.get()
    first, _ = PairFactory(project=project, priority=2), PairFactory(project=project, priority=1)
    tab_a, tab_b = _client(labeler), _client(labeler)
    tab_a.get(f"/projects/{project.slug}/label/")
    tab_b.get(f"/projects/{project.slug}/label/")
    Lease.objects.filter(pair=first).update(swapped=False)  # left is A
    assert tab_a.post(_submit_url(project), {"pair": first.pk, "choice": "left"}, **HTMX).status_code == 200
    response = tab_b.post(_skip_url(project), {"pair": first.pk}, **HTMX)
    assert response.status_code == 404
    # The answer given in the other tab was saved: "Not saved" here would say it was lost.
    assert _error(response.content.decode()) == "Not skipped (pair): You hold no lease on this pair."
    assert list(Comparison.objects.values_list("pair_id", "choice")) == [(first.pk, "a")]
    assert not Lease.objects.filter(labeler=labeler, skipped=True).exists()


# --- a lease that ran out -------------------------------------------------------------------------------


def test_an_answer_after_the_lease_ran_out_is_saved_while_the_slot_is_free(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    Lease.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(minutes=5))
    response = _client(labeler).post(_submit_url(project), {"pair": pair.pk, "choice": "left"}, **HTMX)
    assert response.status_code == 200 and "Saved." in response.content.decode()
    assert Comparison.objects.get(labeler=labeler).pair_id == pair.pk


def test_an_answer_after_the_lease_ran_out_and_the_slot_went_to_another_is_refused(db):
    project = ProjectFactory(labels_per_pair=1)
    pair, following = PairFactory(project=project, priority=2), PairFactory(project=project, priority=1)
    late, newcomer = _member(project), _member(project)
    lease = services.pair_next_for_labeler(project=project, labeler=late)
    Lease.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.pair_next_for_labeler(project=project, labeler=newcomer).pair_id == pair.pk
    response = _client(late).post(_submit_url(project), {"pair": pair.pk, "choice": "left",
                                                         "rationale": "Kept?"}, **HTMX)
    html = response.content.decode()
    assert response.status_code == 409
    assert _error(html) == "Not saved (pair): Your lease on this pair expired and its slot went to another labeler."
    assert _shown_pair(html) == following.pk and ">Kept?</textarea>" not in html
    assert not Comparison.objects.exists()


# --- a pair of another project, choices and strengths the project does not take ------------------------


def test_a_pair_held_in_another_project_is_refused_on_this_projects_page(db):
    here, there = ProjectFactory(), ProjectFactory()
    labeler = _member(here)
    Membership.objects.create(project=there, user=labeler, role=Membership.Role.LABELER)
    PairFactory(project=here)
    foreign = PairFactory(project=there)
    services.pair_next_for_labeler(project=there, labeler=labeler)
    response = _client(labeler).post(_submit_url(here), {"pair": foreign.pk, "choice": "left"}, **HTMX)
    assert response.status_code == 404
    assert _error(response.content.decode()) == f"Not saved (pair): Pair {foreign.pk} is not part of {here.name}."
    assert not Comparison.objects.exists()
    assert Lease.objects.filter(pair=foreign, labeler=labeler, skipped=False).exists()


@pytest.mark.parametrize(("fields", "answer", "message"), [
    ({"allow_both_bad": False}, {"choice": "both_bad"}, "Not saved (choice): This project does not allow 'both bad'."),
    ({"allow_tie": False}, {"choice": "tie"}, "Not saved (choice): This project does not allow ties."),
    ({"strength_scale": "1-3"}, {"choice": "left", "strength": "4"},
     "Not saved (strength): Select a valid choice. 4 is not one of the available choices."),
    ({"strength_scale": "1-3"}, {"choice": "left", "strength": "0"},
     "Not saved (strength): Select a valid choice. 0 is not one of the available choices."),
    ({"strength_scale": "none"}, {"choice": "right", "strength": "2"},
     "Not saved (strength): This project does not record a strength."),
])
def test_an_answer_the_project_does_not_take_is_refused_and_the_pair_kept(db, fields, answer, message):
    project = ProjectFactory(**fields)
    labeler = _member(project)
    pair = PairFactory(project=project)
    services.pair_next_for_labeler(project=project, labeler=labeler)
    for extra in ({}, HTMX):
        response = _client(labeler).post(_submit_url(project), {"pair": pair.pk, **answer}, **extra)
        html = response.content.decode()
        assert response.status_code == 400
        assert _error(html) == message
        assert _shown_pair(html) == pair.pk
    assert not Comparison.objects.exists()
    assert Lease.objects.filter(pair=pair, labeler=labeler, skipped=False).exists()

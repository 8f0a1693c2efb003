"""The labeler's web pages: login, project list, the labeling screen, submitting, skipping and progress."""
from __future__ import annotations

from urllib.parse import quote

import pytest
from django.test import Client

from labeling import services
from labeling.models import Comparison, Lease, Membership, Pair
from tests.factories import PairFactory, ProjectFactory, PromptFactory, ResponseFactory, UserFactory

HTMX = {"HTTP_HX_REQUEST": "true"}


def _member(project, role=Membership.Role.LABELER):
    user = UserFactory()
    Membership.objects.create(project=project, user=user, role=role)
    return user


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _label_url(project) -> str:
    return f"/projects/{project.slug}/label/"


def _lease(project, labeler, *, swapped: bool) -> Lease:
    lease = services.pair_next_for_labeler(project=project, labeler=labeler)
    Lease.objects.filter(pk=lease.pk).update(swapped=swapped)
    lease.refresh_from_db()
    return lease


@pytest.mark.django_db
def test_pages_require_login(project):
    client = Client()
    for url in ("/", _label_url(project)):
        response = client.get(url)
        assert response.status_code == 302
        assert response.url.startswith("/accounts/login/?next=")
    response = client.post(f"{_label_url(project)}submit/", {"pair": 1, "choice": "left"})
    assert response.status_code == 302 and response.url.startswith("/accounts/login/")
    assert not Comparison.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["submit", "skip"])
def test_a_labeler_signed_out_while_labeling_logs_in_and_comes_back_to_the_labeling_page(labeler, action):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    client = Client()
    login_url = f"/accounts/login/?next={quote(_label_url(project))}"
    plain = client.post(f"{_label_url(project)}{action}/", {"pair": pair.pk, "choice": "left"})
    assert plain.status_code == 302 and plain.url == login_url
    # htmx follows a redirect by itself and would swap the login page into the panel: it is told to leave instead.
    swapped = client.post(f"{_label_url(project)}{action}/", {"pair": pair.pk, "choice": "left"}, **HTMX)
    assert swapped.status_code == 200 and swapped["HX-Redirect"] == login_url and swapped.content == b""
    back = client.post(login_url, {"username": labeler.username, "password": "correct-horse-battery",
                                   "next": _label_url(project)})
    assert back.status_code == 302 and back.url == _label_url(project)
    assert pair.response_a.text in client.get(back.url).content.decode()
    assert not Comparison.objects.exists() and not Lease.objects.get(labeler=labeler).skipped


@pytest.mark.django_db
def test_login_page_logs_in_and_goes_to_my_projects(labeler):
    client = Client()
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert 'autocomplete="current-password"' in page.content.decode()
    wrong = client.post("/accounts/login/", {"username": labeler.username, "password": "nope"})
    assert wrong.status_code == 200 and 'role="alert"' in wrong.content.decode()
    response = client.post("/accounts/login/", {"username": labeler.username, "password": "correct-horse-battery"})
    assert response.status_code == 302 and response.url == "/"
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


@pytest.mark.django_db
def test_non_members_get_404(project, outsider):
    pair = PairFactory(project=project)
    client = _client(outsider)
    assert client.get(_label_url(project)).status_code == 404
    response = client.post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "left"})
    assert response.status_code == 404
    assert client.post(f"{_label_url(project)}skip/", {"pair": pair.pk}).status_code == 404
    assert not Lease.objects.exists() and not Comparison.objects.exists()
    assert client.get("/projects/no-such-project/label/").status_code == 404


@pytest.mark.django_db
def test_my_projects_lists_only_my_projects_with_my_progress(project, labeler):
    other = ProjectFactory(name="Secret project")
    pairs = [PairFactory(project=project) for _ in range(3)]
    services.pair_next_for_labeler(project=project, labeler=labeler)
    services.comparison_submit(labeler=labeler, pair_id=pairs[0].pk, choice="left")
    html = _client(labeler).get("/").content.decode()
    assert project.name in html and other.name not in html
    assert "1 labeled of 3 (2 left)" in html
    assert f'href="/projects/{project.slug}/label/"' in html


@pytest.mark.django_db
@pytest.mark.parametrize("swapped", [False, True])
def test_label_page_shows_the_leased_pair_left_and_right_in_the_lease_order(labeler, swapped):
    project = labeler.projects.get()
    project.guidelines = "Prefer **honest** answers."
    project.save()
    prompt = PromptFactory(project=project, content=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "What is 2+2?"}])
    pair = PairFactory(project=project, prompt=prompt, response_a=ResponseFactory(project=project, text="Answer A"),
                       response_b=ResponseFactory(project=project, text="Answer B"))
    _lease(project, labeler, swapped=swapped)
    response = _client(labeler).get(_label_url(project))
    assert response.status_code == 200
    html = response.content.decode()
    left, right = ("Answer B", "Answer A") if swapped else ("Answer A", "Answer B")
    assert html.index('id="left-heading"') < html.index(left) < html.index('id="right-heading"') < html.index(right)
    assert "<strong>honest</strong>" in html and "<details" in html
    assert 'data-role="system"' in html and "Be brief." in html and "What is 2+2?" in html
    assert f'name="pair" value="{pair.pk}"' in html
    assert "csrfmiddlewaretoken" in html
    assert Lease.objects.filter(pair=pair, labeler=labeler, swapped=swapped).count() == 1


@pytest.mark.django_db
def test_script_and_html_in_responses_prompt_and_guidelines_never_reach_the_page_as_markup(labeler):
    project = labeler.projects.get()
    project.guidelines = "<script>alert('guide')</script>"
    project.save()
    PairFactory(
        project=project, prompt=PromptFactory(project=project, content="<img src=x onerror=alert(2)>"),
        response_a=ResponseFactory(project=project, text="<script>alert(1)</script>"),
        response_b=ResponseFactory(project=project, text='[click](javascript:alert(3)) <b onclick="x()">hi</b>'),
    )
    html = _client(labeler).get(_label_url(project)).content.decode()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "onerror" not in html.replace("onerror=alert(2)&gt;", "")
    assert "javascript:" not in html
    assert "<b onclick" not in html and "&lt;b onclick=" in html


@pytest.mark.django_db
@pytest.mark.parametrize(("swapped", "frame_choice", "stored"),
                         [(False, "left", "a"), (False, "right", "b"), (True, "left", "b"), (True, "right", "a")])
def test_posting_a_choice_stores_it_in_the_pairs_a_b_frame(labeler, swapped, frame_choice, stored):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=swapped)
    response = _client(labeler).post(f"{_label_url(project)}submit/", {
        "pair": pair.pk, "choice": frame_choice, "rationale": "More accurate.", "flags": ["factual_error"],
        "time_ms": "4200",
    })
    assert response.status_code == 302 and response.url == _label_url(project)
    comparison = Comparison.objects.get(pair=pair, labeler=labeler)
    assert comparison.choice == stored
    assert comparison.swapped is swapped
    assert comparison.rationale == "More accurate."
    assert comparison.flags == ["factual_error"]
    assert comparison.time_ms == 4200
    assert not Lease.objects.filter(labeler=labeler).exists()


@pytest.mark.django_db
def test_htmx_submit_returns_the_panel_with_the_next_pair(labeler):
    project = labeler.projects.get()
    first = PairFactory(project=project, priority=5)
    second = PairFactory(project=project, priority=1)
    _lease(project, labeler, swapped=False)
    response = _client(labeler).post(f"{_label_url(project)}submit/", {"pair": first.pk, "choice": "tie"}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html and "Saved." in html
    assert f'name="pair" value="{second.pk}"' in html
    assert "1 labeled of 2 (1 left)" in html
    assert "HX-Request" in response["Vary"]
    assert Comparison.objects.get(pair=first).choice == "tie"


@pytest.mark.django_db
def test_disallowed_choice_shows_an_error_and_keeps_the_pair_and_the_rationale(db):
    project = ProjectFactory(allow_tie=False, allow_both_bad=False)
    labeler = _member(project)
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    client = _client(labeler)
    page = client.get(_label_url(project)).content.decode()
    assert 'value="left"' in page and 'value="right"' in page
    assert 'value="tie"' not in page and 'value="both_bad"' not in page
    for extra in ({}, HTMX):
        response = client.post(f"{_label_url(project)}submit/",
                               {"pair": pair.pk, "choice": "tie", "rationale": "Both fine"}, **extra)
        assert response.status_code == 400
        html = response.content.decode()
        assert "This project does not allow ties." in html and 'role="alert"' in html
        assert f'name="pair" value="{pair.pk}"' in html
        assert ">Both fine</textarea>" in html
    assert not Comparison.objects.exists()
    assert Lease.objects.filter(pair=pair, labeler=labeler).exists()


@pytest.mark.django_db
def test_invalid_form_input_names_the_field(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    response = _client(labeler).post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "up"}, **HTMX)
    assert response.status_code == 400
    # The field is named once, beside the message.
    html = response.content.decode()
    assert "Not saved (choice):</strong> Select a valid choice." in html and "choice: Select" not in html
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_pair_from_another_project_is_refused(labeler):
    project = labeler.projects.get()
    foreign = PairFactory(project=ProjectFactory())
    response = _client(labeler).post(f"{_label_url(project)}submit/", {"pair": foreign.pk, "choice": "left"})
    assert response.status_code == 404
    assert "is not part of" in response.content.decode()
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_strength_keys_appear_for_a_1_to_3_scale_and_strength_is_stored(db):
    project = ProjectFactory(strength_scale="1-3")
    labeler = _member(project)
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=True)
    client = _client(labeler)
    html = client.get(_label_url(project)).content.decode()
    assert 'name="strength" value="3" data-key="e"' in html
    client.post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "right", "strength": "3"})
    comparison = Comparison.objects.get(pair=pair)
    assert comparison.choice == "a" and comparison.strength == 3

    plain = ProjectFactory()
    assert 'name="strength"' not in _client(_member(plain)).get(_label_url(plain)).content.decode()


@pytest.mark.django_db
def test_a_tie_ignores_a_strength_left_selected(db):
    project = ProjectFactory(strength_scale="1-3")
    labeler = _member(project)
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    _client(labeler).post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "tie", "strength": "2"})
    comparison = Comparison.objects.get(pair=pair)
    assert comparison.choice == "tie" and comparison.strength is None


@pytest.mark.django_db
def test_skip_releases_the_lease(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project, priority=1)
    following = PairFactory(project=project, priority=0)
    _lease(project, labeler, swapped=False)
    client = _client(labeler)
    response = client.post(f"{_label_url(project)}skip/", {"pair": pair.pk}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Pair skipped" in html
    # The labeler moves on to the next pair; the skipped one is not offered to them again.
    assert following.response_a.text in html and pair.response_a.text not in html
    assert Lease.objects.get(labeler=labeler, pair=pair).skipped
    again = client.post(f"{_label_url(project)}skip/", {"pair": pair.pk})
    assert again.status_code == 404 and "You hold no lease on this pair." in again.content.decode()


@pytest.mark.django_db
def test_progress_counts_my_labels_against_what_i_could_still_label(db):
    project = ProjectFactory(labels_per_pair=2)
    me, other = _member(project), _member(project)
    pairs = [PairFactory(project=project) for _ in range(4)]
    PairFactory(project=project, gold_choice="a")
    Pair.objects.filter(pk=pairs[3].pk).update(status=Pair.Status.COMPLETE, label_count=2)
    for labeler in (me, other):
        lease = services.pair_next_for_labeler(project=project, labeler=labeler)
        services.comparison_submit(labeler=labeler, pair_id=lease.pair_id, choice="left")
    html = _client(me).get(_label_url(project)).content.decode()
    # Mine: one labeled; two open pairs I have not labeled (the complete and the gold pair do not count).
    assert "1 labeled of 3 (2 left)" in html
    assert '<progress id="progress-mine" max="3" value="1">' in html


@pytest.mark.django_db
def test_a_skipped_pair_is_not_left_in_my_progress(db):
    project = ProjectFactory()
    me = _member(project)
    skipped, labeled = PairFactory(project=project, priority=1), PairFactory(project=project, priority=0)
    client = _client(me)
    client.post(f"{_label_url(project)}skip/", {"pair": services.pair_next_for_labeler(project=project,
                                                                                       labeler=me).pair_id})
    assert services.pair_next_for_labeler(project=project, labeler=me).pair_id == labeled.pk
    client.post(f"{_label_url(project)}submit/", {"pair": labeled.pk, "choice": "left"})
    html = client.get(_label_url(project)).content.decode()
    # The queue has nothing left for me (it never offers a skipped pair again), and the bar says so.
    assert "All done" in html and "1 labeled of 1 (0 left)" in html
    home = client.get("/").content.decode()
    assert "1 labeled of 1 (0 left)" in home and "Start labeling" not in home
    assert Pair.objects.get(pk=skipped.pk).status == Pair.Status.OPEN


@pytest.mark.django_db
def test_an_empty_queue_with_pairs_held_by_others_says_so_instead_of_all_done(db):
    project = ProjectFactory(labels_per_pair=1)
    pair = PairFactory(project=project)
    holder, me = _member(project), _member(project)
    assert services.pair_next_for_labeler(project=project, labeler=holder).pair_id == pair.pk
    html = _client(me).get(_label_url(project)).content.decode()
    assert "Nothing free right now" in html and "All done" not in html and "0 labeled of 1 (1 left)" in html
    assert "The 1 pair left for you" in html and "is being labeled by others" in html
    assert 'id="label-form"' not in html
    # Answered by its holder, nothing is left: all done.
    services.comparison_submit(pair_id=pair.pk, labeler=holder, choice="left")
    html = _client(me).get(_label_url(project)).content.decode()
    assert "All done" in html and "0 labeled of 0 (0 left)" in html


@pytest.mark.django_db
def test_empty_queue_shows_all_done_with_a_link_back(labeler):
    project = labeler.projects.get()
    html = _client(labeler).get(_label_url(project)).content.decode()
    assert "All done" in html and 'href="/"' in html
    assert 'id="label-form"' not in html


@pytest.mark.django_db
def test_submit_requires_the_csrf_token(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    client = Client(enforce_csrf_checks=True)
    client.force_login(labeler)
    response = client.post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "left"})
    assert response.status_code == 403
    # A stale token (logged out or in again in another tab) gets the site's page, saying nothing was saved.
    stale = client.post(f"{_label_url(project)}submit/", {"pair": pair.pk, "choice": "left",
                                                          "csrfmiddlewaretoken": "stale" * 8})
    html = stale.content.decode()
    assert stale.status_code == 403 and "<h1>This form has expired</h1>" in html and "Nothing was saved" in html
    assert "Log out" in html and 'href="/"' in html
    assert not Comparison.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["submit", "skip"])
def test_a_pair_id_too_large_for_the_database_is_a_form_error(labeler, action):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    response = _client(labeler).post(f"{_label_url(project)}{action}/",
                                     {"pair": 99999999999999999999999, "choice": "left"}, **HTMX)
    assert response.status_code == 400
    assert f"(pair):</strong> Ensure this value is less than or equal to {2**63 - 1}." in response.content.decode()
    # The labeler keeps the pair they hold.
    assert pair.response_a.text in response.content.decode()
    assert not Comparison.objects.exists() and not Lease.objects.get(labeler=labeler).skipped


@pytest.mark.django_db
def test_a_rationale_refused_as_too_long_comes_back_as_typed_with_the_flags(labeler):
    project = labeler.projects.get()
    pair = PairFactory(project=project)
    _lease(project, labeler, swapped=False)
    typed = "Why: " + "x" * 10_000
    response = _client(labeler).post(f"{_label_url(project)}submit/",
                                     {"pair": pair.pk, "choice": "left", "rationale": typed, "flags": ["unsafe"]},
                                     **HTMX)
    assert response.status_code == 400
    html = response.content.decode()
    assert "rationale" in html and f">{typed}</textarea>" in html
    assert 'value="unsafe" checked' in html
    assert not Comparison.objects.exists()


@pytest.mark.django_db
def test_the_labeling_pages_are_never_kept_by_the_browser(labeler):
    # Back or Forward would otherwise show a pair answered since, and a progress count gone stale.
    project = labeler.projects.get()
    PairFactory(project=project)
    client = _client(labeler)
    for response in (client.get(_label_url(project)), client.get(_label_url(project), **HTMX),
                     client.post(f"{_label_url(project)}submit/", {"pair": 0, "choice": "left"}, **HTMX)):
        assert "no-store" in response["Cache-Control"], response.status_code


@pytest.mark.django_db
def test_a_labeler_refused_a_dashboard_page_sees_the_sites_page_with_a_way_back(labeler):
    response = _client(labeler).get("/dashboard/")
    assert response.status_code == 403
    html = response.content.decode()
    assert "<h1>Not allowed</h1>" in html and 'href="/"' in html and "Log out" in html
    assert 'href="/dashboard/"' not in html


@pytest.mark.django_db
def test_admins_and_managers_get_a_link_to_the_dashboard_and_labelers_do_not(labeler, manager):
    admin = UserFactory(is_staff=True, is_superuser=True)
    for user in (admin, manager):
        client = _client(user)
        assert 'href="/dashboard/">Dashboard</a>' in client.get("/").content.decode()
        assert client.get("/dashboard/").status_code == 200  # the link leads somewhere they may go
    assert 'href="/dashboard/"' not in _client(labeler).get("/").content.decode()
    assert _client(labeler).get("/dashboard/").status_code == 403

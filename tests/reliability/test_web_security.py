"""Web security of the pages and of the API's authentication: hostile text renders inert everywhere, redirects stay
on the site, other projects' objects are 404, a malformed Authorization header is a 401, and password guessing at
the login form and the token endpoint is limited."""
from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from config import middleware
from labeling.models import ApiToken, Membership
from labeling.services import api_token_create
from rewards.models import TrainingRun
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.rewards.factories import RewardModelFactory, TrainingRunFactory

PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's
HOSTILE = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>"
THROTTLE = "config.middleware.LoginThrottleMiddleware"
AUTHENTICATION = "django.contrib.auth.middleware.AuthenticationMiddleware"


def _live_markup(body: str) -> list[str]:
    return [marker for marker in ("<script>alert(1)", "<img src=x", "onerror=alert(2)>", 'href="javascript:')
            if marker in body]


# --- stored XSS -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_hostile_text_renders_inert_on_every_page_and_in_the_admin():
    project = ProjectFactory(name="P" + HOSTILE, guidelines=f"G {HOSTILE}\n\n[guide](javascript:alert(3))")
    manager = UserFactory()
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    labeler = UserFactory(username="eve" + HOSTILE)  # the admin and the ORM skip the username validator
    Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
    PairFactory(project=project, prompt__content=[{"role": "user" + HOSTILE, "content": "C" + HOSTILE}],
                response_a__text="A" + HOSTILE, response_b__text="B" + HOSTILE)
    api_token_create(user=labeler, project=project, scope=ApiToken.Scope.RERANK, name="K" + HOSTILE)
    now = timezone.now()
    run = TrainingRunFactory(
        project=project, status=TrainingRun.Status.RUNNING, started_at=now, heartbeat_at=now, created_by=labeler,
        base_model="M" + HOSTILE, hyperparameters={"h" + HOSTILE: "v" + HOSTILE}, error="E" + HOSTILE,
        log_tail="L" + HOSTILE, metrics_history=[{"step": 1, f"x{HOSTILE}loss": 1.0, "x</script>accuracy": 0.5}],
        eval_metrics={"m" + HOSTILE: "v" + HOSTILE, "eval_by_length": {"0-63" + HOSTILE: {"pairs": HOSTILE}}})
    RewardModelFactory(project=project, base_model="B" + HOSTILE, training_run=run)
    pages = ["/", f"/projects/{project.slug}/label/", "/dashboard/", f"/dashboard/{project.slug}/",
             f"/dashboard/{project.slug}/guidelines/", f"/dashboard/{project.slug}/training/",
             f"/dashboard/{project.slug}/training/runs/", f"/dashboard/runs/{run.pk}/",
             f"/dashboard/runs/{run.pk}/status/"]
    client = Client()
    client.force_login(manager)
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert _live_markup(response.content.decode()) == [], url
    # The curves reach the charts as JSON that cannot close its <script> element.
    page = client.get(f"/dashboard/runs/{run.pk}/").content.decode()
    curves = re.search(r'<script id="run-curves" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in curves and "x\\u003C/script\\u003Eaccuracy" in curves

    admin = Client()
    admin.force_login(UserFactory(is_staff=True, is_superuser=True))
    for url in ["/admin/labeling/project/", f"/admin/labeling/project/{project.pk}/change/", "/admin/labeling/pair/",
                "/admin/labeling/prompt/", "/admin/labeling/response/", "/admin/labeling/apitoken/",
                "/admin/labeling/membership/", "/admin/rewards/trainingrun/",
                f"/admin/rewards/trainingrun/{run.pk}/change/", "/admin/rewards/rewardmodel/", "/admin/auth/user/"]:
        response = admin.get(url)
        assert response.status_code == 200, url
        assert _live_markup(response.content.decode()) == [], url


# --- redirects ------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example/",
                                    "\\\\evil.example/", "http:/evil.example/", " https://evil.example/",
                                    "https:evil.example", "javascript:alert(1)"])
def test_login_and_logout_never_redirect_off_the_site(labeler, target):
    client = Client()
    login = client.post(f"/accounts/login/?next={target}",
                        {"username": labeler.username, "password": PASSWORD, "next": target})
    assert login.status_code == 302 and login["Location"] == "/"
    logout = client.post("/accounts/logout/", {"next": target})
    assert logout.status_code == 302 and logout["Location"] == "/accounts/login/"


# --- other projects' objects ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_manager_of_another_project_gets_404_naming_nothing_of_the_project(project, manager):
    project.name = "Secret project name"
    project.save()
    run = TrainingRunFactory(project=project)
    model = RewardModelFactory(project=project, training_run=run)
    key, _ = api_token_create(user=manager, project=project, scope=ApiToken.Scope.RERANK)
    rival = UserFactory()
    Membership.objects.create(project=ProjectFactory(), user=rival, role=Membership.Role.MANAGER)
    client = Client()
    client.force_login(rival)
    slug = project.slug
    gets = [f"/dashboard/{slug}/", f"/dashboard/{slug}/charts.json", f"/dashboard/{slug}/rerank.json",
            f"/dashboard/{slug}/export/", f"/dashboard/{slug}/guidelines/", f"/dashboard/{slug}/training/",
            f"/dashboard/{slug}/training/runs/", f"/dashboard/runs/{run.pk}/", f"/dashboard/runs/{run.pk}/status/",
            f"/dashboard/runs/{run.pk}/metrics.json", f"/projects/{slug}/label/"]
    posts = [f"/dashboard/{slug}/api-keys/", f"/dashboard/{slug}/api-keys/{key.prefix}/revoke/",
             f"/dashboard/{slug}/members/", f"/dashboard/{slug}/members/remove/", f"/dashboard/{slug}/guidelines/",
             f"/dashboard/{slug}/training/start/", f"/dashboard/runs/{run.pk}/cancel/",
             f"/dashboard/reward-models/{model.pk}/deploy/", f"/projects/{slug}/label/submit/",
             f"/projects/{slug}/label/skip/"]
    for method, url in [("get", url) for url in gets] + [("post", url) for url in posts]:
        response = getattr(client, method)(url, {"username": manager.username, "role": "labeler"}
                                           if method == "post" else None)
        assert response.status_code == 404, (method, url)
        assert b"Secret project" not in response.content, (method, url)
    key.refresh_from_db()
    model.refresh_from_db()
    assert key.revoked_at is None and not model.is_deployed
    assert Membership.objects.filter(project=project, user=manager, role=Membership.Role.MANAGER).exists()


# --- API authentication ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["B\xe9arer abc", "\xe9 abc", "Bearer \xe9", "Bearer", "Bearer a b"])
def test_a_malformed_authorization_header_is_a_401_not_a_server_error(header):
    response = APIClient().get("/api/v1/projects/", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response.json()["error"]["code"] in ("authentication_failed", "not_authenticated")


# --- password guessing ----------------------------------------------------------------------------------


@pytest.fixture
def login_throttle(settings):
    """The throttle as the settings chain it (tests/conftest.py gives each test counters of its own)."""
    assert THROTTLE in settings.MIDDLEWARE


def _token(username: str, password: str, **kwargs):
    return APIClient().post("/api/v1/auth/token/", {"username": username, "password": password},
                            format=kwargs.pop("format", "json"), **kwargs)


@pytest.mark.django_db
def test_wrong_passwords_at_the_token_endpoint_are_limited_and_then_even_the_right_one_is_refused(
        login_throttle, labeler):
    for _ in range(middleware.LOGIN_FAILURES_MAX):
        assert _token(labeler.username, "wrong").status_code == 401
    tokens = ApiToken.objects.count()
    refused = _token(labeler.username, PASSWORD)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= middleware.LOGIN_WINDOW_SECONDS + 1
    assert ApiToken.objects.count() == tokens
    # Another account is not held back by this one's failures.
    assert _token(UserFactory().username, PASSWORD).status_code == 201


@pytest.mark.django_db
def test_wrong_passwords_at_the_login_form_are_limited_and_the_page_says_so(login_throttle, labeler, monkeypatch):
    client = Client(enforce_csrf_checks=True)

    def post(password: str, token: str):
        return client.post("/accounts/login/?next=/dashboard/", {"username": labeler.username, "password": password,
                                                                 "next": "/dashboard/", "csrfmiddlewaretoken": token})

    token = _csrf_token(client.get("/accounts/login/"))
    for _ in range(middleware.LOGIN_FAILURES_MAX):
        assert post("wrong", token).status_code == 200
    refused = post(PASSWORD, token)
    assert refused.status_code == 429
    page = refused.content.decode()
    assert "Too many failed logins" in page and 'name="next" value="/dashboard/"' in page
    assert f'value="{labeler.username}"' in page
    assert "_auth_user_id" not in client.session
    # The admin's login page counts against the same limit.
    assert Client().post("/admin/login/", {"username": labeler.username, "password": PASSWORD}).status_code == 429
    # Once the limit allows it again, the refusal page's own form logs in.
    monkeypatch.setattr(middleware, "LOGIN_FAILURES_MAX", middleware.LOGIN_FAILURES_MAX + 5)
    logged_in = post(PASSWORD, _csrf_token(refused))
    assert logged_in.status_code == 302 and logged_in["Location"] == "/dashboard/"


def _csrf_token(response) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.content.decode()).group(1)


@pytest.mark.django_db
def test_spellings_of_one_username_and_body_encodings_share_one_limit(login_throttle, labeler):
    spellings = [labeler.username, f" {labeler.username} ", labeler.username.upper()]
    for attempt in range(middleware.LOGIN_FAILURES_MAX):
        name = spellings[attempt % len(spellings)]
        answer = _token(name, "wrong", format="json" if attempt % 2 else "multipart")
        assert answer.status_code == 401, (name, answer.content)
    assert _token(labeler.username, PASSWORD, format="multipart").status_code == 429
    assert Client().post("/accounts/login/", {"username": labeler.username, "password": PASSWORD}).status_code == 429


@pytest.mark.django_db
def test_successful_logins_and_refused_bodies_do_not_use_up_the_limit(login_throttle, labeler):
    for _ in range(middleware.LOGIN_FAILURES_MAX + 5):
        assert _token(labeler.username, PASSWORD).status_code == 201
        assert APIClient().post("/api/v1/auth/token/", {"username": labeler.username}, format="json").status_code == 400
    client = Client()
    for _ in range(middleware.LOGIN_FAILURES_MAX + 5):
        assert client.post("/accounts/login/", {"username": labeler.username, "password": PASSWORD}).status_code == 302
        client.post("/accounts/logout/")


@pytest.mark.django_db
def test_an_attempt_holds_its_place_while_the_password_is_checked(login_throttle, labeler, monkeypatch):
    """Guesses sent in parallel: each takes its slot before its password is checked, so the ones beyond the
    limit are refused even though none of the others has failed yet."""
    from django.core.cache import cache

    seen = []
    real = middleware._login_key

    def spy(request, username):
        key = real(request, username)
        seen.append(key)
        return key

    monkeypatch.setattr(middleware, "_login_key", spy)
    assert _token(labeler.username, "wrong").status_code == 401
    key = seen[-1]
    assert cache.get(key) == 1
    cache.set(key, middleware.LOGIN_FAILURES_MAX - 1, 60)  # nine guesses still being checked
    assert _token(labeler.username, PASSWORD).status_code == 201  # the tenth slot, given back on success
    cache.set(key, middleware.LOGIN_FAILURES_MAX, 60)  # ten in flight
    assert _token(labeler.username, PASSWORD).status_code == 429


def test_the_login_throttle_is_in_the_middleware_chain():
    chain = list(settings.MIDDLEWARE)
    assert THROTTLE in chain
    assert chain.index(THROTTLE) > chain.index(AUTHENTICATION)

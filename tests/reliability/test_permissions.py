"""Who may do what: every URL pattern crossed with every kind of caller, hashed secrets, CSRF and production settings.

The rule every row of the table follows:

- Anonymous callers get 401 from the API (with `WWW-Authenticate: Bearer`) and a redirect to the login page from
  the pages (to the admin's own login page under /admin/).
- An object in a project the caller cannot see (neither a member nor staff) is 404, exactly like an object that
  does not exist, and the answer names nothing of that project.
- In a project the caller can see, an operation their role does not allow is 403: labelers on manager operations,
  everyone but staff on admin-only ones such as creating a project. The Django admin sends anyone but staff to
  its login page instead.
- A rerank key works on /rerank/ and /generate/ for its own project only. Anything else, another project's
  reranking included, is 403 whatever the object, so the answer does not depend on whether the object exists
  and leaks nothing. A key is not a session: pages treat its bearer as anonymous.
- A refused request writes nothing to the database (authentication's "last used" touch of a token and the rerank
  traffic counters aside), and no answer carries the name, guidelines, prompts or responses of a project the
  caller cannot see.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib import admin
from django.contrib.auth.hashers import get_hasher, identify_hasher
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction
from django.shortcuts import resolve_url
from django.urls import URLResolver, get_resolver, resolve
from django.utils import timezone
from rest_framework.test import APIClient

from labeling.models import ApiToken, Comparison, Lease, Membership
from labeling.services import api_token_create
from rewards.models import Policy, RewardModelDeployment
from rewards.services import reward_model_register
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.rewards.factories import TrainingRunFactory, labeled_pairs
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's

ANON, OTHER, LABELER, MANAGER, ADMIN, KEY_OTHER, KEY = (
    "anonymous", "labeler-of-another-project", "labeler", "manager", "admin", "rerank-key-of-another-project",
    "rerank-key",
)
ROLES = (ANON, OTHER, LABELER, MANAGER, ADMIN, KEY_OTHER, KEY)
USERS = (OTHER, LABELER, MANAGER, ADMIN)
KEYS = (KEY_OTHER, KEY)

# An expected answer: a status code, or one of these two redirects to a login page.
LOGIN = "redirect to /accounts/login/"
ADMIN_LOGIN = "redirect to /admin/login/"
Expected = int | str

# Every request of the table comes from outside the host, as it would through a proxy: /metrics answers
# loopback without a token.
REMOTE_ADDR = "203.0.113.7"


# --- expectations by kind of operation ------------------------------------------------------------------


def api(ok: int, level: str) -> dict[str, Expected]:
    """API answers: `ok` for the callers the level admits, the refusals of the module docstring for the rest."""
    refused: dict[str, Expected] = {ANON: 401, KEY_OTHER: 403, KEY: 403}
    if level == "public":
        return dict.fromkeys(ROLES, ok)
    if level == "user":
        return {**refused, **dict.fromkeys(USERS, ok)}
    if level == "staff":
        return {**refused, OTHER: 403, LABELER: 403, MANAGER: 403, ADMIN: ok}
    member = {**refused, OTHER: 404, LABELER: ok, MANAGER: ok, ADMIN: ok}
    if level == "member":
        return member
    if level == "manager":
        return {**member, LABELER: 403}
    if level == "rerank":
        return {**member, KEY: ok}
    raise ValueError(level)


def page(ok: int, level: str) -> dict[str, Expected]:
    """Page answers: keys carry no session, so they are anonymous here."""
    anonymous = dict.fromkeys((ANON, *KEYS), LOGIN)
    if level == "public":
        return dict.fromkeys(ROLES, ok)
    if level == "user":
        return {**anonymous, **dict.fromkeys(USERS, ok)}
    if level == "member":
        return {**anonymous, OTHER: 404, LABELER: ok, MANAGER: ok, ADMIN: ok}
    if level == "manager":
        return {**anonymous, OTHER: 404, LABELER: 403, MANAGER: ok, ADMIN: ok}
    if level == "dashboard":
        # The overview is about no project in particular: a person who manages none is refused.
        return {**anonymous, OTHER: 403, LABELER: 403, MANAGER: ok, ADMIN: ok}
    raise ValueError(level)


def staff(ok: Expected) -> dict[str, Expected]:
    """Django admin pages: staff get `ok`; everyone else, with or without a session, the admin's login page."""
    return {**dict.fromkeys(ROLES, ADMIN_LOGIN), ADMIN: ok}


# --- the table ------------------------------------------------------------------------------------------

UPLOAD = object()  # replaced by a fresh one-line HH upload for each request
HH_LINE = json.dumps({"chosen": "\n\nHuman: Atlas upload prompt?\n\nAssistant: A kind and useful reply.",
                      "rejected": "\n\nHuman: Atlas upload prompt?\n\nAssistant: Go away."}) + "\n"


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # a template over the world's names: {p} is the project's slug, {run} a training run id, ...
    expect: dict[str, Expected]
    data: dict[str, Any] | None = None  # templated like the path
    as_json: bool = False  # a JSON body (the API) rather than a form (pages)


def _api(method: str, path: str, expect: dict[str, Expected], data: dict[str, Any] | None = None, *,
         multipart: bool = False) -> Row:
    return Row(method, "/api/v1/" + path, expect, data, as_json=not multipart)


RERANK_BODY = {"project": "{p}", "prompt": "How do I boil an egg?", "candidates": ["Boil it for eight minutes.", "No."]}

API_ROWS = [
    _api("POST", "auth/token/", api(201, "public"), {"username": "{labeler}", "password": PASSWORD}),
    # The labeler's own second token: only its owner can revoke it, to anyone else the prefix is unknown.
    _api("DELETE", "auth/tokens/{spare_token}/", {**api(404, "user"), LABELER: 204}),
    _api("GET", "projects/", api(200, "user")),
    _api("POST", "projects/create/", api(201, "staff"), {"name": "New", "slug": "brand-new"}),
    _api("GET", "projects/{p}/", api(200, "member")),
    _api("PATCH", "projects/{p}/", api(200, "manager"), {"guidelines": "Be brief."}),
    _api("GET", "projects/{p}/members/", api(200, "manager")),
    _api("POST", "projects/{p}/members/set/", api(200, "manager"), {"username": "{spare}", "role": "labeler"}),
    _api("DELETE", "projects/{p}/members/{labeler}/", api(204, "manager")),
    _api("POST", "projects/{p}/pairs/", api(201, "manager"),
         {"prompt": "Why?", "response_a": "So.", "response_b": "No."}),
    _api("GET", "projects/{p}/next/", api(200, "member")),
    _api("POST", "projects/{p}/skip/", api(204, "member"), {"pair": "{pair}"}),
    _api("POST", "projects/{p}/import/", api(201, "manager"), {"format": "hh", "file": UPLOAD}, multipart=True),
    _api("GET", "projects/{p}/export/?format=trl", api(200, "manager")),
    _api("GET", "projects/{p}/stats/", api(200, "manager")),
    _api("POST", "comparisons/", api(201, "member"), {"pair": "{pair}", "choice": "left"}),
    _api("GET", "training-runs/", api(200, "user")),
    _api("POST", "training-runs/", api(202, "manager"), {"project": "{p}", "kind": "reward"}),
    _api("GET", "training-runs/{run}/", api(200, "manager")),
    _api("POST", "training-runs/{run}/cancel/", api(200, "manager")),
    _api("GET", "reward-models/?project={p}", api(200, "manager")),
    _api("POST", "reward-models/register/", api(201, "manager"), {"project": "{p}", "path": "{model_dir}"}),
    _api("POST", "reward-models/{rm}/deploy/", api(200, "manager")),
    _api("GET", "policies/?project={p}", api(200, "manager")),
    _api("POST", "rerank/", api(200, "rerank"), RERANK_BODY),
    _api("POST", "generate/", api(200, "rerank"),
         {"project": "{p}", "prompt": "Say hi.", "policy": "{policy}", "n": 2, "max_new_tokens": 2, "seed": 1,
          "rerank": False}),
    _api("GET", "projects/{p}/api-keys/", api(200, "manager")),
    _api("POST", "projects/{p}/api-keys/", api(201, "manager"), {"name": "new key"}),
    _api("DELETE", "projects/{p}/api-keys/{key}/", api(200, "manager")),
]

PAGE_ROWS = [
    Row("GET", "/", page(200, "user")),
    Row("GET", "/projects/{p}/label/", page(200, "member")),
    Row("POST", "/projects/{p}/label/submit/", page(302, "member"), {"pair": "{pair}", "choice": "left"}),
    Row("POST", "/projects/{p}/label/skip/", page(200, "member"), {"pair": "{pair}"}),
    Row("GET", "/dashboard/", page(200, "dashboard")),
    # Creating a project from the overview is for admins, as in the API: managers are refused too.
    Row("POST", "/dashboard/", {**page(302, "dashboard"), MANAGER: 403},
        {"name": "Page project", "slug": "page-project", "labels_per_pair": 1, "strength_scale": "none",
         "gold_rate": 0}),
    Row("GET", "/dashboard/{p}/", page(200, "manager")),
    Row("GET", "/dashboard/{p}/charts.json", page(200, "manager")),
    Row("GET", "/dashboard/{p}/rerank.json", page(200, "manager")),
    Row("POST", "/dashboard/{p}/api-keys/", page(201, "manager"), {"name": "page key"}),
    Row("POST", "/dashboard/{p}/api-keys/{key}/revoke/", page(302, "manager")),
    Row("POST", "/dashboard/{p}/import/", page(200, "manager"), {"format": "hh", "file": UPLOAD}),
    Row("GET", "/dashboard/{p}/export/?format=trl", page(200, "manager")),
    Row("POST", "/dashboard/{p}/members/", page(302, "manager"), {"username": "{spare}", "role": "labeler"}),
    Row("POST", "/dashboard/{p}/members/remove/", page(302, "manager"), {"username": "{labeler}"}),
    Row("GET", "/dashboard/{p}/guidelines/", page(200, "manager")),
    Row("POST", "/dashboard/{p}/guidelines/", page(302, "manager"), {"guidelines": "Read twice."}),
    Row("POST", "/dashboard/{p}/settings/", page(302, "manager"),
        {"name": "Atlas Fjord Project", "labels_per_pair": 2, "allow_tie": "on", "strength_scale": "none",
         "gold_rate": 0.1}),
    Row("GET", "/dashboard/runs/{run}/", page(200, "manager")),
    Row("GET", "/dashboard/runs/{run}/status/", page(200, "manager")),
    Row("GET", "/dashboard/runs/{run}/metrics.json", page(200, "manager")),
    Row("POST", "/dashboard/runs/{run}/cancel/", page(302, "manager")),
    Row("POST", "/dashboard/reward-models/{rm}/deploy/", page(302, "manager")),
    Row("GET", "/dashboard/{p}/training/", page(200, "manager")),
    Row("GET", "/dashboard/{p}/training/runs/", page(200, "manager")),
    Row("POST", "/dashboard/{p}/training/start/", page(302, "manager"), {"kind": "reward"}),
]

OTHER_ROWS = [
    Row("GET", "/api/schema/", page(200, "public")),
    Row("GET", "/api/docs/", page(200, "public")),
    # /metrics wants loopback or PREFLAB_METRICS_TOKEN; no user or key token is that.
    Row("GET", "/metrics", page(403, "public")),
    Row("GET", "/accounts/login/", page(200, "public")),
    Row("POST", "/accounts/logout/", page(302, "public")),
    Row("GET", "/accounts/password_change/", page(200, "user")),
    Row("POST", "/accounts/password_change/", page(302, "user"),
        {"old_password": PASSWORD, "new_password1": "a-new-Secret-9431", "new_password2": "a-new-Secret-9431"}),
    Row("GET", "/accounts/password_change/done/", page(200, "user")),
    Row("GET", "/accounts/password_reset/", page(200, "public")),
    Row("POST", "/accounts/password_reset/", page(302, "public"), {"email": "nobody@example.com"}),
    Row("GET", "/accounts/password_reset/done/", page(200, "public")),
    Row("GET", "/accounts/reset/MQ/not-a-token/", page(200, "public")),  # renders "the link is invalid"
    Row("GET", "/accounts/reset/done/", page(200, "public")),
]

ADMIN_ROWS = [
    Row("GET", "/admin/", staff(200)),
    # A signed-in person without staff rights sees the login form with a note; staff are sent on to the index.
    Row("GET", "/admin/login/", {**dict.fromkeys(ROLES, 200), ADMIN: 302}),
    # Staff are logged out and sent to LOGOUT_REDIRECT_URL; anyone else to the admin index (then to its login).
    Row("POST", "/admin/logout/", dict.fromkeys(ROLES, 302)),
    Row("GET", "/admin/password_change/", staff(200)),
    Row("GET", "/admin/password_change/done/", staff(200)),
    Row("GET", "/admin/autocomplete/", staff(403)),  # no source field named: refused even to staff
    Row("GET", "/admin/jsi18n/", staff(200)),
    Row("GET", "/admin/r/{project_type}/{obj_labeling_project}/", staff(404)),  # projects have no public URL
    Row("GET", "/admin/labeling/", staff(200)),
    Row("GET", "/admin/no-such-page/", staff(404)),
    Row("GET", "/admin/auth/user/{obj_auth_user}/password/", staff(200)),
]

# Registered in the admin but never added there: an API token's secret is shown once by whoever makes it.
ADMIN_NO_ADD = {ApiToken}


def admin_model_rows() -> list[Row]:
    """The admin's pages of every registered model, on one object of the world each."""
    rows = []
    for model in admin.site._registry:
        base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        obj = "{obj_" + f"{model._meta.app_label}_{model._meta.model_name}" + "}"
        rows += [
            Row("GET", base, staff(200)),
            Row("GET", base + "add/", staff(403 if model in ADMIN_NO_ADD else 200)),
            Row("GET", f"{base}{obj}/", staff(302)),  # to the change page
            Row("GET", f"{base}{obj}/change/", staff(200)),
            Row("GET", f"{base}{obj}/history/", staff(200)),
            Row("GET", f"{base}{obj}/delete/", staff(200)),
            Row("POST", f"{base}{obj}/delete/", staff(302), {"post": "yes"}),
        ]
    return rows


def all_rows() -> list[Row]:
    return API_ROWS + PAGE_ROWS + OTHER_ROWS + ADMIN_ROWS + admin_model_rows()


# --- the URL patterns -----------------------------------------------------------------------------------


def _join(prefix: str, pattern: str) -> str:
    # As django.urls does for ResolverMatch.route: a nested regex loses its leading "^".
    return prefix + pattern.removeprefix("^") if prefix else pattern


def url_patterns(patterns=None, prefix: str = "") -> Iterator[tuple[str, Callable]]:
    """Every (route, view) of the project's URLconf, nested includes walked."""
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(entry, URLResolver):
            yield from url_patterns(entry.url_patterns, _join(prefix, str(entry.pattern)))
        else:
            yield _join(prefix, str(entry.pattern)), entry.callback


def _route_of(path: str) -> str:
    return resolve(urlsplit(path).path).route


def _handled_methods(view: Callable) -> set[str] | None:
    """The HTTP methods a class-based view of this project answers; None for views of other packages."""
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    if view_class is None or not view_class.__module__.startswith(("labeling.", "rewards.", "config.")):
        return None
    return {method.upper() for method in ("get", "post", "put", "patch", "delete") if hasattr(view_class, method)}


def test_every_url_pattern_and_method_has_a_row_in_the_table():
    placeholders = defaultdict(lambda: "1")
    covered: dict[str, set[str]] = defaultdict(set)
    for row in all_rows():
        covered[_route_of(row.path.format_map(placeholders))].add(row.method)
        assert set(row.expect) == set(ROLES), f"{row.method} {row.path} lacks roles"
    patterns = dict(url_patterns())
    missing = sorted(route for route in patterns if route not in covered)
    assert not missing, f"URL patterns without a row in the permissions table: {missing}"
    for route, view in patterns.items():
        methods = _handled_methods(view)
        if methods is not None:
            assert methods <= covered[route], f"{route}: no row for {sorted(methods - covered[route])}"


# --- the world the table runs against -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_reward_model(root)
    tiny_causal_lm(root)
    return root


@pytest.fixture(autouse=True)
def fresh_state(fresh_caches):
    yield


@dataclass
class World:
    names: dict[str, Any]
    clients: dict[str, APIClient]
    # Per project slug: what only those who may see the project may read.
    markers: dict[str, list[str]]
    sees: dict[str, set[str]] = field(default_factory=dict)


def _client(*, user=None, key: str | None = None) -> APIClient:
    client = APIClient(REMOTE_ADDR=REMOTE_ADDR)
    if user is not None:
        client.force_login(user)
        _, key = api_token_create(user=user, name="matrix")
    if key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def world(db, model_root, settings) -> World:
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [model_root]}
    project = ProjectFactory(name="Atlas Fjord Project", slug="atlas-fjord", labels_per_pair=3,
                             guidelines="Guideline text atlas-7731.")
    other = ProjectFactory(name="Borealis Kestrel Project", slug="borealis-kestrel",
                           guidelines="Guideline text borealis-5519.")
    labeler, manager, other_labeler, spare = UserFactory(), UserFactory(), UserFactory(), UserFactory()
    admin_user = UserFactory(is_staff=True, is_superuser=True)
    membership = Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    Membership.objects.create(project=other, user=other_labeler, role=Membership.Role.LABELER)

    pair = PairFactory(project=project, prompt__content="Atlas prompt text 4410?",
                       response_a__text="Atlas reply text one 4410.", response_b__text="Atlas reply text two 4410.")
    PairFactory(project=other, prompt__content="Borealis prompt text 8820?",
                response_a__text="Borealis reply text one 8820.", response_b__text="Borealis reply text two 8820.")
    # The pair to submit and skip is leased to each person of the project who may label it.
    expires = timezone.now() + timedelta(minutes=10)
    leases = [Lease.objects.create(pair=pair, labeler=user, swapped=False, expires_at=expires)
              for user in (labeler, manager, admin_user)]
    decided = labeled_pairs(project, count=4)  # imported labels: something to export and train on
    run = TrainingRunFactory(project=project)
    TrainingRunFactory(project=other)
    live = reward_model_register(project=project, path=model_root / "tiny-reward-bert", deploy=True)
    new = reward_model_register(project=project, path=model_root / "tiny-reward-bert")
    policy = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO, base_model="tiny-llama",
                                   artifact_path=str(model_root / "tiny-causal-llama"))
    spare_token, _ = api_token_create(user=labeler, name="laptop")
    key_token, key = api_token_create(user=manager, scope=ApiToken.Scope.RERANK, project=project, name="product")
    _, other_key = api_token_create(user=other_labeler, scope=ApiToken.Scope.RERANK, project=other, name="theirs")
    group = Group.objects.create(name="reviewers")

    names: dict[str, Any] = {
        "p": project.slug, "pair": pair.pk, "run": run.pk, "rm": new.pk, "policy": policy.pk,
        "model_dir": str(model_root / "tiny-reward-bert"), "labeler": labeler.username, "spare": spare.username,
        "spare_token": spare_token.prefix, "key": key_token.prefix,
        "project_type": ContentType.objects.get_for_model(project).pk,
    }
    admin_objects = {
        "auth_user": spare, "auth_group": group, "labeling_project": project, "labeling_membership": membership,
        "labeling_prompt": pair.prompt, "labeling_response": pair.response_a, "labeling_pair": pair,
        "labeling_comparison": Comparison.objects.filter(pair=decided[0]).first(), "labeling_lease": leases[0],
        "labeling_apitoken": spare_token, "rewards_trainingrun": run, "rewards_rewardmodel": new,
        "rewards_policy": policy,
        "rewards_rewardmodeldeployment": RewardModelDeployment.objects.get(reward_model=live),
    }
    for model in admin.site._registry:
        label = f"{model._meta.app_label}_{model._meta.model_name}"
        obj = admin_objects.get(label) or model._default_manager.order_by("pk").first()
        if obj is not None:
            names[f"obj_{label}"] = obj.pk

    clients = {
        ANON: _client(), OTHER: _client(user=other_labeler), LABELER: _client(user=labeler),
        MANAGER: _client(user=manager), ADMIN: _client(user=admin_user), KEY_OTHER: _client(key=other_key),
        KEY: _client(key=key),
    }
    markers = {
        project.slug: [project.name, project.guidelines, "Atlas prompt text", "Atlas reply text"],
        other.slug: [other.name, other.guidelines, "Borealis prompt text", "Borealis reply text"],
    }
    sees = {ANON: set(), OTHER: {other.slug}, LABELER: {project.slug}, MANAGER: {project.slug},
            ADMIN: {project.slug, other.slug}, KEY_OTHER: set(), KEY: set()}
    return World(names=names, clients=clients, markers=markers, sees=sees)


# --- running the table ----------------------------------------------------------------------------------


def _fill(value: Any, names: dict[str, Any]) -> Any:
    if value is UPLOAD:
        return SimpleUploadedFile("pairs.jsonl", HH_LINE.encode(), content_type="application/jsonl")
    if isinstance(value, str):
        filled = value.format_map(names)
        return int(filled) if re.fullmatch(r"\{\w+\}", value) and filled.isdigit() else filled
    if isinstance(value, dict):
        return {key: _fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, names) for item in value]
    return value


def _outcome(response) -> Expected:
    if response.status_code == 302:
        location = response["Location"]
        if location.startswith(resolve_url(settings.LOGIN_URL) + "?next="):
            return LOGIN
        if location.startswith("/admin/login/?next="):
            return ADMIN_LOGIN
    return response.status_code


# Writes that a refused request may make all the same: the token's "last used" touch of authentication, and the
# per-project rerank traffic counters, which count refused calls as errors by design.
ALLOWED_WRITES = (
    re.compile(r'^\s*UPDATE "labeling_apitoken" SET "last_used_at" = \S+ WHERE "labeling_apitoken"."id" = \S+$'),
    re.compile(r'^\s*INSERT INTO "?rewards_rerankminute"?'),
)
WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE|TRUNCATE|ALTER|DROP|CREATE)\b", re.IGNORECASE)


class WriteRecorder:
    """Collects the SQL statements that would change the database (django.db execute_wrapper)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def __call__(self, execute, sql, params, many, context):
        if WRITE.match(sql) and not any(allowed.match(sql) for allowed in ALLOWED_WRITES):
            self.writes.append(sql[:120])
        return execute(sql, params, many, context)


def _leaks(world: World, role: str, body: bytes, request_text: str) -> list[str]:
    found = []
    for slug, markers in world.markers.items():
        if slug in world.sees[role]:
            continue
        # A slug the caller sent is no news to them; one they did not send is.
        for marker in markers + ([slug] if slug not in request_text else []):
            if marker.encode() in body:
                found.append(marker)
    return found


def run_row(world: World, role: str, row: Row) -> str | None:
    """Make the row's request as `role` in a savepoint that is rolled back; a description of what went wrong."""
    client = world.clients[role]
    path = row.path.format_map(world.names)
    data = _fill(row.data, world.names)
    expected = row.expect[role]
    refused = expected in (LOGIN, ADMIN_LOGIN) or (isinstance(expected, int) and expected >= 400)
    cookies = copy.deepcopy(client.cookies)  # a logout or password change must not end the role's session
    recorder = WriteRecorder()
    try:
        with transaction.atomic(), connection.execute_wrapper(recorder):
            kwargs: dict[str, Any] = {"format": "json"} if row.as_json and data is not None else {}
            response = getattr(client, row.method.lower())(path, data, **kwargs)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            transaction.set_rollback(True)
    finally:
        client.cookies = cookies
    got = _outcome(response)
    problems = []
    if got != expected:
        problems.append(f"expected {expected}, got {got}: {body[:200]!r}")
    if refused and recorder.writes:
        problems.append(f"refused, yet it wrote to the database: {recorder.writes}")
    if expected == 401 and response.get("WWW-Authenticate") != "Bearer":
        problems.append("401 without 'WWW-Authenticate: Bearer'")
    leaked = _leaks(world, role, body, path + json.dumps(data, default=str))
    if leaked:
        problems.append(f"the answer shows {leaked} of a project the caller cannot see")
    return f"{row.method} {path}: " + "; ".join(problems) if problems else None


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
def test_every_route_answers_each_caller_as_the_table_says(world, role, figure):
    rows = all_rows()
    failures = [problem for row in rows if (problem := run_row(world, role, row))]
    assert not failures, f"{len(failures)} rows disagree for {role}:\n" + "\n".join(failures)
    figure(f"[permissions] {role}: {len(rows)} routes and methods answered as the table says")


@pytest.mark.django_db
def test_the_table_notices_a_wrong_expectation_a_write_and_a_leak(world):
    """The checks of run_row can fail: a wrong status, a refused write that went through, a name that leaked."""
    wrong = Row("GET", "/api/v1/projects/{p}/", {**api(200, "member"), OTHER: 200})
    assert "expected 200, got 404" in run_row(world, OTHER, wrong)
    # Expecting a refusal of a write that succeeds shows the database change.
    write = Row("PATCH", "/api/v1/projects/{p}/", {**api(200, "manager"), MANAGER: 403}, {"name": "Renamed"},
                as_json=True)
    assert "it wrote to the database" in run_row(world, MANAGER, write)
    # The project's own labeler is told it cannot see it: its name in the answer is then a leak.
    world.sees[LABELER] = set()
    assert "Atlas Fjord Project" in run_row(world, LABELER, Row("GET", "/api/v1/projects/", api(200, "user")))


# --- secrets at rest and revocation ---------------------------------------------------------------------


def _all_values(model) -> str:
    return json.dumps(list(model.objects.values()), default=str)


@pytest.mark.django_db
def test_tokens_and_keys_are_stored_only_as_hashes_and_passwords_with_a_hasher(project, manager):
    response = APIClient().post("/api/v1/auth/token/", {"username": manager.username, "password": PASSWORD},
                                format="json")
    assert response.status_code == 201
    token = response.json()["token"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    created = client.post(f"/api/v1/projects/{project.slug}/api-keys/", {"name": "prod"}, format="json")
    assert created.status_code == 201
    key = created.json()["key"]
    for secret in (token, key):
        row = ApiToken.objects.get(key_hash=hashlib.sha256(secret.encode()).hexdigest())
        assert secret.startswith(row.prefix) and len(row.prefix) < len(secret) // 2
        # Neither the secret nor its unshown part is anywhere in the table.
        assert secret not in _all_values(ApiToken) and secret[len(row.prefix):] not in _all_values(ApiToken)
    manager.refresh_from_db()
    assert PASSWORD not in manager.password
    assert identify_hasher(manager.password).algorithm == get_hasher().algorithm
    assert manager.check_password(PASSWORD)


@pytest.mark.django_db
def test_a_revoked_token_is_401_on_its_next_call(labeler):
    token, key = api_token_create(user=labeler, name="laptop")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/projects/").status_code == 200
    assert client.delete(f"/api/v1/auth/tokens/{token.prefix}/").status_code == 204
    response = client.get("/api/v1/projects/")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"


@pytest.mark.django_db
def test_a_revoked_rerank_key_is_401_on_rerank(project, manager):
    token, key = api_token_create(user=manager, scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    # An empty body gets past authentication and scope to validation: the key works.
    assert client.post("/api/v1/rerank/", {}, format="json").status_code == 400
    manager_client = _client(user=manager)
    assert manager_client.delete(f"/api/v1/projects/{project.slug}/api-keys/{token.prefix}/").status_code == 200
    response = client.post("/api/v1/rerank/", {}, format="json")
    assert response.status_code == 401 and response.json()["error"]["code"] == "authentication_failed"


# --- CSRF -----------------------------------------------------------------------------------------------


@pytest.fixture
def leased(project, labeler) -> Lease:
    pair = PairFactory(project=project)
    return Lease.objects.create(pair=pair, labeler=labeler, swapped=False,
                                expires_at=timezone.now() + timedelta(minutes=10))


def _skipped(lease: Lease) -> bool:
    lease.refresh_from_db()
    return lease.skipped


@pytest.mark.django_db
def test_page_forms_need_the_csrf_token(project, labeler, leased):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(labeler)
    url = f"/projects/{project.slug}/label/skip/"
    assert client.post(url, {"pair": leased.pair_id}).status_code == 403
    assert not _skipped(leased)
    form = client.get(f"/projects/{project.slug}/label/")
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', form.content).group(1).decode()
    assert client.post(url, {"pair": leased.pair_id, "csrfmiddlewaretoken": token}).status_code == 200
    assert _skipped(leased)


@pytest.mark.django_db
def test_the_api_needs_csrf_with_a_session_but_not_with_a_token(project, labeler, leased):
    url = f"/api/v1/projects/{project.slug}/skip/"
    session = APIClient(enforce_csrf_checks=True)
    session.force_login(labeler)
    assert session.get(f"/api/v1/projects/{project.slug}/").status_code == 200  # reads need no token
    refused = session.post(url, {"pair": leased.pair_id}, format="json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]["message"]
    assert not _skipped(leased)
    session.get("/accounts/login/")  # sets the CSRF cookie, as any page does
    csrf = session.cookies[settings.CSRF_COOKIE_NAME].value
    assert session.post(url, {"pair": leased.pair_id}, format="json", HTTP_X_CSRFTOKEN=csrf).status_code == 204
    assert _skipped(leased)

    other = Lease.objects.create(pair=PairFactory(project=project), labeler=labeler, swapped=False,
                                 expires_at=timezone.now() + timedelta(minutes=10))
    bearer = APIClient(enforce_csrf_checks=True)
    _, key = api_token_create(user=labeler)
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert bearer.post(url, {"pair": other.pair_id}, format="json").status_code == 204
    assert _skipped(other)


# --- production settings --------------------------------------------------------------------------------


def production_env(**overrides: str) -> dict[str, str]:
    """What a production deploy sets (see docker-compose.yml), with a real random key and a public host."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DJANGO_", "DATABASE_", "REDIS_", "CELERY_", "PREFLAB_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "preflab.example.com",
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://preflab.example.com",
        # Never connected to: neither the checks nor the requests below touch the database or the cache.
        "DATABASE_URL": "postgres://preflab:secret@postgres.invalid:5432/preflab",
        "REDIS_URL": "redis://redis.invalid:6379/0",
        "CELERY_BROKER_URL": "redis://redis.invalid:6379/1",
        **overrides,
    })
    return env


def test_production_settings_pass_the_deploy_checks():
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=production_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


PROBE = """
import json
import django
django.setup()
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.test import Client, override_settings

def answer(**extra):
    response = Client().get("/accounts/login/", HTTP_HOST="preflab.example.com", **extra)
    cookie = response.cookies.get(settings.CSRF_COOKIE_NAME)
    return {"status": response.status_code, "headers": dict(response.headers),
            "csrf_cookie_secure": bool(cookie and cookie["secure"])}

result = {
    "plain": answer(),
    "proxied": answer(HTTP_X_FORWARDED_PROTO="https"),
    "hasher": settings.PASSWORD_HASHERS[0],
    "password": make_password("x").split("$", 1)[0],
    "session_cookie_secure": settings.SESSION_COOKIE_SECURE,
}
# docker-compose on its own serves plain HTTP (DJANGO_SECURE_SSL_REDIRECT=false).
with override_settings(SECURE_SSL_REDIRECT=False):
    result["no_redirect"] = answer()
# Without a proxy to trust (DJANGO_SECURE_PROXY_SSL_HEADER blank), a client's own claim of HTTPS is ignored.
with override_settings(SECURE_PROXY_SSL_HEADER=None):
    result["claimed_https"] = answer(HTTP_X_FORWARDED_PROTO="https")
print(json.dumps(result))
"""


def _probe() -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=production_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_answers_carry_the_security_headers():
    probe = _probe()
    assert probe["plain"]["status"] == 301
    assert probe["plain"]["headers"]["Location"] == "https://preflab.example.com/accounts/login/"
    proxied = probe["proxied"]
    assert proxied["status"] == 200
    headers = proxied["headers"]
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert proxied["csrf_cookie_secure"] and probe["session_cookie_secure"]
    assert "MD5" not in probe["hasher"] and probe["password"] in ("pbkdf2_sha256", "argon2", "bcrypt_sha256",
                                                                   "scrypt")

    # Plain HTTP without a proxy: served, but HSTS only ever goes out over HTTPS.
    plain = probe["no_redirect"]
    assert plain["status"] == 200 and "Strict-Transport-Security" not in plain["headers"]
    assert plain["headers"]["X-Frame-Options"] == "DENY"
    assert probe["claimed_https"]["status"] == 301



"""API fuzzing: schemathesis generates requests from the service's own OpenAPI schema, for every role.

Every operation of /api/schema/ is called through the WSGI application as each role (anonymous, a labeler and a
manager of the project, an admin, a labeler of another project, a rerank key of the project) with generated
valid (positive) and invalid (negative) inputs. Every response must be no 5xx, carry a documented status code and
content type, match its documented schema, and every 4xx must be the JSON error body of labeling/errors.py.

Each generated case is sent once per role, each time on the same starting rows (a savepoint rolled back after
every request). PREFLAB_FUZZ_EXAMPLES (cases per operation and generation mode; the default of 5 sends 60 requests
per operation) and PREFLAB_FUZZ_SEED tune a run.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, transaction
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi import from_wsgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from labeling.errors import DomainError
from labeling.models import ApiToken, Comparison, Membership
from labeling.services import api_token_create, pair_next_for_labeler
from rewards import generation
from rewards.models import Policy, TrainingRun
from rewards.services import reward_model_register
from tests.factories import PairFactory, ProjectFactory, UserFactory
from tests.rewards.factories import ImportedComparisonFactory, TrainingRunFactory, labeled_pairs
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

EXAMPLES = int(os.environ.get("PREFLAB_FUZZ_EXAMPLES", "5"))
SEED = int(os.environ.get("PREFLAB_FUZZ_SEED", "0"))
ROLES = ("anonymous", "labeler", "manager", "admin", "outsider", "rerank_key")
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def error_body_conformance(ctx, response, case) -> None:
    """Every 4xx, DRF's own included, is JSON shaped {"error": {"code", "message", "field", ...}}."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.text[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if (not isinstance(error, dict) or not isinstance(error.get("code"), str)
            or not isinstance(error.get("message"), str) or "field" not in error):
        raise AssertionError(f"{response.status_code} body is not an error body: {str(body)[:200]}")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          error_body_conformance]


@dataclass
class World:
    """The rows the fuzzer talks about: who calls, and real values for path parameters and body fields."""

    headers: dict[str, dict[str, str]]
    real: dict[str, list[Any]]
    stats: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failed_requests: int = 0
    # The first failure of each kind, per role and operation.
    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import_root = tmp_path_factory.mktemp("import")
    return {"import_root": import_root, "reward": tiny_reward_model(import_root),
            "policy": tiny_causal_lm(tmp_path_factory.mktemp("policy"))}


@pytest.fixture
def world(db, settings, model_dirs, monkeypatch, tmp_path) -> World:
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [model_dirs["import_root"]],
                        "ARTIFACTS_DIR": tmp_path / "artifacts"}
    # "default" names the embedded SmolLM2; the tiny causal LM stands in for it so /generate/ stays fast.
    monkeypatch.setattr("rewards.embedded.smollm2_path", lambda: model_dirs["policy"])

    project = ProjectFactory(slug="fuzz", guidelines="Pick the more helpful reply.")
    other = ProjectFactory(slug="elsewhere")
    labeler, manager, outsider, key_owner = (UserFactory(username=name) for name in
                                             ("lena", "mark", "olga", "kim"))
    admin = UserFactory(username="ada", is_staff=True, is_superuser=True)
    Membership.objects.create(project=project, user=labeler, role=Membership.Role.LABELER)
    Membership.objects.create(project=project, user=manager, role=Membership.Role.MANAGER)
    Membership.objects.create(project=project, user=key_owner, role=Membership.Role.MANAGER)
    Membership.objects.create(project=other, user=outsider, role=Membership.Role.LABELER)

    decided = labeled_pairs(project, count=6)
    open_pairs = [PairFactory(project=project) for _ in range(3)]
    tie = PairFactory(project=project)
    ImportedComparisonFactory(pair=tie, choice=Comparison.Choice.TIE)
    other_pairs = [PairFactory(project=other) for _ in range(2)]
    # A lease held by the labeler, so that skip and submit find a pair handed out.
    pair_next_for_labeler(project=project, labeler=labeler)

    deployed = reward_model_register(project=project, path=model_dirs["reward"], deploy=True)
    spare = reward_model_register(project=project, path=model_dirs["reward"])
    policy = Policy.objects.create(project=project, version=1, kind=Policy.Kind.DPO,
                                   artifact_path=str(model_dirs["policy"]), base_model="tiny-llama")
    queued = TrainingRunFactory(project=project, created_by=manager)
    finished = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED,
                                  finished_at=timezone.now(), reward_model=deployed)
    elsewhere_run = TrainingRunFactory(project=other)

    tokens: dict[str, ApiToken] = {}
    headers: dict[str, dict[str, str]] = {"anonymous": {}}
    for role, user in (("labeler", labeler), ("manager", manager), ("admin", admin), ("outsider", outsider)):
        tokens[role], key = api_token_create(user=user, name=f"fuzz {role}")
        headers[role] = {"Authorization": f"Bearer {key}"}
    tokens["rerank_key"], key = api_token_create(user=key_owner, scope=ApiToken.Scope.RERANK, project=project,
                                                 name="product")
    headers["rerank_key"] = {"Authorization": f"Bearer {key}"}
    spare_key, _ = api_token_create(user=manager, scope=ApiToken.Scope.RERANK, project=project, name="spare")

    prompts = ["How do I boil an egg?", [{"role": "user", "content": "Name a primary colour."}]]
    real = {
        # The project most roles belong to, twice as often as the other one.
        "slug": [project.slug, project.slug, other.slug],
        "project": [project.slug, project.slug, other.slug],
        "username": [labeler.username, manager.username, outsider.username, admin.username],
        "prefix": [tokens[role].prefix for role in ("labeler", "manager", "admin", "outsider")],
        "key_prefix": [tokens["rerank_key"].prefix, spare_key.prefix],
        "run_id": [queued.pk, finished.pk, elsewhere_run.pk],
        "reward_model_id": [deployed.pk, spare.pk],
        "pair": [p.pk for p in decided[:2] + open_pairs + [tie] + other_pairs],
        "policy": ["default", policy.pk],
        "model": ["deployed", deployed.pk, spare.pk],
        "path": [str(model_dirs["reward"]), str(model_dirs["policy"])],
        "prompt": prompts,
        "hyperparameters": [{"max_steps": 1, "max_length": 64}, {"learning_rate": -1}, {}],
        # A generated base model is almost never a model folder (a 400); these are accepted.
        "base_model": ["", "minilm", str(model_dirs["reward"])],
        "password": ["correct-horse-battery"],
        "candidates": [["Boil it for eight minutes.", "no idea"], ['{"answer": "red"}', "Red.", ""]],
        "constraints": [None, {"max_chars": 40}, {"json": True}],
    }
    return World(headers=headers, real=real)



@pytest.fixture
def connection_kept_open():
    # Django closes the database connection around each request it handles; the test's transaction lives on that
    # connection, so keep it, as Django's own test client does.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def _keep_or_real(value: Any, choices: list[Any]) -> st.SearchStrategy:
    # Mostly real values, so that requests reach the handlers and not only their 404s.
    return st.one_of(st.sampled_from(choices), st.sampled_from(choices), st.just(value))


def _load_schema(world: World):
    from config.wsgi import application

    schema = from_wsgi("/api/schema/", application)
    real = world.real

    @schema.hook
    def flatmap_case(context, case):
        choices: dict[tuple[str, str], st.SearchStrategy] = {}
        for name, value in (case.path_parameters or {}).items():
            # Rerank keys are revoked under a project's api-keys, user tokens under auth/tokens.
            known = real["key_prefix"] if name == "prefix" and "/api-keys/" in case.path else real.get(name)
            if known:
                choices[("path_parameters", name)] = _keep_or_real(value, known)
        if isinstance(case.query, dict) and "project" in case.query:
            choices[("query", "project")] = _keep_or_real(case.query["project"], real["project"])
        if isinstance(case.body, dict):
            for name, value in case.body.items():
                # A new project's slug stays generated: the real ones are taken.
                if name in real and name != "slug":
                    choices[("body", name)] = _keep_or_real(value, real[name])
        originals = {where: dict(getattr(case, where) or {}) for where in ("path_parameters", "query", "body")
                     if isinstance(getattr(case, where), dict)}

        def apply(chosen: dict[tuple[str, str], Any]) -> Any:
            for where, values in originals.items():
                updated = {**values, **{name: v for (loc, name), v in chosen.items() if loc == where}}
                if where == "body" and case.path.endswith("/generate/"):
                    # A CPU budget: up to 16 x 512 new tokens (4 x 128 by default) take the tiny model seconds.
                    for name, cap in (("n", 2), ("max_new_tokens", 4)):
                        value = updated.get(name, cap)
                        if isinstance(value, int) and not isinstance(value, bool):
                            updated[name] = min(value, cap)
                setattr(case, where, updated)
            return case

        return st.fixed_dictionaries(choices).map(apply)

    return schema


def _fuzz(world: World, operation, mode: GenerationMode) -> None:
    """Draw cases for one operation and send each as every role (generation costs more than a request)."""
    label = operation.label
    strategy = operation.as_strategy(generation_mode=mode)
    if operation.get_body_for_media_type("application/json") is not None:
        # Form encodings cannot carry the nested JSON most bodies hold, so JSON gets a draw of its own.
        strategy = st.one_of(strategy, operation.as_strategy(generation_mode=mode, media_type="application/json"))

    @seed(f"{SEED}-{label}-{mode.value}")
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        for role in ROLES:
            headers = world.headers[role]
            world.stats[(role, label)] += 1
            # Each request sees the same starting rows: a revoked token or a removed member must not leak into
            # the next one.
            with transaction.atomic():
                response = case.call(headers=headers)
                world.statuses[(label, response.status_code)] += 1
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except FailureGroup as exc:
                    world.failed_requests += 1
                    for failure in exc.exceptions:
                        world.failures.setdefault((role, label, failure.title), (
                            f"{failure.title}: {failure.message}\n    {case.as_curl_command(headers=headers)}"))
                transaction.set_rollback(True)

    run()


@pytest.mark.postgres
def test_every_operation_as_every_role_answers_as_documented(world, fresh_caches, connection_kept_open, capsys):
    schema = _load_schema(world)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, "the schema lost operations"
    for operation in operations:
        for mode in MODES:
            _fuzz(world, operation, mode)

    total = sum(world.stats.values())
    per_role = {role: sum(n for (r, _), n in world.stats.items() if r == role) for role in ROLES}
    with capsys.disabled():
        print(f"\nfuzz: {total:,} requests over {len(operations)} operations x {len(ROLES)} roles, "
              f"{world.failed_requests} failures (seed {SEED}; "
              + ", ".join(f"{role} {count:,}" for role, count in per_role.items()) + ")")
        for operation in operations:
            codes = sorted((code, n) for (label, code), n in world.statuses.items() if label == operation.label)
            print(f"  {operation.label}: {sum(n for _, n in codes)} requests, "
                  + ", ".join(f"{code} x{n}" for code, n in codes))
    assert not world.failures, "\n\n".join(f"[{role}] {label}: {text}"
                                           for (role, label, _), text in sorted(world.failures.items()))
    assert all(count > 0 for count in per_role.values())
    assert total >= 1000, f"only {total} generated requests; the suite promises at least 1,000"
    # The real values in the hooks are what lets requests past the permission checks and 404s; if most
    # operations never succeed, the fixtures or the hooks broke and the run above proved little.
    succeeded = {label for (label, code), _ in world.statuses.items() if 200 <= code < 300}
    assert len(succeeded) >= 0.75 * len(operations), sorted({op.label for op in operations} - succeeded)


# --- what the fuzzer found, pinned down -----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "url", "body", "field"), [
    ("post", "/api/v1/auth/token/", {"username": "ada", "password": "correct-horse-battery", "name": "n" * 101},
     "name"),
    ("get", "/api/v1/training-runs/?project=fu%00zz", None, "project"),
    ("get", "/api/v1/training-runs/?status=sleeping", None, "status"),
    ("get", "/api/v1/reward-models/?project=fu%00zz", None, "project"),
    ("get", "/api/v1/policies/?project=fu%00zz", None, "project"),
    ("post", "/api/v1/projects/fuzz/pairs/", {"prompt": "Hi?", "response_a": "a", "response_b": "b",
                                               "model_a": "m" * 201}, "model_a"),
    ("post", "/api/v1/projects/create/", {"name": "Create", "slug": "create"}, "slug"),
])
def test_inputs_the_database_cannot_hold_are_a_400_naming_the_field(method, url, body, field):
    project = ProjectFactory(slug="fuzz")
    admin = UserFactory(username="ada", is_staff=True, is_superuser=True)
    Membership.objects.create(project=project, user=admin, role=Membership.Role.MANAGER)
    client = APIClient()
    _, key = api_token_create(user=admin)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    response = getattr(client, method)(url, body, format="json") if body else getattr(client, method)(url)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == field


@pytest.mark.django_db
def test_a_temperature_too_small_to_divide_by_is_refused_before_any_model_work():
    project = ProjectFactory()
    with pytest.raises(DomainError) as refused:
        generation.generate(project=project, prompt="Hi?", temperature=3.5e-59, rerank=False)
    assert refused.value.field == "temperature"


@pytest.mark.django_db
def test_urls_that_match_no_route_answer_json_under_api_and_html_elsewhere():
    client = APIClient()
    for url in ("/api/v1/projects/a%2Fb/", "/api/v1/training-runs/-1/", "/api/v2/"):
        response = client.get(url)
        assert response.status_code == 404 and response["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == "not_found"
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_reserved_path_names_reach_their_own_operation_with_a_json_405(admin_user):
    _, key = api_token_create(user=admin_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    project = ProjectFactory()
    for method, url in (("get", "/api/v1/projects/create/"), ("patch", "/api/v1/projects/create/"),
                        ("delete", f"/api/v1/projects/{project.slug}/members/set/")):
        response = getattr(client, method)(url)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"

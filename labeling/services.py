"""Writes of the labeling core: projects, members, pairs, the labeling queue and comparisons."""
from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from labeling import queries, selectors
from labeling.errors import Conflict, DomainError, NotFound
from labeling.models import (
    ApiToken,
    Choice,
    Comparison,
    Lease,
    Membership,
    Pair,
    Project,
    Prompt,
    Response,
    content_hash,
    unstorable_path,
)

# The labeler's frame: what they saw on the left and on the right.
FRAME_CHOICES = ("left", "right", "tie", "both_bad")


def _frame_to_choice(frame_choice: str, *, swapped: bool) -> str:
    if frame_choice == "left":
        return Choice.B if swapped else Choice.A
    if frame_choice == "right":
        return Choice.A if swapped else Choice.B
    return frame_choice


def choice_to_frame(choice: str, *, swapped: bool) -> str:
    if choice == Choice.A:
        return "right" if swapped else "left"
    if choice == Choice.B:
        return "left" if swapped else "right"
    return choice


# --- projects and members -------------------------------------------------------------------------------


def _validate_project_settings(*, labels_per_pair: int, gold_rate: float) -> None:
    if not 1 <= labels_per_pair <= 50:
        raise DomainError("labels_per_pair must be between 1 and 50.", field="labels_per_pair")
    if not 0.0 <= gold_rate <= 1.0:
        raise DomainError("gold_rate must be between 0 and 1.", field="gold_rate")


@contextmanager
def _unique_or(error: DomainError) -> Iterator[None]:
    """Raise `error` when the insert inside breaks a unique constraint: two requests creating the same row at once
    both pass the check before it, and the second one's insert waits for the first and then fails. It runs in a
    savepoint, so the caller's transaction stays usable."""
    try:
        with transaction.atomic():
            yield
    except IntegrityError as exc:
        if not _is_unique_violation(exc):
            raise
        raise error from exc


def _is_unique_violation(exc: IntegrityError) -> bool:
    """PostgreSQL names the kind by its SQLSTATE (23505); SQLite only in its message."""
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return sqlstate == "23505" if sqlstate is not None else "UNIQUE constraint failed" in str(exc)


@transaction.atomic
def project_create(*, name: str, slug: str, created_by: AbstractBaseUser | None = None, guidelines: str = "",
                   labels_per_pair: int = 1, allow_tie: bool = True, allow_both_bad: bool = True,
                   strength_scale: str = Project.StrengthScale.NONE, gold_rate: float = 0.0) -> Project:
    _validate_project_settings(labels_per_pair=labels_per_pair, gold_rate=gold_rate)
    if slug == "create":
        # /projects/create/ is the create operation itself; a project of that name could never be reached.
        raise DomainError("The slug 'create' is reserved.", field="slug", code="reserved")
    taken = Conflict(f"A project with slug '{slug}' already exists.", field="slug")
    if Project.objects.filter(slug=slug).exists():
        raise taken
    # The check cannot see a project another request is creating right now: the unique index decides.
    with _unique_or(taken):
        project = Project.objects.create(
            name=name, slug=slug, guidelines=guidelines, labels_per_pair=labels_per_pair, allow_tie=allow_tie,
            allow_both_bad=allow_both_bad, strength_scale=strength_scale, gold_rate=gold_rate,
        )
    if created_by is not None:
        Membership.objects.create(project=project, user=created_by, role=Membership.Role.MANAGER)
    return project


@transaction.atomic
def project_update(*, project: Project, **fields: Any) -> Project:
    """Change the given settings and only those: the project is re-read under its row lock, so a setting another
    request changed since `project` was loaded is kept, not written back with the value it had then. Returns the
    project as stored."""
    allowed = {"name", "guidelines", "labels_per_pair", "allow_tie", "allow_both_bad", "strength_scale", "gold_rate"}
    unknown = set(fields) - allowed
    if unknown:
        raise DomainError(f"Unknown project setting: {sorted(unknown)[0]}.", field=sorted(unknown)[0])
    project = Project.objects.select_for_update().get(pk=project.pk)
    _validate_project_settings(labels_per_pair=fields.get("labels_per_pair", project.labels_per_pair),
                               gold_rate=fields.get("gold_rate", project.gold_rate))
    for key, value in fields.items():
        setattr(project, key, value)
    project.save(update_fields=list(fields))
    if "labels_per_pair" in fields:
        pair_statuses_refresh(project=project)
    return project


def pair_statuses_refresh(*, project: Project) -> None:
    """Re-derive open/complete for every non-gold pair after the overlap changed."""
    pairs = Pair.objects.filter(project=project, gold_choice__isnull=True)
    pairs.filter(label_count__gte=project.labels_per_pair).update(status=Pair.Status.COMPLETE)
    pairs.filter(label_count__lt=project.labels_per_pair).update(status=Pair.Status.OPEN)


def _keep_a_manager(*, project: Project, user: AbstractBaseUser, field: str) -> None:
    """Refuse to take the role from the project's last manager: nobody but staff could manage it afterwards (and a
    manager who demoted themselves would be locked out of the page they did it on). Runs under the project's row
    lock, so two managers demoting each other at once cannot both pass."""
    Project.objects.select_for_update().filter(pk=project.pk).first()
    managers = set(Membership.objects.filter(project=project, role=Membership.Role.MANAGER)
                   .values_list("user_id", flat=True))
    if managers == {user.pk}:
        raise Conflict(f"{user} is the last manager of {project.slug}; make someone else a manager first.",
                       field=field, code="last_manager")


@transaction.atomic
def membership_set(*, project: Project, user: AbstractBaseUser, role: str) -> Membership:
    if role not in Membership.Role.values:
        raise DomainError(f"Unknown role '{role}'.", field="role")
    if role != Membership.Role.MANAGER:
        _keep_a_manager(project=project, user=user, field="role")
    membership, _ = Membership.objects.update_or_create(project=project, user=user, defaults={"role": role})
    return membership


@transaction.atomic
def membership_remove(*, project: Project, user: AbstractBaseUser) -> None:
    _keep_a_manager(project=project, user=user, field="username")
    deleted, _ = Membership.objects.filter(project=project, user=user).delete()
    if not deleted:
        raise NotFound(f"{user} is not a member of {project.slug}.", field="username")
    Lease.objects.filter(pair__project=project, labeler=user).delete()


# --- API tokens -----------------------------------------------------------------------------------------


@transaction.atomic
def api_token_create(*, user: AbstractBaseUser, name: str = "", scope: str = ApiToken.Scope.USER,
                     project: Project | None = None) -> tuple[ApiToken, str]:
    """Create a token and return it with its secret, which is not stored and cannot be shown again."""
    if scope not in ApiToken.Scope.values:
        raise DomainError(f"Unknown scope '{scope}'.", field="scope")
    if scope != ApiToken.Scope.USER and project is None:
        raise DomainError("A scoped key needs a project.", field="project")
    key = f"pfl_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(key_hash=ApiToken.hash_key(key), prefix=key[:12], name=name, scope=scope,
                                    user=user, project=project)
    return token, key


@transaction.atomic
def api_token_revoke(*, token: ApiToken) -> ApiToken:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token


# --- prompts, responses, pairs --------------------------------------------------------------------------


def text_storable_check(value: Any, *, field: str) -> None:
    """A 400 naming the first string of a request's value (a prompt, a response) that the database cannot store:
    a NUL character or a lone surrogate."""
    where = unstorable_path(value, field)
    if where:
        raise DomainError(f"{where} contains a NUL character or an unpaired surrogate.", field=where)


def _validate_prompt(content: Any) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise DomainError("The prompt is empty.", field="prompt")
        text_storable_check(content, field="prompt")
        return
    if not isinstance(content, list) or not content:
        raise DomainError("A prompt is a non-empty string or a non-empty list of chat messages.", field="prompt")
    for index, message in enumerate(content):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DomainError(f"Message {index} needs string 'role' and 'content'.", field=f"prompt[{index}]")
        # The rules of an imported message, so that what the API stores exports and imports back unchanged.
        if not message["role"]:
            raise DomainError(f"Message {index} has an empty role.", field=f"prompt[{index}].role")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise DomainError(f"Message {index} has keys other than 'role' and 'content': {', '.join(extra)}.",
                              field=f"prompt[{index}].{extra[0]}")
    text_storable_check(content, field="prompt")


def prompt_get_or_create(*, project: Project, content: Any) -> Prompt:
    _validate_prompt(content)
    prompt, _ = Prompt.objects.get_or_create(project=project, content_hash=content_hash(content),
                                             defaults={"content": content})
    return prompt


def response_get_or_create(*, project: Project, text: str, model_name: str = "",
                           metadata: dict[str, Any] | None = None, field: str = "response") -> Response:
    if not isinstance(text, str) or not text.strip():
        raise DomainError("A response must be a non-empty string.", field=field)
    text_storable_check(text, field=field)
    response, _ = Response.objects.get_or_create(
        project=project, content_hash=content_hash(text),
        defaults={"text": text, "model_name": model_name, "metadata": metadata or {}},
    )
    return response


@transaction.atomic
def pair_create(*, project: Project, prompt: Any, response_a: str, response_b: str, priority: int = 0,
                gold_choice: str | None = None, model_a: str = "", model_b: str = "", source: str = "manual") -> Pair:
    if response_a == response_b:
        raise DomainError("The two responses of a pair must differ.", field="response_b")
    if gold_choice is not None and gold_choice not in Choice.values:
        raise DomainError(f"Unknown gold choice '{gold_choice}'.", field="gold_choice")
    prompt_obj = prompt_get_or_create(project=project, content=prompt)
    a = response_get_or_create(project=project, text=response_a, model_name=model_a, field="response_a")
    b = response_get_or_create(project=project, text=response_b, model_name=model_b, field="response_b")
    low, high = sorted([a.pk, b.pk])
    duplicate = Conflict("This pair already exists in the project.", code="duplicate")
    if Pair.objects.filter(project=project, prompt=prompt_obj, response_a_id__in=[low, high],
                           response_b_id__in=[low, high]).exists():
        raise duplicate
    with _unique_or(duplicate):
        return Pair.objects.create(project=project, prompt=prompt_obj, response_a=a, response_b=b,
                                   priority=priority, gold_choice=gold_choice, source=source)


# --- the queue ------------------------------------------------------------------------------------------


def _lease_seconds() -> int:
    return int(settings.PREFLAB["LEASE_SECONDS"])


def _has_free_slot(*, pair: Pair, labeler: AbstractBaseUser, now) -> bool:
    """Checked with a fresh statement while the pair's row is locked, so it sees every committed lease."""
    if pair.is_gold:
        return True
    others = Lease.objects.filter(pair=pair, expires_at__gt=now).exclude(labeler=labeler).count()
    return pair.label_count + others < pair.project.labels_per_pair


_PROMPT = queries.RowReader.all_fields(Prompt)
_RESPONSE = queries.RowReader.all_fields(Response)
_CANDIDATE = queries.RowReader(Pair, ["id", "gold_choice", "label_count"])

# The queue's statements are hand-written (labeling/queries.py says why). One statement grants a slot: it counts
# the pair's other live leases, and inserts (or renews this labeler's expired) lease only when the pair still has
# room. It runs while the caller holds the pair's row lock, so its snapshot, taken after the lock, sees every
# lease committed before.
_GRANT = queries.Statement("""
    INSERT INTO {lease} (pair_id, labeler_id, swapped, skipped, created_at, expires_at)
    SELECT %s, %s, %s, %s, %s, %s
    WHERE %s OR (SELECT COUNT(*) FROM {lease} WHERE pair_id = %s AND expires_at > %s AND labeler_id <> %s) < %s
    ON CONFLICT (pair_id, labeler_id) DO UPDATE SET swapped = excluded.swapped, expires_at = excluded.expires_at
    RETURNING id""")
# A labeler's unexpired lease in the project, renewed and returned in one statement: a page reload gets the same
# pair back. Not on a pair completed meanwhile (the overlap was lowered): its submit is refused, so handing it back
# would keep the labeler on it until the lease ran out.
_HELD = queries.Statement(f"""
    UPDATE {{lease}} SET expires_at = %s
    WHERE id = (SELECT l.id FROM {{lease}} l JOIN {{pair}} p ON p.id = l.pair_id
                WHERE l.labeler_id = %s AND p.project_id = %s AND l.expires_at > %s AND NOT l.skipped
                  AND (p.status = '{Pair.Status.OPEN.value}' OR p.gold_choice IS NOT NULL)
                ORDER BY l.created_at LIMIT 1)
    RETURNING id, pair_id, swapped""")
# What the queue may offer this labeler: not labeled or skipped by them. Open pairs also need a free slot (labels
# plus other live leases under the overlap); they walk the partial index pair_queue_open, whose conditions are
# written as literals so that the planner can use it. [tried] excludes pairs already found full.
_NOT_MINE = """
      AND NOT EXISTS (SELECT 1 FROM {comparison} c WHERE c.pair_id = p.id AND c.labeler_id = %s)
      AND NOT EXISTS (SELECT 1 FROM {lease} s WHERE s.pair_id = p.id AND s.labeler_id = %s AND s.skipped)"""
_OPEN = f"""
    SELECT {{candidate}} FROM {{pair}} p
    WHERE p.project_id = %s AND p.status = '{Pair.Status.OPEN.value}' AND p.gold_choice IS NULL{_NOT_MINE}
      AND p.label_count < %s - (SELECT COUNT(*) FROM {{lease}} a WHERE a.pair_id = p.id AND a.expires_at > %s)
      [tried]
    ORDER BY p.priority DESC, p.id LIMIT 1"""
_GOLD = f"""
    SELECT {{candidate}} FROM {{pair}} p
    WHERE p.project_id = %s AND p.gold_choice IS NOT NULL{_NOT_MINE}
      [tried]
    ORDER BY p.label_count, p.id LIMIT 1"""
_CONTENT = queries.Statement("""
    SELECT {pair_columns}, {prompt_columns}, {a_columns}, {b_columns}
    FROM {pair} p JOIN {prompt} q ON q.id = p.prompt_id
    JOIN {response} ra ON ra.id = p.response_a_id JOIN {response} rb ON rb.id = p.response_b_id
    WHERE p.id = %s""", pair_columns=(queries.PAIR, "p"), prompt_columns=(_PROMPT, "q"), a_columns=(_RESPONSE, "ra"),
                             b_columns=(_RESPONSE, "rb"))
_candidate_statements: dict[tuple[bool, int, bool], queries.Statement] = {}


def _candidates(*, gold: bool, tried: int, lock: bool) -> queries.Statement:
    key = (gold, tried, lock)
    statement = _candidate_statements.get(key)
    if statement is None:
        exclude = f"AND p.id NOT IN ({', '.join(['%s'] * tried)})" if tried else ""
        template = (_GOLD if gold else _OPEN).replace("[tried]", exclude) + (" {skip_locked p}" if lock else "")
        statement = _candidate_statements[key] = queries.Statement(template, candidate=(_CANDIDATE, "p"))
    return statement


def _grant_if_free(*, pair: Pair, labeler: AbstractBaseUser, now) -> Lease | None:
    """Lease `pair` (whose row the caller has locked) to the labeler if a slot is free, else None. A row that
    exists already is an expired lease of this labeler (held and skipped ones never reach the candidates)."""
    lease = Lease(pair=pair, labeler=labeler, swapped=random.random() < 0.5, skipped=False, created_at=now,
                  expires_at=now + timedelta(seconds=_lease_seconds()))
    room = pair.project.labels_per_pair - pair.label_count
    row = _GRANT.fetch_one([
        pair.pk, labeler.pk, lease.swapped, False, queries.db_datetime(now), queries.db_datetime(lease.expires_at),
        pair.is_gold, pair.pk, queries.db_datetime(now), labeler.pk, room,
    ])
    if row is None:
        return None
    lease.pk = row[0]
    return lease


# When every candidate is row-locked by another labeler's grant or submit, SKIP LOCKED sees nothing although
# the queue is not empty; those locks last milliseconds, so look again a few times before answering "empty".
LOCKED_RETRIES = 5
LOCKED_RETRY_SECONDS = 0.02


def _try_candidates(*, gold: bool, project: Project, labeler: AbstractBaseUser, now,
                    attempts: int = 5) -> Lease | None:
    tried: list[int] = []
    locked_retries = 0
    while len(tried) < attempts:
        params: list[Any] = [project.pk, labeler.pk, labeler.pk]
        if not gold:
            params += [project.labels_per_pair, queries.db_datetime(now)]
        params += tried
        row = _candidates(gold=gold, tried=len(tried), lock=True).fetch_one(params)
        if row is None:
            # A plain read (no lock) tells "all locked right now" from "nothing left"; in READ COMMITTED each
            # retry sees what the other transactions committed meanwhile.
            if (locked_retries < LOCKED_RETRIES
                    and _candidates(gold=gold, tried=len(tried), lock=False).fetch_one(params) is not None):
                locked_retries += 1
                time.sleep(LOCKED_RETRY_SECONDS)
                continue
            return None
        pair = _CANDIDATE.read(row)
        pair.project = project
        lease = _grant_if_free(pair=pair, labeler=labeler, now=now)
        if lease is not None:
            return lease
        tried.append(pair.pk)
    return None


def _lease_with_content(lease: Lease, *, project: Project) -> Lease:
    """The pair with its prompt and responses, in one statement by primary key. The queue's own statements select
    the pair alone: with these three tables joined in, PostgreSQL took 3.7 ms to plan the candidate query (2.2 ms
    the held-lease one), against 0.3 ms (0.1 ms) without."""
    row = _CONTENT.fetch_one([lease.pair_id])
    pair = queries.PAIR.read(row)
    offset = queries.PAIR.width
    pair.prompt = _PROMPT.read(row, offset)
    pair.response_a = _RESPONSE.read(row, offset + _PROMPT.width)
    pair.response_b = _RESPONSE.read(row, offset + _PROMPT.width + _RESPONSE.width)
    pair.project = project
    lease.pair = pair
    return lease


@transaction.atomic
def pair_next_for_labeler(*, project: Project, labeler: AbstractBaseUser,
                          rng: random.Random | None = None) -> Lease | None:
    """Lease the labeler one pair that still needs labels, or return None when the queue is empty for them.
    The lease comes with its pair's project, prompt and responses loaded.

    A labeler who already holds an unexpired lease in the project gets that pair again (a page reload must
    not hand out a second pair). Otherwise gold pairs come at the project's gold rate, then open pairs by
    priority. Rows are locked with SKIP LOCKED so concurrent labelers never wait on, or double-book, a slot.
    """
    lease = _lease_next(project=project, labeler=labeler, rng=rng)
    return _lease_with_content(lease, project=project) if lease is not None else None


def _lease_next(*, project: Project, labeler: AbstractBaseUser, rng: random.Random | None) -> Lease | None:
    now = timezone.now()
    expires_at = now + timedelta(seconds=_lease_seconds())
    held = _HELD.fetch_one([queries.db_datetime(expires_at), labeler.pk, project.pk, queries.db_datetime(now)])
    if held is not None:
        lease_id, pair_id, swapped = held
        return Lease(pk=lease_id, pair_id=pair_id, labeler=labeler, swapped=bool(swapped), skipped=False,
                     expires_at=expires_at)

    draw = (rng or random).random()
    if project.gold_rate > 0 and draw < project.gold_rate:
        lease = _try_candidates(gold=True, project=project, labeler=labeler, now=now)
        if lease is not None:
            return lease
    return _try_candidates(gold=False, project=project, labeler=labeler, now=now)


@transaction.atomic
def lease_release(*, project: Project, labeler: AbstractBaseUser, pair_id: int) -> None:
    """The labeler skipped a leased pair: its slot goes back to the queue for others, and the queue does not
    offer it to this labeler again."""
    updated = (Lease.objects.filter(pair_id=pair_id, pair__project=project, labeler=labeler, skipped=False)
               .update(skipped=True, expires_at=timezone.now()))
    if not updated:
        raise NotFound("You hold no lease on this pair.", field="pair")


def leases_expired_delete(*, older_than: timedelta = timedelta(0)) -> int:
    """Housekeeping: drop expired leases; skipped ones stay, they remember what a labeler passed on."""
    deleted, _ = Lease.objects.filter(expires_at__lt=timezone.now() - older_than, skipped=False).delete()
    return deleted


# --- comparisons ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitResult:
    comparison: Comparison
    created: bool


def _validate_submission(*, project: Project, choice: str, strength: int | None, flags: list[str]) -> None:
    if choice == Choice.TIE and not project.allow_tie:
        raise DomainError("This project does not allow ties.", field="choice")
    if choice == Choice.BOTH_BAD and not project.allow_both_bad:
        raise DomainError("This project does not allow 'both bad'.", field="choice")
    if strength is not None:
        if project.strength_scale == Project.StrengthScale.NONE:
            raise DomainError("This project does not record a strength.", field="strength")
        if not 1 <= strength <= 3:
            raise DomainError("strength must be 1, 2 or 3.", field="strength")
        if choice in (Choice.TIE, Choice.BOTH_BAD):
            raise DomainError("A strength applies only when one response is better.", field="strength")
    unknown = [flag for flag in flags if flag not in Comparison.Flag.values]
    if unknown:
        raise DomainError(f"Unknown flag '{unknown[0]}'.", field="flags")


def comparison_submit(*, labeler: AbstractBaseUser, pair_id: int, choice: str, strength: int | None = None,
                      rationale: str = "", flags: list[str] | None = None, time_ms: int | None = None) -> SubmitResult:
    """Record a labeler's choice for a pair leased to them. `choice` is in the labeler's frame (left/right as
    shown) and is stored in the pair's A/B frame. Re-posting the same comparison returns the stored one. A pair
    of a project the labeler is not a member of (staff aside) is refused as unknown."""
    result, _ = _submit(labeler=labeler, pair_id=pair_id, choice=choice, strength=strength, rationale=rationale,
                        flags=flags, time_ms=time_ms, then_next=False, rng=None)
    return result


def comparison_submit_and_next(*, labeler: AbstractBaseUser, pair_id: int, choice: str, strength: int | None = None,
                               rationale: str = "", flags: list[str] | None = None, time_ms: int | None = None,
                               rng: random.Random | None = None) -> tuple[SubmitResult, Lease | None]:
    """`comparison_submit`, then the labeler's next pair of the same project as `pair_next_for_labeler` gives it
    (None when the queue has nothing left for them): one round trip per label, as the labeling page works. A new
    comparison and the next lease are written in one transaction; a refused submit leases nothing. A repeated
    submit (the client retrying after a lost response) returns the stored comparison and the pair the labeler
    holds, so a retry never skips a pair."""
    return _submit(labeler=labeler, pair_id=pair_id, choice=choice, strength=strength, rationale=rationale,
                   flags=flags, time_ms=time_ms, then_next=True, rng=rng)


def _submit(*, labeler: AbstractBaseUser, pair_id: int, choice: str, strength: int | None, rationale: str,
            flags: list[str] | None, time_ms: int | None, then_next: bool,
            rng: random.Random | None) -> tuple[SubmitResult, Lease | None]:
    if choice not in FRAME_CHOICES:
        raise DomainError(f"choice must be one of {', '.join(FRAME_CHOICES)}.", field="choice")
    flags = sorted(set(flags or []))
    lease = None
    try:
        with transaction.atomic():
            result = _comparison_submit(labeler=labeler, pair_id=pair_id, frame_choice=choice, strength=strength,
                                        rationale=rationale, flags=flags, time_ms=time_ms)
            if then_next:
                lease = _lease_next(project=result.comparison.project, labeler=labeler, rng=rng)
    except IntegrityError:
        # Another request of the same labeler stored its comparison first (the database refused a second).
        existing = Comparison.objects.select_related("project").filter(pair_id=pair_id, labeler=labeler).first()
        if existing is None:
            raise
        result = _same_or_conflict(existing=existing, frame_choice=choice, strength=strength, rationale=rationale,
                                   flags=flags)
        return result, (pair_next_for_labeler(project=existing.project, labeler=labeler, rng=rng) if then_next
                        else None)
    if lease is not None:
        lease = _lease_with_content(lease, project=result.comparison.project)
    return result, lease


def _same_or_conflict(*, existing: Comparison, frame_choice: str, strength: int | None, rationale: str,
                      flags: list[str]) -> SubmitResult:
    same = (existing.choice == _frame_to_choice(frame_choice, swapped=existing.swapped)
            and existing.strength == strength and existing.rationale == rationale and sorted(existing.flags) == flags)
    if not same:
        raise Conflict("You already labeled this pair with a different answer.", field="pair", code="already_labeled")
    return SubmitResult(comparison=existing, created=False)


_SUBMIT_LEASE = queries.RowReader(Lease, ["id", "swapped", "expires_at"])
# The pair (locked) with its project and the labeler's role in it. Then their lease, taken in a statement of its
# own so that its snapshot is taken after the lock (a concurrent submit of the same labeler may just have used it):
# deleted at once, since a submit that is refused further on rolls back and the lease with it.
_SUBMIT_PAIR = queries.Statement(f"""
    SELECT {{pair_columns}}, {{project_columns}}, {queries.member_role("p.project_id")}
    FROM {{pair}} p JOIN {{project}} pr ON pr.id = p.project_id
    WHERE p.id = %s {{lock p}}""", pair_columns=(queries.PAIR, "p"), project_columns=(queries.PROJECT, "pr"))
_LEASE_TAKE = queries.Statement("""
    DELETE FROM {lease} WHERE pair_id = %s AND labeler_id = %s AND NOT skipped RETURNING {lease_columns}""",
                                lease_columns=(_SUBMIT_LEASE, ""))
_INSERT_COMPARISON = queries.Statement("""
    INSERT INTO {comparison} (pair_id, project_id, labeler_id, source, choice, strength, margin, rationale, flags,
                              swapped, time_ms, created_at)
    VALUES (%s, %s, %s, %s, %s, %s, NULL, %s, %s, %s, %s, %s) RETURNING id""")
_PAIR_COUNTED = queries.Statement("UPDATE {pair} SET label_count = %s, status = %s WHERE id = %s")


def _pair_for_submit(*, pair_id: int, labeler: AbstractBaseUser) -> tuple[Pair, Lease | None]:
    """The pair, locked, with its project, and the labeler's unskipped lease on it, deleted (the caller's
    transaction keeps it unless the submit succeeds). A pair of a project the labeler is not a member of (staff
    aside) is missing like an unknown id, so the answer names no project."""
    row = _SUBMIT_PAIR.fetch_one([labeler.pk, pair_id])
    if row is None or selectors.project_role(user=labeler, member_role=row[-1]) is None:
        raise NotFound(f"Pair {pair_id} does not exist.", field="pair")
    pair = queries.PAIR.read(row)
    pair.project = queries.PROJECT.read(row, queries.PAIR.width)
    row = _LEASE_TAKE.fetch_one([pair_id, labeler.pk])
    if row is None:
        return pair, None
    lease = _SUBMIT_LEASE.read(row)
    lease.pair, lease.labeler = pair, labeler
    return pair, lease


def _comparison_submit(*, labeler: AbstractBaseUser, pair_id: int, frame_choice: str, strength: int | None,
                       rationale: str, flags: list[str], time_ms: int | None) -> SubmitResult:
    pair, lease = _pair_for_submit(pair_id=pair_id, labeler=labeler)
    # A stored comparison deleted the lease, so a held lease means no comparison yet (and the unique constraint
    # would refuse a second one); only without a lease is a stored comparison looked for, for a repeated request.
    if lease is None:
        existing = Comparison.objects.filter(pair=pair, labeler=labeler).first()
        if existing is not None:
            existing.pair, existing.project = pair, pair.project
            return _same_or_conflict(existing=existing, frame_choice=frame_choice, strength=strength,
                                     rationale=rationale, flags=flags)
        raise Conflict("This pair is not leased to you; ask the queue for a pair first.", field="pair",
                       code="not_leased")
    now = timezone.now()
    if lease.expires_at <= now and not _has_free_slot(pair=pair, labeler=labeler, now=now):
        raise Conflict("Your lease on this pair expired and its slot went to another labeler.", field="pair",
                       code="lease_expired")
    if not pair.is_gold and pair.label_count >= pair.project.labels_per_pair:
        raise Conflict("This pair already has all the labels it needs.", field="pair", code="pair_complete")
    choice = _frame_to_choice(frame_choice, swapped=lease.swapped)
    _validate_submission(project=pair.project, choice=choice, strength=strength, flags=flags)
    comparison = Comparison(
        pair=pair, project=pair.project, labeler=labeler, source=Comparison.Source.LABEL, choice=choice,
        strength=strength, rationale=rationale, flags=flags, swapped=lease.swapped, time_ms=time_ms, created_at=now,
    )
    flags_value = Comparison._meta.get_field("flags").get_db_prep_save(flags, connection)
    comparison.pk = _INSERT_COMPARISON.fetch_one([
        pair.pk, pair.project_id, labeler.pk, comparison.source, choice, strength, rationale, flags_value,
        lease.swapped, time_ms, queries.db_datetime(now),
    ])[0]
    comparison._state.adding = False
    # The pair's row is locked, so its count is current: one UPDATE writes the new count and, when this label
    # completes the pair, its status.
    pair.label_count += 1
    if not pair.is_gold and pair.label_count >= pair.project.labels_per_pair:
        pair.status = Pair.Status.COMPLETE
    _PAIR_COUNTED.execute([pair.label_count, pair.status, pair.pk])
    return SubmitResult(comparison=comparison, created=True)

"""Tables of the labeling core: projects, members, prompts, responses, pairs, leases and comparisons."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Greatest, Least

# The largest primary key PostgreSQL's bigint and SQLite's INTEGER hold. Every id a request names is bounded by
# it, so an id past it is a 400 naming the field rather than a database error (or a 500) on the query.
ID_MAX = 2**63 - 1


# Characters PostgreSQL stores in no text or jsonb column, and refuses even in a query's parameter: NUL, and a lone
# surrogate (UTF-8 has no encoding for it). Both reach a request only through a "\u" escape or a %00 in a URL.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_path(value: Any, path: str = "") -> str | None:
    """The path (`prompt[0].content`) of the first string, key or value, of a JSON value that holds an UNSTORABLE
    character, or None. `path` names the value itself ("" for a whole document: its keys name themselves)."""
    if isinstance(value, str):
        return (path or "value") if UNSTORABLE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = unstorable_path(key, path) or unstorable_path(item, inner)
        if found:
            return found
    return None


def content_hash(value: Any) -> str:
    """Stable SHA-256 of a string or JSON value; the deduplication key for prompts and responses."""
    if isinstance(value, str):
        raw = "s:" + value
    else:
        raw = "j:" + json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class Project(models.Model):
    class StrengthScale(models.TextChoices):
        NONE = "none", "No strength"
        ONE_TO_THREE = "1-3", "1 (slight) to 3 (strong)"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    guidelines = models.TextField(blank=True, help_text="Markdown shown to labelers above every pair.")
    labels_per_pair = models.PositiveSmallIntegerField(default=1)
    allow_tie = models.BooleanField(default=True)
    allow_both_bad = models.BooleanField(default=True)
    strength_scale = models.CharField(max_length=8, choices=StrengthScale.choices, default=StrengthScale.NONE)
    gold_rate = models.FloatField(default=0.0, help_text="Share of assignments that are gold pairs (0 to 1).")
    rerank_sample_rate = models.FloatField(
        default=0.0, help_text="Share of close reranks (0 to 1) whose best two candidates become a pair to label.")
    rerank_sample_margin = models.FloatField(
        default=0.5, help_text="Largest reward gap between the best and runner-up that counts as close.")
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="projects")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(labels_per_pair__gte=1, labels_per_pair__lte=50),
                                   name="project_labels_per_pair_range"),
            models.CheckConstraint(condition=Q(gold_rate__gte=0.0, gold_rate__lte=1.0), name="project_gold_rate_range"),
            models.CheckConstraint(condition=Q(rerank_sample_rate__gte=0.0, rerank_sample_rate__lte=1.0),
                                   name="project_rerank_sample_rate_range"),
            models.CheckConstraint(condition=Q(rerank_sample_margin__gte=0.0), name="project_rerank_sample_margin_min"),
        ]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    class Role(models.TextChoices):
        MANAGER = "manager", "Manager"
        LABELER = "labeler", "Labeler"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.LABELER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class Prompt(models.Model):
    """A prompt: a plain string or a chat message list ([{"role", "content"}, ...]) in `content`."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    content = models.JSONField()
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "content_hash"], name="prompt_unique_content")]

    def __str__(self) -> str:
        return self.as_text()[:60]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.content, list)

    @property
    def messages(self) -> list[dict[str, str]]:
        if self.is_chat:
            return self.content
        return [{"role": "user", "content": self.content}]

    def as_text(self) -> str:
        if not self.is_chat:
            return self.content
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.content)


class Response(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="responses")
    text = models.TextField()
    model_name = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "content_hash"], name="response_unique_content")]

    def __str__(self) -> str:
        return self.text[:60]


class Choice(models.TextChoices):
    A = "a", "A is better"
    B = "b", "B is better"
    TIE = "tie", "Tie"
    BOTH_BAD = "both_bad", "Both bad"


class Pair(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Needs labels"
        COMPLETE = "complete", "Fully labeled"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pairs")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="pairs")
    response_a = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    response_b = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    priority = models.IntegerField(default=0)
    # NULL means "not a gold pair"; the partial indexes of the queue key on it.
    gold_choice = models.CharField(max_length=16, choices=Choice.choices, null=True, blank=True)  # noqa: DJ001
    # Labels so far (human and imported); kept in step with Comparison rows under the pair's row lock.
    label_count = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    source = models.CharField(max_length=32, default="manual", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(response_a=F("response_b")), name="pair_distinct_responses"),
            # A pair is the same pair whichever response is called A.
            models.UniqueConstraint(
                "project", "prompt", Least("response_a", "response_b"), Greatest("response_a", "response_b"),
                name="pair_unique_responses",
            ),
            # Redundant as a rule (the id alone is unique); it is what a comparison's (pair, project) refers to.
            models.UniqueConstraint(fields=["id", "project"], name="pair_id_project"),
        ]
        indexes = [
            # The queue walks this index: open pairs of one project, highest priority first.
            models.Index(fields=["project", "-priority", "id"], name="pair_queue_open",
                         condition=Q(status="open", gold_choice__isnull=True)),
            models.Index(fields=["project", "id"], name="pair_gold", condition=Q(gold_choice__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"pair {self.pk} of {self.project_id}"

    @property
    def is_gold(self) -> bool:
        return self.gold_choice is not None


class Lease(models.Model):
    """A pair handed to one labeler for a limited time, with the left/right order they were shown."""

    pair = models.ForeignKey(Pair, on_delete=models.CASCADE, related_name="leases")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="leases")
    swapped = models.BooleanField(help_text="True when response B was shown on the left.")
    # A skipped pair keeps its (expired) lease row so the queue does not offer it to the same labeler again.
    skipped = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["pair", "labeler"], name="lease_unique")]
        indexes = [models.Index(fields=["pair", "expires_at"], name="lease_pair_expiry"),
                   models.Index(fields=["labeler", "expires_at"], name="lease_labeler_expiry")]

    def __str__(self) -> str:
        return f"lease of pair {self.pair_id} to {self.labeler_id}"


class Comparison(models.Model):
    class Source(models.TextChoices):
        LABEL = "label", "Labeled here"
        IMPORT = "import", "Imported"

    class Flag(models.TextChoices):
        UNSAFE = "unsafe", "Unsafe content"
        FACTUAL_ERROR = "factual_error", "Factual error"
        OFF_TOPIC = "off_topic", "Off topic"
        BAD_PROMPT = "bad_prompt", "Prompt is broken"

    Choice = Choice

    pair = models.ForeignKey(Pair, on_delete=models.CASCADE, related_name="comparisons")
    # The pair's project, kept on the comparison so that a project's statistics and export read its comparisons
    # through an index instead of joining every pair; on PostgreSQL a foreign key on (pair, project) to the
    # pair's (id, project) guarantees it is the pair's own (migration 0004).
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="comparisons")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                                related_name="comparisons")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.LABEL)
    choice = models.CharField(max_length=16, choices=Choice.choices)
    strength = models.PositiveSmallIntegerField(null=True, blank=True)
    # A preference margin carried by an imported data set (TRL's `margin` column).
    margin = models.FloatField(null=True, blank=True)
    rationale = models.TextField(blank=True)
    flags = models.JSONField(default=list, blank=True)
    swapped = models.BooleanField(default=False, help_text="True when response B was shown on the left.")
    time_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["pair", "labeler"], name="comparison_one_per_labeler",
                                    condition=Q(labeler__isnull=False)),
            models.UniqueConstraint(fields=["pair"], name="comparison_one_import_per_pair",
                                    condition=Q(source="import")),
            models.CheckConstraint(condition=Q(choice__in=["a", "b", "tie", "both_bad"]),
                                   name="comparison_choice_valid"),
            models.CheckConstraint(condition=Q(strength__isnull=True) | Q(strength__gte=1, strength__lte=3),
                                   name="comparison_strength_range"),
            models.CheckConstraint(
                condition=(Q(source="label", labeler__isnull=False) | Q(source="import", labeler__isnull=True)),
                name="comparison_source_matches_labeler",
            ),
        ]
        indexes = [models.Index(fields=["labeler", "created_at"], name="comparison_labeler_time"),
                   models.Index(fields=["project", "source"], name="comparison_project_source")]

    def __str__(self) -> str:
        return f"{self.choice} on pair {self.pair_id}"


class ApiToken(models.Model):
    """A secret for the API, stored only as its SHA-256. User tokens act as their user; rerank keys are
    scoped to one project and one purpose."""

    class Scope(models.TextChoices):
        USER = "user", "Acts as the user"
        RERANK = "rerank", "Reranking for one project"

    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12, help_text="The first characters, to recognise a key in lists.")
    name = models.CharField(max_length=100, blank=True)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.USER)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, null=True, blank=True, related_name="api_tokens")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(scope="user") | Q(project__isnull=False),
                                   name="api_token_scoped_has_project"),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.scope})"

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

"""Tables of training runs, the model registry and per-project rerank traffic."""
from __future__ import annotations

from functools import reduce
from operator import add

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from labeling.models import Project


class TrainingRun(models.Model):
    """One training job: what it trains on (a frozen dataset snapshot), how, and how far it got."""

    class Kind(models.TextChoices):
        REWARD = "reward", "Reward model"
        DPO = "dpo", "DPO policy"
        RLHF = "rlhf", "RLHF policy"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    class ExportPolicy(models.TextChoices):
        MAJORITY = "majority", "Majority vote per pair (gold pairs too); ties, both-bad and split votes left out"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    base_model = models.CharField(max_length=500, blank=True,
                                  help_text="Path or id; blank means the embedded default for the kind.")
    hyperparameters = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)

    # The dataset snapshot: exactly which labels the run was given, and how they were split.
    export_policy = models.CharField(max_length=16, choices=ExportPolicy.choices, default=ExportPolicy.MAJORITY)
    comparison_ids = models.JSONField(default=list, blank=True)
    dataset_hash = models.CharField(max_length=64, blank=True)
    split_seed = models.IntegerField(default=0)
    eval_fraction = models.FloatField(default=0.1)
    train_pair_ids = models.JSONField(default=list, blank=True)
    eval_pair_ids = models.JSONField(default=list, blank=True)
    pair_count = models.PositiveIntegerField(default=0)
    train_count = models.PositiveIntegerField(default=0)
    eval_count = models.PositiveIntegerField(default=0)

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    epoch = models.FloatField(default=0.0)
    eta_seconds = models.PositiveIntegerField(null=True, blank=True)
    metrics_history = models.JSONField(default=list, blank=True)
    eval_metrics = models.JSONField(default=dict, blank=True)
    log_tail = models.TextField(blank=True)
    error = models.TextField(blank=True)
    artifact_path = models.CharField(max_length=1000, blank=True)
    # The reward model an RLHF run optimises against (or a DPO run is judged by), fixed at submission.
    reward_model = models.ForeignKey("RewardModel", on_delete=models.SET_NULL, null=True, blank=True,
                                     related_name="dependent_runs")

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker_hostname = models.CharField(max_length=255, blank=True)
    # Which process trains the run now, so a worker on the same machine can tell at once that it died: the
    # host name with the PID namespace (two containers may share a host name, never a namespace) and the pid.
    worker_host = models.CharField(max_length=255, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    # How many times a worker has started the run; a run whose worker was lost is queued again (resumed from
    # its last checkpoint) until PREFLAB["TRAINING_MAX_ATTEMPTS"]. Progress writes carry it, so a process
    # that lost the run to a later attempt cannot overwrite it.
    attempts = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="training_runs")
    # The client's Idempotency-Key (or the start form's token): a submission sent again with it returns this run
    # instead of queuing a second one. Blank when none was sent.
    idempotency_key = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "idempotency_key"], condition=~Q(idempotency_key=""),
                                    name="training_run_idempotency_key"),
            models.CheckConstraint(condition=Q(status__in=["queued", "running", "succeeded", "failed", "cancelled"]),
                                   name="training_run_status_valid"),
            models.CheckConstraint(condition=Q(kind__in=["reward", "dpo", "rlhf"]), name="training_run_kind_valid"),
            models.CheckConstraint(condition=Q(eval_fraction__gte=0.0, eval_fraction__lt=1.0),
                                   name="training_run_eval_fraction_range"),
            # A finished run says when it finished; an unfinished one does not.
            models.CheckConstraint(
                condition=(Q(status__in=["queued", "running"], finished_at__isnull=True)
                           | Q(status__in=["succeeded", "failed", "cancelled"], finished_at__isnull=False)),
                name="training_run_finished_at_matches_status",
            ),
            models.CheckConstraint(condition=~Q(status="running") | Q(started_at__isnull=False),
                                   name="training_run_running_has_started_at"),
        ]
        indexes = [
            models.Index(fields=["project", "-created_at"], name="training_run_project_time"),
            models.Index(fields=["status", "heartbeat_at"], name="training_run_status_heartbeat"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} run {self.pk} of {self.project_id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in self.TERMINAL


class RegistryEntry(models.Model):
    """What every registered model version has: a per-project version number, its files and where it came
    from. Exactly one version per project may be deployed; earlier versions stay for history and rollback."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    version = models.PositiveIntegerField()
    training_run = models.OneToOneField(TrainingRun, on_delete=models.SET_NULL, null=True, blank=True,
                                        related_name="+")
    artifact_path = models.CharField(max_length=1000)
    base_model = models.CharField(max_length=500, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    lineage = models.JSONField(default=dict, blank=True)
    is_deployed = models.BooleanField(default=False)
    deployed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")

    class Meta:
        abstract = True
        ordering = ["project", "-version"]


class RewardModel(RegistryEntry):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="reward_models")
    training_run = models.OneToOneField(TrainingRun, on_delete=models.SET_NULL, null=True, blank=True,
                                        related_name="registered_reward_model")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="registered_reward_models")

    class Meta(RegistryEntry.Meta):
        constraints = [
            models.UniqueConstraint(fields=["project", "version"], name="reward_model_version_unique"),
            models.UniqueConstraint(fields=["project"], condition=Q(is_deployed=True),
                                    name="reward_model_one_deployed_per_project"),
            models.CheckConstraint(condition=Q(version__gte=1), name="reward_model_version_positive"),
            models.CheckConstraint(condition=Q(is_deployed=False) | Q(deployed_at__isnull=False),
                                   name="reward_model_deployed_has_time"),
        ]

    def __str__(self) -> str:
        return f"reward model v{self.version} of {self.project_id}"


class Policy(RegistryEntry):
    """A language model tuned on the project's preferences (DPO) or against its reward model (RLHF)."""

    class Kind(models.TextChoices):
        DPO = "dpo", "DPO"
        RLHF = "rlhf", "RLHF"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="policies")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    training_run = models.OneToOneField(TrainingRun, on_delete=models.SET_NULL, null=True, blank=True,
                                        related_name="registered_policy")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="registered_policies")

    class Meta(RegistryEntry.Meta):
        verbose_name_plural = "policies"
        constraints = [
            models.UniqueConstraint(fields=["project", "version"], name="policy_version_unique"),
            models.UniqueConstraint(fields=["project"], condition=Q(is_deployed=True),
                                    name="policy_one_deployed_per_project"),
            models.CheckConstraint(condition=Q(version__gte=1), name="policy_version_positive"),
            models.CheckConstraint(condition=Q(kind__in=["dpo", "rlhf"]), name="policy_kind_valid"),
            models.CheckConstraint(condition=Q(is_deployed=False) | Q(deployed_at__isnull=False),
                                   name="policy_deployed_has_time"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} policy v{self.version} of {self.project_id}"


class RewardModelDeployment(models.Model):
    """The deployment history of a project: which reward model version went live, when and by whom."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="reward_model_deployments")
    reward_model = models.ForeignKey(RewardModel, on_delete=models.CASCADE, related_name="deployments")
    previous = models.ForeignKey(RewardModel, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    deployed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                    related_name="+")
    deployed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-deployed_at", "-id"]

    def __str__(self) -> str:
        return f"deployment of {self.reward_model_id} in {self.project_id}"


# Upper bounds in milliseconds of the rerank latency buckets, log-spaced (1-2-5 per decade); one more bucket
# holds everything slower than the last bound.
RERANK_LATENCY_BOUNDS_MS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                                             50000)
RERANK_LATENCY_FIELDS: tuple[str, ...] = (*(f"latency_le_{bound}ms" for bound in RERANK_LATENCY_BOUNDS_MS),
                                          f"latency_gt_{RERANK_LATENCY_BOUNDS_MS[-1]}ms")


class RerankMinute(models.Model):
    """Rerank traffic of one project in one UTC minute, kept per project because the Prometheus counters are per
    process and not per project.

    One row per project and minute, incremented in place by one upsert per request. `rejected` counts requests
    refused with a client error (4xx: bad input, unknown model, ...), the caller's doing, and `errors` those
    that failed with a server error (5xx); the others were answered, and of those `cache_hits` came from the
    cache. The latency columns count the answered requests per bucket (not cumulatively): `latency_le_100ms`
    holds those that took more than 50 ms and at most 100 ms."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="rerank_minutes")
    minute = models.DateTimeField(help_text="The start of the minute, UTC.")
    requests = models.PositiveIntegerField(default=0)
    cache_hits = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0, help_text="Requests that failed with a server error (5xx).")
    rejected = models.PositiveIntegerField(default=0, help_text="Requests refused with a client error (4xx).")
    latency_ms_sum = models.FloatField(default=0.0, help_text="Of the answered requests.")
    latency_le_1ms = models.PositiveIntegerField(default=0)
    latency_le_2ms = models.PositiveIntegerField(default=0)
    latency_le_5ms = models.PositiveIntegerField(default=0)
    latency_le_10ms = models.PositiveIntegerField(default=0)
    latency_le_20ms = models.PositiveIntegerField(default=0)
    latency_le_50ms = models.PositiveIntegerField(default=0)
    latency_le_100ms = models.PositiveIntegerField(default=0)
    latency_le_200ms = models.PositiveIntegerField(default=0)
    latency_le_500ms = models.PositiveIntegerField(default=0)
    latency_le_1000ms = models.PositiveIntegerField(default=0)
    latency_le_2000ms = models.PositiveIntegerField(default=0)
    latency_le_5000ms = models.PositiveIntegerField(default=0)
    latency_le_10000ms = models.PositiveIntegerField(default=0)
    latency_le_20000ms = models.PositiveIntegerField(default=0)
    latency_le_50000ms = models.PositiveIntegerField(default=0)
    latency_gt_50000ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["project", "minute"]
        constraints = [
            # Also the conflict target of the upsert, and the index the dashboard reads a window through.
            models.UniqueConstraint(fields=["project", "minute"], name="rerank_minute_unique"),
            models.CheckConstraint(condition=Q(errors__lte=F("requests") - F("rejected")),
                                   name="rerank_minute_failed_le_requests"),
            models.CheckConstraint(condition=Q(cache_hits__lte=F("requests") - F("errors") - F("rejected")),
                                   name="rerank_minute_hits_le_answered_requests"),
            models.CheckConstraint(
                condition=Q(requests=reduce(add, (F(name) for name in RERANK_LATENCY_FIELDS)) + F("errors")
                            + F("rejected")),
                name="rerank_minute_buckets_count_answered_requests",
            ),
        ]

    def __str__(self) -> str:
        return f"rerank traffic of {self.project_id} at {self.minute:%Y-%m-%d %H:%M}"

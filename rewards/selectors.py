"""Reads of training runs and the model registry, limited to the projects a user may see."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ObjectDoesNotExist
from django.db.models import Func, IntegerField, QuerySet
from django.utils import timezone

from labeling.errors import DomainError, NotFound
from labeling.models import Project
from labeling.selectors import project_get_for_user, project_list_managed_by
from rewards.models import (
    RERANK_LATENCY_BOUNDS_MS,
    RERANK_LATENCY_FIELDS,
    Policy,
    RerankMinute,
    RewardModel,
    TrainingRun,
)

# What a run's API output reads besides the run: joined in, so that a page of runs is one query.
_RUN_RELATED = ("project", "created_by", "registered_reward_model", "registered_policy")
# The snapshot's id lists, a hundred thousand ids each on a large project: the API and the pages show only how many
# comparisons there are (`comparison_count`), and the training page polls 50 runs every 2 s.
_RUN_SNAPSHOT_IDS = ("comparison_ids", "train_pair_ids", "eval_pair_ids")


class _JSONArrayLength(Func):
    """The length of a JSON array column, counted by the database (PostgreSQL and SQLite)."""

    function = "JSON_ARRAY_LENGTH"
    output_field = IntegerField()

    def as_postgresql(self, compiler, connection, **extra_context):
        return self.as_sql(compiler, connection, function="JSONB_ARRAY_LENGTH", **extra_context)


def _runs() -> QuerySet[TrainingRun]:
    return (TrainingRun.objects.select_related(*_RUN_RELATED).defer(*_RUN_SNAPSHOT_IDS)
            .annotate(comparison_count=_JSONArrayLength("comparison_ids")))


def training_run_list_for_user(*, user: AbstractBaseUser, project_slug: str | None = None,
                               status: str | None = None, kind: str | None = None) -> QuerySet[TrainingRun]:
    """The runs of the projects the user manages (every project for staff): runs carry server paths, worker
    names and tracebacks, which are for the people who run training, as the dashboard's training pages are."""
    if project_slug:
        runs = _runs().filter(project=project_get_for_user(slug=project_slug, user=user, manage=True))
    else:
        runs = _runs().filter(project__in=project_list_managed_by(user=user))
    if status:
        if status not in TrainingRun.Status.values:
            raise DomainError(f"Unknown status '{status}'.", field="status")
        runs = runs.filter(status=status)
    if kind:
        if kind not in TrainingRun.Kind.values:
            raise DomainError(f"Unknown kind '{kind}'.", field="kind")
        runs = runs.filter(kind=kind)
    return runs.order_by("-created_at", "-id")


def training_run_get_for_user(*, run_id: int, user: AbstractBaseUser, manage: bool = False) -> TrainingRun:
    """The run if the user may see its project (404 otherwise, so runs of other projects do not leak)."""
    run = _runs().filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"Training run {run_id} not found.", field="run")
    try:
        project_get_for_user(slug=run.project.slug, user=user, manage=manage)
    except NotFound:
        raise NotFound(f"Training run {run_id} not found.", field="run")
    return run


def training_run_produced(*, run: TrainingRun) -> dict[str, Any] | None:
    """What a run registered: {"type": "reward_model" or "policy", "id", "version"} of the registry entry its
    success created (a reward run a reward model, a DPO or RLHF run a policy), or None (not succeeded, or the
    entry was deleted). Not `run.reward_model`, which is the reward model the run was judged by or trained
    against."""
    if run.status != TrainingRun.Status.SUCCEEDED:
        return None
    kind, related = (("reward_model", "registered_reward_model") if run.kind == TrainingRun.Kind.REWARD
                     else ("policy", "registered_policy"))
    try:
        entry = getattr(run, related)
    except ObjectDoesNotExist:
        return None
    return {"type": kind, "id": entry.pk, "version": entry.version}


def reward_model_list(*, project: Project) -> QuerySet[RewardModel]:
    # The training run is shown by its id alone: joining it in would read its snapshot's id lists as well.
    return RewardModel.objects.filter(project=project).order_by("-version")


def reward_model_get_for_user(*, reward_model_id: int, user: AbstractBaseUser, manage: bool = False) -> RewardModel:
    model = RewardModel.objects.select_related("project").filter(pk=reward_model_id).first()
    if model is None:
        raise NotFound(f"Reward model {reward_model_id} not found.", field="reward_model")
    try:
        project_get_for_user(slug=model.project.slug, user=user, manage=manage)
    except NotFound:
        raise NotFound(f"Reward model {reward_model_id} not found.", field="reward_model")
    return model


def reward_model_deployed(*, project: Project) -> RewardModel | None:
    return RewardModel.objects.filter(project=project, is_deployed=True).first()


def reward_models_deployed(*, projects: Iterable[Project]) -> dict[int, RewardModel]:
    """The deployed reward model of each project given that has one, by project id, in one query."""
    return {model.project_id: model for model in
            RewardModel.objects.filter(project__in=list(projects), is_deployed=True)}


def policy_list(*, project: Project) -> QuerySet[Policy]:
    return Policy.objects.filter(project=project).order_by("-version")


def training_run_curves(*, run: TrainingRun) -> dict[str, dict[str, list[dict[str, float]]]]:
    """The run's logged metrics as drawable series, by step: losses (names ending in "loss") and accuracies
    (names holding "accurac", which covers eval_accuracy and TRL's rewards/accuracies). Entries without a
    step or with a non-numeric value are left out."""
    curves: dict[str, dict[str, list[dict[str, float]]]] = {"loss": {}, "accuracy": {}}
    for entry in run.metrics_history or []:
        step = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for name, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = "loss" if name.endswith("loss") else "accuracy" if "accurac" in name else None
            if group is not None:
                curves[group].setdefault(name, []).append({"step": step, "value": float(value)})
    return curves


def training_runs_active(*, runs: Iterable[TrainingRun]) -> bool:
    return any(run.status in (TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING) for run in runs)


# --- rerank traffic -------------------------------------------------------------------------------------

RERANK_USAGE_DEFAULT_MINUTES = 60
RERANK_USAGE_MAX_MINUTES = 24 * 60
RERANK_PERCENTILES = (50, 95, 99)


def latency_percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) in milliseconds of latencies counted per bucket: one count per bound of
    RERANK_LATENCY_BOUNDS_MS and a last one for the slower ones. Interpolated linearly inside the bucket the
    quantile falls in, as Prometheus's histogram_quantile does, so it is exact to within that bucket; a quantile
    in the last bucket is given as the last bound. None without counts."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(RERANK_LATENCY_BOUNDS_MS):
                return float(RERANK_LATENCY_BOUNDS_MS[-1])
            lower = RERANK_LATENCY_BOUNDS_MS[index - 1] if index else 0
            upper = RERANK_LATENCY_BOUNDS_MS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return None


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def rerank_usage(*, project: Project, minutes: int = RERANK_USAGE_DEFAULT_MINUTES,
                 now: datetime | None = None) -> dict[str, Any]:
    """The project's reranking over the last `minutes` UTC minutes (the current, partial one last): requests per
    minute as a series with the quiet minutes as zeros, and over the whole window the request rate, cache hit
    rate of the answered requests, server errors (5xx), requests rejected for the caller's input (4xx) and
    latency percentiles. One indexed query of at most `minutes` rows."""
    if not 1 <= minutes <= RERANK_USAGE_MAX_MINUTES:
        raise DomainError(f"minutes must be between 1 and {RERANK_USAGE_MAX_MINUTES}.", field="minutes")
    current = (now or timezone.now()).astimezone(UTC).replace(second=0, microsecond=0)
    start = current - timedelta(minutes=minutes - 1)
    rows = {
        row["minute"]: row
        for row in RerankMinute.objects.filter(project=project, minute__gte=start, minute__lte=current).values(
            "minute", "requests", "cache_hits", "errors", "rejected", "latency_ms_sum", *RERANK_LATENCY_FIELDS)
    }
    series = []
    for i in range(minutes):
        minute = start + timedelta(minutes=i)
        row = rows.get(minute)
        series.append({"minute": minute, "requests": row["requests"] if row else 0,
                       "cache_hits": row["cache_hits"] if row else 0, "errors": row["errors"] if row else 0,
                       "rejected": row["rejected"] if row else 0})
    requests = sum(row["requests"] for row in rows.values())
    errors = sum(row["errors"] for row in rows.values())
    rejected = sum(row["rejected"] for row in rows.values())
    cache_hits = sum(row["cache_hits"] for row in rows.values())
    answered = requests - errors - rejected
    counts = [sum(row[name] for row in rows.values()) for name in RERANK_LATENCY_FIELDS]
    latency = {"mean": _share(sum(row["latency_ms_sum"] for row in rows.values()), answered)}
    latency.update({f"p{q}": latency_percentile(counts, q / 100) for q in RERANK_PERCENTILES})
    return {
        "minutes": minutes,
        "start": start,
        "end": current + timedelta(minutes=1),
        "requests": requests,
        "requests_per_minute": requests / minutes,
        "peak_requests_per_minute": max(point["requests"] for point in series),
        "answered": answered,
        "errors": errors,
        "error_rate": _share(errors, requests),
        "rejected": rejected,
        "rejected_rate": _share(rejected, requests),
        "cache_hits": cache_hits,
        "cache_hit_rate": _share(cache_hits, answered),
        "latency_ms": latency,
        "latency_buckets": [{"le_ms": bound, "requests": count}
                            for bound, count in zip((*RERANK_LATENCY_BOUNDS_MS, None), counts, strict=True)],
        "series": series,
    }

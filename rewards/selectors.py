"""Reads of training runs and the model registry, limited to the projects a user may see."""
from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from labeling.errors import DomainError, NotFound
from labeling.models import Project
from labeling.selectors import project_get_for_user, project_list_for_user
from rewards.models import Policy, RewardModel, TrainingRun


def training_run_list_for_user(*, user: AbstractBaseUser, project_slug: str | None = None,
                               status: str | None = None, kind: str | None = None) -> QuerySet[TrainingRun]:
    if project_slug:
        runs = TrainingRun.objects.filter(project=project_get_for_user(slug=project_slug, user=user))
    else:
        runs = TrainingRun.objects.filter(project__in=project_list_for_user(user=user))
    if status:
        if status not in TrainingRun.Status.values:
            raise DomainError(f"Unknown status '{status}'.", field="status")
        runs = runs.filter(status=status)
    if kind:
        if kind not in TrainingRun.Kind.values:
            raise DomainError(f"Unknown kind '{kind}'.", field="kind")
        runs = runs.filter(kind=kind)
    return runs.select_related("project", "created_by").order_by("-created_at", "-id")


def training_run_get_for_user(*, run_id: int, user: AbstractBaseUser, manage: bool = False) -> TrainingRun:
    """The run if the user may see its project (404 otherwise, so runs of other projects do not leak)."""
    run = TrainingRun.objects.select_related("project", "created_by").filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"Training run {run_id} not found.", field="run")
    try:
        project_get_for_user(slug=run.project.slug, user=user, manage=manage)
    except NotFound:
        raise NotFound(f"Training run {run_id} not found.", field="run")
    return run


def reward_model_list(*, project: Project) -> QuerySet[RewardModel]:
    return RewardModel.objects.filter(project=project).select_related("training_run").order_by("-version")


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


def policy_list(*, project: Project) -> QuerySet[Policy]:
    return Policy.objects.filter(project=project).select_related("training_run").order_by("-version")


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

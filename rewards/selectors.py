"""Reads of training runs and the model registry, limited to the projects a user may see."""
from __future__ import annotations

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

"""Reads of the labeling core: who may see which project, and querysets for the API and pages."""
from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from labeling.errors import Forbidden, NotFound
from labeling.models import Membership, Project


def project_list_for_user(*, user: AbstractBaseUser) -> QuerySet[Project]:
    if user.is_staff:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user).distinct()


def project_role(*, project: Project, user: AbstractBaseUser) -> str | None:
    """'admin' for staff, the membership role for members, None for everyone else."""
    if not user.is_authenticated:
        return None
    if user.is_staff:
        return "admin"
    return Membership.objects.filter(project=project, user=user).values_list("role", flat=True).first()


def project_get_for_user(*, slug: str, user: AbstractBaseUser, manage: bool = False) -> Project:
    """The project if the user may see it (and manage it when `manage`); a non-member gets a 404 so that
    project names do not leak."""
    project = Project.objects.filter(slug=slug).first()
    role = project_role(project=project, user=user) if project is not None else None
    if project is None or role is None:
        raise NotFound(f"Project '{slug}' not found.", field="project")
    if manage and role not in ("admin", Membership.Role.MANAGER):
        raise Forbidden("Only the project's managers can do this.", field="project")
    return project

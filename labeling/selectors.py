"""Reads of the labeling core: who may see which project, and querysets for the API and pages."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Exists, OuterRef, QuerySet

from labeling.errors import Forbidden, NotFound
from labeling.models import Comparison, Membership, Pair, Project


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


# --- aggregation: the one definition of "which response won" ------------------------------------------


@dataclass(frozen=True)
class PreferenceRow:
    """One decided pair: the majority's chosen and rejected responses, with the labels behind it."""

    pair_id: int
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float | None
    comparison_ids: tuple[int, ...]


def pair_decision(choices: list[tuple[str, int | None, float | None]]) -> tuple[str, float | None] | None:
    """Majority vote over (choice, strength, margin) labels of one pair. Returns ('a'|'b', margin) or None when
    the majority is a tie or both-bad, or A and B have equal votes. The margin is the imported margin where
    one was given, else the mean strength of the winning votes that carry one."""
    votes = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    for choice, _, _ in choices:
        votes[choice] += 1
    top = max(votes.values())
    winners = [c for c, n in votes.items() if n == top]
    if len(winners) != 1 or winners[0] not in ("a", "b"):
        return None
    winner = winners[0]
    margins = [m for c, _, m in choices if c == winner and m is not None]
    if margins:
        return winner, sum(margins) / len(margins)
    strengths = [s for c, s, _ in choices if c == winner and s is not None]
    return winner, (sum(strengths) / len(strengths) if strengths else None)


def preference_rows(*, project: Project, comparison_ids: Iterable[int] | None = None,
                    chunk_size: int = 2000) -> Iterator[PreferenceRow]:
    """Stream the project's decided pairs in pair order (constant memory); pairs without a clear A/B majority
    are left out. Gold pairs count like any other pair, decided by their labels. `comparison_ids` limits the
    vote to a frozen set of comparisons."""
    comparisons = Comparison.objects.filter(pair__project=project)
    if comparison_ids is not None:
        comparisons = comparisons.filter(pk__in=list(comparison_ids))
    rows = comparisons.order_by("pair_id", "id").values_list(
        "pair_id", "id", "choice", "strength", "margin",
        "pair__prompt__content", "pair__response_a__text", "pair__response_b__text",
    ).iterator(chunk_size=chunk_size)
    for pair_id, group in groupby(rows, key=lambda row: row[0]):
        labels = list(group)
        decided = pair_decision([(row[2], row[3], row[4]) for row in labels])
        if decided is None:
            continue
        winner, margin = decided
        _, _, _, _, _, prompt, text_a, text_b = labels[0]
        chosen, rejected = (text_a, text_b) if winner == "a" else (text_b, text_a)
        yield PreferenceRow(pair_id=pair_id, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin,
                            comparison_ids=tuple(row[1] for row in labels))


# --- a labeler's own progress ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """A labeler's own work in one project: pairs labeled, and open pairs they have not labeled yet."""

    done: int
    remaining: int

    @property
    def total(self) -> int:
        return self.done + self.remaining

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 100


def labeler_progress(*, projects: Iterable[Project], user: AbstractBaseUser) -> dict[int, Progress]:
    """Progress per project id in two grouped queries, whatever the number of projects."""
    ids = [project.pk for project in projects]
    done = dict(
        Comparison.objects.filter(labeler=user, pair__project_id__in=ids)
        .values_list("pair__project_id").annotate(n=Count("id")).order_by()
    )
    mine = Comparison.objects.filter(pair=OuterRef("pk"), labeler=user)
    # Gold pairs never close, so counting them would keep the bar short of 100% forever; the labeler's
    # gold answers still count as done.
    remaining = dict(
        Pair.objects.filter(project_id__in=ids, status=Pair.Status.OPEN, gold_choice__isnull=True)
        .exclude(Exists(mine)).values_list("project_id").annotate(n=Count("id")).order_by()
    )
    return {pk: Progress(done=done.get(pk, 0), remaining=remaining.get(pk, 0)) for pk in ids}

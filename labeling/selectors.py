"""Reads of the labeling core: who may see which project, and querysets for the API and pages."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from labeling import queries
from labeling.errors import Forbidden, NotFound
from labeling.models import UNSTORABLE, ApiToken, Comparison, Lease, Membership, Pair, Project


def project_list_for_user(*, user: AbstractBaseUser) -> QuerySet[Project]:
    if user.is_staff:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user).distinct()


# The project and the user's membership role in it, in one statement (it runs on every labeling request).
_PROJECT_WITH_ROLE = queries.Statement(f"""
    SELECT {{project_columns}}, {queries.member_role("pr.id")}
    FROM {{project}} pr WHERE pr.slug = %s""", project_columns=(queries.PROJECT, "pr"))


def project_role(*, user: AbstractBaseUser, member_role: str | None) -> str | None:
    """What the user may do in a project where their membership role is `member_role` (None: not a member):
    staff act as 'admin' everywhere, anyone else by their membership, and a non-member not at all."""
    if not user.is_authenticated:
        return None
    return "admin" if user.is_staff else member_role


def project_get_for_user(*, slug: str, user: AbstractBaseUser, manage: bool = False) -> Project:
    """The project if the user may see it (and manage it when `manage`); a non-member gets a 404 so that
    project names do not leak. Staff see every project as admins."""
    row = _PROJECT_WITH_ROLE.fetch_one([user.pk, slug]) if user.is_authenticated else None
    role = None if row is None else project_role(user=user, member_role=row[-1])
    if role is None:
        raise NotFound(f"Project '{slug}' not found.", field="project")
    if manage and role not in ("admin", Membership.Role.MANAGER):
        raise Forbidden("Only the project's managers can do this.", field="project")
    return queries.PROJECT.read(row)


# --- scoped API keys ------------------------------------------------------------------------------------


def api_key_list(*, project: Project) -> QuerySet[ApiToken]:
    """The project's scoped keys (rerank keys), newest first, revoked ones included; user tokens are personal
    and never listed here."""
    return (ApiToken.objects.select_related("user").filter(project=project).exclude(scope=ApiToken.Scope.USER)
            .order_by("-created_at", "-id"))


def _storable(text: str) -> bool:
    """Whether the database can hold (and so compare) `text`: a name taken from a URL path may carry a NUL as
    %00, which PostgreSQL refuses in any query rather than matching nothing."""
    return UNSTORABLE.search(text) is None


def user_get_by_username(*, username: str, field: str = "username") -> AbstractBaseUser:
    user = get_user_model().objects.filter(username=username).first() if _storable(username) else None
    if user is None:
        raise NotFound(f"No user named '{username}'.", field=field)
    return user


def api_token_get_active(*, user: AbstractBaseUser, prefix: str) -> ApiToken:
    """One of the user's own tokens that is not revoked, by its prefix."""
    token = (ApiToken.objects.filter(prefix=prefix, user=user, revoked_at__isnull=True).first()
             if _storable(prefix) else None)
    if token is None:
        raise NotFound("No active token with this prefix.", field="prefix")
    return token


def api_key_get(*, project: Project, prefix: str) -> ApiToken:
    token = api_key_list(project=project).filter(prefix=prefix).first() if _storable(prefix) else None
    if token is None:
        raise NotFound(f"Project '{project.slug}' has no API key starting with '{prefix}'.", field="prefix")
    return token


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
    comparisons = Comparison.objects.filter(project=project)
    frozen: set[int] | None = None
    if comparison_ids is not None:
        # Matched here rather than in SQL: a snapshot holds up to every label of the project, and a statement
        # carries at most 65,535 parameters (PostgreSQL's limit with server-side binding).
        frozen = set(comparison_ids)
        if not frozen:
            return
        comparisons = comparisons.filter(pk__range=(min(frozen), max(frozen)))
    rows = comparisons.order_by("pair_id", "id").values_list(
        "pair_id", "id", "choice", "strength", "margin",
        "pair__prompt__content", "pair__response_a__text", "pair__response_b__text",
    ).iterator(chunk_size=chunk_size)
    if frozen is not None:
        rows = (row for row in rows if row[1] in frozen)
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
        Comparison.objects.filter(labeler=user, project_id__in=ids)
        .values_list("project_id").annotate(n=Count("id")).order_by()
    )
    mine = Comparison.objects.filter(pair=OuterRef("pk"), labeler=user)
    # A pair the labeler skipped is never offered to them again: counting it would leave "1 left" beside an
    # empty queue.
    skipped = Lease.objects.filter(pair=OuterRef("pk"), labeler=user, skipped=True)
    # Gold pairs never close, so counting them would keep the bar short of 100% forever; the labeler's
    # gold answers still count as done.
    remaining = dict(
        Pair.objects.filter(project_id__in=ids, status=Pair.Status.OPEN, gold_choice__isnull=True)
        .exclude(Exists(mine)).exclude(Exists(skipped)).values_list("project_id").annotate(n=Count("id")).order_by()
    )
    return {pk: Progress(done=done.get(pk, 0), remaining=remaining.get(pk, 0)) for pk in ids}


# --- the manager dashboard ------------------------------------------------------------------------------

# A labeler is flagged for a look when one of these holds, each judged only on enough evidence: on a handful of
# answers a careful labeler lands on the wrong side of any threshold by chance, and a flag that fires on noise
# teaches managers to ignore flags. The left-side rate counts picks of a side only (ties and both-bad answers say
# nothing about position). It flags when it lies outside the band (a bias worth a look) and a fair coin would land
# that far from half with probability under OUTLIER_LEFT_SHARE_P (two-sided binomial test): outside the band alone,
# a fair labeler was flagged about one time in nine at 20 picks; with the test, at most one time in a hundred at any
# count (0.3% at 20 picks, which then need 17 of one side). A labeler who is right on 90% of gold pairs falls below
# OUTLIER_GOLD_ACCURACY_MIN on 8% of samples of 5 gold answers, on 1% of samples of OUTLIER_GOLD_MIN_ANSWERS.
OUTLIER_MIN_LABELS = 20
OUTLIER_LEFT_SHARE_BAND = (0.35, 0.65)
OUTLIER_LEFT_SHARE_P = 0.01
OUTLIER_GOLD_ACCURACY_MIN = 0.7
OUTLIER_GOLD_MIN_ANSWERS = 10
OUTLIER_MEDIAN_SECONDS_MIN = 3.0
# The median time over fewer answers is one or two quick answers to obvious pairs.
OUTLIER_MEDIAN_MIN_TIMED = 10
# Below this a labeler disagrees with the others on most of the labels they share.
OUTLIER_AGREEMENT_MIN = 0.5
OUTLIER_AGREEMENT_MIN_PAIRS = 20


def project_list_managed_by(*, user: AbstractBaseUser) -> QuerySet[Project]:
    """The projects a user may manage: every project for staff, else those where they are a manager."""
    if user.is_staff:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user, memberships__role=Membership.Role.MANAGER).distinct()


def membership_list(*, project: Project) -> QuerySet[Membership]:
    return Membership.objects.filter(project=project).select_related("user").order_by("user__username")


@dataclass(frozen=True)
class RecentActivity:
    comparisons_today: int
    active_labelers: int


def project_recent_activity(*, projects: Iterable[Project], now: datetime | None = None) -> dict[int, RecentActivity]:
    """Per project id: human comparisons since local midnight, and distinct labelers in the last 24 hours."""
    now = now or timezone.now()
    midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    ids = [project.pk for project in projects]
    rows = (
        Comparison.objects.filter(project_id__in=ids, source=Comparison.Source.LABEL,
                                  created_at__gte=min(midnight, now - timedelta(hours=24)), created_at__lte=now)
        .values("project_id")
        .annotate(today=Count("id", filter=Q(created_at__gte=midnight)),
                  labelers=Count("labeler_id", distinct=True, filter=Q(created_at__gte=now - timedelta(hours=24))))
        .order_by()
    )
    found = {row["project_id"]: RecentActivity(row["today"], row["labelers"]) for row in rows}
    return {pk: found.get(pk, RecentActivity(0, 0)) for pk in ids}


def _fair_coin_p(*, heads: int, tosses: int) -> float:
    """Two-sided binomial test against a fair coin: the probability of a count at least as far from half."""
    from scipy.stats import binom  # imported on first use: most requests never get here

    return min(1.0, 2 * float(binom.cdf(min(heads, tosses - heads), tosses, 0.5)))


def labeler_outlier_reasons(*, side_picks: int, left_share: float | None, gold_comparisons: int,
                            gold_accuracy: float | None, timed: int, median_seconds: float | None,
                            agreement_pairs: int, agreement: float | None) -> list[str]:
    """Why a labeler's work deserves a second look (empty when nothing stands out). The one outlier rule.
    Each measure comes with the count it was taken over: `side_picks` A or B picks for `left_share`,
    `gold_comparisons` answers on gold pairs for `gold_accuracy`, `timed` comparisons with a time for
    `median_seconds`, and `agreement_pairs` pairs shared with other labelers for `agreement`."""
    reasons = []
    low, high = OUTLIER_LEFT_SHARE_BAND
    if (side_picks >= OUTLIER_MIN_LABELS and left_share is not None and not low <= left_share <= high
            and _fair_coin_p(heads=round(left_share * side_picks), tosses=side_picks) < OUTLIER_LEFT_SHARE_P):
        reasons.append(f"picks the left side {left_share:.0%} of the time")
    if (gold_comparisons >= OUTLIER_GOLD_MIN_ANSWERS and gold_accuracy is not None
            and gold_accuracy < OUTLIER_GOLD_ACCURACY_MIN):
        # The counts say what a rounded percentage cannot: 0.695 would read "70%" beside a threshold of 0.7.
        correct = round(gold_accuracy * gold_comparisons)
        reasons.append(f"gold accuracy {gold_accuracy:.0%} ({correct} of {gold_comparisons})")
    if timed >= OUTLIER_MEDIAN_MIN_TIMED and median_seconds is not None and median_seconds < OUTLIER_MEDIAN_SECONDS_MIN:
        reasons.append(f"median {median_seconds:.1f} s per comparison")
    if agreement_pairs >= OUTLIER_AGREEMENT_MIN_PAIRS and agreement is not None and agreement < OUTLIER_AGREEMENT_MIN:
        reasons.append(f"agrees with the others {agreement:.0%} of the time")
    return reasons


def labeler_table(*, stats: dict[str, Any], member_ids: set[int] | None = None) -> list[dict[str, Any]]:
    """One row per labeler from labeling.stats.project_stats output: activity, gold accuracy and agreement with
    others side by side, with the outlier reasons of each. With `member_ids`, `member` says whether the labeler is
    still in the project (a removed labeler's labels stay, and so does their row)."""
    gold = {row["labeler"]["id"]: row for row in stats["gold"]["labelers"]}
    agreement = {row["labeler"]["id"]: row for row in stats["agreement"]["per_labeler"]}
    rows = []
    for activity in stats["labelers"]:
        labeler_id = activity["labeler"]["id"]
        gold_row = gold.get(labeler_id, {"comparisons": 0, "accuracy": None})
        agreement_row = agreement.get(labeler_id, {"pairs": 0, "agreement": None})
        rows.append({
            **activity,
            "member": member_ids is None or labeler_id in member_ids,
            "gold_comparisons": gold_row["comparisons"],
            "gold_accuracy": gold_row["accuracy"],
            "agreement_pairs": agreement_row["pairs"],
            "agreement": agreement_row["agreement"],
            "outliers": labeler_outlier_reasons(
                side_picks=activity["side_picks"], left_share=activity["left_share"],
                gold_comparisons=gold_row["comparisons"], gold_accuracy=gold_row["accuracy"],
                timed=activity["timed"], median_seconds=activity["median_seconds"],
                agreement_pairs=agreement_row["pairs"], agreement=agreement_row["agreement"]),
        })
    return rows

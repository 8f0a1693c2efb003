"""Read-only statistics of a project: pair and label counts, labeler behaviour, agreement and gold accuracy."""
from __future__ import annotations

import math
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import reduce
from itertools import combinations, groupby
from operator import or_
from typing import Any

import krippendorff
import numpy as np
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Aggregate, Count, F, FloatField, Q
from django.db.models.functions import TruncHour
from django.utils import timezone

from labeling.errors import DomainError
from labeling.models import Choice, Comparison, Pair, Project
from labeling.services import choice_to_frame

CHOICES: tuple[str, ...] = tuple(Choice.values)
DECISIVE: tuple[str, ...] = (Choice.A.value, Choice.B.value)
CHOICE_INDEX = {choice: index for index, choice in enumerate(CHOICES)}
DECISIVE_INDEXES = frozenset(CHOICE_INDEX[choice] for choice in DECISIVE)
THROUGHPUT_DEFAULT_HOURS = 48
THROUGHPUT_MAX_HOURS = 24 * 31


class _Median(Aggregate):
    """PostgreSQL's exact median; NULLs are ignored like in every other aggregate."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


def _share(part: int | float, whole: int | float) -> float | None:
    return part / whole if whole else None


def _human(project: Project):
    return Comparison.objects.filter(pair__project=project, source=Comparison.Source.LABEL)


def _shown_on_left() -> Q:
    """Comparisons whose pick was the response shown on the left, derived from the one A/B-to-frame rule."""
    cases = [Q(choice=choice, swapped=swapped) for choice in DECISIVE for swapped in (False, True)
             if choice_to_frame(choice, swapped=swapped) == "left"]
    return reduce(or_, cases)


def _labeler_ref(labeler_id: int, username: str) -> dict[str, Any]:
    return {"id": labeler_id, "username": username}


# --- counts ---------------------------------------------------------------------------------------------


def pair_counts(*, project: Project) -> dict[str, int]:
    """Pairs of the project. Gold pairs never complete (everyone may label them), so the status counts cover
    the labelable (non-gold) pairs only: complete + in_progress + unlabeled == labelable."""
    regular = Q(gold_choice__isnull=True)
    open_ = Q(status=Pair.Status.OPEN)
    counts = Pair.objects.filter(project=project).aggregate(
        total=Count("id"),
        gold=Count("id", filter=Q(gold_choice__isnull=False)),
        complete=Count("id", filter=regular & Q(status=Pair.Status.COMPLETE)),
        in_progress=Count("id", filter=regular & open_ & Q(label_count__gt=0)),
        unlabeled=Count("id", filter=regular & open_ & Q(label_count=0)),
    )
    counts["labelable"] = counts["total"] - counts["gold"]
    return counts


def comparison_counts(*, project: Project) -> dict[str, int]:
    return Comparison.objects.filter(pair__project=project).aggregate(
        total=Count("id"),
        human=Count("id", filter=Q(source=Comparison.Source.LABEL)),
        imported=Count("id", filter=Q(source=Comparison.Source.IMPORT)),
    )


def choice_distribution(*, project: Project) -> dict[str, int]:
    """How often each choice was made, over human and imported comparisons, in the pair's A/B frame."""
    return Comparison.objects.filter(pair__project=project).aggregate(
        **{choice: Count("id", filter=Q(choice=choice)) for choice in CHOICES}
    )


# --- labelers -------------------------------------------------------------------------------------------


def _median_ms_by_labeler(*, project: Project) -> dict[int, float]:
    comparisons = _human(project).filter(time_ms__isnull=False)
    if connection.vendor == "postgresql":
        rows = comparisons.values("labeler_id").annotate(median=_Median("time_ms")).values_list("labeler_id", "median")
        return {labeler_id: float(median) for labeler_id, median in rows}
    # SQLite has no median aggregate: stream the times sorted per labeler instead (local development only).
    rows = comparisons.order_by("labeler_id").values_list("labeler_id", "time_ms").iterator(chunk_size=5000)
    return {labeler_id: float(statistics.median(ms for _, ms in group))
            for labeler_id, group in groupby(rows, key=lambda row: row[0])}


def labeler_activity(*, project: Project) -> list[dict[str, Any]]:
    """Per labeler of human comparisons: how many, median seconds per comparison (of those that carry a time),
    the share of left-side picks among the comparisons that picked a side as the labeler saw it (0.5 is no
    position bias), and the tie and both-bad rates."""
    rows = (
        _human(project).values("labeler_id", "labeler__username")
        .annotate(
            comparisons=Count("id"),
            sided=Count("id", filter=Q(choice__in=DECISIVE)),
            left=Count("id", filter=_shown_on_left()),
            ties=Count("id", filter=Q(choice=Choice.TIE)),
            both_bad=Count("id", filter=Q(choice=Choice.BOTH_BAD)),
        )
        .order_by("labeler__username")
    )
    medians = _median_ms_by_labeler(project=project)
    result = []
    for row in rows:
        median_ms = medians.get(row["labeler_id"])
        result.append({
            "labeler": _labeler_ref(row["labeler_id"], row["labeler__username"]),
            "comparisons": row["comparisons"],
            "median_seconds": median_ms / 1000 if median_ms is not None else None,
            "left_share": _share(row["left"], row["sided"]),
            "tie_rate": _share(row["ties"], row["comparisons"]),
            "both_bad_rate": _share(row["both_bad"], row["comparisons"]),
        })
    return result


def comparison_throughput_hourly(*, project: Project, hours: int = THROUGHPUT_DEFAULT_HOURS,
                                 now: datetime | None = None) -> list[dict[str, Any]]:
    """Human comparisons per UTC hour over the last `hours` hours (the current, partial hour last), with the
    hours that saw none included as zeros so the series can be drawn as is."""
    if not 1 <= hours <= THROUGHPUT_MAX_HOURS:
        raise DomainError(f"hours must be between 1 and {THROUGHPUT_MAX_HOURS}.", field="hours")
    current = (now or timezone.now()).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = current - timedelta(hours=hours - 1)
    counts = dict(
        _human(project).filter(created_at__gte=start, created_at__lt=current + timedelta(hours=1))
        .annotate(hour=TruncHour("created_at", tzinfo=UTC)).values("hour")
        .annotate(n=Count("id")).values_list("hour", "n")
    )
    buckets = (start + timedelta(hours=i) for i in range(hours))
    return [{"hour": hour, "comparisons": counts.get(hour, 0)} for hour in buckets]


# --- agreement ------------------------------------------------------------------------------------------


def _agreement_summary(per_pair: list[tuple[float, bool]]) -> dict[str, Any]:
    return {
        "pairs": len(per_pair),
        "percent_agreement": statistics.fmean(a for a, _ in per_pair) if per_pair else None,
        "unanimous_share": _share(sum(1 for _, unanimous in per_pair if unanimous), len(per_pair)),
    }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _krippendorff_alpha(value_counts: list[list[int]]) -> float | None:
    matrix = np.asarray(value_counts, dtype=float).reshape(-1, len(CHOICES))
    # With a single value ever used there is no expected disagreement and alpha is undefined.
    if np.count_nonzero(matrix.sum(axis=0)) < 2:
        return None
    return _finite(krippendorff.alpha(value_counts=matrix, level_of_measurement="nominal"))


def cohen_kappas(tables: np.ndarray) -> list[float | None]:
    """Cohen's kappa of each two labelers from their contingency tables, shape (pairs of labelers, 4, 4):
    rows the first labeler's choice, columns the second's. None where chance agreement is certain (both
    only ever used one and the same choice).

    The same formula as scikit-learn's cohen_kappa_score (the tests hold it to that), applied to every table at
    once: calling scikit-learn per two labelers costs about 10 ms of input checks each, which made 40 labelers
    on 100k comparisons (780 overlapping couples) take 8 seconds."""
    n = tables.sum(axis=(1, 2))
    observed = np.trace(tables, axis1=1, axis2=2) / n
    expected = np.einsum("ki,ki->k", tables.sum(axis=2), tables.sum(axis=1)) / n**2
    defined = ~np.isclose(expected, 1.0)
    kappa = (observed - expected) / np.where(defined, 1.0 - expected, 1.0)
    return [float(k) if ok else None for k, ok in zip(kappa, defined, strict=True)]


def labeler_agreement(*, project: Project) -> dict[str, Any]:
    """Agreement among labelers on the pairs (gold included) that have two or more human labels.

    `with_ties` covers every such pair; `without_ties` only the pairs where every label is A or B. Percent
    agreement is the share of agreeing label pairs, averaged over pairs; Krippendorff's alpha is nominal over
    all four choices; Cohen's kappa is given for every two labelers who share pairs, and on its own when
    exactly two labelers overlap. A labeler's agreement is the share of the other labels on their pairs that
    match theirs."""
    multi = (_human(project).values("pair_id").annotate(n=Count("id")).filter(n__gte=2).values("pair_id"))
    rows = (
        Comparison.objects.filter(source=Comparison.Source.LABEL, pair_id__in=multi)
        .order_by("pair_id", "labeler_id").values_list("pair_id", "labeler_id", "choice").iterator(chunk_size=5000)
    )
    with_ties: list[tuple[float, bool]] = []
    without_ties: list[tuple[float, bool]] = []
    value_counts: list[list[int]] = []
    matches: Counter[int] = Counter()
    others: Counter[int] = Counter()
    shared_pairs: Counter[int] = Counter()
    # (first labeler, second labeler, first's choice index, second's choice index) -> pairs
    overlaps: Counter[tuple[int, int, int, int]] = Counter()
    labels = 0
    for _, group in groupby(rows, key=lambda row: row[0]):
        votes = [(labeler_id, CHOICE_INDEX[choice]) for _, labeler_id, choice in group]
        n = len(votes)
        labels += n
        counts = Counter(choice for _, choice in votes)
        value_counts.append([counts[index] for index in range(len(CHOICES))])
        agreeing = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
        unanimous = len(counts) == 1
        with_ties.append((agreeing, unanimous))
        if set(counts) <= DECISIVE_INDEXES:
            without_ties.append((agreeing, unanimous))
        for labeler_id, choice in votes:
            matches[labeler_id] += counts[choice] - 1
            others[labeler_id] += n - 1
            shared_pairs[labeler_id] += 1
        # Votes are sorted by labeler id, so each two labelers always land under the same (low, high) key.
        overlaps.update((first_id, second_id, first, second)
                        for (first_id, first), (second_id, second) in combinations(votes, 2))

    usernames = dict(get_user_model().objects.filter(pk__in=list(shared_pairs)).values_list("pk", "username"))
    couples = sorted({(first_id, second_id) for first_id, second_id, _, _ in overlaps})
    couple_index = {couple: i for i, couple in enumerate(couples)}
    tables = np.zeros((len(couples), len(CHOICES), len(CHOICES)))
    for (first_id, second_id, first, second), count in overlaps.items():
        tables[couple_index[(first_id, second_id)], first, second] = count
    pairwise = [
        {
            "labeler_a": _labeler_ref(first_id, usernames[first_id]),
            "labeler_b": _labeler_ref(second_id, usernames[second_id]),
            "pairs": int(table.sum()),
            "kappa": kappa,
        }
        for (first_id, second_id), table, kappa in zip(couples, tables, cohen_kappas(tables), strict=True)
    ]
    per_labeler = [
        {
            "labeler": _labeler_ref(labeler_id, usernames[labeler_id]),
            "pairs": shared_pairs[labeler_id],
            "agreement": _share(matches[labeler_id], others[labeler_id]),
        }
        for labeler_id in sorted(shared_pairs, key=lambda pk: usernames[pk])
    ]
    return {
        "labels": labels,
        "labelers": len(shared_pairs),
        "with_ties": _agreement_summary(with_ties),
        "without_ties": _agreement_summary(without_ties),
        "krippendorff_alpha": _krippendorff_alpha(value_counts) if value_counts else None,
        "cohen_kappa": pairwise[0]["kappa"] if len(pairwise) == 1 else None,
        "pairwise_kappa": pairwise,
        "per_labeler": per_labeler,
    }


# --- gold -----------------------------------------------------------------------------------------------


def gold_accuracy(*, project: Project) -> dict[str, Any]:
    """On gold pairs, the share of human comparisons whose choice equals the gold choice, overall and per
    labeler."""
    rows = (
        _human(project).filter(pair__gold_choice__isnull=False)
        .values("labeler_id", "labeler__username")
        .annotate(comparisons=Count("id"), correct=Count("id", filter=Q(choice=F("pair__gold_choice"))))
        .order_by("labeler__username")
    )
    labelers = [
        {
            "labeler": _labeler_ref(row["labeler_id"], row["labeler__username"]),
            "comparisons": row["comparisons"],
            "correct": row["correct"],
            "accuracy": _share(row["correct"], row["comparisons"]),
        }
        for row in rows
    ]
    comparisons = sum(row["comparisons"] for row in labelers)
    correct = sum(row["correct"] for row in labelers)
    return {"comparisons": comparisons, "correct": correct, "accuracy": _share(correct, comparisons),
            "labelers": labelers}


# --- everything at once ---------------------------------------------------------------------------------


def project_stats(*, project: Project, hours: int = THROUGHPUT_DEFAULT_HOURS,
                  now: datetime | None = None) -> dict[str, Any]:
    """All of the project's statistics in one plain dict (a fixed number of queries, whatever the size)."""
    now = now or timezone.now()
    return {
        "project": project.slug,
        "generated_at": now,
        "pairs": pair_counts(project=project),
        "comparisons": comparison_counts(project=project),
        "choices": choice_distribution(project=project),
        "labelers": labeler_activity(project=project),
        "throughput": {"hours": hours,
                       "buckets": comparison_throughput_hourly(project=project, hours=hours, now=now)},
        "agreement": labeler_agreement(project=project),
        "gold": gold_accuracy(project=project),
    }

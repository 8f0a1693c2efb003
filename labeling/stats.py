"""Read-only statistics of a project: pair and label counts, labeler behaviour, agreement and gold accuracy."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import reduce
from itertools import chain, groupby
from operator import or_
from typing import Any

import krippendorff
import numpy as np
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Aggregate, BigIntegerField, Case, Count, F, FloatField, Func, IntegerField, Q, Value, When
from django.db.models.functions import TruncHour
from django.utils import timezone

from labeling.errors import DomainError
from labeling.models import Choice, Comparison, Membership, Pair, Project
from labeling.services import choice_to_frame

CHOICES: tuple[str, ...] = tuple(Choice.values)
DECISIVE: tuple[str, ...] = (Choice.A.value, Choice.B.value)
CHOICE_INDEX = {choice: index for index, choice in enumerate(CHOICES)}
DECISIVE_INDEXES = frozenset(CHOICE_INDEX[choice] for choice in DECISIVE)
UNDECISIVE_INDEXES = [index for index in range(len(CHOICES)) if index not in DECISIVE_INDEXES]
THROUGHPUT_DEFAULT_HOURS = 48
THROUGHPUT_MAX_HOURS = 24 * 31
# Days of the agreement-over-time series (UTC days, the current one last).
AGREEMENT_DAYS = 14


class _Median(Aggregate):
    """PostgreSQL's exact median; NULLs are ignored like in every other aggregate."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


class _EpochSeconds(Func):
    """A datetime as whole seconds since 1970 (UTC), rounded down, so label times arrive as plain integers."""

    output_field = BigIntegerField()

    def as_postgresql(self, compiler, connection, **extra):
        # A cast alone rounds to the nearest second: a label at 23:59:59.5 would count for the next day.
        return self.as_sql(compiler, connection, template="FLOOR(EXTRACT(EPOCH FROM %(expressions)s))::bigint",
                           **extra)

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection, template="CAST(strftime('%%%%s', %(expressions)s) AS INTEGER)",
                           **extra)


def _share(part: int | float, whole: int | float) -> float | None:
    return part / whole if whole else None


def _human(project: Project):
    return Comparison.objects.filter(project=project, source=Comparison.Source.LABEL)


def _shown_on_left() -> Q:
    """Comparisons whose pick was the response shown on the left, derived from the one A/B-to-frame rule."""
    cases = [Q(choice=choice, swapped=swapped) for choice in DECISIVE for swapped in (False, True)
             if choice_to_frame(choice, swapped=swapped) == "left"]
    return reduce(or_, cases)


def _labeler_ref(labeler_id: int, username: str) -> dict[str, Any]:
    return {"id": labeler_id, "username": username}


# --- counts ---------------------------------------------------------------------------------------------


_PAIR_COUNT_KEYS = ("total", "gold", "complete", "in_progress", "unlabeled")


def pair_counts(*, project: Project) -> dict[str, int]:
    """Pairs of the project. Gold pairs never complete (everyone may label them), so the status counts cover
    the labelable (non-gold) pairs only: complete + in_progress + unlabeled == labelable."""
    return pair_counts_by_project(projects=[project])[project.pk]


def pair_counts_by_project(*, projects: Iterable[Project]) -> dict[int, dict[str, int]]:
    """pair_counts of every project given, by project id, in one grouped query."""
    regular = Q(gold_choice__isnull=True)
    open_ = Q(status=Pair.Status.OPEN)
    ids = [project.pk for project in projects]
    rows = {row["project_id"]: row for row in Pair.objects.filter(project_id__in=ids).values("project_id").annotate(
        total=Count("id"),
        gold=Count("id", filter=Q(gold_choice__isnull=False)),
        complete=Count("id", filter=regular & Q(status=Pair.Status.COMPLETE)),
        in_progress=Count("id", filter=regular & open_ & Q(label_count__gt=0)),
        unlabeled=Count("id", filter=regular & open_ & Q(label_count=0)),
    ).order_by()}
    counts = {}
    for pk in ids:
        row = rows.get(pk, {})
        counts[pk] = {key: row.get(key, 0) for key in _PAIR_COUNT_KEYS}
        counts[pk]["labelable"] = counts[pk]["total"] - counts[pk]["gold"]
    return counts


def _comparison_totals(*, project: Project) -> tuple[dict[str, int], dict[str, int]]:
    """Comparison counts and the choice distribution in one pass over the project's comparisons."""
    row = Comparison.objects.filter(project=project).aggregate(
        total=Count("id"),
        human=Count("id", filter=Q(source=Comparison.Source.LABEL)),
        imported=Count("id", filter=Q(source=Comparison.Source.IMPORT)),
        **{f"choice_{choice}": Count("id", filter=Q(choice=choice)) for choice in CHOICES},
    )
    return ({key: row[key] for key in ("total", "human", "imported")},
            {choice: row[f"choice_{choice}"] for choice in CHOICES})


def comparison_counts(*, project: Project) -> dict[str, int]:
    return _comparison_totals(project=project)[0]


def choice_distribution(*, project: Project) -> dict[str, int]:
    """How often each choice was made, over human and imported comparisons, in the pair's A/B frame."""
    return _comparison_totals(project=project)[1]


# --- labelers -------------------------------------------------------------------------------------------


def _median_ms_by_labeler(*, project: Project) -> dict[int, float]:
    # SQLite has no median aggregate: stream the times sorted per labeler instead (local development only;
    # PostgreSQL computes the median in labeler_activity's own query).
    comparisons = _human(project).filter(time_ms__isnull=False)
    rows = comparisons.order_by("labeler_id").values_list("labeler_id", "time_ms").iterator(chunk_size=5000)
    return {labeler_id: float(statistics.median(ms for _, ms in group))
            for labeler_id, group in groupby(rows, key=lambda row: row[0])}


def labeler_activity(*, project: Project) -> list[dict[str, Any]]:
    """Per labeler of human comparisons: how many, median seconds per comparison over those that carry a time
    (`timed` of them), how many picked a side (A or B), the share of left-side picks among those as the labeler saw
    them (0.5 is no position bias), and the tie and both-bad rates. Members with the labeler role who have not
    labeled yet are listed too, with zero counts and None for every rate and the median."""
    # Grouped by the labeler id alone, and named afterwards: with the username in the group key the rows to sort
    # for the median were wide enough to spill to disk on large projects.
    rows = (
        _human(project).values("labeler_id")
        .annotate(
            comparisons=Count("id"),
            # Comparisons sent without a time (through the API) are left out of the median, and so of its count.
            timed=Count("time_ms"),
            sided=Count("id", filter=Q(choice__in=DECISIVE)),
            left=Count("id", filter=_shown_on_left()),
            ties=Count("id", filter=Q(choice=Choice.TIE)),
            both_bad=Count("id", filter=Q(choice=Choice.BOTH_BAD)),
        )
        .order_by()
    )
    postgres = connection.vendor == "postgresql"
    if postgres:
        # In the same pass: a second query for the medians cost another scan of the project's comparisons.
        rows = rows.annotate(median_ms=_Median("time_ms"))
    medians = {} if postgres else _median_ms_by_labeler(project=project)
    by_labeler = {row["labeler_id"]: row for row in rows}
    # The names, and in the same query the labelers who have done nothing yet: a manager needs to see those too.
    labelers = Membership.objects.filter(project=project, role=Membership.Role.LABELER).values("user_id")
    usernames = dict(get_user_model().objects.filter(Q(pk__in=list(by_labeler)) | Q(pk__in=labelers))
                     .values_list("pk", "username"))
    nothing = {"median_ms": None, **dict.fromkeys(("comparisons", "timed", "sided", "left", "ties", "both_bad"), 0)}
    result = []
    for labeler_id in sorted(usernames, key=usernames.__getitem__):
        row = by_labeler.get(labeler_id, nothing)
        median_ms = row["median_ms"] if postgres else medians.get(labeler_id)
        result.append({
            "labeler": _labeler_ref(labeler_id, usernames[labeler_id]),
            "comparisons": row["comparisons"],
            "median_seconds": median_ms / 1000 if median_ms is not None else None,
            "timed": row["timed"],
            "side_picks": row["sided"],
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


def _agreement_summary(agreeing: np.ndarray, unanimous: np.ndarray) -> dict[str, Any]:
    """Over pairs: the mean share of agreeing label pairs (fsum, exactly rounded) and the share of unanimous
    pairs."""
    pairs = len(agreeing)
    return {
        "pairs": pairs,
        "percent_agreement": math.fsum(agreeing.tolist()) / pairs if pairs else None,
        "unanimous_share": _share(int(unanimous.sum()), pairs),
    }


def _pair_agreement(value_counts: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """From the choice counts of the pairs with two or more human labels (a row per pair, a column per choice):
    each pair's share of agreeing label pairs, and the project-wide measures that follow from the counts alone."""
    n = value_counts.sum(axis=1)
    agreeing = (value_counts * (value_counts - 1)).sum(axis=1) / (n * (n - 1))
    unanimous = value_counts.max(axis=1, initial=0) == n
    decisive = value_counts[:, UNDECISIVE_INDEXES].sum(axis=1) == 0
    alpha, alpha_reason = _krippendorff_alpha(value_counts)
    return agreeing, {
        "labels": int(n.sum()),
        "with_ties": _agreement_summary(agreeing, unanimous),
        "without_ties": _agreement_summary(agreeing[decisive], unanimous[decisive]),
        "krippendorff_alpha": alpha,
        "krippendorff_alpha_reason": alpha_reason,
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _krippendorff_alpha(value_counts: np.ndarray) -> tuple[float | None, str | None]:
    """Nominal alpha over the choice counts of the pairs with two or more labels, or None with the reason."""
    if not len(value_counts):
        return None, "No pair has two or more human labels."
    matrix = np.asarray(value_counts, dtype=float).reshape(-1, len(CHOICES))
    used = np.flatnonzero(matrix.sum(axis=0))
    # With a single value ever used there is no expected disagreement and alpha is undefined.
    if len(used) < 2:
        return None, (f"Every label on the pairs with two or more human labels is the same choice "
                      f"('{CHOICES[used[0]]}'): with no disagreement to expect, alpha is undefined.")
    alpha = _finite(krippendorff.alpha(value_counts=matrix, level_of_measurement="nominal"))
    return alpha, None if alpha is not None else "Alpha is not a number on these labels."


def _kappa_reason(table: np.ndarray, kappa: float | None) -> str | None:
    """Why a kappa from cohen_kappas is None: both labelers only ever used one and the same choice."""
    if kappa is not None:
        return None
    choice = CHOICES[int(np.argmax(table.sum(axis=1)))]
    return (f"Both labelers only chose '{choice}' on the pairs they share: chance agreement is certain, so kappa "
            "is undefined.")


def _cohen_kappa_reason(pairwise: list[dict[str, Any]]) -> str | None:
    if not pairwise:
        return "No two labelers labeled the same pair."
    if len(pairwise) > 1:
        return f"{len(pairwise)} couples of labelers share pairs: see pairwise_kappa."
    return pairwise[0]["kappa_reason"]


def cohen_kappas(tables: np.ndarray) -> list[float | None]:
    """Cohen's kappa of each two labelers from their contingency tables, shape (pairs of labelers, 4, 4):
    rows the first labeler's choice, columns the second's. None where chance agreement is certain (both
    only ever used one and the same choice).

    The same formula as scikit-learn's cohen_kappa_score (the tests hold it to that), applied to every table at
    once: calling scikit-learn per two labelers costs about 10 ms of input checks each, which made 40 labelers
    on 100k comparisons (780 overlapping couples) take 8 seconds."""
    n = tables.sum(axis=(1, 2))
    observed = np.trace(tables, axis1=1, axis2=2) / n
    chance = np.einsum("ki,ki->k", tables.sum(axis=2), tables.sum(axis=1))
    # The counts are whole numbers, so chance agreement is certain exactly when these products make n squared;
    # a tolerance on the ratio would call kappa undefined for two labelers sharing 100k pairs or more.
    defined = chance != n**2
    expected = chance / n**2
    kappa = (observed - expected) / np.where(defined, 1.0 - expected, 1.0)
    return [float(k) if ok else None for k, ok in zip(kappa, defined, strict=True)]


def labeler_agreement(*, project: Project, days: int = AGREEMENT_DAYS,
                      now: datetime | None = None) -> dict[str, Any]:
    """Agreement among labelers on the pairs (gold included) that have two or more human labels.

    `with_ties` covers every such pair; `without_ties` only the pairs where every label is A or B. Percent
    agreement is the share of agreeing label pairs, averaged over pairs; Krippendorff's alpha is nominal over
    all four choices; Cohen's kappa is given for every two labelers who share pairs, and on its own when
    exactly two labelers overlap; where one is undefined it is None and its `*_reason` says why. A labeler's
    agreement is the share of the other labels on their pairs that match theirs. `daily` is agreement over time:
    for each of the last `days` UTC days (the current one last), the percent agreement of the pairs whose latest
    label came that day."""
    # One fetch of the project's human labels, then array arithmetic: looping over 100k labels in Python took
    # seconds, and the same numbers as SQL aggregates cost a self-join; both made the dashboard pages slow.
    # The rows are read with a plain cursor as whole numbers (the choice as its index), straight into an array.
    query = _human(project).annotate(choice_index=Case(
        *(When(choice=choice, then=Value(index)) for choice, index in CHOICE_INDEX.items()),
        output_field=IntegerField(),
    ), at=_EpochSeconds("created_at")).values_list("pair_id", "labeler_id", "choice_index", "at")
    with connection.cursor() as cursor:
        cursor.execute(*query.query.sql_with_params())
        fetched = cursor.fetchall()
    columns = np.fromiter(chain.from_iterable(fetched), dtype=np.int64, count=4 * len(fetched)).reshape(-1, 4)
    pair, choice = columns[:, 0], columns[:, 2]
    labeler_keys, labeler = np.unique(columns[:, 1], return_inverse=True)
    order = np.lexsort((labeler, pair))  # by pair, then by labeler id
    pair, labeler, choice, at = pair[order], labeler[order], choice[order], columns[order, 3]

    # Groups of labels per pair; only pairs with two or more labels take part.
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(pair)])
    group = np.repeat(np.arange(len(starts)), sizes)
    counts = np.bincount(group * len(CHOICES) + choice, minlength=len(starts) * len(CHOICES)).reshape(
        -1, len(CHOICES))
    multi = sizes >= 2
    agreeing, summary = _pair_agreement(counts[multi])
    latest = np.maximum.reduceat(at, starts)[multi] if len(at) else np.zeros(0, dtype=np.int64)
    daily = _agreement_daily(latest, agreeing, days=days, now=now)

    # A labeler's agreement: the other labels on their pairs that match theirs, over all other labels there.
    in_multi = multi[group]
    row_labeler = labeler[in_multi]
    same = counts[group[in_multi], choice[in_multi]] - 1
    others_per_row = sizes[group[in_multi]] - 1
    shared = np.bincount(row_labeler, minlength=len(labeler_keys))
    matches = np.bincount(row_labeler, weights=same, minlength=len(labeler_keys))
    others = np.bincount(row_labeler, weights=others_per_row, minlength=len(labeler_keys))

    # Contingency tables of every two labelers on the pairs they share: within a pair the labels are sorted by
    # labeler id, so label i and label i + d of the same pair always give the (lower id, higher id) couple.
    width = len(CHOICES)
    keys = []
    for offset in range(1, int(sizes.max(initial=1))):
        same_pair = pair[:-offset] == pair[offset:]
        first, second = labeler[:-offset][same_pair], labeler[offset:][same_pair]
        keys.append(((first * len(labeler_keys) + second) * width + choice[:-offset][same_pair]) * width
                    + choice[offset:][same_pair])
    overlap_keys, overlap_counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64),
                                             return_counts=True)
    couple_keys = overlap_keys // (width * width)
    couple_list, couple_index = np.unique(couple_keys, return_inverse=True)
    tables = np.zeros((len(couple_list), width, width))
    tables[couple_index, (overlap_keys // width) % width, overlap_keys % width] = overlap_counts
    couples = [(int(labeler_keys[key // len(labeler_keys)]), int(labeler_keys[key % len(labeler_keys)]))
               for key in couple_list.tolist()]
    shared_pairs = {int(labeler_keys[i]): int(shared[i]) for i in np.flatnonzero(shared).tolist()}

    usernames = dict(get_user_model().objects.filter(pk__in=list(shared_pairs)).values_list("pk", "username"))
    index_of = {int(labeler_id): i for i, labeler_id in enumerate(labeler_keys.tolist())}
    pairwise = [
        {
            "labeler_a": _labeler_ref(first_id, usernames[first_id]),
            "labeler_b": _labeler_ref(second_id, usernames[second_id]),
            "pairs": int(table.sum()),
            "kappa": kappa,
            "kappa_reason": _kappa_reason(table, kappa),
        }
        for (first_id, second_id), table, kappa in zip(couples, tables, cohen_kappas(tables), strict=True)
    ]
    per_labeler = [
        {
            "labeler": _labeler_ref(labeler_id, usernames[labeler_id]),
            "pairs": shared_pairs[labeler_id],
            "agreement": _share(int(matches[index_of[labeler_id]]), int(others[index_of[labeler_id]])),
        }
        for labeler_id in sorted(shared_pairs, key=lambda pk: usernames[pk])
    ]
    return {
        "labels": summary["labels"],
        "labelers": len(shared_pairs),
        "with_ties": summary["with_ties"],
        "without_ties": summary["without_ties"],
        "krippendorff_alpha": summary["krippendorff_alpha"],
        "krippendorff_alpha_reason": summary["krippendorff_alpha_reason"],
        "cohen_kappa": pairwise[0]["kappa"] if len(pairwise) == 1 else None,
        "cohen_kappa_reason": _cohen_kappa_reason(pairwise),
        "pairwise_kappa": pairwise,
        "per_labeler": per_labeler,
        "daily": daily,
    }


def agreement_summary_by_project(*, projects: Iterable[Project]) -> dict[int, dict[str, Any]]:
    """Per project id, the measures of labeler_agreement that need no labeler or day: `labels`, `with_ties`,
    `without_ties`, `krippendorff_alpha` and its reason, each equal to labeler_agreement's for that project. One
    query for all the projects, which reads the choice counts of each pair with two or more human labels; the
    projects overview would otherwise fetch every label of every project, one project after the other."""
    ids = [project.pk for project in projects]
    rows = (
        Comparison.objects.filter(project_id__in=ids, source=Comparison.Source.LABEL)
        .values_list("project_id", "pair_id")
        .annotate(n=Count("id"), **{f"n_{choice}": Count("id", filter=Q(choice=choice)) for choice in CHOICES})
        .filter(n__gte=2)
        .order_by()
    )
    columns = np.array(list(rows), dtype=np.int64).reshape(-1, 3 + len(CHOICES))
    # In pair order within each project, the order labeler_agreement reads them in: the same rows in the same
    # order give the same alpha to the last bit.
    columns = columns[np.lexsort((columns[:, 1], columns[:, 0]))]
    bounds = np.searchsorted(columns[:, 0], ids, side="left"), np.searchsorted(columns[:, 0], ids, side="right")
    return {pk: _pair_agreement(columns[start:end, 3:])[1] for pk, start, end in zip(ids, *bounds, strict=True)}


def _agreement_daily(latest: np.ndarray, agreeing: np.ndarray, *, days: int,
                     now: datetime | None) -> list[dict[str, Any]]:
    """Per UTC day of the last `days`: the pairs whose latest label (`latest`, epoch seconds) came that day, and
    their mean percent agreement (None on a day without any)."""
    today = (now or timezone.now()).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    day = (latest - int(first.timestamp())) // 86400
    inside = (day >= 0) & (day < days)
    pairs = np.bincount(day[inside], minlength=days)
    sums = np.bincount(day[inside], weights=agreeing[inside], minlength=days)
    return [{"day": (first + timedelta(days=i)).date(), "pairs": int(pairs[i]),
             "percent_agreement": float(sums[i] / pairs[i]) if pairs[i] else None} for i in range(days)]


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
    comparisons, choices = _comparison_totals(project=project)
    return {
        "project": project.slug,
        "generated_at": now,
        "pairs": pair_counts(project=project),
        "comparisons": comparisons,
        "choices": choices,
        "labelers": labeler_activity(project=project),
        "throughput": {"hours": hours,
                       "buckets": comparison_throughput_hourly(project=project, hours=hours, now=now)},
        "agreement": labeler_agreement(project=project, now=now),
        "gold": gold_accuracy(project=project),
    }

"""HTTP API of a project's labeling statistics, for its managers and admins."""
from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling import selectors, stats
from labeling.apis import ERRORS


def _rate(help_text: str) -> serializers.FloatField:
    return serializers.FloatField(allow_null=True, help_text=f"{help_text} From 0 to 1; null when undefined.")


class LabelerRef(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()


class PairCountsOutput(serializers.Serializer):
    total = serializers.IntegerField()
    gold = serializers.IntegerField()
    labelable = serializers.IntegerField(help_text="Pairs that are not gold.")
    complete = serializers.IntegerField(help_text="Labelable pairs with all the labels they need.")
    in_progress = serializers.IntegerField(help_text="Labelable pairs with some labels but not all.")
    unlabeled = serializers.IntegerField(help_text="Labelable pairs with no label yet.")


class ComparisonCountsOutput(serializers.Serializer):
    total = serializers.IntegerField()
    human = serializers.IntegerField()
    imported = serializers.IntegerField()


class ChoicesOutput(serializers.Serializer):
    a = serializers.IntegerField()
    b = serializers.IntegerField()
    tie = serializers.IntegerField()
    both_bad = serializers.IntegerField()


# Each measure below comes with the count it was taken over; the dashboard flags a labeler on a measure only when
# that count reaches the minimum of labeling.selectors.labeler_outlier_reasons, and the schema says which.


class LabelerActivityOutput(serializers.Serializer):
    labeler = LabelerRef()
    comparisons = serializers.IntegerField(help_text="Human comparisons; 0 for a labeler who has not labeled yet.")
    median_seconds = serializers.FloatField(allow_null=True,
                                            help_text="Of the comparisons that carry a time; null when none does.")
    timed = serializers.IntegerField(
        help_text="Comparisons that carry a time: the count behind median_seconds (those sent without one are left "
                  f"out). The dashboard flags a median under {selectors.OUTLIER_MEDIAN_SECONDS_MIN} s only over at "
                  f"least {selectors.OUTLIER_MEDIAN_MIN_TIMED} of them.")
    side_picks = serializers.IntegerField(
        help_text="Comparisons that picked A or B: the count behind left_share. The dashboard flags a left_share "
                  f"outside {selectors.OUTLIER_LEFT_SHARE_BAND[0]}-{selectors.OUTLIER_LEFT_SHARE_BAND[1]} only over "
                  f"at least {selectors.OUTLIER_MIN_LABELS} of them, and only when a two-sided binomial test against "
                  f"a fair coin gives p < {selectors.OUTLIER_LEFT_SHARE_P}.")
    left_share = _rate("Share of left-side picks, as shown, among the picks of one side (0.5 is no position bias).")
    tie_rate = _rate("Share of ties.")
    both_bad_rate = _rate("Share of 'both bad'.")


class ThroughputBucketOutput(serializers.Serializer):
    hour = serializers.DateTimeField(help_text="Start of the UTC hour.")
    comparisons = serializers.IntegerField()


class ThroughputOutput(serializers.Serializer):
    hours = serializers.IntegerField()
    buckets = ThroughputBucketOutput(many=True)


class AgreementSummaryOutput(serializers.Serializer):
    pairs = serializers.IntegerField()
    percent_agreement = _rate("Share of agreeing label pairs, averaged over pairs.")
    unanimous_share = _rate("Share of pairs where every label is the same.")


class PairwiseKappaOutput(serializers.Serializer):
    labeler_a = LabelerRef()
    labeler_b = LabelerRef()
    pairs = serializers.IntegerField(help_text="Pairs both labeled.")
    kappa = serializers.FloatField(allow_null=True, help_text="Cohen's kappa; null when undefined.")
    kappa_reason = serializers.CharField(allow_null=True, help_text="Why kappa is null; null when it is set.")


class LabelerAgreementOutput(serializers.Serializer):
    labeler = LabelerRef()
    pairs = serializers.IntegerField(
        help_text="Pairs the labeler shares with other labelers (pairs they labeled that have two or more human "
                  f"labels): the count behind agreement. The dashboard flags an agreement below "
                  f"{selectors.OUTLIER_AGREEMENT_MIN} only over at least {selectors.OUTLIER_AGREEMENT_MIN_PAIRS} of "
                  "them.")
    agreement = _rate("Share of the other labels on their pairs that match theirs.")


class AgreementDayOutput(serializers.Serializer):
    day = serializers.DateField(help_text="The UTC day.")
    pairs = serializers.IntegerField(help_text="Pairs with two or more human labels whose latest label came that day.")
    percent_agreement = _rate("Their mean share of agreeing label pairs; null on a day without any.")


class AgreementOutput(serializers.Serializer):
    labels = serializers.IntegerField(help_text="Human labels on pairs with two or more human labels.")
    labelers = serializers.IntegerField()
    with_ties = AgreementSummaryOutput(help_text="Every pair with two or more human labels.")
    without_ties = AgreementSummaryOutput(help_text="Only the pairs where every label is A or B.")
    krippendorff_alpha = serializers.FloatField(allow_null=True, help_text="Nominal, over all four choices.")
    krippendorff_alpha_reason = serializers.CharField(allow_null=True,
                                                      help_text="Why krippendorff_alpha is null; null when it is set.")
    cohen_kappa = serializers.FloatField(allow_null=True,
                                         help_text="Set when exactly two labelers share pairs; see pairwise_kappa.")
    cohen_kappa_reason = serializers.CharField(allow_null=True,
                                               help_text="Why cohen_kappa is null; null when it is set.")
    pairwise_kappa = PairwiseKappaOutput(many=True)
    per_labeler = LabelerAgreementOutput(many=True, help_text="The labelers who share pairs with others.")
    daily = AgreementDayOutput(many=True, help_text="Agreement over time: the last 14 UTC days, the current one last.")


class GoldLabelerOutput(serializers.Serializer):
    labeler = LabelerRef()
    comparisons = serializers.IntegerField(
        help_text="Answers on gold pairs: the count behind accuracy. The dashboard flags an accuracy below "
                  f"{selectors.OUTLIER_GOLD_ACCURACY_MIN} only over at least {selectors.OUTLIER_GOLD_MIN_ANSWERS} of "
                  "them.")
    correct = serializers.IntegerField()
    accuracy = _rate("Share of comparisons equal to the gold choice.")


class GoldOutput(serializers.Serializer):
    comparisons = serializers.IntegerField()
    correct = serializers.IntegerField()
    accuracy = _rate("Share of comparisons equal to the gold choice.")
    labelers = GoldLabelerOutput(many=True, help_text="The labelers who answered gold pairs.")


class ProjectStatsOutput(serializers.Serializer):
    project = serializers.SlugField()
    generated_at = serializers.DateTimeField()
    pairs = PairCountsOutput()
    comparisons = ComparisonCountsOutput()
    choices = ChoicesOutput(help_text="Human and imported comparisons, in the pair's A/B frame.")
    labelers = LabelerActivityOutput(
        many=True, help_text="Everyone with human comparisons, and the members with the labeler role who have none "
                             "yet (zero counts, null rates), by username.")
    throughput = ThroughputOutput(help_text="Human comparisons per hour.")
    agreement = AgreementOutput()
    gold = GoldOutput()


class ProjectStatsApi(APIView):
    class InputSerializer(serializers.Serializer):
        hours = serializers.IntegerField(min_value=1, max_value=stats.THROUGHPUT_MAX_HOURS,
                                         default=stats.THROUGHPUT_DEFAULT_HOURS,
                                         help_text="Window of the hourly throughput, ending with the current hour.")

    # Named at module level: a nested class would appear in the schema as a second, clashing "Output".
    OutputSerializer = ProjectStatsOutput

    @extend_schema(parameters=[InputSerializer], responses={200: OutputSerializer, **ERRORS})
    def get(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = stats.project_stats(project=project, hours=params.validated_data["hours"])
        return Response(self.OutputSerializer(data).data)

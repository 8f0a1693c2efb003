"""HTTP API of training runs and the model registry (reward models, policies): one view per operation."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling.apis import ErrorSerializer
from labeling.selectors import project_get_for_user
from labeling.serializing import QueryParamsSerializer, StrictInputSerializer
from rewards import selectors, services
from rewards.models import Policy, RewardModel, TrainingRun

ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 409, 503)}

# The most runs one page of /training-runs/ holds: each carries its metrics history and log tail.
RUNS_MAX_LIMIT = 200
# PostgreSQL's OFFSET is a bigint; past it the query fails instead of finding nothing.
OFFSET_MAX = 2**63 - 1


class RunsPagination(LimitOffsetPagination):
    max_limit = RUNS_MAX_LIMIT


class TrainingRunProducedOutput(serializers.Serializer):
    type = serializers.ChoiceField(choices=["reward_model", "policy"],
                                   help_text="reward_model: listed under /reward-models/; policy: under /policies/.")
    id = serializers.IntegerField()
    version = serializers.IntegerField()


class TrainingRunOutput(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    progress = serializers.SerializerMethodField()
    dataset = serializers.SerializerMethodField()
    reward_model = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True,
        help_text="The reward model an RLHF run trains against or a DPO run is judged by; see `produced` for "
                  "what the run made.")
    produced = serializers.SerializerMethodField(
        help_text="The registry entry the run made when it succeeded (a reward model or a policy), else null.")

    class Meta:
        model = TrainingRun
        fields = ["id", "project", "kind", "base_model", "hyperparameters", "status", "progress", "dataset",
                  "metrics_history", "eval_metrics", "log_tail", "error", "artifact_path", "reward_model",
                  "produced", "cancel_requested", "worker_hostname", "attempts", "created_by", "created_at",
                  "started_at", "finished_at", "heartbeat_at"]

    @extend_schema_field(TrainingRunProducedOutput(allow_null=True))
    def get_produced(self, run: TrainingRun) -> dict | None:
        return selectors.training_run_produced(run=run)

    def get_progress(self, run: TrainingRun) -> dict:
        return {"step": run.step, "total_steps": run.total_steps, "epoch": run.epoch, "eta_seconds": run.eta_seconds}

    def get_dataset(self, run: TrainingRun) -> dict:
        return {"export_policy": run.export_policy, "content_hash": run.dataset_hash, "pairs": run.pair_count,
                "comparisons": _comparison_count(run), "train_pairs": run.train_count, "eval_pairs": run.eval_count,
                "eval_fraction": run.eval_fraction, "split_seed": run.split_seed}


def _comparison_count(run: TrainingRun) -> int:
    # Counted by the query when the run came from the selectors, which leave its id lists unread.
    count = getattr(run, "comparison_count", None)
    return len(run.comparison_ids) if count is None else count


class RewardModelOutput(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    training_run = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = RewardModel
        fields = ["id", "project", "version", "training_run", "artifact_path", "base_model", "metrics", "lineage",
                  "is_deployed", "deployed_at", "created_at"]


class PolicyOutput(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    training_run = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = Policy
        fields = ["id", "project", "kind", "version", "training_run", "artifact_path", "base_model", "metrics",
                  "lineage", "is_deployed", "deployed_at", "created_at"]


class TrainingRunStartApi(APIView):
    class InputSerializer(StrictInputSerializer):
        project = serializers.SlugField()
        kind = serializers.ChoiceField(choices=TrainingRun.Kind.choices)
        base_model = serializers.CharField(required=False, allow_blank=True, default="", max_length=500,
                                           help_text="Path or id; blank for the embedded default.")
        hyperparameters = serializers.DictField(required=False, default=dict,
                                                help_text="TRL config fields, e.g. num_train_epochs.")
        eval_fraction = serializers.FloatField(required=False, default=0.1, min_value=0.0, max_value=0.9)
        seed = serializers.IntegerField(required=False, default=0, min_value=0, max_value=2**31 - 1)

    @extend_schema(
        request=InputSerializer,
        parameters=[OpenApiParameter(
            "Idempotency-Key", str, OpenApiParameter.HEADER, required=False,
            description="Any unique string (a UUID). The same submission sent again with the same key (a retry after "
                        "a timeout) returns the run the first one started, with 200, instead of queuing another; "
                        "the same key with other settings is a 409.")],
        responses={202: TrainingRunOutput, 200: TrainingRunOutput, **ERRORS})
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        project = project_get_for_user(slug=values.pop("project"), user=request.user, manage=True)
        key = request.headers.get("Idempotency-Key")
        if key is None:
            run = services.training_run_start(project=project, created_by=request.user, restrict_to_import_dirs=True,
                                              **values)
            return Response(TrainingRunOutput(run).data, status=status.HTTP_202_ACCEPTED)
        run, created = services.training_run_start_once(project=project, created_by=request.user,
                                                        restrict_to_import_dirs=True,
                                                        idempotency_key=key, **values)
        return Response(TrainingRunOutput(run).data,
                        status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
                        headers=None if created else {"Idempotent-Replayed": "true"})


class TrainingRunListApi(APIView):
    # Named on the view so that the schema documents the page envelope and its limit/offset parameters.
    pagination_class = RunsPagination

    # Not "InputSerializer": TrainingRunCollectionApi inherits this view and the start view's InputSerializer.
    class FilterSerializer(QueryParamsSerializer):
        project = serializers.SlugField(required=False)
        status = serializers.ChoiceField(choices=TrainingRun.Status.choices, required=False)
        kind = serializers.ChoiceField(choices=TrainingRun.Kind.choices, required=False)
        # Read by the paginator; checked here, since it quietly falls back to its defaults on a bad value.
        limit = serializers.IntegerField(required=False, min_value=1, max_value=RUNS_MAX_LIMIT,
                                         help_text=f"Runs per page, 1 to {RUNS_MAX_LIMIT} (50 by default).")
        offset = serializers.IntegerField(required=False, min_value=0, max_value=OFFSET_MAX,
                                          help_text="How many runs to skip, newest first.")

    @extend_schema(parameters=[FilterSerializer], responses={200: TrainingRunOutput(many=True), **ERRORS})
    def get(self, request):
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        runs = selectors.training_run_list_for_user(user=request.user,
                                                    project_slug=filters.validated_data.get("project"),
                                                    status=filters.validated_data.get("status"),
                                                    kind=filters.validated_data.get("kind"))
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(TrainingRunOutput(page, many=True).data)


class TrainingRunDetailApi(APIView):
    @extend_schema(responses={200: TrainingRunOutput, **ERRORS})
    def get(self, request, run_id: int):
        run = selectors.training_run_get_for_user(run_id=run_id, user=request.user, manage=True)
        return Response(TrainingRunOutput(run).data)


class TrainingRunCancelApi(APIView):
    @extend_schema(request=None, responses={200: TrainingRunOutput, **ERRORS})
    def post(self, request, run_id: int):
        run = selectors.training_run_get_for_user(run_id=run_id, user=request.user, manage=True)
        run = services.training_run_cancel(run=run)
        return Response(TrainingRunOutput(run).data)


class ProjectQuerySerializer(QueryParamsSerializer):
    """`?project=<slug>`: the registry lists are per project."""

    project = serializers.SlugField()


class RewardModelListApi(APIView):
    InputSerializer = ProjectQuerySerializer

    @extend_schema(parameters=[InputSerializer], responses={200: RewardModelOutput(many=True), **ERRORS})
    def get(self, request):
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        project = project_get_for_user(slug=params.validated_data["project"], user=request.user, manage=True)
        return Response(RewardModelOutput(selectors.reward_model_list(project=project), many=True).data)


class PolicyListApi(APIView):
    """The project's policy versions (registered by DPO and RLHF runs), newest first: their ids are what
    /generate/ takes as `policy`."""

    InputSerializer = ProjectQuerySerializer

    @extend_schema(parameters=[InputSerializer], responses={200: PolicyOutput(many=True), **ERRORS})
    def get(self, request):
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        project = project_get_for_user(slug=params.validated_data["project"], user=request.user, manage=True)
        return Response(PolicyOutput(selectors.policy_list(project=project), many=True).data)


class RewardModelDeployApi(APIView):
    @extend_schema(request=None, responses={200: RewardModelOutput, **ERRORS})
    def post(self, request, reward_model_id: int):
        model = selectors.reward_model_get_for_user(reward_model_id=reward_model_id, user=request.user, manage=True)
        model = services.reward_model_deploy(reward_model=model, deployed_by=request.user)
        return Response(RewardModelOutput(model).data)


class RewardModelRegisterApi(APIView):
    class InputSerializer(StrictInputSerializer):
        project = serializers.SlugField()
        path = serializers.CharField(max_length=1000,
                                     help_text="A folder on the server under PREFLAB_MODEL_IMPORT_DIRS.")
        deploy = serializers.BooleanField(required=False, default=False)

    @extend_schema(request=InputSerializer, responses={201: RewardModelOutput, **ERRORS})
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = project_get_for_user(slug=data.validated_data["project"], user=request.user, manage=True)
        model = services.reward_model_register(project=project, path=data.validated_data["path"],
                                               created_by=request.user, restrict_to_import_dirs=True,
                                               deploy=data.validated_data["deploy"])
        return Response(RewardModelOutput(model).data, status=status.HTTP_201_CREATED)


class TrainingRunCollectionApi(TrainingRunListApi, TrainingRunStartApi):
    """`/training-runs/` answers both GET (list) and POST (start); each operation keeps its own view above."""

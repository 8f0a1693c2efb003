"""HTTP API of best-of-N reranking and of the project's rerank keys: one view per operation."""
from __future__ import annotations

import logging
import time

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from labeling import services as labeling_services
from labeling.apis import ErrorSerializer
from labeling.errors import Forbidden
from labeling.models import ApiToken, Project
from labeling.permissions import ScopedTokenPermission, request_token
from labeling.selectors import api_key_get, api_key_list, project_get_for_user
from labeling.serializing import StrictInputSerializer
from rewards.scoring import rerank
from rewards.services import rerank_usage_record

logger = logging.getLogger(__name__)

ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 409, 429, 503)}


class RerankThrottle(SimpleRateThrottle):
    """Requests per API key (per user for sessions), at PREFLAB["RERANK_RATE"] read on each request.

    A sliding-window counter instead of DRF's log of timestamps: the count of the current fixed window plus the
    previous window's count weighted by how much of it still overlaps the last `duration` seconds. On Redis that
    is one round trip (INCR, EXPIRE and GET in a pipeline) whatever the rate; DRF's log is read and written back
    whole on every request, so at a rate of thousands a minute each request pickled thousands of timestamps.
    Refused requests count too, so a client that keeps sending over its rate stays refused."""

    scope = "rerank"

    def get_rate(self) -> str | None:
        return settings.PREFLAB.get("RERANK_RATE", "600/min")

    def allow_request(self, request, view) -> bool:
        # The rate may change between requests (settings overrides); parse it each time.
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        self.now = self.timer()
        try:
            current, previous = self._count(self.key, self.now)
        except Exception:  # the throttle lives in the cache; an outage must not stop reranking
            logger.warning("rerank throttle cache unavailable; request let through", exc_info=True)
            return True
        elapsed = (self.now % self.duration) / self.duration
        return previous * (1.0 - elapsed) + current <= self.num_requests

    def _count(self, key: str, now: float) -> tuple[int, int]:
        """Count this request in its window; returns (this window's count, the previous window's)."""
        window = int(now // self.duration)
        current_key, previous_key = f"{key}:{window}", f"{key}:{window - 1}"
        redis_client = getattr(self.cache, "redis_client", None)
        if redis_client is not None:  # Redis (config.cache.RedisCache): one round trip
            redis = redis_client()
            current_key, previous_key = self.cache.make_key(current_key), self.cache.make_key(previous_key)
            pipe = redis.pipeline(transaction=False)
            pipe.incr(current_key)
            pipe.expire(current_key, 2 * self.duration)
            pipe.get(previous_key)
            current, _, previous = pipe.execute()
            return int(current), int(previous or 0)
        # Another cache backend (the file cache without Redis): the same counts, shared by the processes but not atomic.
        counts = self.cache.get_many([current_key, previous_key])
        current = counts.get(current_key, 0) + 1
        self.cache.set(current_key, current, 2 * self.duration)
        return current, counts.get(previous_key, 0)

    def wait(self) -> float | None:
        """Until the current window ends: by then at most the refused window's weight remains."""
        return self.duration - (self.now % self.duration)

    def get_cache_key(self, request, view) -> str | None:
        token = request_token(request)
        ident = f"key-{token.pk}" if token is not None else f"user-{request.user.pk}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


def _project_for_rerank(*, slug: str, request) -> Project:
    """A rerank key reaches only its own project (another project's key: 403); users need to be members."""
    token = request_token(request)
    if token is not None and token.scope == ApiToken.Scope.RERANK:
        if token.project.slug != slug:
            raise Forbidden("This API key is for another project.", field="project")
        return token.project
    return project_get_for_user(slug=slug, user=request.user)


class _StrictCharField(serializers.CharField):
    """A JSON string and nothing else: DRF's CharField turns 3 into "3", which would rank a number as a reply."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class RerankApi(APIView):
    permission_classes = [IsAuthenticated, ScopedTokenPermission]
    token_scopes = (ApiToken.Scope.RERANK,)
    throttle_classes = [RerankThrottle]

    class InputSerializer(StrictInputSerializer):
        project = serializers.SlugField()
        prompt = serializers.JSONField(help_text="A string, or a list of chat messages with 'role' and 'content'.")
        candidates = serializers.ListField(child=_StrictCharField(allow_blank=True, trim_whitespace=False),
                                           help_text="The responses to rank (1 to RERANK_MAX_CANDIDATES).")
        model = serializers.JSONField(required=False, default="deployed",
                                      help_text='"deployed", or the id of a reward model version of the project.')
        top_k = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1,
                                         help_text="Return only the k best results (the beginning of the whole "
                                                   "ranking, which is what is cached).")
        constraints = serializers.JSONField(required=False, allow_null=True, default=None,
                                            help_text="max_chars, min_chars, regex, json, json_schema.")

    class OutputSerializer(serializers.Serializer):
        class ModelOutput(serializers.Serializer):
            id = serializers.IntegerField()
            version = serializers.IntegerField()
            base_model = serializers.CharField()

        class ResultOutput(serializers.Serializer):
            index = serializers.IntegerField()
            score = serializers.FloatField()
            rank = serializers.IntegerField()
            passed = serializers.BooleanField()
            reasons = serializers.ListField(child=serializers.CharField())

        model = ModelOutput()
        results = ResultOutput(
            many=True,
            help_text="Best first: candidates that pass the constraints by score, then failing ones by score; equal "
                      "scores (5 decimals) in request order, the lower index first. The same request gives the same "
                      "results, cached or not and with its candidates in another order or repeated; a request "
                      "scored beside other traffic (the server's default batching) can differ from one scored alone "
                      "in its last rounded digit, rarely.")
        best_index = serializers.IntegerField()
        cached = serializers.BooleanField(help_text="Answered from the cache; the body is the same either way.")
        timing_ms = serializers.FloatField()

    # Set once the request names a project it may rerank in; a refusal before that counts against the key's own.
    project: Project | None = None

    def initial(self, request, *args, **kwargs):
        self.started = time.perf_counter()
        super().initial(request, *args, **kwargs)

    def handle_exception(self, exc):
        """Every refusal (input, project, model, the rate limit) and failure counts on the dashboard, by the status
        that labeling.errors.exception_handler answered with: a 4xx as rejected (the caller's doing), anything
        else as an error of the service."""
        try:
            response = super().handle_exception(exc)
        except Exception:
            self._record_failure(rejected=False)
            raise
        self._record_failure(rejected=400 <= response.status_code < 500)
        return response

    def _record_failure(self, *, rejected: bool) -> None:
        token = request_token(self.request)
        project = self.project or (token.project if token is not None and token.scope != ApiToken.Scope.USER
                                   else None)
        if project is not None:
            latency_ms = (time.perf_counter() - getattr(self, "started", time.perf_counter())) * 1000.0
            rerank_usage_record(project=project, latency_ms=latency_ms, error=not rejected, rejected=rejected)

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, **ERRORS})
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        self.project = _project_for_rerank(slug=fields["project"], request=request)
        body = rerank(project=self.project, prompt=fields["prompt"], candidates=fields["candidates"],
                      model=fields["model"], top_k=fields["top_k"], constraints=fields["constraints"])
        body["timing_ms"] = round((time.perf_counter() - self.started) * 1000.0, 3)
        rerank_usage_record(project=self.project, latency_ms=body["timing_ms"], cached=body["cached"])
        return Response(body)


# --- rerank keys ----------------------------------------------------------------------------------------


class ApiKeyOutput(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")

    class Meta:
        model = ApiToken
        fields = ["prefix", "name", "scope", "user", "created_at", "last_used_at", "revoked_at"]


class ApiKeyListCreateApi(APIView):
    class InputSerializer(StrictInputSerializer):
        name = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
        scope = serializers.ChoiceField(choices=[ApiToken.Scope.RERANK], default=ApiToken.Scope.RERANK)

    class CreatedOutput(ApiKeyOutput):
        key = serializers.SerializerMethodField(help_text="Shown once; send it as 'Authorization: Bearer KEY'.")

        class Meta(ApiKeyOutput.Meta):
            fields = ["key", *ApiKeyOutput.Meta.fields]

        def get_key(self, token: ApiToken) -> str:
            return self.context["key"]

    @extend_schema(responses={200: ApiKeyOutput(many=True), **ERRORS})
    def get(self, request, slug: str):
        project = project_get_for_user(slug=slug, user=request.user, manage=True)
        return Response(ApiKeyOutput(api_key_list(project=project), many=True).data)

    @extend_schema(request=InputSerializer, responses={201: CreatedOutput, **ERRORS})
    def post(self, request, slug: str):
        project = project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        token, key = labeling_services.api_token_create(user=request.user, project=project, **data.validated_data)
        return Response(self.CreatedOutput(token, context={"key": key}).data, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(APIView):
    @extend_schema(responses={200: ApiKeyOutput, **ERRORS})
    def delete(self, request, slug: str, prefix: str):
        project = project_get_for_user(slug=slug, user=request.user, manage=True)
        token = labeling_services.api_token_revoke(token=api_key_get(project=project, prefix=prefix))
        return Response(ApiKeyOutput(token).data)

"""HTTP API of generation: sample N candidates from a policy and rerank them with the deployed reward model."""
from __future__ import annotations

import time

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling.models import ApiToken
from labeling.permissions import ScopedTokenPermission
from labeling.serializing import StrictInputSerializer
from rewards.apis_rerank import ERRORS, RerankApi, RerankThrottle, _project_for_rerank
from rewards.generation import DEFAULT_POLICY, MAX_CANDIDATES, MAX_NEW_TOKENS, MIN_TEMPERATURE, generate


class GenerateApi(APIView):
    permission_classes = [IsAuthenticated, ScopedTokenPermission]
    token_scopes = (ApiToken.Scope.RERANK,)
    throttle_classes = [RerankThrottle]

    class InputSerializer(StrictInputSerializer):
        project = serializers.SlugField()
        prompt = serializers.JSONField(help_text="A string, or a list of chat messages with 'role' and 'content'.")
        n = serializers.IntegerField(required=False, default=4, min_value=1, max_value=MAX_CANDIDATES)
        temperature = serializers.FloatField(required=False, default=0.7, min_value=0.0,
                                             help_text=f"0 decodes greedily; otherwise at least {MIN_TEMPERATURE}.")
        top_k = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=0,
                                         help_text="Sample from the k likeliest tokens; unset: 50; 0: every token.")
        top_p = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0.0, max_value=1.0,
                                       help_text="Nucleus sampling; unset: 1 (every token).")
        max_new_tokens = serializers.IntegerField(required=False, default=128, min_value=1, max_value=MAX_NEW_TOKENS)
        seed = serializers.IntegerField(
            required=False, allow_null=True, default=None, min_value=0, max_value=2**63 - 1,
            help_text="The seed of sampling. Without one, the seed is derived from the request (prompt, policy and "
                      "every sampling setting), so the same request gives the same candidates; send seeds of your "
                      "own for other samples. Equivalent requests derive one seed: a prompt string and the one user "
                      "message it stands for (message keys other than role and content are ignored); top_k unset "
                      "and 50; top_k 0 and any top_k of at least the policy's vocabulary (every token); top_p unset, "
                      "1 and 1.0; temperature 1 and 1.0; stop unset, null and []; stop strings in any order or "
                      "repeated, and one that begins with another stop string left out. Greedy decoding "
                      "(temperature 0) ignores seed, top_k and top_p.")
        stop = serializers.ListField(child=serializers.CharField(trim_whitespace=False), required=False,
                                     allow_null=True, default=None, max_length=8,
                                     help_text="Each candidate is cut before the first of these strings to "
                                               "occur in it.")
        policy = serializers.JSONField(required=False, default=DEFAULT_POLICY,
                                       help_text='"default" (embedded SmolLM2), or the id of a policy version.')
        rerank = serializers.BooleanField(required=False, default=True)

    class OutputSerializer(serializers.Serializer):
        class PolicyOutput(serializers.Serializer):
            id = serializers.IntegerField(allow_null=True)
            version = serializers.IntegerField(allow_null=True)
            kind = serializers.CharField()
            base_model = serializers.CharField()

        class CandidateOutput(serializers.Serializer):
            index = serializers.IntegerField()
            text = serializers.CharField()
            score = serializers.FloatField(required=False)
            rank = serializers.IntegerField(required=False)

        policy = PolicyOutput()
        reward_model = RerankApi.OutputSerializer.ModelOutput(required=False)
        candidates = CandidateOutput(many=True)
        best_index = serializers.IntegerField(required=False, allow_null=True)
        timing_ms = serializers.FloatField()
        tokens_generated = serializers.IntegerField()
        seed = serializers.IntegerField(allow_null=True,
                                        help_text="The seed sampled with (the request's or the derived one); null "
                                                  "when decoding was greedy (temperature 0).")

    @extend_schema(request=InputSerializer, responses={200: OutputSerializer, **ERRORS})
    def post(self, request):
        started = time.perf_counter()
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        project = _project_for_rerank(slug=fields.pop("project"), request=request)
        body = generate(project=project, **fields)
        body["timing_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        return Response(body)

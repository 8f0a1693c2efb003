"""HTTP API of the labeling core: one view per operation; each validates, calls one service, serializes."""
from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling import selectors, services
from labeling.errors import DomainError, Forbidden
from labeling.models import ID_MAX, Comparison, Lease, Membership, Pair, Project
from labeling.serializing import FieldsOnce, StrictInputSerializer


class ErrorSerializer(serializers.Serializer):
    class Inner(serializers.Serializer):
        code = serializers.CharField()
        message = serializers.CharField()
        field = serializers.CharField(allow_null=True)
        fields = serializers.JSONField(required=False)

    error = Inner()


ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 409)}


def _path_name(name: str, *, reserved: str, pattern: str, description: str) -> OpenApiParameter:
    """A path parameter that can never be `reserved`: that value routes to the sibling URL of the same name."""
    return OpenApiParameter(name, {"type": "string", "pattern": pattern, "not": {"enum": [reserved]}},
                            OpenApiParameter.PATH, description=description)


# /projects/create/ and /projects/{slug}/members/set/ are operations of their own, so neither name reaches the
# operations on a project or a member; project_create refuses the slug "create".
PROJECT_SLUG = _path_name("slug", reserved="create", pattern=r"^[-a-zA-Z0-9_]+$", description="The project's slug.")
MEMBER_USERNAME = _path_name("username", reserved="set", pattern=r"^[^/]+$",
                             description="The member's username (a member named 'set' is removed in the admin).")
# What the reserved name gets instead: the sibling operation does not take this method.
RESERVED_NAME = {405: OpenApiResponse(ErrorSerializer, description="The path names the sibling operation.")}


def id_field(**kwargs: Any) -> serializers.IntegerField:
    """An input naming a row by id: bounded like the database's ids (the schema shows the bounds)."""
    return serializers.IntegerField(min_value=1, max_value=ID_MAX, **kwargs)


def _prompt_field() -> serializers.JSONField:
    return serializers.JSONField(help_text="A string, or a list of chat messages with 'role' and 'content'.")


class ProjectOutput(FieldsOnce, serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "name", "slug", "guidelines", "labels_per_pair", "allow_tie", "allow_both_bad",
                  "strength_scale", "gold_rate", "created_at"]


class PairOutput(serializers.ModelSerializer):
    prompt = serializers.JSONField(source="prompt.content")
    response_a = serializers.CharField(source="response_a.text")
    response_b = serializers.CharField(source="response_b.text")

    class Meta:
        model = Pair
        fields = ["id", "prompt", "response_a", "response_b", "priority", "gold_choice", "label_count", "status",
                  "created_at"]


class ComparisonOutput(FieldsOnce, serializers.ModelSerializer):
    labeler = serializers.CharField(source="labeler.username", allow_null=True, default=None)
    shown_choice = serializers.SerializerMethodField(help_text="The choice in the frame the labeler saw.")

    class Meta:
        model = Comparison
        fields = ["id", "pair", "labeler", "source", "choice", "shown_choice", "strength", "margin", "rationale",
                  "flags", "swapped", "time_ms", "created_at"]

    def get_shown_choice(self, obj: Comparison) -> str:
        return services.choice_to_frame(obj.choice, swapped=obj.swapped)


class AuthTokenCreateApi(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list = []

    class InputSerializer(StrictInputSerializer):
        username = serializers.CharField()
        password = serializers.CharField(style={"input_type": "password"})
        name = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField(help_text="Shown once; send it as 'Authorization: Bearer TOKEN'.")
        prefix = serializers.CharField()

    # 429: too many wrong passwords for this username (config.middleware.LoginThrottleMiddleware).
    @extend_schema(request=InputSerializer, responses={201: OutputSerializer, **ERRORS, 429: ErrorSerializer},
                   auth=[])
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = authenticate(request, username=data.validated_data["username"],
                            password=data.validated_data["password"])
        if user is None:
            raise DomainError("Wrong username or password.", field="password", code="authentication_failed",
                              status_code=status.HTTP_401_UNAUTHORIZED)
        token, key = services.api_token_create(user=user, name=data.validated_data["name"])
        return Response({"token": key, "prefix": token.prefix}, status=status.HTTP_201_CREATED)


class ProjectListApi(APIView):
    @extend_schema(responses={200: ProjectOutput(many=True), **ERRORS})
    def get(self, request):
        projects = selectors.project_list_for_user(user=request.user)
        return Response(ProjectOutput(projects, many=True).data)


class ProjectCreateApi(APIView):
    class InputSerializer(StrictInputSerializer):
        name = serializers.CharField(max_length=200)
        slug = serializers.SlugField(max_length=100)
        guidelines = serializers.CharField(required=False, allow_blank=True, default="")
        labels_per_pair = serializers.IntegerField(min_value=1, max_value=50, default=1)
        allow_tie = serializers.BooleanField(default=True)
        allow_both_bad = serializers.BooleanField(default=True)
        strength_scale = serializers.ChoiceField(choices=Project.StrengthScale.choices,
                                                 default=Project.StrengthScale.NONE)
        gold_rate = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.0)

    @extend_schema(request=InputSerializer, responses={201: ProjectOutput, **ERRORS})
    def post(self, request):
        if not request.user.is_staff:
            raise Forbidden("Only admins create projects.")
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = services.project_create(created_by=request.user, **data.validated_data)
        return Response(ProjectOutput(project).data, status=status.HTTP_201_CREATED)


class ProjectDetailApi(APIView):
    class UpdateSerializer(StrictInputSerializer):
        name = serializers.CharField(max_length=200, required=False)
        guidelines = serializers.CharField(required=False, allow_blank=True)
        labels_per_pair = serializers.IntegerField(min_value=1, max_value=50, required=False)
        allow_tie = serializers.BooleanField(required=False)
        allow_both_bad = serializers.BooleanField(required=False)
        strength_scale = serializers.ChoiceField(choices=Project.StrengthScale.choices, required=False)
        gold_rate = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)

    @extend_schema(parameters=[PROJECT_SLUG], responses={200: ProjectOutput, **ERRORS, **RESERVED_NAME})
    def get(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user)
        return Response(ProjectOutput(project).data)

    @extend_schema(parameters=[PROJECT_SLUG], request=UpdateSerializer,
                   responses={200: ProjectOutput, **ERRORS, **RESERVED_NAME})
    def patch(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.UpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = services.project_update(project=project, **data.validated_data)
        return Response(ProjectOutput(project).data)


class MembershipOutput(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")

    class Meta:
        model = Membership
        fields = ["username", "role", "created_at"]


class MembershipListApi(APIView):
    @extend_schema(responses={200: MembershipOutput(many=True), **ERRORS})
    def get(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        members = project.memberships.select_related("user").order_by("user__username")
        return Response(MembershipOutput(members, many=True).data)


class MembershipSetApi(APIView):
    class InputSerializer(StrictInputSerializer):
        username = serializers.CharField()
        role = serializers.ChoiceField(choices=Membership.Role.choices)

    @extend_schema(request=InputSerializer, responses={200: MembershipOutput, **ERRORS})
    def post(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = selectors.user_get_by_username(username=data.validated_data["username"])
        membership = services.membership_set(project=project, user=user, role=data.validated_data["role"])
        return Response(MembershipOutput(membership).data)


class MembershipDeleteApi(APIView):
    @extend_schema(parameters=[MEMBER_USERNAME], responses={204: None, **ERRORS, **RESERVED_NAME})
    def delete(self, request, slug: str, username: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        user = selectors.user_get_by_username(username=username)
        services.membership_remove(project=project, user=user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class PairCreateApi(APIView):
    class InputSerializer(StrictInputSerializer):
        prompt = _prompt_field()
        response_a = serializers.CharField(trim_whitespace=False)
        response_b = serializers.CharField(trim_whitespace=False)
        model_a = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
        model_b = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
        priority = serializers.IntegerField(default=0, min_value=-(2**31), max_value=2**31 - 1)
        gold_choice = serializers.ChoiceField(choices=Comparison.Choice.choices, required=False, allow_null=True,
                                              default=None)

    @extend_schema(request=InputSerializer, responses={201: PairOutput, **ERRORS})
    def post(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        pair = services.pair_create(project=project, **data.validated_data)
        return Response(PairOutput(pair).data, status=status.HTTP_201_CREATED)


class AssignmentOutput(FieldsOnce, serializers.Serializer):
    """A leased pair as the labeler sees it: `left` and `right` already in the randomized order."""

    pair = serializers.IntegerField(source="pair.id")
    prompt = serializers.JSONField(source="pair.prompt.content")
    left = serializers.SerializerMethodField()
    right = serializers.SerializerMethodField()
    expires_at = serializers.DateTimeField()

    def get_left(self, lease: Lease) -> str:
        return (lease.pair.response_b if lease.swapped else lease.pair.response_a).text

    def get_right(self, lease: Lease) -> str:
        return (lease.pair.response_a if lease.swapped else lease.pair.response_b).text


class ComparisonSubmitOutput(ComparisonOutput):
    """The stored comparison; with `next` when the submit asked for it."""

    next = AssignmentOutput(required=False, allow_null=True,
                            help_text="Only when the request set `next`: the next pair leased to you, as "
                                      "`GET /projects/{slug}/next/` returns it, or null when nothing is left.")

    class Meta(ComparisonOutput.Meta):
        fields = [*ComparisonOutput.Meta.fields, "next"]


class PairNextApi(APIView):
    @extend_schema(responses={200: AssignmentOutput, 204: None, **ERRORS})
    def get(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user)
        lease = services.pair_next_for_labeler(project=project, labeler=request.user)
        if lease is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(AssignmentOutput(lease).data)


class LeaseReleaseApi(APIView):
    class InputSerializer(StrictInputSerializer):
        pair = id_field()

    @extend_schema(request=InputSerializer, responses={204: None, **ERRORS})
    def post(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.lease_release(project=project, labeler=request.user, pair_id=data.validated_data["pair"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class ComparisonSubmitApi(APIView):
    class InputSerializer(FieldsOnce, StrictInputSerializer):
        pair = id_field()
        choice = serializers.ChoiceField(choices=services.FRAME_CHOICES,
                                         help_text="What the labeler saw: left, right, tie or both_bad.")
        strength = serializers.IntegerField(min_value=1, max_value=3, required=False, allow_null=True, default=None)
        rationale = serializers.CharField(required=False, allow_blank=True, default="", max_length=10000)
        flags = serializers.ListField(child=serializers.ChoiceField(choices=Comparison.Flag.choices),
                                      required=False, default=list, max_length=10)
        time_ms = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False, allow_null=True,
                                           default=None)
        next = serializers.BooleanField(
            required=False, default=False,
            help_text="Also lease the next pair of the same project and return it as `next` (null when nothing is "
                      "left for you): one round trip per label instead of two.")

    @extend_schema(request=InputSerializer,
                   responses={201: ComparisonSubmitOutput, 200: ComparisonSubmitOutput, **ERRORS})
    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        then_next = values.pop("next")
        # The service refuses a pair outside the labeler's projects as unknown (a removed member's leases are void).
        if then_next:
            result, lease = services.comparison_submit_and_next(labeler=request.user, pair_id=values.pop("pair"),
                                                                **values)
        else:
            result = services.comparison_submit(labeler=request.user, pair_id=values.pop("pair"), **values)
        body = ComparisonOutput(result.comparison).data
        if then_next:
            body["next"] = AssignmentOutput(lease).data if lease is not None else None
        return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)


class TokenRevokeApi(APIView):
    @extend_schema(responses={204: None, **ERRORS})
    def delete(self, request, prefix: str):
        services.api_token_revoke(token=selectors.api_token_get_active(user=request.user, prefix=prefix))
        return Response(status=status.HTTP_204_NO_CONTENT)

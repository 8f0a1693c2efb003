"""HTTP API for moving preference data in and out of a project: JSONL upload and streamed JSONL download."""
from __future__ import annotations

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling import exports, imports, selectors
from labeling.apis import ERRORS
from labeling.errors import DomainError
from labeling.serializing import StrictInputSerializer


class _FormatIsNotARenderer(DefaultContentNegotiation):
    """Here `?format=` names the data format; DRF would otherwise read it as a renderer and answer 404."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class PreferencesImportApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    class InputSerializer(StrictInputSerializer):
        file = serializers.FileField(help_text="A JSONL file, one record per line.")
        format = serializers.ChoiceField(choices=imports.FORMATS)

        class Meta:
            ref_name = "PreferencesImportInput"

    class OutputSerializer(serializers.Serializer):
        class BadLineOutput(serializers.Serializer):
            line = serializers.IntegerField(help_text="1-based line number in the file.")
            reason = serializers.CharField()

        format = serializers.CharField()
        lines_read = serializers.IntegerField()
        pairs_created = serializers.IntegerField()
        comparisons_created = serializers.IntegerField()
        duplicates_skipped = serializers.IntegerField()
        bad_line_count = serializers.IntegerField()
        bad_lines = BadLineOutput(many=True, help_text="The first bad lines (at most 1000).")
        bad_lines_truncated = serializers.BooleanField()

        class Meta:
            ref_name = "ImportReport"

    @extend_schema(request={"multipart/form-data": InputSerializer},
                   responses={201: OutputSerializer, 200: OutputSerializer, **ERRORS})
    def post(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data["file"]
        limit = int(settings.PREFLAB["IMPORT_MAX_BYTES"])
        if upload.size > limit:
            raise DomainError(f"The file is {upload.size} bytes; the limit is {limit}.", field="file",
                              code="too_large", status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        upload.seek(0)
        report = imports.preferences_import(project=project, stream=upload.file,
                                            format=data.validated_data["format"])
        return Response(self.OutputSerializer(report.as_dict()).data,
                        status=status.HTTP_201_CREATED if report.pairs_created or report.comparisons_created
                        else status.HTTP_200_OK)


class PreferencesExportApi(APIView):
    renderer_classes = [JSONRenderer]
    content_negotiation_class = _FormatIsNotARenderer

    class InputSerializer(serializers.Serializer):
        format = serializers.ChoiceField(choices=exports.FORMATS, default="trl")

    @extend_schema(
        parameters=[OpenApiParameter("format", OpenApiTypes.STR, enum=list(exports.FORMATS),
                                     description="trl (default), hh or comparisons")],
        responses={(200, "application/jsonl"): OpenApiResponse(OpenApiTypes.STR, description="JSONL lines"),
                   **ERRORS},
    )
    def get(self, request, slug: str):
        project = selectors.project_get_for_user(slug=slug, user=request.user, manage=True)
        data = self.InputSerializer(data=request.query_params)
        data.is_valid(raise_exception=True)
        fmt = data.validated_data["format"]
        lines = exports.preferences_export(project=project, format=fmt)
        response = StreamingHttpResponse(exports.blocks(lines), content_type="application/jsonl; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{project.slug}-{fmt}.jsonl"'
        return response

"""OpenAPI schema details: unique component names for nested serializers, the errors every body may get, and the
token auth scheme."""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ComponentRegistry


class PreflabAutoSchema(AutoSchema):
    def get_operation(self, path: str, path_regex: str, path_prefix: str, method: str,
                      registry: ComponentRegistry) -> dict | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is not None and "requestBody" in operation:
            # Any operation that reads a body can refuse it before the view runs: a media type no parser
            # accepts (415) or a body over DATA_UPLOAD_MAX_MEMORY_SIZE (413), with the usual error body.
            from labeling.apis import ErrorSerializer

            error = {"content": {"application/json": {"schema": self.resolve_serializer(ErrorSerializer,
                                                                                        "response").ref}}}
            for code, description in (("413", "The request body is too large."),
                                      ("415", "The request body's media type is not accepted.")):
                operation["responses"].setdefault(code, {**error, "description": description})
        return operation

    def get_serializer_name(self, serializer, direction):
        # Views nest their own InputSerializer/OutputSerializer; name components after the owner
        # ("ComparisonSubmitApiInput") so that two views' nested serializers never collide.
        qualname = type(serializer).__qualname__
        if "." in qualname:
            return qualname.replace("Serializer", "").replace(".", "")
        return super().get_serializer_name(serializer, direction)


class ApiTokenAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "labeling.authentication.ApiTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token: 'Authorization: Bearer KEY'."}

"""OpenAPI schema details: unique component names for nested serializers, and the token auth scheme."""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema


class PreflabAutoSchema(AutoSchema):
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

"""Django admin of the labeling tables, for looking at raw data; rule-bound writes go through the services."""
from django.contrib import admin

from labeling.models import ApiToken, Comparison, Lease, Membership, Pair, Project, Prompt, Response


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "labels_per_pair", "gold_rate", "strength_scale", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["project", "user", "role", "created_at"]
    list_filter = ["role", "project"]
    search_fields = ["user__username", "project__slug"]


@admin.register(Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "__str__", "created_at"]
    list_filter = ["project"]
    readonly_fields = ["content_hash"]


@admin.register(Response)
class ResponseAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "model_name", "__str__", "created_at"]
    list_filter = ["project", "model_name"]
    search_fields = ["text", "model_name"]
    readonly_fields = ["content_hash"]


@admin.register(Pair)
class PairAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "status", "priority", "label_count", "gold_choice", "source", "created_at"]
    list_filter = ["status", "source", "project", ("gold_choice", admin.EmptyFieldListFilter)]
    raw_id_fields = ["prompt", "response_a", "response_b"]
    # The label count and status are kept by the services under the pair's row lock.
    readonly_fields = ["label_count", "status"]


@admin.register(Comparison)
class ComparisonAdmin(admin.ModelAdmin):
    list_display = ["id", "pair", "labeler", "source", "choice", "strength", "swapped", "time_ms", "created_at"]
    list_filter = ["source", "choice", "swapped", "project"]
    search_fields = ["labeler__username", "rationale"]
    raw_id_fields = ["pair"]
    readonly_fields = [field.name for field in Comparison._meta.fields]
    date_hierarchy = "created_at"


@admin.register(Lease)
class LeaseAdmin(admin.ModelAdmin):
    list_display = ["pair", "labeler", "swapped", "skipped", "expires_at"]
    list_filter = ["skipped", "pair__project"]
    raw_id_fields = ["pair"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "scope", "user", "project", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["scope", "project"]
    search_fields = ["prefix", "name", "user__username"]
    # Only the hash is stored; new keys are made with create_api_key or the API so the secret is shown once.
    readonly_fields = ["key_hash", "prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request) -> bool:
        return False

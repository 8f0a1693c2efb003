"""Django admin of training runs and the model registry (read-mostly: state changes go through services)."""
from django.contrib import admin

from rewards.models import Policy, RewardModel, RewardModelDeployment, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "kind", "status", "step", "total_steps", "created_by", "created_at",
                    "finished_at"]
    list_filter = ["status", "kind", "project"]
    search_fields = ["id", "project__slug", "error"]
    readonly_fields = [field.name for field in TrainingRun._meta.fields]


@admin.register(RewardModel)
class RewardModelAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "version", "is_deployed", "deployed_at", "training_run", "created_at"]
    list_filter = ["is_deployed", "project"]
    readonly_fields = ["project", "version", "training_run", "artifact_path", "base_model", "metrics", "lineage",
                       "is_deployed", "deployed_at", "created_at", "created_by"]


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "kind", "version", "is_deployed", "training_run", "created_at"]
    list_filter = ["kind", "is_deployed", "project"]
    readonly_fields = ["project", "kind", "version", "training_run", "artifact_path", "base_model", "metrics",
                       "lineage", "is_deployed", "deployed_at", "created_at", "created_by"]


@admin.register(RewardModelDeployment)
class RewardModelDeploymentAdmin(admin.ModelAdmin):
    list_display = ["project", "reward_model", "previous", "deployed_by", "deployed_at"]
    list_filter = ["project"]
    readonly_fields = ["project", "reward_model", "previous", "deployed_by", "deployed_at"]

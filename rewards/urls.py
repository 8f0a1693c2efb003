"""API routes of training runs, the model registry, reranking and rerank keys, mounted under /api/v1/."""
from django.urls import path

from rewards import apis, apis_generate, apis_rerank

app_name = "rewards_api"

urlpatterns = [
    path("training-runs/", apis.TrainingRunCollectionApi.as_view(), name="training-run-list"),
    path("training-runs/<int:run_id>/", apis.TrainingRunDetailApi.as_view(), name="training-run-detail"),
    path("training-runs/<int:run_id>/cancel/", apis.TrainingRunCancelApi.as_view(), name="training-run-cancel"),
    path("reward-models/", apis.RewardModelListApi.as_view(), name="reward-model-list"),
    path("reward-models/register/", apis.RewardModelRegisterApi.as_view(), name="reward-model-register"),
    path("reward-models/<int:reward_model_id>/deploy/", apis.RewardModelDeployApi.as_view(),
         name="reward-model-deploy"),
    path("policies/", apis.PolicyListApi.as_view(), name="policy-list"),
    path("rerank/", apis_rerank.RerankApi.as_view(), name="rerank"),
    path("generate/", apis_generate.GenerateApi.as_view(), name="generate"),
    path("projects/<slug:slug>/api-keys/", apis_rerank.ApiKeyListCreateApi.as_view(), name="api-key-list"),
    path("projects/<slug:slug>/api-keys/<str:prefix>/", apis_rerank.ApiKeyRevokeApi.as_view(),
         name="api-key-revoke"),
]

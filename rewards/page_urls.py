"""Routes of the training pages, mounted under /dashboard/ ahead of the project pages."""
from django.urls import path

from rewards import views

app_name = "training"

urlpatterns = [
    path("runs/<int:run_id>/", views.RunPageView.as_view(), name="run"),
    path("runs/<int:run_id>/status/", views.RunStatusView.as_view(), name="run-status"),
    path("runs/<int:run_id>/metrics.json", views.RunMetricsView.as_view(), name="run-metrics"),
    path("runs/<int:run_id>/cancel/", views.RunCancelView.as_view(), name="run-cancel"),
    path("reward-models/<int:reward_model_id>/deploy/", views.RewardModelDeployView.as_view(),
         name="reward-model-deploy"),
    path("<slug:slug>/training/", views.TrainingPageView.as_view(), name="training"),
    path("<slug:slug>/training/runs/", views.TrainingRunsView.as_view(), name="training-runs"),
    path("<slug:slug>/training/start/", views.TrainingRunStartView.as_view(), name="training-start"),
]

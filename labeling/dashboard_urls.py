"""Routes of the manager dashboard pages, mounted under /dashboard/."""
from django.urls import path

from labeling import dashboard_views as views

app_name = "dashboard"

urlpatterns = [
    path("", views.DashboardView.as_view(), name="overview"),
    path("<slug:slug>/", views.ProjectDashboardView.as_view(), name="project"),
    path("<slug:slug>/charts.json", views.ProjectChartsView.as_view(), name="project-charts"),
    path("<slug:slug>/rerank.json", views.ProjectRerankView.as_view(), name="project-rerank"),
    path("<slug:slug>/api-keys/", views.ApiKeyCreateView.as_view(), name="api-key-create"),
    path("<slug:slug>/api-keys/<str:prefix>/revoke/", views.ApiKeyRevokeView.as_view(), name="api-key-revoke"),
    path("<slug:slug>/import/", views.ProjectImportView.as_view(), name="project-import"),
    path("<slug:slug>/export/", views.ProjectExportView.as_view(), name="project-export"),
    path("<slug:slug>/members/", views.MemberSetView.as_view(), name="member-set"),
    path("<slug:slug>/members/remove/", views.MemberRemoveView.as_view(), name="member-remove"),
    path("<slug:slug>/guidelines/", views.GuidelinesView.as_view(), name="guidelines"),
    path("<slug:slug>/settings/", views.ProjectSettingsView.as_view(), name="project-settings"),
]

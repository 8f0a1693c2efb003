"""API routes of the labeling core, mounted under /api/v1/."""
from django.urls import path

from labeling import apis, apis_io, apis_stats

app_name = "labeling_api"

urlpatterns = [
    path("auth/token/", apis.AuthTokenCreateApi.as_view(), name="token-create"),
    path("auth/tokens/<str:prefix>/", apis.TokenRevokeApi.as_view(), name="token-revoke"),
    path("projects/", apis.ProjectListApi.as_view(), name="project-list"),
    path("projects/create/", apis.ProjectCreateApi.as_view(), name="project-create"),
    path("projects/<slug:slug>/", apis.ProjectDetailApi.as_view(), name="project-detail"),
    path("projects/<slug:slug>/members/", apis.MembershipListApi.as_view(), name="member-list"),
    path("projects/<slug:slug>/members/set/", apis.MembershipSetApi.as_view(), name="member-set"),
    path("projects/<slug:slug>/members/<str:username>/", apis.MembershipDeleteApi.as_view(), name="member-delete"),
    path("projects/<slug:slug>/pairs/", apis.PairCreateApi.as_view(), name="pair-create"),
    path("projects/<slug:slug>/next/", apis.PairNextApi.as_view(), name="pair-next"),
    path("projects/<slug:slug>/skip/", apis.LeaseReleaseApi.as_view(), name="lease-release"),
    path("projects/<slug:slug>/import/", apis_io.PreferencesImportApi.as_view(), name="preferences-import"),
    path("projects/<slug:slug>/export/", apis_io.PreferencesExportApi.as_view(), name="preferences-export"),
    path("projects/<slug:slug>/stats/", apis_stats.ProjectStatsApi.as_view(), name="project-stats"),
    path("comparisons/", apis.ComparisonSubmitApi.as_view(), name="comparison-submit"),
]

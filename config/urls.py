"""Top-level routes: the API under /api/v1/, its schema and docs, the pages, Django admin and /metrics."""
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from config.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("labeling.urls")),
    path("api/v1/", include("rewards.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's start-up script as a file (/api/docs/?script=) instead of inline, which
    # the Content-Security-Policy would refuse.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("dashboard/", include("rewards.page_urls")),
    path("dashboard/", include("labeling.dashboard_urls")),
    path("", include("labeling.page_urls")),
]

# URLs under /api/ that match no route answer with the JSON error body, like the API itself.
handler404 = "labeling.errors.page_not_found"

"""Routes of the pages for people (labelers and managers)."""
from django.urls import path

from labeling import views

app_name = "labeling"

urlpatterns = [
    path("", views.ProjectListView.as_view(), name="home"),
    path("projects/<slug:slug>/label/", views.LabelPageView.as_view(), name="label"),
    path("projects/<slug:slug>/label/submit/", views.LabelSubmitView.as_view(), name="label-submit"),
    path("projects/<slug:slug>/label/skip/", views.LabelSkipView.as_view(), name="label-skip"),
]

"""Pages for people: server-rendered templates."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from labeling import selectors


@login_required
def home(request):
    projects = selectors.project_list_for_user(user=request.user)
    return render(request, "labeling/home.html", {"projects": projects})

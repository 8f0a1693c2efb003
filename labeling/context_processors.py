"""Template context every page shares: whether the header offers the dashboard."""
from __future__ import annotations

from django.http import HttpRequest

from labeling import selectors


def navigation(request: HttpRequest) -> dict:
    """`shows_dashboard`: staff, and managers of at least one project (the dashboard refuses everyone else).
    A callable, so the query runs only on a page that renders the header, and at most once per page."""
    answer: list[bool] = []

    def shows_dashboard() -> bool:
        if not answer:
            user = getattr(request, "user", None)
            answer.append(bool(user is not None and user.is_authenticated
                               and (user.is_staff or selectors.project_list_managed_by(user=user).exists())))
        return answer[0]

    return {"shows_dashboard": shows_dashboard}

"""API permissions shared by every view: scoped keys (e.g. rerank keys) only reach the views that accept them."""
from __future__ import annotations

from rest_framework.permissions import BasePermission

from labeling.models import ApiToken


def request_token(request) -> ApiToken | None:
    """The ApiToken a request authenticated with, or None (session login, anonymous)."""
    return request.auth if isinstance(request.auth, ApiToken) else None


class ScopedTokenPermission(BasePermission):
    """Refuses a request made with a scoped key unless the view lists that scope in `token_scopes`.

    User tokens and sessions pass; a leaked rerank key thus gives no access to labels, exports or training.
    """

    message = "This API key may only be used for the operations of its scope."

    def has_permission(self, request, view) -> bool:
        token = request_token(request)
        if token is None or token.scope == ApiToken.Scope.USER:
            return True
        return token.scope in getattr(view, "token_scopes", ())

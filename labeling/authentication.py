"""API authentication by hashed tokens: `Authorization: Bearer KEY` (or `Token KEY`), with a shared cache of
the token rows so that a request does not pay a three-table query to learn who sent it."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, models, transaction
from django.utils import timezone
from rest_framework import authentication, exceptions

from labeling.models import ApiToken, Project

logger = logging.getLogger(__name__)

# `last_used_at` is written at most once per this many seconds, so authentication is not a write per request.
TOUCH_SECONDS = 60
CACHE_PREFIX = "preflab:auth:"
# Written over a token's entry when its token, user or project changes: while it stands, every process reads
# the token from the database and none may cache it, so a request that read the row just before the change
# cannot put the old row back. It outlives any entry (see `_entry_seconds`).
STALE = "stale"
# Never cached: a secret, and nothing authentication or the views need.
USER_FIELDS_SKIPPED = ("password",)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keywords = ("bearer", "token")

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        # Latin-1, as the header arrived: a scheme with other bytes is not ours, never a decoding error (a 500).
        if not header or header[0].lower().decode("latin-1") not in self.keywords:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Invalid Authorization header: expected '<Bearer|Token> KEY'.")
        try:
            key = header[1].decode()
        except UnicodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid token characters.") from exc
        token = api_token_for_key(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        return token.user, token

    def authenticate_header(self, request) -> str:
        return "Bearer"


def _cache_seconds() -> int:
    return int(settings.PREFLAB["AUTH_CACHE_SECONDS"])


def api_token_cache_enabled() -> bool:
    return _cache_seconds() > 0


def _cache_key(key_hash: str) -> str:
    return CACHE_PREFIX + key_hash


def api_token_for_key(key: str) -> ApiToken | None:
    """The live token (with its user and project loaded) that `key` belongs to, or None for an unknown or
    revoked key or an inactive user.

    With PREFLAB["AUTH_CACHE_SECONDS"] > 0 the rows come from the shared cache when they are there. An entry
    lives at most that long and never past the moment the token's `last_used_at` is due for its next write, and a
    change to the token, its user or its project replaces the entry with a marker (see `api_token_cache_forget`).
    When the cache cannot be reached, the database answers alone."""
    key_hash = ApiToken.hash_key(key)
    seconds = _cache_seconds()
    cached = None
    if seconds > 0:
        try:
            cached = cache.get(_cache_key(key_hash))
        except Exception:  # the cache is an optimisation: an outage must not stop authentication
            logger.warning("token cache unavailable; authenticating from the database", exc_info=True)
            cached = STALE
        if isinstance(cached, dict):
            return _token_from_entry(cached)
    token = (ApiToken.objects.select_related("user", "project")
             .filter(key_hash=key_hash, revoked_at__isnull=True).first())
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > TOUCH_SECONDS:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    if seconds > 0 and cached is None:
        _cache_add(key_hash, token, seconds=_entry_seconds(token, now=now, limit=seconds))
    return token


def _entry_seconds(token: ApiToken, *, now: datetime, limit: int) -> int:
    """An entry expires by the time its token's `last_used_at` is due for a write, so the next request reads
    the row, writes the time and caches it afresh; the touch thus stays once a minute per key."""
    due = TOUCH_SECONDS - (now - token.last_used_at).total_seconds()
    return max(1, min(limit, int(due)))


def _stale_seconds() -> int:
    return max(_cache_seconds(), TOUCH_SECONDS) * 2


def _fields(instance: models.Model, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    # By name, not position: an entry written before a migration added or dropped a column must still come back
    # with each value in its own field.
    return {field.attname: getattr(instance, field.attname) for field in instance._meta.concrete_fields
            if field.attname not in skip}


def _instance(model: type[models.Model], fields: dict[str, Any]) -> models.Model:
    """The model instance the database query would give, from an entry's fields; a field the entry lacks is
    deferred (read from the database if used), one the model no longer has is ignored."""
    names = [field.attname for field in model._meta.concrete_fields if field.attname in fields]
    return model.from_db(DEFAULT_DB_ALIAS, names, [fields[name] for name in names])


def _cache_add(key_hash: str, token: ApiToken, *, seconds: int) -> None:
    entry = {"token": _fields(token), "user": _fields(token.user, USER_FIELDS_SKIPPED),
             "project": _fields(token.project) if token.project_id is not None else None}
    try:
        # `add`, not `set`: it never writes over the marker a concurrent change left.
        cache.add(_cache_key(key_hash), entry, timeout=seconds)
    except Exception:
        logger.warning("token cache unavailable; token not cached", exc_info=True)


def _token_from_entry(entry: dict) -> ApiToken:
    """Model instances as the database query would give them. The user's password is deferred: reading it
    loads it, and saving the instance writes only the fields it holds."""
    token = _instance(ApiToken, entry["token"])
    token.user = _instance(get_user_model(), entry["user"])
    token.project = _instance(Project, entry["project"]) if entry["project"] else None
    return token


def api_token_cache_forget(key_hashes: list[str]) -> None:
    """Put the marker over these tokens' entries, now and again when the current transaction commits."""
    if not key_hashes or not api_token_cache_enabled():
        return

    def mark() -> None:
        try:
            cache.set_many({_cache_key(key_hash): STALE for key_hash in key_hashes}, timeout=_stale_seconds())
        except Exception:
            logger.error("token cache unavailable: %d changed tokens may be honoured from the cache for up to %d s",
                         len(key_hashes), _cache_seconds(), exc_info=True)

    mark()
    transaction.on_commit(mark)

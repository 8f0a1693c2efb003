"""Receivers that keep the authentication cache honest: a token, user or project changed anywhere (services,
the admin, a shell) must not be honoured from a cached copy."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db.models.signals import post_delete, post_save

from labeling.authentication import api_token_cache_enabled, api_token_cache_forget
from labeling.models import ApiToken, Project


def _token_changed(sender, instance: ApiToken, created: bool = False, **kwargs) -> None:
    # A new key cannot be cached yet; marking it would only keep it out of the cache for a while.
    if not created:
        api_token_cache_forget([instance.key_hash])


def _owner_changed(sender, instance, created: bool = False, **kwargs) -> None:
    if created or not api_token_cache_enabled():
        return
    # Tokens of a deleted user or project are deleted with it (and forgotten by `_token_changed`).
    field = "user" if isinstance(instance, get_user_model()) else "project"
    api_token_cache_forget(list(ApiToken.objects.filter(**{field: instance.pk}).values_list("key_hash", flat=True)))


def connect() -> None:
    post_save.connect(_token_changed, sender=ApiToken, dispatch_uid="preflab-token-saved")
    post_delete.connect(_token_changed, sender=ApiToken, dispatch_uid="preflab-token-deleted")
    post_save.connect(_owner_changed, sender=get_user_model(), dispatch_uid="preflab-user-saved")
    post_save.connect(_owner_changed, sender=Project, dispatch_uid="preflab-project-saved")

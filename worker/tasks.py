"""Celery tasks: each takes ids and plain values, loads by id and calls one service."""
from __future__ import annotations

"""Settings for the test suite: fast password hashing, tasks run by a real worker unless a test says so."""
from .base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEBUG = False

# Each rerank request writes its traffic counts itself, so a test reads them right after its request; the
# buffered writer has tests of its own.
PREFLAB = {**PREFLAB, "RERANK_USAGE_FLUSH_SECONDS": 0.0}  # noqa: F405

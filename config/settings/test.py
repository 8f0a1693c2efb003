"""Settings for the test suite: fast password hashing, tasks run by a real worker unless a test says so."""
from .base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEBUG = False

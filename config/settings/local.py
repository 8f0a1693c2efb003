"""Settings for a developer machine: embedded defaults, debug on unless the environment says otherwise."""
from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)

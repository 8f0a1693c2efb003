"""App config of the labeling core."""
from django.apps import AppConfig


class LabelingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "labeling"

    def ready(self) -> None:
        from labeling import (
            schema,  # noqa: F401  (registers the OpenAPI auth extension)
            signals,
        )

        signals.connect()

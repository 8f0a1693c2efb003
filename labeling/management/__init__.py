"""Command-line entry points of the labeling app (python manage.py ...)."""

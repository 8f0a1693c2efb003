"""Tables of training runs and the model registry."""
from __future__ import annotations

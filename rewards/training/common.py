"""Types shared by the training recipes: the hyperparameter error, the training result and device choice."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class HyperparameterError(ValueError):
    """A hyperparameter that cannot be used; `field` names it so an API can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class TrainingResult:
    artifact: Path
    metrics: dict
    history: list[dict]
    train_pairs: int
    eval_pairs: int
    shortened_pairs: int = 0
    extra: dict = field(default_factory=dict)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

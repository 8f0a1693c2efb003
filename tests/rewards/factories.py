"""factory_boy factories of training runs, registry entries and labeled pairs to train on."""
from __future__ import annotations

import factory

from labeling.models import Comparison
from rewards.models import RewardModel, TrainingRun
from tests.factories import PairFactory, ProjectFactory


class ImportedComparisonFactory(factory.django.DjangoModelFactory):
    """An imported label (no labeler): the quickest way to give a pair a decided winner."""

    class Meta:
        model = Comparison

    pair = factory.SubFactory(PairFactory)
    project = factory.SelfAttribute("pair.project")
    source = Comparison.Source.IMPORT
    labeler = None
    choice = Comparison.Choice.A


class TrainingRunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TrainingRun

    project = factory.SubFactory(ProjectFactory)
    kind = TrainingRun.Kind.REWARD
    dataset_hash = factory.Sequence(lambda n: f"{n:064x}")
    pair_count = 1
    train_count = 1


class RewardModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RewardModel

    project = factory.SubFactory(ProjectFactory)
    version = factory.Sequence(lambda n: n + 1)
    artifact_path = factory.Sequence(lambda n: f"/nonexistent/reward-model-{n}")


# Short texts a tiny tokenizer handles; the winner is always the helpful answer, so a model can learn it.
PROMPTS = ["How do I boil an egg?", "What is the capital of France?", "Name a primary colour.",
           "How many legs does a spider have?", "What does a thermometer measure?", "Which planet is largest?",
           "What is two plus two?", "What colour is the sky on a clear day?"]


def labeled_pairs(project, *, count: int = 8, choice: str = Comparison.Choice.A) -> list:
    """`count` pairs of the project, each on its own prompt and decided by one imported label."""
    pairs = []
    for index in range(count):
        prompt = PROMPTS[index % len(PROMPTS)] + ("" if index < len(PROMPTS) else f" ({index})")
        pair = PairFactory(project=project, prompt__content=prompt,
                           response_a__text=f"A clear, correct and helpful answer number {index}.",
                           response_b__text=f"no idea {index}")
        ImportedComparisonFactory(pair=pair, choice=choice)
        pairs.append(pair)
    return pairs

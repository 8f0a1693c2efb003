"""A training run's dataset snapshot: frozen at submission, hashed by its content, split by prompt."""
from __future__ import annotations

import pytest

from labeling.errors import DomainError
from labeling.models import Comparison
from rewards import services
from rewards.models import TrainingRun
from tests.factories import PairFactory, PromptFactory, UserFactory
from tests.rewards.factories import ImportedComparisonFactory, labeled_pairs

TINY = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1}


def _vote(pair, choice: str, *, strength: int | None = None) -> Comparison:
    return Comparison.objects.create(pair=pair, project=pair.project, labeler=UserFactory(), choice=choice,
                                     strength=strength)


def _start(project, **options) -> TrainingRun:
    return services.training_run_start(project=project, kind="reward", hyperparameters=TINY, queue=False, **options)


def _trained_on(run: TrainingRun, monkeypatch, tmp_path, settings) -> tuple[list, list]:
    """What the worker hands the recipe for `run`: the (train, eval) examples."""
    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    seen = {}

    def capture(*, train, eval, **kwargs):
        seen.update(train=train, eval=eval)
        raise RuntimeError("stop here")

    recipe = services.Recipe({}, lambda hyperparameters: hyperparameters, capture, lambda: tmp_path, "tiny")
    monkeypatch.setattr(services, "_recipe", lambda kind: recipe)
    assert services.training_run_execute(run_id=run.pk, worker="w@h").error == "RuntimeError: stop here"
    return seen["train"], seen["eval"]


@pytest.mark.django_db
def test_labels_added_after_submission_change_nothing_the_run_trains_on(project, monkeypatch, tmp_path, settings):
    pairs = labeled_pairs(project, count=6)
    undecided = PairFactory(project=project)
    _vote(undecided, "a")
    _vote(undecided, "b")
    run = _start(project, eval_fraction=0.3)
    # After submission: one pair flips (two votes for B against the imported A), the split pair gets decided.
    _vote(pairs[0], "b")
    _vote(pairs[0], "b")
    _vote(undecided, "a")
    train, held_out = _trained_on(run, monkeypatch, tmp_path, settings)
    assert len(train) == run.train_count and len(held_out) == run.eval_count and run.pair_count == 6
    assert sorted((e.prompt, e.chosen, e.rejected) for e in train + held_out) == sorted(
        (p.prompt.content, p.response_a.text, p.response_b.text) for p in pairs)
    assert _start(project).dataset_hash != run.dataset_hash


@pytest.mark.django_db
def test_the_dataset_hash_is_stable_and_follows_the_decided_rows(project):
    pairs = labeled_pairs(project, count=4)
    first = _start(project)
    assert _start(project, eval_fraction=0.5, seed=9).dataset_hash == first.dataset_hash
    _vote(pairs[1], "a")  # agrees and carries no strength: the rows are the same
    assert _start(project).dataset_hash == first.dataset_hash
    _vote(pairs[1], "a", strength=2)  # a margin now
    with_margin = _start(project).dataset_hash
    assert with_margin != first.dataset_hash
    ImportedComparisonFactory(pair=PairFactory(project=project))
    assert _start(project).dataset_hash not in (first.dataset_hash, with_margin)


@pytest.mark.django_db
@pytest.mark.parametrize("seed", range(5))
def test_the_split_keeps_every_prompt_on_one_side(project, seed):
    shared = PromptFactory(project=project, content="Shared question?")
    same_as_text = PromptFactory(project=project, content=[{"role": "user", "content": "Shared question?"}])
    chat = PromptFactory(project=project, content=[{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"},
                                                   {"role": "user", "content": "More?"}])
    groups = {"shared": [PairFactory(project=project, prompt=shared) for _ in range(3)]
              + [PairFactory(project=project, prompt=same_as_text) for _ in range(2)],
              "chat": [PairFactory(project=project, prompt=chat) for _ in range(2)]}
    groups.update({f"single-{i}": [pair] for i, pair in enumerate(labeled_pairs(project, count=6))})
    for pairs in (groups["shared"], groups["chat"]):
        for pair in pairs:
            ImportedComparisonFactory(pair=pair)
    run = _start(project, eval_fraction=0.4, seed=seed)
    train, held_out = set(run.train_pair_ids), set(run.eval_pair_ids)
    assert not train & held_out and len(train | held_out) == run.pair_count == 13
    assert train and held_out
    for pairs in groups.values():
        ids = {pair.pk for pair in pairs}
        assert ids <= train or ids <= held_out


@pytest.mark.django_db
def test_a_gold_pair_decided_by_its_labels_is_in_the_snapshot_and_a_split_vote_is_not(project):
    gold = PairFactory(project=project, gold_choice="b")
    _vote(gold, "b")
    split = PairFactory(project=project)
    _vote(split, "a")
    _vote(split, "b")
    run = _start(project, eval_fraction=0.0)
    assert run.train_pair_ids == [gold.pk] and run.comparison_ids == list(gold.comparisons.values_list("pk", flat=True))
    gold.comparisons.all().delete()
    with pytest.raises(DomainError, match="split votes are not training data") as refused:
        _start(project)
    assert "gold" not in refused.value.message

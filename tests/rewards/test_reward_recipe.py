"""Tests of the reward-model recipe: hyperparameters, training on tiny models, artifacts, embedded models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewards.scoring import RewardScorer
from rewards.training.common import HyperparameterError, TrainingResult
from rewards.training.data import PreferenceExample, split_by_prompt
from rewards.training.reward import REWARD_DEFAULTS, train_reward_model, validate_reward_hyperparameters
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LONG_PREFIX = " ".join(f"filler{i}" for i in range(150))


def preference_pairs() -> list[PreferenceExample]:
    """16 pairs over 12 prompts: the polite answer is preferred; 4 prompts are far longer than max_length."""
    pairs = []
    for i in range(16):
        question = f"question number {i % 12}: how do I fix my bike?"
        if i % 4 == 0:
            prompt = [{"role": "user", "content": LONG_PREFIX}, {"role": "assistant", "content": "go on"},
                      {"role": "user", "content": question}]
        else:
            prompt = question
        pairs.append(PreferenceExample(prompt=prompt, chosen=f"thank you, here is a careful answer {i}",
                                       rejected=f"no, go away {i}", margin=0.5 if i % 3 == 0 else None))
    return pairs


FAST = {"max_length": 64, "learning_rate": 1e-3, "num_train_epochs": 2, "per_device_train_batch_size": 4,
        "logging_steps": 1, "warmup_steps": 0}


def scores_with_plain_transformers(artifact: Path, scorer: RewardScorer, examples) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(artifact, dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for example in examples:
            for response in (example.chosen, example.rejected):
                ids = torch.tensor([scorer.encode(example.prompt, response).input_ids])
                scores.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item())
    return scores


def scores_with_scorer(scorer: RewardScorer, examples) -> list[float]:
    scores = []
    for example in examples:
        scores += scorer.score(example.prompt, [example.chosen, example.rejected])
    return scores


def changed_tensors(before: Path, after: Path) -> set[str]:
    first = AutoModelForSequenceClassification.from_pretrained(before, dtype=torch.float32).state_dict()
    second = AutoModelForSequenceClassification.from_pretrained(after, dtype=torch.float32).state_dict()
    assert first.keys() == second.keys()
    return {name for name in first if not torch.equal(first[name], second[name])}


# --- hyperparameters --------------------------------------------------------------------------------------


def test_defaults_are_merged_and_named_as_reward_config_fields():
    import dataclasses

    from trl import RewardConfig

    hp = validate_reward_hyperparameters({"learning_rate": 3e-5})
    assert hp["learning_rate"] == 3e-5
    assert hp["max_length"] == 256 and hp["num_train_epochs"] == 1.0 and hp["per_device_train_batch_size"] == 8
    assert hp["gradient_checkpointing"] is False and hp["lora_r"] is None
    config_fields = {f.name for f in dataclasses.fields(RewardConfig)}
    assert set(REWARD_DEFAULTS) <= config_fields
    # Callers store the validated dict and hand it back to train_reward_model, which validates it again.
    assert validate_reward_hyperparameters(hp) == hp


@pytest.mark.parametrize(("hp", "field", "fragment"), [
    ({"learnin_rate": 1e-5}, "learnin_rate", "not a tunable"),
    ({"output_dir": "/tmp/x"}, "output_dir", "not a tunable"),
    ({"learning_rate": "fast"}, "learning_rate", "number"),
    ({"learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"max_length": 4}, "max_length", "at least 16"),
    ({"max_length": 64.5}, "max_length", "integer"),
    ({"per_device_train_batch_size": True}, "per_device_train_batch_size", "integer"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", "true or false"),
    ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type", "one of"),
    ({"num_train_epochs": float("nan")}, "num_train_epochs", "finite"),
    ({"max_steps": 0}, "max_steps", "-1"),
    ({"bf16": True, "fp16": True}, "fp16", "bf16"),
    ({"lora_alpha": 16}, "lora_alpha", "lora_r"),
    ({"lora_r": 4, "lora_target_modules": []}, "lora_target_modules", "non-empty"),
    ({"seed": None}, "seed", "null"),
])
def test_bad_hyperparameters_name_the_field(hp, field, fragment):
    with pytest.raises(HyperparameterError) as caught:
        validate_reward_hyperparameters(hp)
    assert caught.value.field == field
    assert fragment in caught.value.message


def test_max_length_beyond_the_model_positions_is_refused_before_training(tmp_path):
    base = tiny_reward_model(tmp_path)
    with pytest.raises(HyperparameterError) as caught:
        train_reward_model(base_model=str(base), train=preference_pairs(), eval=[], output_dir=tmp_path / "out",
                           hyperparameters={"max_length": 1024})
    assert caught.value.field == "max_length"
    assert not (tmp_path / "out").exists()


def test_training_needs_pairs_and_an_empty_output_folder(tmp_path):
    base = tiny_reward_model(tmp_path)
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(base_model=str(base), train=[], eval=[], output_dir=tmp_path / "out", hyperparameters={})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        train_reward_model(base_model=str(base), train=preference_pairs(), eval=[], output_dir=tmp_path / "busy",
                           hyperparameters={})
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


# --- training ---------------------------------------------------------------------------------------------


def test_recipe_keeps_every_pair_left_truncates_and_saves_a_plain_transformers_model(tmp_path):
    base = tiny_reward_model(tmp_path)
    pairs = preference_pairs()
    train, evaluation = split_by_prompt(pairs, eval_fraction=0.25, seed=1)
    assert train and evaluation

    result = train_reward_model(base_model=str(base), train=train, eval=evaluation, output_dir=tmp_path / "model",
                                hyperparameters=FAST, metadata={"project": "bikes", "run": 7})

    assert isinstance(result, TrainingResult)
    assert result.train_pairs == len(train) and result.eval_pairs == len(evaluation)
    # The 4 long-prompt pairs are shortened, not dropped: every training pair makes the step count.
    assert result.shortened_pairs == 4
    assert result.extra["dropped_pairs"] == 0 and result.extra["response_cut_pairs"] == 0
    steps_per_epoch = -(-len(train) // FAST["per_device_train_batch_size"])
    assert result.metrics["train_steps"] == 2 * steps_per_epoch
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 2 * steps_per_epoch and all(loss > 0 for loss in losses)
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    assert result.metrics["eval_pairs"] == len(evaluation)
    assert sum(bucket["pairs"] for bucket in result.metrics["eval_by_length"].values()) == len(evaluation)

    changed = changed_tensors(base, result.artifact)
    assert "classifier.weight" in changed
    assert any(name.startswith("bert.encoder.") for name in changed)

    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["format"]["max_length"] == 64 and manifest["format"]["template"] == "plain"
    assert manifest["format"]["truncation"] == "prompt_left"
    assert manifest["metadata"] == {"project": "bikes", "run": 7}
    assert manifest["metrics"]["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert manifest["config"]["learning_rate"] == 1e-3 and manifest["shortened_pairs"] == 4

    scorer = RewardScorer.load(result.artifact, device="cpu")
    assert scorer.format.max_length == 64
    long_pair = pairs[0]
    encoded = scorer.encode(long_pair.prompt, long_pair.chosen)
    tokenizer = AutoTokenizer.from_pretrained(result.artifact)
    assert len(encoded.input_ids) == 64 and encoded.prompt_cut > 0
    assert encoded.input_ids[0] == tokenizer.cls_token_id and encoded.input_ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(encoded.input_ids[1:-1]).endswith(
        "question number 0 : how do i fix my bike? assistant : thank you, here is a careful answer 0")

    plain = scores_with_plain_transformers(result.artifact, scorer, pairs)
    assert plain == pytest.approx(scores_with_scorer(scorer, pairs), abs=1e-5)


def test_lora_run_is_merged_into_a_plain_model(tmp_path):
    base = tiny_reward_model(tmp_path)
    pairs = preference_pairs()
    result = train_reward_model(base_model=str(base), train=pairs[:12], eval=pairs[12:],
                                output_dir=tmp_path / "lora", hyperparameters={**FAST, "lora_r": 4})

    assert not (result.artifact / "adapter_config.json").exists()
    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["lora"] == {"r": 4, "alpha": 8, "merged": True}
    changed = changed_tensors(base, result.artifact)
    assert "classifier.weight" in changed
    # LoRA targets query/value of BERT; merging folds the adapters into exactly those weights.
    encoder_changes = {name for name in changed if name.startswith("bert.encoder.")}
    assert encoder_changes and all(".query." in name or ".value." in name for name in encoder_changes)
    scorer = RewardScorer.load(result.artifact, device="cpu")
    assert scores_with_plain_transformers(result.artifact, scorer, pairs) == pytest.approx(
        scores_with_scorer(scorer, pairs), abs=1e-5)


def test_causal_lm_backbone_trains_with_its_chat_template(tmp_path):
    base = tiny_causal_lm(tmp_path)
    pairs = preference_pairs()
    result = train_reward_model(base_model=str(base), train=pairs[:12], eval=pairs[12:],
                                output_dir=tmp_path / "llama", hyperparameters={**FAST, "num_train_epochs": 1})

    assert result.shortened_pairs == 4
    assert any("loss" in entry for entry in result.history)
    # The base has no score head (loaded here, it gets a random one): the transformer's own weights must move.
    assert any(name.startswith("model.layers.") for name in changed_tensors(base, result.artifact))
    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["format"]["template"] == "chat"
    scorer = RewardScorer.load(result.artifact, device="cpu")
    encoded = scorer.encode(pairs[0].prompt, pairs[0].chosen)
    assert scorer.tokenizer.decode(encoded.input_ids).endswith(
        "how do I fix my bike?<|im_end|>\n<|im_start|>assistant\nthank you, here is a careful answer 0<|im_end|>\n")
    assert scores_with_plain_transformers(result.artifact, scorer, pairs) == pytest.approx(
        scores_with_scorer(scorer, pairs), abs=1e-4)


# --- the real embedded models -----------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_trains_on_hh_pairs(tmp_path):
    from rewards.training.data import read_preference_file

    with (FIXTURES / "hh-sample.jsonl").open("rb") as stream:
        examples, _ = read_preference_file(stream, file_format="hh", limit=24)
    assert len(examples) == 24
    train, evaluation = split_by_prompt(examples, eval_fraction=0.25, seed=0)
    result = train_reward_model(train=train, eval=evaluation, output_dir=tmp_path / "minilm",
                                hyperparameters={"max_steps": 3, "per_device_train_batch_size": 4,
                                                 "logging_steps": 1, "max_length": 128})

    assert result.metrics["train_steps"] == 3
    assert [entry["step"] for entry in result.history if "loss" in entry] == [1, 2, 3]
    assert result.shortened_pairs > 0  # HH dialogues often exceed 128 tokens
    assert result.metrics["eval_pairs"] == len(evaluation)
    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["base_model"] == "minilm"
    model = AutoModelForSequenceClassification.from_pretrained(result.artifact)
    assert model.config.num_labels == 1 and model.config.model_type == "bert"


@pytest.mark.slow
def test_smollm2_is_materialized_into_a_plain_checkpoint_that_generates(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rewards.embedded import smollm2_path

    monkeypatch.setenv("PREFLAB_MODEL_CACHE", str(tmp_path))
    path = smollm2_path()
    assert path == tmp_path / "smollm2-135m-instruct"
    assert smollm2_path() == path
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # Five greedy tokens of the real model: "The capital of France is".
    assert text.startswith("The capital of France")


def test_checkpoint_spacing_skips_saves_that_come_too_soon_after_the_last_one():
    from transformers import TrainerControl

    from rewards.progress import CheckpointSpacing

    now = [100.0]
    spacing = CheckpointSpacing(min_seconds=120, clock=lambda: now[0])

    def asks_to_save() -> bool:
        control = TrainerControl(should_save=True)
        return spacing.on_step_end(None, None, control).should_save

    assert asks_to_save()  # the first checkpoint is always written
    spacing.on_save(None, None, TrainerControl())
    now[0] += 119
    assert not asks_to_save()
    now[0] += 2
    assert asks_to_save()
    assert not spacing.on_step_end(None, None, TrainerControl(should_save=False)).should_save


def test_a_spaced_run_keeps_its_first_checkpoint_where_save_steps_alone_would_keep_the_last(tmp_path):
    from rewards.progress import CheckpointSpacing
    from rewards.training.common import latest_checkpoint

    base = tiny_reward_model(tmp_path)
    pairs = preference_pairs()
    hp = {**FAST, "save_steps": 1, "per_device_train_batch_size": 4, "num_train_epochs": 1}
    kept = {}
    for name, callbacks in (("spaced", [CheckpointSpacing(min_seconds=3600)]), ("every-step", [])):
        checkpoints = tmp_path / f"checkpoints-{name}"
        result = train_reward_model(base_model=str(base), train=pairs[:12], eval=[], output_dir=tmp_path / name,
                                    hyperparameters=hp, callbacks=callbacks, checkpoint_dir=checkpoints)
        assert result.artifact.is_dir()
        kept[name] = latest_checkpoint(checkpoints).name
    # Only the latest checkpoint is kept: with saves an hour apart that is still the first one (12 pairs in
    # batches of 4: 3 steps).
    assert kept == {"spaced": "checkpoint-1", "every-step": "checkpoint-3"}

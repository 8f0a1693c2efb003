"""RLHF (GRPO) recipe: a few online steps on tiny models, rewarded by a reward model, reporting reward and KL."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.scoring import RewardScorer
from rewards.training.common import HyperparameterError
from rewards.training.dpo import generate_greedy_ids
from rewards.training.rlhf import RLHF_DEFAULTS, split_prompts, train_rlhf, validate_rlhf_hyperparameters
from tests.rewards.test_dpo_recipe import assert_generates, parameters_changed
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

FAST = {"learning_rate": 1e-3, "max_steps": 2, "max_completion_length": 8, "heldout_prompts": 2}
TOPICS = ["cats", "dogs", "rain", "tea", "snow", "maps"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rlhf-models")
    return tiny_causal_lm(folder), tiny_reward_model(folder)


def test_rlhf_trains_and_reports_reward_before_after_and_kl(models, tmp_path):
    lm_path, reward_path = models
    prompts = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in TOPICS]
    result = train_rlhf(
        base_model=str(lm_path),
        prompts=prompts,
        reward_model_path=reward_path,
        output_dir=tmp_path / "run",
        hyperparameters=FAST,
        metadata={"run": 7},
    )

    logged = [entry for entry in result.history if "loss" in entry]
    assert len(logged) == 2
    # beta > 0 by default, so TRL computes the KL to the reference and logs it with the reward model's score.
    assert all("kl" in entry and "rewards/reward_model/mean" in entry for entry in logged)
    assert result.train_pairs == 4
    assert result.eval_pairs == 2
    assert result.metrics["heldout_prompts"] == 2
    assert result.metrics["kl_to_base"] > 0
    answers = result.extra["heldout_answers"]
    assert len(answers) == 2
    # The answers are the greedy ones of the base and of the saved policy, each loaded afresh from its folder, and
    # reward before/after are the reward model's mean score of them.
    scorer = RewardScorer.load(reward_path)
    for side, folder, metric in (("base", lm_path, "reward_before"), ("trained", result.artifact, "reward_after")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        policy = AutoModelForCausalLM.from_pretrained(folder)
        prompts = [answer["prompt"] for answer in answers]
        greedy = generate_greedy_ids(policy, tokenizer, prompts, max_new_tokens=FAST["max_completion_length"])
        assert [tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids in greedy] == [
            answer[side] for answer in answers]
        scores = [scorer.score(answer["prompt"], [answer[side]])[0] for answer in answers]
        assert result.metrics[metric] == pytest.approx(sum(scores) / len(scores), rel=1e-4, abs=1e-5)
    assert parameters_changed(lm_path, result.artifact)
    assert_generates(result.artifact)

    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["recipe"] == "rlhf"
    assert manifest["config"]["algorithm"] == "grpo"
    assert manifest["config"]["num_generations"] == RLHF_DEFAULTS["num_generations"]
    assert manifest["metadata"] == {"run": 7}
    assert manifest["metrics"]["kl_to_base"] == result.metrics["kl_to_base"]


def test_rlhf_with_lora_and_string_prompts(models, tmp_path):
    lm_path, reward_path = models
    result = train_rlhf(
        base_model=str(lm_path),
        prompts=[f"Write one line about {topic}:" for topic in TOPICS],
        reward_model_path=str(reward_path),
        output_dir=tmp_path / "run",
        hyperparameters={**FAST, "lora_r": 4, "max_steps": 1},
    )
    assert any("loss" in entry for entry in result.history)
    assert result.extra["lora"] is True
    assert result.extra["conversational"] is False
    assert result.metrics["kl_to_base"] >= 0
    saved = load_file(result.artifact / "model.safetensors")
    assert not any("lora" in name for name in saved)
    assert parameters_changed(lm_path, result.artifact)


def test_split_prompts_holds_out_at_most_half_reproducibly():
    prompts = [f"p{i}" for i in range(10)]
    train, held = split_prompts(prompts, heldout=8, seed=1)
    assert len(held) == 5
    assert sorted(train + held) == sorted(prompts)
    assert split_prompts(prompts, heldout=8, seed=1) == (train, held)
    assert split_prompts(prompts, heldout=0, seed=1) == (prompts, [])


@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"kl_coef": 0.1}, "kl_coef"),
        ({"beta": -0.1}, "beta"),
        ({"num_generations": 1}, "num_generations"),
        ({"num_generations": 3}, "num_generations"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"temperature": 0}, "temperature"),
        ({"max_completion_length": "long"}, "max_completion_length"),
        ({"heldout_prompts": -2}, "heldout_prompts"),
        ({"beta": 1e300}, "beta"),
    ],
)
def test_validate_rlhf_hyperparameters_names_the_bad_field(hp, field):
    with pytest.raises(HyperparameterError) as caught:
        validate_rlhf_hyperparameters(hp)
    assert caught.value.field == field


def test_validate_rlhf_hyperparameters_accepts_whole_groups():
    merged = validate_rlhf_hyperparameters({"num_generations": 2, "per_device_train_batch_size": 2})
    assert merged["num_generations"] == 2
    assert merged["beta"] == RLHF_DEFAULTS["beta"]
    assert validate_rlhf_hyperparameters(
        {"num_generations": 8, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    )["gradient_accumulation_steps"] == 2

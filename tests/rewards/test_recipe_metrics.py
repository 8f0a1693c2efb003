"""The numbers the training recipes report measure what their names say, on tiny models built from a config."""
from __future__ import annotations

import pytest
import torch

from rewards.training import dpo
from rewards.training.data import PreferenceExample
from rewards.training.reward import train_reward_model
from rewards.training.rlhf import train_rlhf
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

# A learning rate too small to move a float32 weight: the trained policy is the base policy, bit for bit.
FROZEN = {"learning_rate": 1e-12, "max_steps": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metric-models")
    return tiny_causal_lm(folder), tiny_reward_model(folder)


@pytest.fixture
def bf16_training(monkeypatch):
    """Training arguments as on a GPU that supports bf16 (the trainer's forward runs in bf16 autocast), on the
    CPU."""
    monkeypatch.setattr(dpo, "trainer_precision", lambda device: {"use_cpu": True, "bf16": True, "fp16": False})


def test_rlhf_kl_to_base_compares_the_saved_float32_policy_with_the_base(models, tmp_path, bf16_training):
    lm_path, reward_path = models
    prompts = [[{"role": "user", "content": f"Tell me about {topic}."}]
               for topic in ("cats", "dogs", "rain", "tea", "snow", "maps", "sun", "sea")]
    result = train_rlhf(base_model=str(lm_path), prompts=prompts, reward_model_path=reward_path,
                        output_dir=tmp_path / "run",
                        hyperparameters={**FROZEN, "max_completion_length": 8, "heldout_prompts": 4})

    assert result.metrics["heldout_prompts"] == 4
    assert all(answer["base"] == answer["trained"] for answer in result.extra["heldout_answers"])
    assert result.metrics["reward_after"] == result.metrics["reward_before"]
    # An unchanged policy is at KL 0 from its base; through the bf16 autocast the training leaves on the model's
    # forward it was a precision gap, and negative.
    assert result.metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-9)


def test_dpo_trained_answers_come_from_the_float32_policy_that_is_saved(models, tmp_path, bf16_training,
                                                                        monkeypatch):
    lm_path, judge_path = models
    generate = dpo.generate_greedy
    logits_dtypes: list[set[torch.dtype]] = []

    def generate_watching_precision(model, *args, **kwargs):
        seen: set[torch.dtype] = set()
        hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: seen.add(
            output.dtype))
        try:
            return generate(model, *args, **kwargs)
        finally:
            hook.remove()
            logits_dtypes.append(seen)

    monkeypatch.setattr(dpo, "generate_greedy", generate_watching_precision)
    pairs = [PreferenceExample(prompt=[{"role": "user", "content": f"What is {i} plus {i}?"}],
                               chosen=f"{i} plus {i} is {2 * i}.", rejected="I will not answer that.")
             for i in range(8)]
    result = dpo.train_dpo(base_model=str(lm_path), train=pairs[:6], eval=pairs[6:], output_dir=tmp_path / "run",
                           judge_path=judge_path, hyperparameters={**FROZEN, "max_length": 64, "max_new_tokens": 4})

    # The base answers, then the trained ones: both from float32 logits, as the saved folder generates.
    assert logits_dtypes == [{torch.float32}, {torch.float32}]
    assert result.metrics["answers_changed_vs_base"] == 0.0
    assert result.metrics["win_rate_vs_base"] == 0.5


def test_reward_eval_accuracy_counts_a_tie_as_half(tmp_path):
    base = tiny_reward_model(tmp_path)
    train = [PreferenceExample(prompt=f"question {i}", chosen=f"good answer {i}", rejected=f"bad {i}")
             for i in range(4)]
    # Both replies are longer than max_length and keep the same start, so the model sees one text twice: a tie.
    shared = " ".join(f"word{i}" for i in range(60))
    tie = PreferenceExample(prompt="tie", chosen=f"{shared} yes", rejected=f"{shared} no")
    result = train_reward_model(base_model=str(base), train=train, eval=[tie], output_dir=tmp_path / "model",
                                hyperparameters={"max_length": 32, "max_steps": 1, "logging_steps": 1})

    assert result.metrics["eval_mean_margin"] == 0.0
    assert result.metrics["eval_accuracy"] == 0.5
    assert result.metrics["eval_by_length"] == {"0-63": {"pairs": 1, "accuracy": 0.5}}

"""DPO recipe: a few steps on tiny models train, evaluate, judge and save a policy plain transformers loads."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.scoring import RewardScorer
from rewards.training.common import HyperparameterError
from rewards.training.data import PreferenceExample
from rewards.training.dpo import (
    DPO_DEFAULTS,
    fit_conversation,
    generate_greedy,
    generate_greedy_ids,
    judge_win_rate,
    train_dpo,
    validate_dpo_hyperparameters,
)
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

FAST = {"learning_rate": 1e-3, "max_steps": 3, "warmup_steps": 0, "max_length": 64, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-models")
    return tiny_causal_lm(folder), tiny_reward_model(folder)


def chat_pairs(count: int, offset: int = 0) -> list[PreferenceExample]:
    return [
        PreferenceExample(
            prompt=[{"role": "user", "content": f"What is {i} plus {i}?"}],
            chosen=f"{i} plus {i} is {2 * i}.",
            rejected="I will not answer that.",
        )
        for i in range(offset, offset + count)
    ]


def parameters_changed(base_path, trained_path) -> bool:
    base = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(trained_path).state_dict()
    assert base.keys() == trained.keys()
    return any(not torch.equal(base[name], trained[name]) for name in base)


def assert_generates(path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = tokenizer("Hello", return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > batch["input_ids"].shape[1]


def test_dpo_trains_judges_and_saves_a_loadable_policy(models, tmp_path):
    lm_path, judge_path = models
    result = train_dpo(
        base_model=str(lm_path),
        train=chat_pairs(6),
        eval=chat_pairs(3, offset=10),
        output_dir=tmp_path / "run",
        hyperparameters=FAST,
        metadata={"project": "arith"},
        judge_path=judge_path,
    )

    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 3
    assert result.train_pairs == 6
    assert result.eval_pairs == 3
    assert result.extra["conversational"] is True
    assert 0.0 <= result.metrics["eval_rewards/accuracies"] <= 1.0
    assert "eval_rewards/margins" in result.metrics
    assert result.metrics["judged_prompts"] == 3
    # The judge's verdict, recomputed: the greedy answers of the base and of the saved policy on the held-out
    # prompts, each scored by the reward model; a win is a higher score, a tie counts half.
    prompts = [example.prompt for example in chat_pairs(3, offset=10)]
    judge = RewardScorer.load(judge_path)
    scores = {}
    for side, folder in (("base", lm_path), ("trained", result.artifact)):
        policy = AutoModelForCausalLM.from_pretrained(folder)
        answers = generate_greedy(policy, AutoTokenizer.from_pretrained(folder), prompts,
                                  max_new_tokens=FAST["max_new_tokens"])
        scores[side] = [judge.score(prompt, [answer])[0] for prompt, answer in zip(prompts, answers, strict=True)]
    wins = [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(scores["trained"], scores["base"], strict=True)]
    assert result.metrics["win_rate_vs_base"] == pytest.approx(sum(wins) / 3)
    for side in ("base", "trained"):
        assert result.metrics[f"judge_reward_{side}"] == pytest.approx(sum(scores[side]) / 3, rel=1e-4, abs=1e-5)
    assert parameters_changed(lm_path, result.artifact)
    assert_generates(result.artifact)

    manifest = json.loads((result.artifact / "preflab.json").read_text())
    assert manifest["recipe"] == "dpo"
    assert manifest["metadata"] == {"project": "arith"}
    assert manifest["config"]["learning_rate"] == 1e-3
    assert manifest["config"]["beta"] == DPO_DEFAULTS["beta"]
    assert manifest["metrics"]["win_rate_vs_base"] == result.metrics["win_rate_vs_base"]
    assert not (tmp_path / "run" / "trainer").exists()


def test_batched_greedy_answers_equal_one_by_one_with_a_right_padding_tokenizer(models):
    lm_path, _ = models
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    model = AutoModelForCausalLM.from_pretrained(lm_path)
    assert tokenizer.padding_side == "right"
    prompts = [[{"role": "user", "content": "hi"}],
               [{"role": "user", "content": "tell me a much longer story about the sea and the ships on it"}]]
    batched = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens=6)
    assert batched == [generate_greedy_ids(model, tokenizer, [prompt], max_new_tokens=6)[0] for prompt in prompts]


def test_an_answer_the_training_left_unchanged_is_a_tie(models):
    _, judge_path = models
    prompts = [f"question {n}?" for n in range(8)]
    base = [" ".join(["word"] * (n + 1)) for n in range(8)]
    trained = [" ".join(["other"] * 60), *base[1:]]
    judge = RewardScorer.load(judge_path)
    first_trained, first_base = (judge.score(prompts[0], [answer])[0] for answer in (trained[0], base[0]))
    assert first_trained != first_base
    # One answer changed and seven did not: seven ties at a half each, and the changed one a win or a loss.
    expected = ((1.0 if first_trained > first_base else 0.0) + 7 * 0.5) / 8
    assert judge_win_rate(judge_path, prompts, trained, base)["win_rate_vs_base"] == expected


def test_dpo_with_lora_and_string_prompts_saves_merged_weights(models, tmp_path):
    lm_path, _ = models
    train = [
        PreferenceExample(prompt=f"Q: name a colour ({i})\nA:", chosen=" Blue.", rejected=" No.") for i in range(4)
    ]
    result = train_dpo(
        base_model=str(lm_path),
        train=train,
        eval=[PreferenceExample(prompt="Q: name a fruit\nA:", chosen=" Apple.", rejected=" No.")],
        output_dir=tmp_path / "run",
        hyperparameters={**FAST, "lora_r": 4, "max_steps": 2},
    )

    assert any("loss" in entry for entry in result.history)
    assert result.extra["lora"] is True
    assert result.extra["conversational"] is False
    assert "win_rate_vs_base" not in result.metrics
    assert 0.0 <= result.metrics["answers_changed_vs_base"] <= 1.0
    saved = load_file(result.artifact / "model.safetensors")
    assert not any("lora" in name for name in saved)
    assert parameters_changed(lm_path, result.artifact)
    assert_generates(result.artifact)


def test_dpo_counts_pairs_cut_by_max_length(models, tmp_path):
    lm_path, _ = models
    long_answer = " ".join(["word"] * 80)
    train = [PreferenceExample(prompt="Say something long:", chosen=long_answer, rejected="No.")] * 2
    result = train_dpo(
        base_model=str(lm_path),
        train=train,
        eval=[],
        output_dir=tmp_path / "run",
        hyperparameters={**FAST, "max_steps": 1, "win_rate_prompts": 0},
    )
    assert result.shortened_pairs == 2
    assert result.eval_pairs == 0


def test_fit_conversation_drops_oldest_turns_and_keeps_the_end(models):
    lm_path, _ = models
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question {i} " + "filler " * 10},
                    {"role": "assistant", "content": f"Answer {i} " + "filler " * 10}]
    prompt = [{"role": "system", "content": "Be kind."}, *history, {"role": "user", "content": "Last question?"}]
    example = PreferenceExample(prompt=prompt, chosen="Sure.", rejected="No.")

    fitted, dropped = fit_conversation(tokenizer, example, 160)

    assert dropped is True
    assert fitted.prompt[0] == {"role": "system", "content": "Be kind."}
    assert fitted.prompt[1]["role"] == "user"
    assert fitted.prompt[-1] == {"role": "user", "content": "Last question?"}
    assert len(fitted.prompt) < len(prompt)
    full = [*fitted.prompt, {"role": "assistant", "content": "Sure."}]
    assert len(tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]) <= 160
    assert fit_conversation(tokenizer, example, 4096) == (example, False)


def test_validate_dpo_hyperparameters_merges_defaults():
    merged = validate_dpo_hyperparameters({"beta": 0.3, "max_steps": 10.0})
    assert merged["beta"] == 0.3
    assert merged["max_steps"] == 10
    assert isinstance(merged["max_steps"], int)
    assert merged["learning_rate"] == DPO_DEFAULTS["learning_rate"]
    assert validate_dpo_hyperparameters({}) == validate_dpo_hyperparameters(None)


@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"betta": 0.1}, "betta"),
        ({"beta": 0}, "beta"),
        ({"beta": "high"}, "beta"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"per_device_train_batch_size": 1.5}, "per_device_train_batch_size"),
        ({"per_device_train_batch_size": True}, "per_device_train_batch_size"),
        ({"loss_type": "squared"}, "loss_type"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"max_steps": 0}, "max_steps"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"lora_r": -1}, "lora_r"),
        ({"max_length": 4}, "max_length"),
        # Every number has an upper bound, as the reward recipe's do.
        ({"beta": 1e300}, "beta"),
        ({"logging_steps": 10**300}, "logging_steps"),
        ({"warmup_steps": 1e300}, "warmup_steps"),
        ({"max_grad_norm": 1e300}, "max_grad_norm"),
        ({"lora_alpha": 1e300}, "lora_alpha"),
    ],
)
def test_validate_dpo_hyperparameters_names_the_bad_field(hp, field):
    with pytest.raises(HyperparameterError) as caught:
        validate_dpo_hyperparameters(hp)
    assert caught.value.field == field
    assert caught.value.message


def test_train_dpo_rejects_bad_hyperparameters_before_loading_a_model(tmp_path):
    with pytest.raises(HyperparameterError) as caught:
        train_dpo(
            base_model=str(tmp_path / "missing-model"),
            train=chat_pairs(2),
            eval=[],
            output_dir=tmp_path / "run",
            hyperparameters={"num_train_epochs": -1},
        )
    assert caught.value.field == "num_train_epochs"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dpo_on_embedded_smollm2(tmp_path):
    from rewards.embedded import smollm2_path

    base = smollm2_path()
    result = train_dpo(
        base_model=str(base),
        train=chat_pairs(4),
        eval=chat_pairs(2, offset=20),
        output_dir=tmp_path / "run",
        hyperparameters={"max_steps": 1, "max_length": 96, "win_rate_prompts": 1, "max_new_tokens": 4},
    )
    assert len([entry for entry in result.history if "loss" in entry]) == 1
    assert "eval_rewards/accuracies" in result.metrics
    assert parameters_changed(base, result.artifact)
    assert_generates(result.artifact)

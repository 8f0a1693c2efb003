"""Online RLHF recipe: GRPO with TRL on prompts, rewarded by a trained reward model; before/after reward and KL."""
from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.training.common import (
    DEFAULT_SAVE_STEPS,
    HyperparameterError,
    TrainingResult,
    check_save_steps,
    model_positions,
    pick_device,
    raise_if_cancelled,
)
from rewards.training.data import prompt_messages
from rewards.training.dpo import (
    POLICY_TRAINING_RULES,
    Prompt,
    Rule,
    check_hyperparameters,
    generate_greedy_ids,
    load_policy,
    lora_config,
    plain_metrics,
    prompt_ids,
    save_policy,
    score_responses,
    trained_policy,
    trainer_arguments,
)

# GRPO rather than RLOO: both take a plain Python reward function in TRL 1.16 and run on a CPU, and GRPO is the
# one TRL maintains first (RLOO shares its generation code). Every key except the recipe's own (below) is a TRL
# GRPOConfig field. The values keep a CPU run small: 4 completions per prompt of at most 48 tokens, one prompt
# per optimizer step, and a KL term (beta > 0) so the policy stays near the base model and TRL logs the KL.
RLHF_DEFAULTS: dict[str, Any] = {
    "beta": 0.04,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "epsilon": 0.2,
    "num_iterations": 1,
    "num_generations": 4,
    "max_completion_length": 48,
    "temperature": 1.0,
    "top_p": 1.0,
    "mask_truncated_completions": False,
    "learning_rate": 3e-6,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_steps": DEFAULT_SAVE_STEPS,
    "seed": 42,
    # Recipe keys, not GRPOConfig fields: LoRA, the held-out prompts scored before and after, the reward batch.
    "lora_r": 0,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "heldout_prompts": 8,
    "reward_batch_size": 16,
}

RECIPE_KEYS = frozenset({"lora_r", "lora_alpha", "lora_dropout", "heldout_prompts", "reward_batch_size"})
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")

RLHF_RULES: dict[str, Rule] = {
    **POLICY_TRAINING_RULES,
    "beta": Rule("float", low=0, high=100.0),
    "loss_type": Rule("choice", choices=GRPO_LOSS_TYPES),
    "scale_rewards": Rule("choice", choices=("group", "batch", "none")),
    "epsilon": Rule("float", low=0, low_open=True, high=1.0),
    "num_iterations": Rule("int", low=1, high=16),
    "num_generations": Rule("int", low=2, high=64),
    "max_completion_length": Rule("int", low=1, high=4096),
    "temperature": Rule("float", low=0, low_open=True, high=10.0),
    "top_p": Rule("float", low=0, low_open=True, high=1.0),
    "mask_truncated_completions": Rule("bool"),
    "heldout_prompts": Rule("int", low=0, high=1000),
    "reward_batch_size": Rule("int", low=1, high=1024),
}


def validate_rlhf_hyperparameters(hp: dict) -> dict:
    """The GRPO hyperparameters to train with: RLHF_DEFAULTS merged with `hp`, checked; HyperparameterError names
    the first bad field."""
    merged = check_hyperparameters(hp, defaults=RLHF_DEFAULTS, rules=RLHF_RULES)
    if merged["max_steps"] == 0:
        raise HyperparameterError("max_steps", "must be -1 (train num_train_epochs) or a positive number of steps.")
    merged["save_steps"] = check_save_steps(merged["save_steps"])
    # TRL samples whole groups: every generation batch holds num_generations completions of each of its prompts.
    generation_batch = merged["per_device_train_batch_size"] * merged["gradient_accumulation_steps"]
    if generation_batch % merged["num_generations"]:
        raise HyperparameterError(
            "num_generations",
            f"must divide per_device_train_batch_size x gradient_accumulation_steps ({generation_batch}), since "
            "each batch holds whole groups of completions of one prompt.",
        )
    return merged


def rlhf_lengths_fit(hp: dict[str, Any], *, positions: int) -> None:
    """Refuse a max_completion_length that does not fit the policy's `positions` with at least one prompt token
    before it. GRPO generates max_completion_length tokens after each prompt: a GPT-2-style policy (learned
    absolute positions) fails with an index error past its positions, and a rotary one (Llama, SmolLM2) would be
    trained on text longer than it was built for; both are refused alike. Prompts that leave too little room are
    shortened in the worker (see fit_prompt)."""
    if hp["max_completion_length"] >= positions:
        raise HyperparameterError("max_completion_length", f"must be below the {positions} positions of the base "
                                                           "model (a completion follows at least one prompt token).")


def _cut_from_left(text: str, *, fits: Any) -> str:
    """The longest end of `text` for which `fits(end)` holds (token counts fall as the start moves right, so a
    binary search on the start finds it), or "" when no end fits."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if fits(text[middle:]):
            high = middle
        else:
            low = middle + 1
    # Token counts are not strictly monotone in the cut (a word split differently): step on until it fits.
    while low < len(text) and not fits(text[low:]):
        low += 1
    return text[low:]


def fit_prompt(tokenizer: Any, prompt: Prompt, *, room: int) -> tuple[Prompt, bool]:
    """The prompt shortened until its tokens (as TRL builds them: chat template with the generation prompt, or the
    tokenizer's own call) are at most `room`, and whether it was. A conversation loses its oldest turns first (a
    leading system message stays), then the start of its last turn, then its system message; a text loses its
    start. The end of the prompt, which the completion answers, always survives."""

    def fits(candidate: Prompt) -> bool:
        return len(prompt_ids(tokenizer, candidate)) <= room

    if fits(prompt):
        return prompt, False
    if isinstance(prompt, str):
        cut = _cut_from_left(prompt, fits=fits)
        if not cut:
            raise HyperparameterError("max_completion_length", f"leaves {room} positions for the prompt, too few "
                                                               "for any of its text.")
        return cut, True
    system = prompt[:1] if prompt and prompt[0].get("role") == "system" else []
    turns = list(prompt[len(system):])
    while len(turns) > 1 and not fits([*system, *turns]):
        turns = turns[1:]
        # A dialogue opens with the user, so an assistant turn left first goes too.
        while len(turns) > 1 and turns[0].get("role") == "assistant":
            turns = turns[1:]
    if fits([*system, *turns]):
        return [*system, *turns], True
    last = turns[-1]
    for head in (system, []):
        content = _cut_from_left(str(last.get("content") or ""),
                                 fits=lambda text, head=head: fits([*head, {**last, "content": text}]))
        if content:
            return [*head, {**last, "content": content}], True
    raise HyperparameterError("max_completion_length", f"leaves {room} positions for the prompt, fewer than the chat "
                                                       "template alone takes.")


def completion_text(completion: str | list[dict]) -> str:
    """A GRPO completion as text: conversational completions arrive as a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def reward_function(scorer: Any, *, batch_size: int) -> Any:
    """The GRPO reward function: the reward model's score of each (prompt, completion), in batches."""

    def reward_model(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        sequences = [
            scorer.encode(prompt, completion_text(completion)).input_ids
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        return scorer.score_ids(sequences, batch_size=batch_size)

    return reward_model


def heldout_count(prompts: int, *, heldout: int) -> int:
    """How many of `prompts` prompts split_prompts holds out: up to `heldout`, never more than half."""
    return min(heldout, prompts // 2)


def split_prompts(prompts: Sequence[Prompt], *, heldout: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): up to `heldout` prompts, never more than half, are set aside at random (seeded)."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    count = heldout_count(len(prompts), heldout=heldout)
    held = set(order[:count])
    train = [prompt for index, prompt in enumerate(prompts) if index not in held]
    return train, [prompts[index] for index in sorted(held)]


def completion_logps(model: Any, generated: Sequence[tuple[list[int], list[int]]]) -> list[Any]:
    """For each (prompt ids, completion ids), the model's next-token log-distributions at the completion tokens."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    result = []
    with torch.no_grad():
        for prompt_ids, completion_ids in generated:
            ids = torch.tensor([prompt_ids + completion_ids], device=device)
            # Position t predicts token t + 1, so the completion is predicted from the last prompt position on.
            window = slice(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
            result.append(F.log_softmax(model(input_ids=ids).logits[0, window].float(), dim=-1))
    return result


def mean_kl(policy_logps: Sequence[Any], base_logps: Sequence[Any]) -> float:
    """Mean per-token KL(policy || base) over all positions, from the full next-token distributions."""
    total = 0.0
    tokens = 0
    for policy_lp, base_lp in zip(policy_logps, base_logps, strict=True):
        total += (policy_lp.exp() * (policy_lp - base_lp)).sum().item()
        tokens += policy_lp.shape[0]
    return total / tokens if tokens else 0.0


def train_rlhf(
    *,
    base_model: str,
    prompts: Sequence[str | list[dict]],
    reward_model_path: str | Path,
    output_dir: Path,
    hyperparameters: dict,
    callbacks: Sequence = (),
    metadata: dict | None = None,
    checkpoint_dir: Path | None = None,
    resume_from_checkpoint: Path | None = None,
) -> TrainingResult:
    """Train `base_model` with TRL's GRPOTrainer on `prompts`, rewarded by the reward model at
    `reward_model_path`, and save the policy to `output_dir`/model. With `checkpoint_dir`, the latest checkpoint
    (every `save_steps`) is kept there, and training continues from `resume_from_checkpoint` when given.

    A seeded random set of up to `heldout_prompts` prompts is kept out of training. On it the base and the trained
    policy each answer greedily, and the reward model's mean score of those answers is reported as reward_before
    and reward_after, with kl_to_base, the mean per-token KL of the trained policy from the base on its own answers.
    """
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer

    from rewards.scoring import RewardScorer

    hp = validate_rlhf_hyperparameters(hyperparameters)
    if not prompts:
        raise ValueError("RLHF needs at least one prompt.")
    conversational = any(isinstance(prompt, list) for prompt in prompts)
    normalized: list[Prompt] = [prompt_messages(p) if conversational else p for p in prompts]
    for index, prompt in enumerate(normalized):
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError(f"Prompt {index} is empty.")
    train_prompts, heldout = split_prompts(normalized, heldout=hp["heldout_prompts"], seed=hp["seed"])

    output_dir = Path(output_dir)
    artifact = output_dir / "model"
    device = pick_device()
    torch.manual_seed(hp["seed"])
    scorer = RewardScorer.load(reward_model_path, device=device)
    model, tokenizer = load_policy(base_model, device)
    if conversational and not tokenizer.chat_template:
        raise ValueError("The base model's tokenizer has no chat template, so conversational prompts cannot be used.")
    shortened_prompts = 0
    positions = model_positions(model)
    if positions is not None:
        # Checked at submission from the config; again here on the model as loaded (the folder may have changed).
        rlhf_lengths_fit(hp, positions=positions)
        # TRL does not cut GRPO prompts: each one is shortened until its completion fits the positions too.
        room = positions - hp["max_completion_length"]
        fitted_train = [fit_prompt(tokenizer, prompt, room=room) for prompt in train_prompts]
        fitted_heldout = [fit_prompt(tokenizer, prompt, room=room) for prompt in heldout]
        train_prompts = [prompt for prompt, _ in fitted_train]
        heldout = [prompt for prompt, _ in fitted_heldout]
        shortened_prompts = sum(cut for _, cut in [*fitted_train, *fitted_heldout])

    max_new = hp["max_completion_length"]
    base_generated = generate_greedy_ids(model, tokenizer, heldout, max_new_tokens=max_new)
    base_answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids in base_generated]

    args = GRPOConfig(**trainer_arguments(hp, output_dir=output_dir, device=device, recipe_keys=RECIPE_KEYS,
                                          checkpoint_dir=checkpoint_dir))
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_function(scorer, batch_size=hp["reward_batch_size"])],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in train_prompts]),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=lora_config(hp),
    )
    output = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
    raise_if_cancelled(callbacks)
    history = [dict(entry) for entry in trainer.state.log_history]
    metrics: dict[str, Any] = {
        "train_loss": output.training_loss,
        "train_runtime": output.metrics.get("train_runtime"),
        "train_reward": _mean_logged(history, "reward"),
        "train_kl": _mean_logged(history, "kl"),
    }

    policy = trained_policy(trainer)
    if heldout:
        trained_generated = generate_greedy_ids(policy, tokenizer, heldout, max_new_tokens=max_new)
        trained_answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids in trained_generated]
        # Scored in one call, which scores a repeated sequence once: an answer training left unchanged gets exactly
        # its base score, not one that moved with the shape of another batch.
        scores = score_responses(scorer, [*heldout, *heldout], [*base_answers, *trained_answers])
        before, after = scores[:len(heldout)], scores[len(heldout):]
        metrics["reward_before"] = sum(before) / len(before)
        metrics["reward_after"] = sum(after) / len(after)
        metrics["reward_gain"] = metrics["reward_after"] - metrics["reward_before"]
        metrics["heldout_prompts"] = len(heldout)
        policy_lp = completion_logps(policy, trained_generated)
        if isinstance(policy, PeftModel):
            # Under LoRA the base model is the same network with the adapter switched off.
            with policy.disable_adapter():
                base_lp = completion_logps(policy, trained_generated)
        else:
            base, _ = load_policy(base_model, device)
            base_lp = completion_logps(base, trained_generated)
            del base
        metrics["kl_to_base"] = mean_kl(policy_lp, base_lp)
    metrics = plain_metrics(metrics)

    save_policy(
        policy,
        tokenizer,
        artifact,
        recipe="rlhf",
        base_model=base_model,
        hyperparameters={**hp, "algorithm": "grpo"},
        metadata=metadata,
        metrics=metrics,
    )
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    return TrainingResult(
        artifact=artifact,
        metrics=metrics,
        history=history,
        train_pairs=len(train_prompts),
        eval_pairs=len(heldout),
        extra={
            "algorithm": "grpo",
            "shortened_prompts": shortened_prompts,
            "device": device,
            "lora": bool(hp["lora_r"]),
            "conversational": conversational,
            "heldout_answers": [
                {"prompt": prompt, "base": base, "trained": trained}
                for prompt, base, trained in zip(heldout, base_answers, trained_answers, strict=True)
            ]
            if heldout
            else [],
        },
    )


def _mean_logged(history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in history if isinstance(entry.get(key), int | float)]
    return sum(values) / len(values) if values else None

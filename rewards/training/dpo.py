"""DPO recipe: validate hyperparameters, train a causal LM on preference pairs with TRL, judge it and save it."""
from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.training.common import (
    DEFAULT_SAVE_STEPS,
    HyperparameterError,
    TrainingResult,
    check_save_steps,
    checkpoint_arguments,
    model_positions,
    pick_device,
    raise_if_cancelled,
)
from rewards.training.data import PreferenceExample, prompt_key, prompt_messages

logger = logging.getLogger(__name__)

Prompt = str | list[dict]

# Every key except the recipe's own (below) is a TRL DPOConfig field and is passed through unchanged. The values
# suit SmolLM2-135M on a CPU: short sequences, small batches and a learning rate that moves a 135M model in a few
# hundred pairs without collapsing it.
DPO_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    "loss_type": "sigmoid",
    "label_smoothing": 0.0,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 512,
    "gradient_checkpointing": False,
    "precompute_ref_log_probs": False,
    "logging_steps": 1,
    "save_steps": DEFAULT_SAVE_STEPS,
    "seed": 42,
    # Recipe keys, not DPOConfig fields: LoRA (lora_r = 0 trains every weight) and the win-rate evaluation.
    "lora_r": 0,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "win_rate_prompts": 16,
    "max_new_tokens": 64,
}

RECIPE_KEYS = frozenset({"lora_r", "lora_alpha", "lora_dropout", "win_rate_prompts", "max_new_tokens"})

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
PREFLAB_FILE = "preflab.json"


@dataclass(frozen=True)
class Rule:
    """What one hyperparameter accepts: a kind ('int', 'float', 'bool', 'choice'), bounds and choices."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> Any:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise HyperparameterError(name, f"must be true or false, got {value!r}.")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise HyperparameterError(name, f"must be one of {', '.join(self.choices)}; got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HyperparameterError(name, f"must be a number, got {value!r}.")
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise HyperparameterError(name, f"must be a whole number, got {value!r}.")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise HyperparameterError(name, f"must be a finite number, got {value!r}.")
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise HyperparameterError(name, f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value!r}.")
        if self.high is not None and value > self.high:
            raise HyperparameterError(name, f"must be <= {self.high:g}, got {value!r}.")
        return value


def check_hyperparameters(hp: Any, *, defaults: dict[str, Any], rules: dict[str, Rule]) -> dict[str, Any]:
    """Defaults overlaid with `hp`, each value checked by its rule; an unknown name is an error, not ignored."""
    if hp is None:
        hp = {}
    if not isinstance(hp, dict):
        raise HyperparameterError("hyperparameters", f"must be an object of name -> value, got {type(hp).__name__}.")
    unknown = sorted(set(hp) - set(rules))
    if unknown:
        raise HyperparameterError(
            unknown[0], f"unknown hyperparameter; accepted names are {', '.join(sorted(rules))}."
        )
    merged = {**defaults, **hp}
    return {name: rules[name].check(name, value) for name, value in merged.items()}


# Rules of the trainer fields every policy recipe accepts; each recipe adds its own.
POLICY_TRAINING_RULES: dict[str, Rule] = {
    "learning_rate": Rule("float", low=0, low_open=True, high=1.0),
    "lr_scheduler_type": Rule("choice", choices=LR_SCHEDULERS),
    "warmup_steps": Rule("float", low=0, high=1_000_000),
    "weight_decay": Rule("float", low=0, high=1.0),
    "max_grad_norm": Rule("float", low=0, low_open=True, high=1e6),
    "num_train_epochs": Rule("float", low=0, low_open=True, high=100),
    # Bounded as the reward recipe bounds it: the run's step and total_steps columns are 32-bit integers.
    "max_steps": Rule("int", low=-1, high=1_000_000),
    "per_device_train_batch_size": Rule("int", low=1, high=256),
    "gradient_accumulation_steps": Rule("int", low=1, high=1024),
    "gradient_checkpointing": Rule("bool"),
    "logging_steps": Rule("int", low=1, high=1_000_000),
    # A fraction of the run's steps below 1, a whole number of steps from 1 (see check_save_steps).
    "save_steps": Rule("float", low=0, low_open=True, high=1_000_000),
    "seed": Rule("int", low=0, high=2**32 - 1),
    "lora_r": Rule("int", low=0, high=1024),
    "lora_alpha": Rule("float", low=0, low_open=True, high=4096),
    "lora_dropout": Rule("float", low=0, high=0.9),
}

DPO_RULES: dict[str, Rule] = {
    **POLICY_TRAINING_RULES,
    "beta": Rule("float", low=0, low_open=True, high=100.0),
    "loss_type": Rule("choice", choices=DPO_LOSS_TYPES),
    "label_smoothing": Rule("float", low=0, high=0.5),
    "per_device_eval_batch_size": Rule("int", low=1, high=256),
    "max_length": Rule("int", low=16, high=32768),
    "precompute_ref_log_probs": Rule("bool"),
    "win_rate_prompts": Rule("int", low=0, high=1000),
    "max_new_tokens": Rule("int", low=1, high=2048),
}


def validate_dpo_hyperparameters(hp: dict) -> dict:
    """The DPO hyperparameters to train with: DPO_DEFAULTS merged with `hp`, checked; HyperparameterError names the
    first bad field."""
    merged = check_hyperparameters(hp, defaults=DPO_DEFAULTS, rules=DPO_RULES)
    if merged["max_steps"] == 0:
        raise HyperparameterError("max_steps", "must be -1 (train num_train_epochs) or a positive number of steps.")
    merged["save_steps"] = check_save_steps(merged["save_steps"])
    if merged["loss_type"] == "exo_pair" and merged["label_smoothing"] == 0:
        raise HyperparameterError("label_smoothing", "must be > 0 for loss_type exo_pair (the EXO paper uses 1e-3).")
    if merged["loss_type"] == "robust" and merged["label_smoothing"] >= 0.5:
        raise HyperparameterError("label_smoothing", "must be < 0.5 for loss_type robust.")
    return merged


def dpo_lengths_fit(hp: dict[str, Any], *, positions: int) -> None:
    """Refuse lengths that do not fit the policy's `positions`: a DPO sequence (prompt and reply) is at most
    max_length tokens, and a win-rate answer of max_new_tokens needs at least one prompt token before it. A
    GPT-2-style policy (learned absolute positions) fails with an index error past its positions, and a rotary one
    (Llama, SmolLM2) is trained and judged on text it was never built for; both are refused alike."""
    if hp["max_length"] > positions:
        raise HyperparameterError("max_length", f"is larger than the {positions} positions of the base model.")
    if hp["win_rate_prompts"] and hp["max_new_tokens"] >= positions:
        raise HyperparameterError("max_new_tokens", f"must be below the {positions} positions of the base model "
                                                    "(a win-rate answer follows at least one prompt token).")


def trainer_precision(device: str) -> dict[str, Any]:
    """TrainingArguments precision flags: bf16 autocast on GPUs that support it, plain float32 on CPU."""
    import torch

    if device == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False}
    return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False}


def trainer_arguments(hp: dict[str, Any], *, output_dir: Path, device: str,
                      recipe_keys: frozenset[str] = RECIPE_KEYS, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Config arguments shared by the online and offline policy trainers: the TRL fields of `hp` (all but the
    recipe's own `recipe_keys`) plus what the recipe fixes itself (scratch folder, no reporting, checkpoints
    only into `checkpoint_dir` when given, precision)."""
    return {
        "output_dir": str(output_dir / "trainer"),
        **checkpoint_arguments(checkpoint_dir),
        "report_to": [],
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **trainer_precision(device),
        **{name: value for name, value in hp.items() if name not in recipe_keys},
    }


def load_policy(base_model: str, device: str) -> tuple[Any, Any]:
    """The causal LM (float32) and its tokenizer, padded on the left as batched generation and TRL need."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def lora_config(hp: dict[str, Any]) -> Any:
    """A peft LoraConfig on every linear layer but the LM head (TRL computes log-probs from lm_head.weight), or
    None when lora_r is 0."""
    if not hp["lora_r"]:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def is_conversational(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids a policy continues, built the way TRL builds them: the chat template with the generation prompt
    for messages, the tokenizer's own call (special tokens included) for a string."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise ValueError("The base model's tokenizer has no chat template, so conversational prompts cannot be used.")
    encoded = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def prompt_room(model: Any, *, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit before `max_new_tokens` generated ones within the model's positions (None: no
    limit known). Refuses a max_new_tokens that leaves no room at all."""
    positions = model_positions(model)
    if positions is None:
        return None
    if max_new_tokens >= positions:
        raise HyperparameterError("max_new_tokens", f"must be below the {positions} positions of the base model.")
    return positions - max_new_tokens


def generate_greedy_ids(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 8
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each prompt's greedy completion, generated in left-padded batches; the
    completion ends at the first end-of-sequence token (kept), so padding never counts as text. A prompt longer
    than the model's positions leave room for (see prompt_room) is cut from the left, keeping the end it is
    answered from: a GPT-2-style model fails with an index error past its positions."""
    import torch

    room = prompt_room(model, max_new_tokens=max_new_tokens) if prompts else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = set(_eos_ids(model, tokenizer))
    results: list[tuple[list[int], list[int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            if room is not None:
                encoded = [ids[-room:] if len(ids) > room else ids for ids in encoded]
            # Left padding whatever the tokenizer's own side (a folder's tokenizer usually pads on the right).
            batch = tokenizer.pad([{"input_ids": ids} for ids in encoded], padding=True, padding_side="left",
                                  return_tensors="pt")
            batch = batch.to(device)
            with torch.no_grad():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            for ids, row in zip(encoded, output[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
                completion: list[int] = []
                for token in row:
                    completion.append(token)
                    if token in eos_ids:
                        break
                results.append((ids, completion))
    finally:
        model.train(was_training)
    return results


def trained_policy(trainer: Any) -> Any:
    """The trainer's model as it is saved, for the metrics measured after training. Under bf16, accelerate runs
    the model's forward in bf16 autocast, and that forward stays on the model after training: answers generated
    and log-probabilities read through it would come from a bf16 model, not the float32 one that is saved and
    compared with the float32 base."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return [i for i in [*ids, tokenizer.eos_token_id] if i is not None]


def generate_greedy(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy completions of each prompt as text (special tokens dropped)."""
    generated = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(completion, skip_special_tokens=True).strip() for _, completion in generated]


def judge_win_rate(
    judge_path: str | Path, prompts: Sequence[Prompt], trained: Sequence[str], base: Sequence[str]
) -> dict[str, float]:
    """How often the reward model scores the trained answer above the base answer (a tie counts half)."""
    from rewards.scoring import RewardScorer

    scorer = RewardScorer.load(judge_path)
    # Both sides in one call, so an answer the training left unchanged is scored once and is an exact tie.
    count = len(prompts)
    scores = score_responses(scorer, [*prompts, *prompts], [*trained, *base])
    trained_scores, base_scores = scores[:count], scores[count:]
    wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(trained_scores, base_scores, strict=True))
    return {
        "win_rate_vs_base": wins / count,
        "judge_reward_trained": sum(trained_scores) / count,
        "judge_reward_base": sum(base_scores) / count,
    }


def score_responses(scorer: Any, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """The reward of each (prompt, response), encoded as the reward model was trained and scored in batches."""
    sequences = [scorer.encode(prompt, response).input_ids for prompt, response in zip(prompts, responses, strict=True)]
    return [float(score) for score in scorer.score_ids(sequences)]


def preference_rows(examples: Sequence[PreferenceExample], *, conversational: bool) -> list[dict[str, Any]]:
    """TRL preference rows: strings as they are, or messages (string prompts become one user turn) when any
    prompt of the run is a conversation, so one dataset never mixes the two formats."""
    rows = []
    for example in examples:
        if conversational:
            rows.append(
                {
                    "prompt": prompt_messages(example.prompt),
                    "chosen": [{"role": "assistant", "content": example.chosen}],
                    "rejected": [{"role": "assistant", "content": example.rejected}],
                }
            )
        else:
            rows.append({"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected})
    return rows


def fit_conversation(tokenizer: Any, example: PreferenceExample, max_length: int) -> tuple[PreferenceExample, bool]:
    """The pair with its oldest turns dropped (a leading system message stays) until the prompt and the longer
    response fit in max_length tokens, keeping the end of the dialogue that the two responses answer, and whether
    anything was dropped. TRL would otherwise cut the responses or drop the pair."""
    messages = prompt_messages(example.prompt)
    longer = max(example.chosen, example.rejected, key=len)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]

    def length(candidate: list[dict]) -> int:
        full = [*system, *candidate, {"role": "assistant", "content": longer}]
        return len(tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"])

    dropped = False
    while len(turns) > 1 and length(turns) > max_length:
        turns = turns[1:]
        # A dialogue opens with the user, so an assistant turn left first goes too.
        while len(turns) > 1 and turns[0]["role"] == "assistant":
            turns = turns[1:]
        dropped = True
    if not dropped:
        return example, False
    return PreferenceExample(prompt=[*system, *turns], chosen=example.chosen, rejected=example.rejected,
                             margin=example.margin), True


def held_out_prompts(examples: Sequence[PreferenceExample], limit: int) -> list[Prompt]:
    """Up to `limit` distinct prompts, in order of first appearance."""
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for example in examples:
        key = prompt_key(example.prompt)
        if key not in seen and len(prompts) < limit:
            seen.add(key)
            prompts.append(example.prompt)
    return prompts


def plain_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON can hold them: NaN and infinities become None, anything else not a number is left out."""
    plain: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            plain[key] = value
        elif isinstance(value, int):
            plain[key] = value
        elif isinstance(value, float):
            plain[key] = value if math.isfinite(value) else None
    return plain


def save_policy(
    model: Any,
    tokenizer: Any,
    artifact: Path,
    *,
    recipe: str,
    base_model: str,
    hyperparameters: dict[str, Any],
    metadata: dict | None,
    metrics: dict[str, Any],
) -> None:
    """A folder plain AutoModelForCausalLM and AutoTokenizer load: LoRA merged into the weights, plus preflab.json."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    artifact.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(artifact)
    tokenizer.save_pretrained(artifact)
    (artifact / PREFLAB_FILE).write_text(
        json.dumps(
            {
                "recipe": recipe,
                "base_model": str(base_model),
                "config": hyperparameters,
                "metadata": metadata or {},
                "metrics": metrics,
            },
            indent=2,
            default=str,
        )
    )


def train_dpo(
    *,
    base_model: str,
    train: Sequence[PreferenceExample],
    eval: Sequence[PreferenceExample],
    output_dir: Path,
    hyperparameters: dict,
    callbacks: Sequence = (),
    metadata: dict | None = None,
    judge_path: str | Path | None = None,
    checkpoint_dir: Path | None = None,
    resume_from_checkpoint: Path | None = None,
) -> TrainingResult:
    """Train `base_model` with TRL's DPOTrainer on `train` and save the policy to `output_dir`/model.

    With `checkpoint_dir`, the latest checkpoint (every `save_steps`) is kept there, and training continues from
    `resume_from_checkpoint` when given.

    The reference is the base model itself (a frozen copy made by TRL, or the adapter-disabled model under LoRA).
    Metrics: TRL's eval rewards (accuracies, margins, ...) on `eval`, and, on up to `win_rate_prompts` distinct
    eval prompts, how often the trained policy's greedy answer differs from the base policy's and, with a judge
    reward model, how often the judge prefers it.
    """
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    hp = validate_dpo_hyperparameters(hyperparameters)
    if not train:
        raise ValueError("DPO needs at least one training pair.")
    output_dir = Path(output_dir)
    artifact = output_dir / "model"
    device = pick_device()
    torch.manual_seed(hp["seed"])

    model, tokenizer = load_policy(base_model, device)
    positions = model_positions(model)
    if positions is not None:
        # Checked at submission from the config; again here on the model as loaded (the folder may have changed).
        dpo_lengths_fit(hp, positions=positions)
    conversational = any(is_conversational(example.prompt) for example in [*train, *eval])
    if conversational and not tokenizer.chat_template:
        raise ValueError("The base model's tokenizer has no chat template, so conversational prompts cannot be used.")

    turns_dropped = [False] * len(train)
    if conversational:
        fitted = [fit_conversation(tokenizer, example, hp["max_length"]) for example in train]
        train = [example for example, _ in fitted]
        turns_dropped = [changed for _, changed in fitted]
        eval = [fit_conversation(tokenizer, example, hp["max_length"])[0] for example in eval]
    train_rows = [
        {**row, "turns_dropped": dropped}
        for row, dropped in zip(preference_rows(train, conversational=conversational), turns_dropped, strict=True)
    ]

    judge_prompts = held_out_prompts(eval, hp["win_rate_prompts"])
    if conversational:
        judge_prompts = [prompt_messages(prompt) for prompt in judge_prompts]
    # The base answers come from the untouched weights, before the trainer wraps or updates them.
    base_answers = generate_greedy(model, tokenizer, judge_prompts, max_new_tokens=hp["max_new_tokens"])

    args = DPOConfig(**trainer_arguments(hp, output_dir=output_dir, device=device, checkpoint_dir=checkpoint_dir))
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(preference_rows(eval, conversational=conversational)) if eval else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=lora_config(hp),
    )
    train_pairs = len(trainer.train_dataset)
    eval_pairs = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    if train_pairs == 0:
        raise ValueError(
            f"Every training pair's prompt alone fills max_length={hp['max_length']} tokens; raise max_length."
        )
    shortened = count_shortened(trainer.train_dataset, hp["max_length"])

    output = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
    raise_if_cancelled(callbacks)
    metrics: dict[str, Any] = {"train_loss": output.training_loss, "train_runtime": output.metrics.get("train_runtime")}
    if trainer.eval_dataset is not None and eval_pairs:
        metrics.update(trainer.evaluate())

    policy = trained_policy(trainer)
    if judge_prompts:
        trained_answers = generate_greedy(policy, tokenizer, judge_prompts, max_new_tokens=hp["max_new_tokens"])
        changed = sum(a != b for a, b in zip(trained_answers, base_answers, strict=True))
        metrics["answers_changed_vs_base"] = changed / len(judge_prompts)
        if judge_path is not None:
            metrics.update(judge_win_rate(judge_path, judge_prompts, trained_answers, base_answers))
            metrics["judged_prompts"] = len(judge_prompts)
    metrics = plain_metrics(metrics)

    save_policy(
        policy,
        tokenizer,
        artifact,
        recipe="dpo",
        base_model=base_model,
        hyperparameters=hp,
        metadata=metadata,
        metrics=metrics,
    )
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    return TrainingResult(
        artifact=artifact,
        metrics=metrics,
        history=[dict(entry) for entry in trainer.state.log_history],
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        shortened_pairs=shortened,
        extra={
            "pairs_with_turns_dropped": sum(turns_dropped),
            "dropped_pairs": len(train) - train_pairs,
            "device": device,
            "lora": bool(hp["lora_r"]),
            "conversational": conversational,
        },
    )


def count_shortened(dataset: Any, max_length: int) -> int:
    """Pairs that lost text: their oldest turns were dropped, or the prompt plus the longer response still exceeds
    max_length, so the collator cuts the response's end off."""
    return sum(
        bool(row.get("turns_dropped"))
        or len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > max_length
        for row in dataset
    )

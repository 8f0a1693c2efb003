"""Reward-model training recipe: TRL RewardTrainer on pre-truncated pairs, optional LoRA, a self-contained artifact."""
from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rewards.training.common import (
    DEFAULT_SAVE_STEPS,
    EMBEDDED_BASE_MODELS,
    HyperparameterError,
    TrainingResult,
    check_save_steps,
    checkpoint_arguments,
    config_positions,
    pick_device,
    raise_if_cancelled,
)
from rewards.training.common import resolve_base_model as common_resolve_base_model
from rewards.training.data import EncodedText, PreferenceExample, RewardEncoder, RewardFormat

logger = logging.getLogger(__name__)

# Named as TRL's RewardConfig fields, with values for a small encoder on CPU. `bf16=None` means "bf16 on a GPU
# that supports it, float32 elsewhere" (TRL's own default would turn bf16 on for CPU too).
REWARD_DEFAULTS: dict[str, Any] = {
    "max_length": 256,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "logging_steps": 5,
    # Used when the run keeps checkpoints (a worker that dies resumes from the last one).
    "save_steps": DEFAULT_SAVE_STEPS,
    "seed": 42,
    "center_rewards_coefficient": None,
    "disable_dropout": True,
    "bf16": None,
    "fp16": False,
    "use_cpu": False,
    "optim": "adamw_torch",
    "eval_strategy": "no",
    "eval_steps": None,
}
# LoRA is off while lora_r is None; lora_alpha defaults to 2 * lora_r, target modules to PEFT's per-architecture
# defaults (query/value for BERT, q_proj/v_proj for Llama). The score head is always trained in full.
LORA_DEFAULTS: dict[str, Any] = {"lora_r": None, "lora_alpha": None, "lora_dropout": 0.05, "lora_target_modules": None}

# (kind, minimum, maximum, None allowed); minimum/maximum are inclusive, "gt0" means strictly positive.
_RULES: dict[str, tuple[str, Any, Any, bool]] = {
    "max_length": ("int", 16, 8192, False),
    "num_train_epochs": ("float", "gt0", 100, False),
    "max_steps": ("int", -1, 1_000_000, False),
    "learning_rate": ("float", "gt0", 1.0, False),
    "per_device_train_batch_size": ("int", 1, 1024, False),
    "per_device_eval_batch_size": ("int", 1, 1024, False),
    "gradient_accumulation_steps": ("int", 1, 1024, False),
    "gradient_checkpointing": ("bool", None, None, False),
    "warmup_steps": ("float", 0, 1_000_000, False),
    "weight_decay": ("float", 0, 1.0, False),
    "max_grad_norm": ("float", 0, 1e6, False),
    "adam_beta1": ("float", 0, 0.9999, False),
    "adam_beta2": ("float", 0, 0.99999, False),
    "adam_epsilon": ("float", "gt0", 1.0, False),
    "logging_steps": ("float", "gt0", 1_000_000, False),
    "save_steps": ("float", "gt0", 1_000_000, False),
    "seed": ("int", 0, 2**32 - 1, False),
    "data_seed": ("int", 0, 2**32 - 1, True),
    "center_rewards_coefficient": ("float", 0, 10.0, True),
    "disable_dropout": ("bool", None, None, False),
    "bf16": ("bool", None, None, True),
    "fp16": ("bool", None, None, False),
    "use_cpu": ("bool", None, None, False),
    "eval_steps": ("float", "gt0", 1_000_000, True),
    "dataloader_num_workers": ("int", 0, 64, False),
    "lora_r": ("int", 1, 512, True),
    "lora_alpha": ("float", "gt0", 4096, True),
    "lora_dropout": ("float", 0, 0.99, False),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler_type": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"),
    "optim": ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"),
    "eval_strategy": ("no", "steps", "epoch"),
}
_LORA_FIELDS = frozenset(LORA_DEFAULTS)
TUNABLE_FIELDS = frozenset(_RULES) | frozenset(_CHOICES) | {"lora_target_modules"}


def _check_value(name: str, value: Any) -> Any:
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise HyperparameterError(name, f"must be one of {', '.join(_CHOICES[name])}.")
        return value
    if name == "lora_target_modules":
        if value is None:
            return None
        if (not isinstance(value, list) or not value
                or not all(isinstance(item, str) and item.strip() for item in value)):
            raise HyperparameterError(name, "must be a non-empty list of module names, or null.")
        return value
    kind, low, high, nullable = _RULES[name]
    if value is None:
        if nullable:
            return None
        raise HyperparameterError(name, "must not be null.")
    if kind == "bool":
        if not isinstance(value, bool):
            raise HyperparameterError(name, "must be true or false.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HyperparameterError(name, f"must be {'an integer' if kind == 'int' else 'a number'}.")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise HyperparameterError(name, "must be an integer.")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise HyperparameterError(name, "must be a finite number.")
    if low == "gt0" and value <= 0:
        raise HyperparameterError(name, "must be greater than 0.")
    if low != "gt0" and value < low:
        raise HyperparameterError(name, f"must be at least {low}.")
    if value > high:
        raise HyperparameterError(name, f"must be at most {high}.")
    return value


def validate_reward_hyperparameters(hp: dict) -> dict:
    """The defaults merged with `hp`, every value checked; raises HyperparameterError naming the first bad field."""
    if hp is None:
        hp = {}
    if not isinstance(hp, dict):
        raise HyperparameterError("hyperparameters", "must be an object of name: value.")
    merged = {**REWARD_DEFAULTS, **LORA_DEFAULTS}
    for name in sorted(hp):
        if name not in TUNABLE_FIELDS:
            # Output, logging, saving and hub fields of RewardConfig are set by the recipe itself.
            raise HyperparameterError(
                name, f"is not a tunable reward-model hyperparameter; use one of {', '.join(sorted(TUNABLE_FIELDS))}."
            )
        merged[name] = _check_value(name, hp[name])
    if merged["max_steps"] == 0:
        raise HyperparameterError("max_steps", "must be -1 (train num_train_epochs) or at least 1.")
    merged["save_steps"] = check_save_steps(merged["save_steps"])
    if merged["bf16"] and merged["fp16"]:
        raise HyperparameterError("fp16", "cannot be combined with bf16.")
    if merged["lora_r"] is None:
        for name in ("lora_alpha", "lora_target_modules"):
            if merged[name] is not None:
                raise HyperparameterError(name, "needs lora_r (LoRA is off without it).")
    return merged


def resolve_base_model(base_model: str | Path | None) -> Path:
    """A local model folder: None or an embedded name ('minilm', 'smollm2'), or a path."""
    from rewards import embedded

    return common_resolve_base_model(base_model, default=embedded.minilm_path)


def max_length_check(*, base_model: str | None, max_length: int) -> None:
    """Refuse, before a run is queued, a max_length past the backbone's max_position_embeddings, read from the
    config.json of the default backbone or of a local folder (an embedded policy is built on first use, so it is
    left to the worker's exact check, which also knows RoBERTa's padding offset)."""
    from rewards import embedded

    name = "" if base_model is None else str(base_model).strip()
    # Blank is this recipe's default backbone; an embedded name maps to the function that finds its folder.
    finder = "minilm_path" if not name else EMBEDDED_BASE_MODELS.get(name.lower())
    if finder is None:
        folder = Path(name)
    elif finder != "minilm_path":
        return
    else:
        try:
            folder = Path(embedded.minilm_path())
        except FileNotFoundError:
            return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    positions = config_positions(config) if isinstance(config, dict) else None
    if positions is not None and max_length > positions:
        raise HyperparameterError("max_length", f"is larger than the {positions} positions of the base model.")


def reward_length_check(*, base_model: str | None, hyperparameters: dict[str, Any]) -> None:
    """max_length_check with the run's validated hyperparameters (the recipes' common submission check)."""
    max_length_check(base_model=base_model, max_length=hyperparameters.get("max_length", 0))


def _usable_positions(model: Any) -> int | None:
    """How many tokens the model can take at once: its position embeddings, less the offset of models that number
    positions from padding_idx + 1 (RoBERTa and its kin: 514 embeddings hold 512 tokens)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    offset = getattr(table, "padding_idx", None)
    return positions - (offset + 1) if isinstance(offset, int) and offset >= 0 else positions


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _encode(encoder: RewardEncoder, examples: Sequence[PreferenceExample]) -> tuple[dict, int, int]:
    chosen_ids: list[list[int]] = []
    rejected_ids: list[list[int]] = []
    shortened = response_cut = 0
    for example in examples:
        sides: tuple[EncodedText, EncodedText] = encoder.encode_pair(example)
        chosen_ids.append(sides[0].input_ids)
        rejected_ids.append(sides[1].input_ids)
        shortened += any(side.shortened for side in sides)
        response_cut += any(side.response_cut for side in sides)
    columns: dict[str, list] = {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if any(example.margin is not None for example in examples):
        columns["margin"] = [float(example.margin or 0.0) for example in examples]
    return columns, shortened, response_cut


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "preflab.json").write_text(json.dumps(_json_safe(manifest), indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")


def train_reward_model(*, base_model: str | None = None, train: Sequence[PreferenceExample],
                       eval: Sequence[PreferenceExample], output_dir: Path, hyperparameters: dict,
                       callbacks: Sequence = (), metadata: dict | None = None, checkpoint_dir: Path | None = None,
                       resume_from_checkpoint: Path | None = None) -> TrainingResult:
    """Trains a scalar reward model on preference pairs and saves a folder that plain transformers can load.

    Every pair is kept: texts longer than max_length are cut from the left of the prompt before TRL sees them
    (TRL itself would drop them). The artifact holds the (merged, when LoRA) model, the tokenizer and
    preflab.json with the format, the resolved hyperparameters, `metadata` and the held-out metrics.
    With `checkpoint_dir`, a checkpoint is kept there every `save_steps` (only the latest); training continues
    from `resume_from_checkpoint` (a checkpoint folder) when given. The artifact never holds checkpoints.
    """
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    hp = validate_reward_hyperparameters(hyperparameters)
    if not train:
        raise ValueError("There are no training pairs.")
    base_path = resolve_base_model(base_model)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty; a model is saved into an empty or new folder.")
    created_output = not output_dir.exists()

    bf16 = hp["bf16"]
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if bf16 is None:
        bf16 = not hp["use_cpu"] and not hp["fp16"] and bf16_gpu
    elif bf16 and not hp["use_cpu"] and not bf16_gpu:
        # TrainingArguments would refuse it too, with advice about use_cpu that names no field.
        raise HyperparameterError("bf16", "needs a GPU that supports bf16, and this worker has none; leave bf16 "
                                          "unset (bf16 is used wherever the GPU supports it) or set use_cpu.")
    lora = hp["lora_r"] is not None

    set_seed(hp["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32,
                                                                   local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {base_path} has neither a pad nor an EOS token.")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    positions = _usable_positions(model)
    if positions is not None and hp["max_length"] > positions:
        raise HyperparameterError("max_length", f"is larger than the {positions} positions of the base model.")

    fmt = RewardFormat.for_tokenizer(tokenizer, max_length=hp["max_length"])
    encoder = RewardEncoder(tokenizer, fmt)
    train_columns, train_shortened, train_response_cut = _encode(encoder, train)
    eval_columns, eval_shortened, eval_response_cut = _encode(encoder, eval)

    trl_fields = {k: v for k, v in hp.items() if k not in _LORA_FIELDS}
    trl_fields["bf16"] = bf16
    if trl_fields["eval_strategy"] != "no" and not eval:
        raise HyperparameterError("eval_strategy", "needs evaluation pairs.")
    peft_config = None
    if lora:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=hp["lora_r"],
                                 lora_alpha=hp["lora_alpha"] or 2 * hp["lora_r"], lora_dropout=hp["lora_dropout"],
                                 target_modules=hp["lora_target_modules"])

    try:
        with tempfile.TemporaryDirectory(prefix="preflab-reward-") as scratch:
            try:
                args = RewardConfig(**{"output_dir": scratch, **checkpoint_arguments(checkpoint_dir)},
                                    report_to=[], disable_tqdm=True, logging_strategy="steps", **trl_fields)
            except ValueError as exc:
                raise HyperparameterError("hyperparameters", str(exc))
            try:
                trainer = RewardTrainer(
                    model=model, args=args, train_dataset=Dataset.from_dict(train_columns),
                    eval_dataset=Dataset.from_dict(eval_columns) if eval else None, processing_class=tokenizer,
                    callbacks=list(callbacks) or None, peft_config=peft_config,
                )
            except ValueError as exc:
                if lora and "target modules" in str(exc).lower():
                    raise HyperparameterError("lora_target_modules", str(exc))
                raise
            if len(trainer.train_dataset) != len(train):
                raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(train)} training pairs.")
            train_output = trainer.train(
                resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
            raise_if_cancelled(callbacks)
            history = list(trainer.state.log_history)
            device = trainer.args.device.type
            trained = trainer.accelerator.unwrap_model(trainer.model)
            if lora:
                trained = trained.merge_and_unload()
            output_dir.mkdir(parents=True, exist_ok=True)
            trained.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            del trainer, trained, model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        manifest = {
            "kind": "reward_model",
            "base_model": str(base_model or "minilm"),
            "base_model_path": str(base_path),
            "format": fmt.as_dict(),
            "config": {**hp, "bf16": bf16},
            "metadata": metadata or {},
            "train_pairs": len(train),
            "eval_pairs": len(eval),
            "shortened_pairs": train_shortened + eval_shortened,
            "lora": ({"r": hp["lora_r"], "alpha": hp["lora_alpha"] or 2 * hp["lora_r"], "merged": True}
                     if lora else None),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__},
            "created_at": datetime.now(UTC).isoformat(),
        }
        _write_manifest(output_dir, manifest)

        from rewards.scoring import RewardScorer, evaluate_preferences

        scorer = RewardScorer.load(output_dir, device="cpu" if hp["use_cpu"] else pick_device())
        evaluation = evaluate_preferences(scorer, eval, batch_size=hp["per_device_eval_batch_size"])
        del scorer
        metrics = {
            "eval_accuracy": evaluation["accuracy"],
            "eval_mean_margin": evaluation["mean_margin"],
            "eval_pairs": evaluation["pairs"],
            "eval_by_length": evaluation["by_length"],
            "eval_seconds": evaluation["seconds"],
            "train_loss": train_output.training_loss,
            "train_runtime": train_output.metrics.get("train_runtime"),
            "train_steps": train_output.global_step,
        }
        manifest["metrics"] = metrics
        _write_manifest(output_dir, manifest)
    except BaseException:
        # The folder was new or empty, so everything in it now is a partial artifact of this run.
        if created_output:
            shutil.rmtree(output_dir, ignore_errors=True)
        elif output_dir.exists():
            for child in output_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise

    return TrainingResult(
        artifact=output_dir, metrics=_json_safe(metrics), history=_json_safe(history), train_pairs=len(train),
        eval_pairs=len(eval), shortened_pairs=train_shortened + eval_shortened,
        extra={"train_shortened_pairs": train_shortened, "eval_shortened_pairs": eval_shortened,
               "response_cut_pairs": train_response_cut + eval_response_cut, "dropped_pairs": 0,
               "device": device, "bf16": bf16, "lora": lora, "format": fmt.as_dict(),
               "base_model_path": str(base_path)},
    )

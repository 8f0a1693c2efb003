"""Types shared by the training recipes: the hyperparameter error, the training result, device choice and
the checkpoints a run resumes from."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint-"
# Trainer._save_checkpoint writes the trainer state after the weights, optimizer, scheduler and RNG states, so
# a checkpoint folder without it was cut off while being written.
CHECKPOINT_COMPLETE_FILE = "trainer_state.json"
# Checkpoints every 10% of the run's steps: a lost worker costs at most a tenth of the run.
DEFAULT_SAVE_STEPS = 0.1


class HyperparameterError(ValueError):
    """A hyperparameter that cannot be used; `field` names it so an API can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TrainingCancelled(Exception):
    """Training stopped on the run's cancel request; the recipe saved and evaluated nothing after it."""


def raise_if_cancelled(callbacks: Any) -> None:
    """Raise TrainingCancelled when a callback stopped training on a cancel request (it says so with a true
    `cancelled` attribute, as rewards.progress.RunProgressCallback does): the recipe then skips the evaluation,
    generation and saving that follow training, which a cancelled run would throw away."""
    if any(getattr(callback, "cancelled", False) for callback in callbacks or ()):
        raise TrainingCancelled("training stopped on a cancel request")


@dataclass
class TrainingResult:
    artifact: Path
    metrics: dict
    history: list[dict]
    train_pairs: int
    eval_pairs: int
    shortened_pairs: int = 0
    extra: dict = field(default_factory=dict)


# Names of the models shipped with Preflab (see rewards.embedded), by the rewards.embedded function that gives
# their folder.
EMBEDDED_BASE_MODELS = {"minilm": "minilm_path", "all-minilm-l6-v2": "minilm_path",
                        "smollm2": "smollm2_path", "smollm2-135m-instruct": "smollm2_path"}


# The model ids of the embedded models, by the rewards.embedded function that gives their folder.
EMBEDDED_MODEL_IDS = {"minilm_path": "sentence-transformers/all-MiniLM-L6-v2",
                      "smollm2_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _base_name(base_model: str | Path | None) -> str:
    """A base model as a run stores it: blank (the recipe's default), an embedded model's name, or a folder."""
    return "" if base_model is None else str(base_model).strip()


def base_model_label(base_model: str | Path | None, *, default: str) -> str:
    """How the registry names a run's base model: an embedded model (blank is the recipe's `default`, an embedded
    name) by its model id, which means the same on every machine, unlike the folder it was unpacked to; any other
    base model by the folder as given."""
    name = _base_name(base_model) or default
    function = EMBEDDED_BASE_MODELS.get(name.lower())
    return f"{EMBEDDED_MODEL_IDS[function]} (embedded)" if function else name


def base_model_check(base_model: str | Path | None) -> None:
    """Raise HyperparameterError (field `base_model`) unless it is blank (the recipe's default), an embedded
    model's name or a local folder with a config.json. Nothing is loaded or built, so a submission can check
    it; models are never downloaded, so a hub id is refused here rather than failing in the worker."""
    name = _base_name(base_model)
    if not name or name.lower() in EMBEDDED_BASE_MODELS:
        return
    if not (Path(name) / "config.json").is_file():
        raise HyperparameterError(
            "base_model", f"{name} is neither an embedded model ({', '.join(sorted(EMBEDDED_BASE_MODELS))}) nor a "
                          "local model folder with a config.json; models are not downloaded.")


# How many positions the embedded models hold (their configs' max_position_embeddings), for a submission made before
# the embedded policy was first built from its GGUF (tests check these against the packaged models).
EMBEDDED_POSITIONS = {"minilm_path": 512, "smollm2_path": 8192}
# The names configs give a model's positions: transformers maps max_position_embeddings to n_positions for GPT-2
# and its kin (learned absolute positions), so a raw config.json may carry either.
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def config_positions(config: dict[str, Any]) -> int | None:
    """The positions a raw config.json gives its model (a multimodal model's are in its text_config), or None."""
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        for key in POSITION_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_positions(model: Any) -> int | None:
    """How many tokens a loaded model takes at once (its config's max_position_embeddings, which transformers maps
    to n_positions for GPT-2-style configs), or None when its config does not say."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def base_model_positions(base_model: str | Path | None, *, default: str) -> int | None:
    """The positions of a base model as a submission names it (blank is the recipe's `default`, an embedded name),
    read from its config.json without loading anything; None when that cannot be told (no readable config), in
    which case the worker's check on the loaded model is the only one."""
    from rewards import embedded

    name = _base_name(base_model) or default
    finder = EMBEDDED_BASE_MODELS.get(name.lower())
    if finder == "smollm2_path":
        # Built from the packaged GGUF on first use: read the built folder's config when it is there, and do not
        # build it (minutes) just to answer a submission.
        folder = embedded.model_cache_dir() / embedded.SMOLLM2_DIR_NAME
        if not (folder / embedded._COMPLETE_MARKER).exists():
            return EMBEDDED_POSITIONS[finder]
    elif finder is not None:
        try:
            folder = Path(getattr(embedded, finder)())
        except FileNotFoundError:
            return EMBEDDED_POSITIONS[finder]
    else:
        folder = Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config_positions(config) if isinstance(config, dict) else None


def policy_length_check(lengths_fit: Callable[..., None], *, base_model: str | None,
                        hyperparameters: dict[str, Any]) -> None:
    """A policy recipe's `lengths_fit(hyperparameters, positions=...)` before a run is queued, with the positions read
    from the base model's config.json (the embedded SmolLM2 when blank); the worker checks again on the loaded
    model."""
    positions = base_model_positions(base_model, default="smollm2")
    if positions is not None:
        lengths_fit(hyperparameters, positions=positions)


# The architectures a config may name that generate text, and those that do not: an encoder, a bare model without
# its language-model head (BertModel, LlamaModel), a classifier. GPT-2's GPT2LMHeadModel ends in "Model" too.
GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
NOT_GENERATIVE = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                  "ForQuestionAnswering", "ForPreTraining", "ForMultipleChoice", "ForNextSentencePrediction")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def policy_model_problem(base_model: str | Path | None, *, conversational: bool) -> str | None:
    """Why a base model cannot be a DPO or RLHF policy, told from its config.json and tokenizer_config.json
    before a run is queued (blank is the embedded SmolLM2), or None. The worker would otherwise fail once it has
    loaded the model: an encoder has no language-model head, and conversational prompts need a chat template."""
    name = _base_name(base_model) or "smollm2"
    finder = EMBEDDED_BASE_MODELS.get(name.lower())
    if finder == "minilm_path":
        return (f"The base model {name} is a sentence encoder, the embedded reward-model backbone; a policy must be "
                "a causal language model that generates text (smollm2, or a folder of one)")
    if finder is not None:
        return None
    folder = Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # checked when the worker loads it
    architectures = config.get("architectures") if isinstance(config, dict) else None
    names = [arch for arch in architectures if isinstance(arch, str)] if isinstance(architectures, list) else []
    if names and not any(arch.endswith(GENERATIVE) for arch in names) and all(
            arch.endswith(NOT_GENERATIVE) for arch in names):
        return (f"The base model {name} is a {names[0]}, which does not generate text; a policy must be a causal "
                "language model (a ...ForCausalLM)")
    if conversational and not _has_chat_template(folder):
        return (f"The tokenizer of {name} has no chat template, and this project's prompts are conversations; save "
                "a tokenizer with one into the folder")
    return None


def resolve_base_model(base_model: str | Path | None, *, default: Callable[[], Path]) -> Path:
    """The local folder of a base model that passes base_model_check: `default()` when blank, the embedded
    model's folder (built on first use) for its name, else the folder itself."""
    from rewards import embedded

    base_model_check(base_model)
    name = _base_name(base_model)
    if not name:
        return Path(default())
    if name.lower() in EMBEDDED_BASE_MODELS:
        return Path(getattr(embedded, EMBEDDED_BASE_MODELS[name.lower()])())
    return Path(name)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_save_steps(value: float) -> float | int:
    """TrainingArguments' save_steps: a fraction of the run's steps below 1, or a whole number of steps."""
    if value >= 1:
        if not float(value).is_integer():
            raise HyperparameterError("save_steps", "must be a fraction of the run below 1 (0.1 saves every 10% "
                                                    "of the steps) or a whole number of steps.")
        return int(value)
    return value


def checkpoint_arguments(checkpoint_dir: Path | None) -> dict[str, Any]:
    """Trainer arguments for periodic checkpoints (every `save_steps`, only the latest kept) in
    `checkpoint_dir`, or for none when it is None. The recipe's artifact is saved elsewhere."""
    if checkpoint_dir is None:
        return {"save_strategy": "no"}
    return {"output_dir": str(checkpoint_dir), "save_strategy": "steps", "save_total_limit": 1,
            "save_only_model": False}


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def checkpoints(folder: Path | None) -> list[Path]:
    """The complete checkpoint folders in `folder`, oldest step first."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = [path for path in Path(folder).iterdir()
             if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)
             and path.name[len(CHECKPOINT_PREFIX):].isdigit() and (path / CHECKPOINT_COMPLETE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The complete checkpoint of the highest step in `folder`, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None

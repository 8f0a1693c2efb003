"""Scoring responses with a trained reward model, and pairwise evaluation on held-out preferences."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.training.common import pick_device
from rewards.training.data import EncodedText, Messages, PreferenceExample, RewardEncoder, RewardFormat

MANIFEST_NAME = "preflab.json"
# Upper bounds of the prompt-length buckets (prompt tokens before truncation) used in evaluation reports.
LENGTH_BUCKETS = (64, 128, 256, 512)


def length_bucket(prompt_tokens: int) -> str:
    lower = 0
    for upper in LENGTH_BUCKETS:
        if prompt_tokens < upper:
            return f"{lower}-{upper - 1}"
        lower = upper
    return f"{lower}+"


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.exists():
        return {}
    return json.loads(manifest.read_text(encoding="utf-8"))


class RewardScorer:
    """A sequence-classification reward model loaded once; `score` may be called from several threads.

    The text format (template and max_length) comes from the folder's preflab.json, so responses are scored
    exactly as they were trained. A folder without one (any transformers reward model) gets the tokenizer's chat
    template when it has one and the model's maximum length.
    """

    def __init__(self, model: Any, tokenizer: Any, fmt: RewardFormat, *, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = fmt
        self.device = device
        self.encoder = RewardEncoder(tokenizer, fmt)
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        # Fast tokenizers may not be entered from two threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> RewardScorer:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json).")
        device = device or pick_device()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ValueError(f"{path} has num_labels={model.config.num_labels}; a reward model has 1.")
        if model.config.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            model.config.pad_token_id = pad
        model.to(device).eval()
        manifest_format = read_manifest(path).get("format")
        if manifest_format:
            fmt = RewardFormat.from_dict(manifest_format)
        else:
            limit = min(getattr(model.config, "max_position_embeddings", None) or 512, 4096)
            fmt = RewardFormat.for_tokenizer(tokenizer, max_length=limit)
        return cls(model, tokenizer, fmt, device=device)

    def encode(self, prompt: str | Messages, response: str) -> EncodedText:
        with self._tokenizer_lock:
            return self.encoder.encode(prompt, response)

    def score_ids(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[float]:
        """Rewards of already encoded sequences, right-padded per batch as in training."""
        import torch

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1.")
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
                    attention_mask[row, :len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def score(self, prompt: str | Messages, candidates: Sequence[str], *, batch_size: int = 16) -> list[float]:
        """One reward per candidate response to `prompt`, in the order given."""
        encoded = [self.encode(prompt, candidate).input_ids for candidate in candidates]
        return self.score_ids(encoded, batch_size=batch_size)


def evaluate_preferences(scorer: RewardScorer, examples: Sequence[PreferenceExample], *,
                         batch_size: int = 16) -> dict:
    """Pairwise accuracy (chosen scored above rejected), mean margin and accuracy by prompt-length bucket."""
    started = time.perf_counter()
    sequences: list[list[int]] = []
    buckets: list[str] = []
    shortened = 0
    for example in examples:
        chosen, rejected = (scorer.encode(example.prompt, example.chosen),
                            scorer.encode(example.prompt, example.rejected))
        sequences += [chosen.input_ids, rejected.input_ids]
        buckets.append(length_bucket(chosen.prompt_tokens))
        shortened += chosen.shortened or rejected.shortened
    # Scoring in length order keeps padding small; the scores are put back in place afterwards.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    sorted_scores = scorer.score_ids([sequences[i] for i in order], batch_size=batch_size)
    scores = [0.0] * len(sequences)
    for position, index in enumerate(order):
        scores[index] = sorted_scores[position]

    margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(examples))]
    by_length: dict[str, dict] = {}
    for bucket, margin in zip(buckets, margins, strict=True):
        entry = by_length.setdefault(bucket, {"pairs": 0, "correct": 0})
        entry["pairs"] += 1
        entry["correct"] += margin > 0
    ordered = sorted(by_length.items(), key=lambda item: int(item[0].split("-")[0].rstrip("+")))
    return {
        "pairs": len(examples),
        "accuracy": sum(m > 0 for m in margins) / len(margins) if margins else None,
        "mean_margin": sum(margins) / len(margins) if margins else None,
        "shortened_pairs": shortened,
        "by_length": {b: {"pairs": e["pairs"], "accuracy": e["correct"] / e["pairs"]} for b, e in ordered},
        "seconds": round(time.perf_counter() - started, 3),
    }

"""Scoring responses with a trained reward model, and pairwise evaluation on held-out preferences."""
from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.training.common import pick_device
from rewards.training.data import EncodedText, Messages, PreferenceExample, RewardEncoder, RewardFormat

logger = logging.getLogger(__name__)

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


# The fixed cost of one forward pass, in padded tokens' worth of work. On a CPU a pass costs little beyond its
# tokens (MiniLM on 2 cores: 24 to 70 tokens' worth across runs of bench/forward_plan.py), so batches stay tight
# around similar lengths. On a GPU the tokens are cheap and the launches are not, so fewer, wider batches win;
# 1024 there is an estimate, not a measurement.
FORWARD_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 1024}


def forward_overhead_tokens(device: str) -> int:
    return FORWARD_OVERHEAD_TOKENS.get(str(device).split(":")[0], FORWARD_OVERHEAD_TOKENS["cuda"])


def forward_batches_plan(lengths: Sequence[int], *, max_batch: int, overhead_tokens: int) -> list[tuple[int, int]]:
    """Splits sequences sorted by length (ascending) into forward batches [(start, end), ...] of at most
    `max_batch`, with the least total cost: each batch costs its padded size (count x longest) plus
    `overhead_tokens`. A fixed batch size pads a short reply to the longest one beside it; on real replies,
    whose lengths vary widely, fixed batches of 16 added three quarters again to a 16-candidate request's tokens.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1.")
    count = len(lengths)
    if any(lengths[i] > lengths[i + 1] for i in range(count - 1)):
        raise ValueError("lengths must be sorted in ascending order.")
    best = [0] * (count + 1)
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = lengths[end - 1]
        best[end], cut[end] = min((best[start] + overhead_tokens + (end - start) * width, start)
                                  for start in range(max(0, end - max_batch), end))
    plan = []
    end = count
    while end > 0:
        plan.append((cut[end], end))
        end = cut[end]
    return plan[::-1]


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
        self.forward_overhead_tokens = forward_overhead_tokens(device)

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

    def score_ids(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                  overhead_tokens: int | None = None) -> list[float]:
        """Rewards of already encoded sequences, in the order given, right-padded per batch as in training.

        The sequences are scored in length order, in the forward batches `forward_batches_plan` picks (at most
        `batch_size` each), so a batch pads only to the longest of neighbours of similar length.
        `overhead_tokens` overrides the device's cost of a forward pass (a huge value gives the fewest batches).

        Float32 logits move in their last bits with the shape of the batch a sequence lands in (its batchmates,
        its row, the padded width), so the batches are a function of the set of distinct sequences alone: a
        sequence given more than once is scored once (two copies in different batches would compare as unequal),
        and sequences of one length are ordered by their ids, not by where they were given. The same sequences in
        any order, with any repeats, get the same scores bit for bit (for one `batch_size`, overhead and device).
        """
        import torch

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1.")
        if not sequences:
            return []
        slot: dict[tuple[int, ...], int] = {}
        unique: list[Sequence[int]] = []
        for ids in sequences:
            key = tuple(ids)
            if key not in slot:
                slot[key] = len(unique)
                unique.append(ids)
        if len(unique) < len(sequences):
            scores = self.score_ids(unique, batch_size=batch_size, overhead_tokens=overhead_tokens)
            return [scores[slot[tuple(ids)]] for ids in sequences]
        # Ids break ties between equal lengths: the distinct sequences' order decides the batches, never the caller's.
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), tuple(sequences[i])))
        lengths = [len(sequences[i]) for i in order]
        if overhead_tokens is None:
            overhead_tokens = self.forward_overhead_tokens
        scores = [0.0] * len(sequences)
        with torch.inference_mode():
            for start, end in forward_batches_plan(lengths, max_batch=batch_size, overhead_tokens=overhead_tokens):
                batch = [sequences[i] for i in order[start:end]]
                width = lengths[end - 1]
                input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
                    attention_mask[row, :len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits
                for index, score in zip(order[start:end], logits[:, 0].float().cpu().tolist(), strict=True):
                    scores[index] = score
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
    scores = scorer.score_ids(sequences, batch_size=batch_size)
    margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(examples))]
    # A diverged model's NaN scores decide nothing: its figures are None rather than a made-up 0.
    diverged = any(math.isnan(m) for m in margins)
    by_length: dict[str, dict] = {}
    for bucket, margin in zip(buckets, margins, strict=True):
        entry = by_length.setdefault(bucket, {"pairs": 0, "correct": 0.0})
        entry["pairs"] += 1
        entry["correct"] += _pair_credit(margin)
    ordered = sorted(by_length.items(), key=lambda item: int(item[0].split("-")[0].rstrip("+")))
    return {
        "pairs": len(examples),
        "accuracy": sum(map(_pair_credit, margins)) / len(margins) if margins and not diverged else None,
        "mean_margin": sum(margins) / len(margins) if margins and not diverged else None,
        "shortened_pairs": shortened,
        "by_length": {b: {"pairs": e["pairs"], "accuracy": None if diverged else e["correct"] / e["pairs"]}
                      for b, e in ordered},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _pair_credit(margin: float) -> float:
    """A pair is right when chosen scores above rejected; an exact tie (the model saw the same text on both sides,
    both replies cut to the same start) is a coin flip and counts half."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


# --- best-of-N reranking --------------------------------------------------------------------------------

# Scores are rounded before ranking and caching, to digits a reward model's ranking can mean. Rounding alone does
# not make an answer reproducible: float32 logits move in their last bits with the shape of the forward batch a
# candidate lands in, and a score that close to a rounding boundary rounds either way. What does is that batches
# depend on nothing but the distinct texts scored together (RewardScorer.score_ids), that the first answer is
# cached, and, with RERANK_BATCH_ACROSS_REQUESTS off, that a request is scored beside its own candidates only
# (rewards.serving.MicroBatcher).
SCORE_DECIMALS = 5
# v2: the canonical prompt and constraints are keyed, top_k is not (the whole ranking is kept and cut on the way
# out), and a request's scores no longer depend on the order of its candidates.
RERANK_CACHE_PREFIX = "preflab:rerank:v2"
RERANK_PAIR_SOURCE = "rerank"
_sample_rng = random.Random()


def rerank_order(scores: Sequence[float], reasons: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Every candidate, best first: passing ones by score, then failing ones by score. Equal (rounded) scores keep
    the request's order, the lower index first: a candidate given twice scores the same both times, and the copy
    given first ranks first."""
    passing = sorted((i for i in range(len(scores)) if not reasons[i]), key=lambda i: (-scores[i], i))
    failing = sorted((i for i in range(len(scores)) if reasons[i]), key=lambda i: (-scores[i], i))
    return [{"index": index, "score": scores[index], "rank": rank, "passed": not reasons[index],
             "reasons": list(reasons[index])}
            for rank, index in enumerate(passing + failing, start=1)]


def _constraints_canonical(constraints: dict | None) -> dict:
    """Validated constraints without the entries that check nothing: a null value, `json: false`, and `json: true`
    beside a `json_schema` (the schema parses the candidate as JSON anyway, with the same reason when it fails)."""
    canonical = {name: value for name, value in (constraints or {}).items() if value is not None}
    if canonical.get("json") is False or "json_schema" in canonical:
        canonical.pop("json", None)
    return canonical


def rerank_cache_key(*, reward_model: Any, prompt: str | Messages, candidates: Sequence[str],
                     constraints: dict | None) -> str:
    """The cache key of a request: the model version and a SHA-256 of the canonical JSON of what shapes its answer.

    That is the prompt as the model reads it (`prompt_key`: a string and the one user message it stands for are
    one prompt, and keys other than role and content are left out), the candidates in their order (the answer names
    them by index, and equal scores keep that order) and the constraints that check something. top_k is left out:
    the whole ranking is cached, and top_k cuts it. The version is named by its id and the moment it was
    registered: the cache (Redis, or var/cache) can outlive the database, and a version registered after a reset may
    get an id the cache already holds answers for."""
    import hashlib

    from rewards.training.data import prompt_key

    canonical = json.dumps({"prompt": prompt_key(prompt), "candidates": list(candidates),
                            "constraints": _constraints_canonical(constraints)},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    registered = reward_model.created_at.timestamp() if reward_model.created_at else ""
    return f"{RERANK_CACHE_PREFIX}:{reward_model.pk}:{registered}:{digest}"


def _top(body: dict[str, Any], top_k: int | None) -> dict[str, Any]:
    """The answer to a request with `top_k`: the cached whole ranking, cut."""
    return body if top_k is None else {**body, "results": body["results"][:top_k]}


def _rerank_setting(name: str, default: Any) -> Any:
    from django.conf import settings

    return settings.PREFLAB.get(name, default)


# Every text is hashed and tokenized as UTF-8, which has no encoding for a lone surrogate (a JSON "\ud800" escape).
_SURROGATE = re.compile("[\ud800-\udfff]")


def prompt_text_check(prompt: Any) -> None:
    """A 400 naming the first string of a request's prompt that holds a NUL character or a lone surrogate: the
    prompt may be stored as a labeling pair (PostgreSQL text holds no NUL)."""
    from labeling.services import text_storable_check

    text_storable_check(prompt, field="prompt")


def _rerank_validate(*, prompt: Any, candidates: Any, top_k: int | None) -> None:
    from labeling.errors import DomainError
    from rewards.training.data import prompt_messages

    if isinstance(prompt, str):
        if not prompt.strip():
            raise DomainError("The prompt is empty.", field="prompt")
    else:
        try:
            prompt_messages(prompt)
        except ValueError as exc:
            raise DomainError(str(exc), field="prompt") from exc
    prompt_text_check(prompt)
    limit = int(_rerank_setting("RERANK_MAX_CANDIDATES", 64))
    if not isinstance(candidates, list) or not candidates:
        raise DomainError("candidates must be a non-empty list of strings.", field="candidates")
    if len(candidates) > limit:
        raise DomainError(f"{len(candidates)} candidates; at most {limit} may be reranked at once.",
                          field="candidates")
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, str):
            raise DomainError(f"Candidate {index} is not a string.", field=f"candidates[{index}]")
        if not candidate:
            raise DomainError(f"Candidate {index} is empty.", field=f"candidates[{index}]")
        if _SURROGATE.search(candidate):
            raise DomainError(f"Candidate {index} contains an unpaired surrogate.", field=f"candidates[{index}]")
    prompt_chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    total = prompt_chars + sum(len(candidate) for candidate in candidates)
    max_chars = int(_rerank_setting("RERANK_MAX_CHARS", 200_000))
    if total > max_chars:
        raise DomainError(f"The prompt and candidates hold {total} characters; at most {max_chars} are allowed.",
                          field="prompt" if prompt_chars > max_chars else "candidates")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise DomainError("top_k must be a whole number of at least 1.", field="top_k")


def rerank_model_resolve(*, project: Any, model: str | int = "deployed") -> Any:
    """The RewardModel a request names: the project's deployed one (kept per process for a second, see
    rewards.serving.DeploymentCache) or a version id of the project's registry."""
    from labeling.errors import Conflict, DomainError, NotFound
    from rewards.models import RewardModel
    from rewards.serving import deployments

    fields = ("id", "project_id", "version", "base_model", "artifact_path", "created_at")
    if model == "deployed":
        found = deployments.get(project_id=project.pk, load=lambda: RewardModel.objects.filter(
            project=project, is_deployed=True).only(*fields).first())
        if found is None:
            raise Conflict(f"Project '{project.slug}' has no deployed reward model; deploy a version first.",
                           field="model", code="no_deployed_model")
        return found
    if isinstance(model, bool) or not isinstance(model, int):
        raise DomainError("model is \"deployed\" or the id of a reward model version.", field="model")
    found = RewardModel.objects.filter(pk=model, project=project).only(*fields).first()
    if found is None:
        raise NotFound(f"Project '{project.slug}' has no reward model version with id {model}.", field="model")
    return found


def _cache_get(key: str) -> dict | None:
    from django.core.cache import cache

    try:
        return cache.get(key)
    except Exception:  # a cache outage must not take reranking down with it
        logger.warning("rerank cache unavailable on read; scoring without it", exc_info=True)
        return None


def _cache_set(key: str, value: dict) -> None:
    from django.core.cache import cache

    try:
        cache.set(key, value, timeout=int(_rerank_setting("RERANK_CACHE_SECONDS", 3600)))
    except Exception:  # see _cache_get
        logger.warning("rerank cache unavailable on write; result not cached", exc_info=True)


def _count_cache(result: str) -> None:
    from config.metrics import RERANK_CACHE

    RERANK_CACHE.labels(result=result).inc()


def rerank(*, project: Any, prompt: str | Messages, candidates: list[str], model: str | int = "deployed",
           top_k: int | None = None, constraints: dict | None = None) -> dict[str, Any]:
    """Best-of-N: score every candidate with the project's reward model, apply the hard constraints and rank.

    Returns {"model", "results", "best_index", "cached"}. Candidates failing a constraint are still scored but
    come after every passing one, so `best_index` is a failing candidate only when none passes; equal scores keep
    the request's order (`rerank_order`). The same request gives the same body: the candidates are scored in
    batches their distinct texts decide (never in an order the request chose; beside other requests' only with
    RERANK_BATCH_ACROSS_REQUESTS, see rewards.serving.MicroBatcher), and the whole ranking is cached per model
    version and canonical inputs (`rerank_cache_key`); a hit does no model work.
    """
    from labeling.errors import DomainError, ServiceUnavailable
    from rewards.constraints import constraints_parse
    from rewards.serving import ModelUnloaded, pool

    _rerank_validate(prompt=prompt, candidates=candidates, top_k=top_k)
    parsed = constraints_parse(constraints)
    reward_model = rerank_model_resolve(project=project, model=model)
    key = rerank_cache_key(reward_model=reward_model, prompt=prompt, candidates=candidates, constraints=constraints)
    hit = _cache_get(key)
    if hit is not None:
        _count_cache("hit")
        return {**_top(hit, top_k), "cached": True}
    _count_cache("miss")

    # Another request may evict the model from the pool between taking it and scoring with it (more versions in
    # use than RERANK_MODEL_CACHE_SIZE): it is then loaded again, once.
    for retries_left in (1, 0):
        try:
            served = pool.get(reward_model_id=reward_model.pk, artifact_path=reward_model.artifact_path,
                              registered=reward_model.created_at)
        except (FileNotFoundError, OSError, ValueError) as exc:
            logger.exception("reward model %s could not be loaded", reward_model.pk)
            raise ServiceUnavailable(f"Reward model version {reward_model.version} could not be loaded: {exc}",
                                     field="model") from exc
        try:
            raw_scores = served.score(prompt, candidates)
            break
        except ModelUnloaded as exc:
            if not retries_left:
                raise ServiceUnavailable(f"Reward model version {reward_model.version} was unloaded while "
                                         "scoring; try again.", field="model") from exc
        except TimeoutError as exc:
            raise ServiceUnavailable(str(exc), field="model") from exc
        except ValueError as exc:
            # The encoder refuses inputs it cannot format (e.g. a chat prompt the template rejects).
            raise DomainError(f"The inputs cannot be scored by this model: {exc}", field="prompt") from exc
    scores = [round(float(score), SCORE_DECIMALS) for score in raw_scores]
    reasons = [parsed.check(candidate) for candidate in candidates] if not parsed.empty else [[]] * len(candidates)
    results = rerank_order(scores, reasons)
    body = {
        "model": {"id": reward_model.pk, "version": reward_model.version, "base_model": reward_model.base_model},
        "results": results,
        "best_index": results[0]["index"],
    }
    _cache_set(key, body)
    rerank_sample_into_queue(project=project, prompt=prompt, candidates=candidates, results=results)
    return {**_top(body, top_k), "cached": False}


def rerank_sample_into_queue(*, project: Any, prompt: str | Messages, candidates: Sequence[str],
                             results: Sequence[dict[str, Any]], rng: random.Random | None = None) -> Any:
    """Turn a close call of the reward model into a pair for people to label; returns the new Pair or None.

    With probability `project.rerank_sample_rate`, when the two best candidates both pass the constraints and
    their scores are at most `project.rerank_sample_margin` apart, (prompt, best, runner-up) becomes a pair with
    source "rerank": the cases where the model is least sure are the labels that teach it most. A pair the
    project has already is skipped silently, and nothing here can fail the rerank that triggered it.
    """
    from django.db import DataError, IntegrityError

    from labeling.errors import DomainError
    from labeling.services import pair_create

    rate = float(getattr(project, "rerank_sample_rate", 0.0) or 0.0)
    if rate <= 0.0 or len(results) < 2:
        return None
    best, runner_up = results[0], results[1]
    if not (best["passed"] and runner_up["passed"]):
        return None
    if best["score"] - runner_up["score"] > float(project.rerank_sample_margin):
        return None
    if (rng or _sample_rng).random() >= rate:
        return None
    best_text, runner_up_text = candidates[best["index"]], candidates[runner_up["index"]]
    if best_text == runner_up_text:
        return None
    try:
        return pair_create(project=project, prompt=prompt, response_a=best_text, response_b=runner_up_text,
                           source=RERANK_PAIR_SOURCE)
    except DomainError:  # the pair exists already (or cannot be a pair): nothing to add
        return None
    except IntegrityError:  # a concurrent request created the same pair first
        return None
    except DataError:  # a text the database cannot store (a generated candidate with a NUL character)
        return None

"""Sampling N candidates from a policy in one batched generate call, then best-of-N reranking them."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from rewards.training.data import Messages, chat_template_apply, prompt_messages

logger = logging.getLogger(__name__)

DEFAULT_POLICY = "default"
MAX_CANDIDATES = 16
MAX_NEW_TOKENS = 512
# Below this (but above 0, greedy) the logits divided by the temperature overflow to inf and sampling fails.
MIN_TEMPERATURE = 0.01
MAX_STOP_STRINGS = 8
# What sampling uses for a top_k or top_p the request leaves unset: the 50 most likely tokens, and every token.
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0

# torch's global RNG drives sampling; generation runs one at a time per process so a seeded request is not
# disturbed by another request drawing from the same generator halfway through.
_generate_lock = threading.Lock()


def _setting(name: str, default: Any) -> Any:
    return settings.PREFLAB.get(name, default)


@dataclass
class LoadedPolicy:
    key: str
    path: str
    model: Any
    tokenizer: Any
    device: str
    registered: Any = None


class PolicyPool:
    """Loaded causal LMs keyed by "default" or "policy-<id>", least recently used evicted beyond the size.

    A loaded policy is served only to the version it was loaded for (its folder and registration time): after a
    database reset a new version may reuse a loaded id, with its files written again into the same folder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[str, LoadedPolicy] = OrderedDict()
        self._pid = os.getpid()
        self.loads = 0

    def get(self, *, key: str, path: str, registered: Any = None) -> LoadedPolicy:
        with self._lock:
            if self._pid != os.getpid():
                self._models = OrderedDict()
                self._pid = os.getpid()
            loaded = self._models.get(key)
            if loaded is not None and (loaded.path, loaded.registered) == (path, registered):
                self._models.move_to_end(key)
                return loaded
            # Loading under the pool lock keeps two first requests from loading the same model twice; loads are
            # rare (the pool is warm) and generation itself is serialized anyway.
            loaded = self._load(key=key, path=path)
            loaded.registered = registered
            self._models[key] = loaded
            while len(self._models) > max(int(_setting("GENERATE_MODEL_CACHE_SIZE", 2)), 1):
                old_key, _ = self._models.popitem(last=False)
                logger.info("unloaded policy %s", old_key)
            return loaded

    def _load(self, *, key: str, path: str) -> LoadedPolicy:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from config.metrics import MODEL_LOAD_SECONDS
        from rewards.serving import torch_threads_configure
        from rewards.training.common import pick_device

        folder = Path(path)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
        torch_threads_configure()
        started = time.perf_counter()
        device = pick_device()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.to(device).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        seconds = time.perf_counter() - started
        MODEL_LOAD_SECONDS.labels(kind="policy").observe(seconds)
        self.loads += 1
        logger.info("loaded policy %s from %s in %.2f s", key, path, seconds)
        return LoadedPolicy(key=key, path=str(folder), model=model, tokenizer=tokenizer, device=device)

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


pool = PolicyPool()


def generation_policy_resolve(*, project: Any, policy: Any) -> tuple[str, str, dict[str, Any], Any]:
    """(pool key, folder, description, registration time) of the policy a request names: "default" (the embedded
    SmolLM2, registered never) or the id of a Policy version of the project."""
    from labeling.errors import DomainError, NotFound, ServiceUnavailable
    from rewards.embedded import smollm2_path
    from rewards.models import Policy

    if policy == DEFAULT_POLICY:
        try:
            path = smollm2_path()
        except FileNotFoundError as exc:
            raise ServiceUnavailable(f"The embedded policy is not available: {exc}", field="policy") from exc
        return DEFAULT_POLICY, str(path), {"id": None, "version": None, "kind": "embedded",
                                           "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, None
    if isinstance(policy, bool) or not isinstance(policy, int):
        raise DomainError('policy is "default" or the id of a policy version of the project.', field="policy")
    found = Policy.objects.filter(pk=policy, project=project).first()
    if found is None:
        raise NotFound(f"Project '{project.slug}' has no policy version with id {policy}.", field="policy")
    return f"policy-{found.pk}", found.artifact_path, {"id": found.pk, "version": found.version, "kind": found.kind,
                                                       "base_model": found.base_model}, found.created_at


def _validate(*, prompt: Any, n: Any, temperature: Any, top_k: Any, top_p: Any, max_new_tokens: Any, seed: Any,
              stop: Any) -> Messages:
    from labeling.errors import DomainError
    from rewards.scoring import prompt_text_check

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if isinstance(prompt, str) and not prompt.strip():
        raise DomainError("The prompt is empty.", field="prompt")
    try:
        messages = prompt_messages(prompt)
    except ValueError as exc:
        raise DomainError(str(exc), field="prompt") from exc
    # Before any model work: the tokenizer cannot encode a lone surrogate, and the prompt may be stored.
    prompt_text_check(prompt)
    if not whole(n) or not 1 <= n <= MAX_CANDIDATES:
        raise DomainError(f"n must be a whole number from 1 to {MAX_CANDIDATES}.", field="n")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise DomainError("temperature must be a number of at least 0 (0 means greedy).", field="temperature")
    if 0 < temperature < MIN_TEMPERATURE:
        raise DomainError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}.", field="temperature")
    if top_k is not None and (not whole(top_k) or top_k < 0):
        raise DomainError("top_k must be a whole number of at least 0 (0 turns it off).", field="top_k")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise DomainError("top_p must be a number above 0 and at most 1.", field="top_p")
    if not whole(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise DomainError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}.",
                          field="max_new_tokens")
    if seed is not None and (not whole(seed) or not 0 <= seed < 2**63):
        raise DomainError("seed must be a whole number from 0 to 2**63 - 1.", field="seed")
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
            raise DomainError(f"stop must be a list of at most {MAX_STOP_STRINGS} strings.", field="stop")
        for index, item in enumerate(stop):
            if not isinstance(item, str) or not item:
                raise DomainError(f"Stop string {index} must be a non-empty string.", field=f"stop[{index}]")
    return messages


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The text up to (not including) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = min((position for position in (text.find(s) for s in stop) if position >= 0), default=len(text))
    return text[:cut]


def _prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        encoded = chat_template_apply(tokenizer, messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding; older versions a plain list of ids.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def stop_canonical(stop: list[str] | None) -> list[str] | None:
    """The stop strings that can decide a cut, sorted; None for none. `cut_at_stop` cuts at the earliest
    occurrence of any of them, so their order and repeats do not matter, and a string that begins with another stop
    string never cuts first (wherever it occurs, the shorter one occurs too); one that merely contains another can
    ("xab" and "ab" cut "zxab" at 1, "ab" alone at 2), so it stays."""
    unique = sorted(set(stop or ()))
    kept = [s for s in unique if not any(other != s and s.startswith(other) for other in unique)]
    return kept or None


def sampling_canonical(*, temperature: float, top_k: int | None, top_p: float | None, stop: list[str] | None,
                       vocabulary: int | None) -> tuple[float, int | None, float | None, list[str] | None]:
    """(temperature, top_k, top_p, stop) spelled one way for every request that samples and cuts the same
    candidates: a whole-number temperature is its float; a top_k that keeps as many tokens as the default 50 is
    unset, and one that keeps every token (0, or at least the policy's `vocabulary`) is 0; top_p 1 is unset; stop
    strings as `stop_canonical`. A default is spelled unset so that a request that leaves its settings unset keeps
    the seed it was given before these rules."""

    def keeps(value: int) -> int:  # 0 for every token
        return 0 if value == 0 or (vocabulary is not None and value >= vocabulary) else value

    effective = keeps(DEFAULT_TOP_K if top_k is None else top_k)
    top_k = None if effective == keeps(DEFAULT_TOP_K) else effective
    canonical_top_p = None if top_p is None or float(top_p) >= DEFAULT_TOP_P else float(top_p)
    return float(temperature), top_k, canonical_top_p, stop_canonical(stop)


def request_seed(*, policy_key: str, messages: Messages, n: int, temperature: float, top_k: int | None,
                 top_p: float | None, max_new_tokens: int, stop: list[str] | None,
                 vocabulary: int | None = None) -> int:
    """The seed of a sampling request that names none: a hash of everything that shapes its candidates, so the same
    request to the same policy version gives the same candidates (and, through the rerank cache, the same answer),
    and a client that wants other samples sends a seed of its own.

    Equivalent requests share it: the prompt is hashed as its chat messages (`prompt_messages`: a string is the
    one user message it stands for, and keys other than role and content are left out) and the settings as
    `sampling_canonical` spells them (`vocabulary`: the width of the policy's logits). Nothing else is merged:
    requests that could sample or cut differently get different seeds."""
    temperature, top_k, top_p, stop = sampling_canonical(temperature=temperature, top_k=top_k, top_p=top_p,
                                                         stop=stop, vocabulary=vocabulary)
    shape = json.dumps([policy_key, messages, n, temperature, top_k, top_p, max_new_tokens, stop],
                       ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(shape.encode()).digest()[:8], "big") >> 1


def policy_vocabulary(loaded: LoadedPolicy) -> int | None:
    """The number of tokens sampling chooses from (the width of the policy's logits), when the model says."""
    head = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(loaded.model.config, "vocab_size", None)


def sample_candidates(loaded: LoadedPolicy, *, messages: Messages, n: int, temperature: float, top_k: int | None,
                      top_p: float | None, max_new_tokens: int, seed: int | None,
                      stop: list[str] | None) -> tuple[list[str], int]:
    """N completions of the chat prompt from one batched generate call; returns (texts, tokens generated)."""
    import torch

    from labeling.errors import DomainError

    tokenizer, model = loaded.tokenizer, loaded.model
    try:
        ids = _prompt_ids(tokenizer, messages)
    except ValueError as exc:  # the policy's chat template refuses the conversation
        raise DomainError(f"The prompt cannot be given to this policy: {exc}", field="prompt") from exc
    # n copies of the prompt in one batch: every row samples on its own, and greedy decoding (which refuses
    # num_return_sequences > 1) works the same way.
    input_ids = torch.tensor([ids] * n, dtype=torch.long, device=loaded.device)
    attention_mask = torch.ones_like(input_ids)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                               "eos_token_id": model.generation_config.eos_token_id or tokenizer.eos_token_id}
    if temperature > 0:
        options.update(do_sample=True, temperature=float(temperature),
                       top_k=top_k if top_k is not None else DEFAULT_TOP_K,
                       top_p=float(top_p) if top_p is not None else DEFAULT_TOP_P)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with _generate_lock, torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    new_tokens = output[:, input_ids.shape[1]:].cpu().tolist()
    eos = options["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    texts, total = [], 0
    for row in new_tokens:
        length = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        total += length
        texts.append(cut_at_stop(tokenizer.decode(row[:length], skip_special_tokens=True), stop))
    return texts, total


def generate(*, project: Any, prompt: str | Messages, n: int = 4, temperature: float = 0.7, top_k: int | None = None,
             top_p: float | None = None, max_new_tokens: int = 128, seed: int | None = None,
             stop: list[str] | None = None, policy: str | int = DEFAULT_POLICY, rerank: bool = True) -> dict[str, Any]:
    """Sample `n` candidates from a policy and, with `rerank`, rank them with the project's deployed reward model
    through the same path as /rerank/ (cache, constraints order, sampling into the labeling queue).

    Sampling without a seed uses `request_seed`: the same request, or an equivalent one (see there), gives the same
    candidates. Greedy decoding (temperature 0) uses no seed and ignores top_k, top_p and seed.

    Returns {"policy", "candidates": [{"index", "text", "score"?, "rank"?}], "best_index"?, "tokens_generated",
    "seed"} (the seed sampled with, null for greedy decoding).
    Empty candidates (the model stopped at once, or a stop string came first) are returned unscored and last.
    """
    from labeling.errors import Conflict, ServiceUnavailable
    from rewards.models import RewardModel
    from rewards.scoring import rerank as rerank_candidates

    messages = _validate(prompt=prompt, n=n, temperature=temperature, top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed, stop=stop)
    if rerank and not RewardModel.objects.filter(project=project, is_deployed=True).exists():
        raise Conflict(f"Project '{project.slug}' has no deployed reward model to rerank with; deploy one or send "
                       "rerank: false.", field="rerank", code="no_deployed_model")
    key, path, description, registered = generation_policy_resolve(project=project, policy=policy)
    try:
        loaded = pool.get(key=key, path=path, registered=registered)
    except (FileNotFoundError, OSError, ValueError) as exc:
        logger.exception("policy %s could not be loaded", key)
        raise ServiceUnavailable(f"The policy could not be loaded: {exc}", field="policy") from exc
    if temperature > 0 and seed is None:
        seed = request_seed(policy_key=key, messages=messages, n=n, temperature=temperature, top_k=top_k,
                            top_p=top_p, max_new_tokens=max_new_tokens, stop=stop,
                            vocabulary=policy_vocabulary(loaded))
    texts, tokens = sample_candidates(loaded, messages=messages, n=n, temperature=temperature, top_k=top_k,
                                      top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
    body: dict[str, Any] = {"policy": description, "tokens_generated": tokens,
                            "seed": seed if temperature > 0 else None}
    if not rerank:
        body["candidates"] = [{"index": index, "text": text} for index, text in enumerate(texts)]
        return body

    scorable = [index for index, text in enumerate(texts) if text]
    candidates = [{"index": index, "text": text} for index, text in enumerate(texts)]
    if not scorable:
        body.update(candidates=candidates, best_index=None)
        return body
    ranked = rerank_candidates(project=project, prompt=prompt, candidates=[texts[i] for i in scorable])
    ordered = []
    for row in ranked["results"]:
        candidate = candidates[scorable[row["index"]]]
        candidate.update(score=row["score"], rank=row["rank"])
        ordered.append(candidate)
    ordered += [candidate for candidate in candidates if "rank" not in candidate]
    body.update(candidates=ordered, best_index=scorable[ranked["best_index"]], reward_model=ranked["model"])
    return body

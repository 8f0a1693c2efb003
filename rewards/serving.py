"""Process-wide serving of reward models: a warm LRU of loaded scorers and a request queue per model."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from config.metrics import MODEL_LOAD_SECONDS, RERANK_BATCH_SIZE
from rewards.scoring import RewardScorer

logger = logging.getLogger(__name__)


def _setting(name: str, default: Any) -> Any:
    return settings.PREFLAB.get(name, default)


_torch_lock = threading.Lock()
_torch_configured = False


def torch_threads_configure() -> int:
    """Fix torch's intra-op thread count once per process, before the first model runs.

    torch otherwise takes every core, and gunicorn workers times torch threads oversubscribe the machine; the
    operator states the number instead (PREFLAB["TORCH_THREADS"], default: the cores this process may use).
    """
    global _torch_configured
    import torch

    with _torch_lock:
        threads = int(_setting("TORCH_THREADS", 0) or _cores())
        if not _torch_configured:
            torch.set_num_threads(threads)
            _torch_configured = True
        return torch.get_num_threads()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- micro-batching --------------------------------------------------------------------------------------


class ModelUnloaded(RuntimeError):
    """The model was evicted from the pool (or the pool cleared) between a request taking it and scoring with it;
    loading it again and retrying answers the request."""


@dataclass
class _Pending:
    sequences: Sequence[Sequence[int]]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Queues the encoded candidates of concurrent requests for one model and scores them on one thread.

    The first request to arrive opens a window of `window_ms`; requests arriving within it (up to `max_items`
    candidates in all) are gathered, and their distinct candidates scored in forward batches of at most
    `forward_batch` of similar length, as offline scoring does. With `across_requests` (the default) the candidates
    of all gathered requests share those batches: the throughput of offline batching under concurrent load, but
    float32 logits move in their last bits with the shape of the batch a candidate lands in, so a score can differ
    in its last bits with the traffic it was scored beside (the rerank cache, and rounding, keep the answer to a
    repeated request the same). Without it, each distinct request is scored on its own, never beside another's:
    the same candidates get the same scores bit for bit whatever else arrives, at the cost of smaller batches.
    Requests with the same distinct candidates (in any order, with any repeats) are scored once either way. Each
    caller gets back exactly its own scores, in its own order. One daemon thread per model does the forward passes,
    so torch runs one batch at a time per model instead of one per request thread.
    """

    def __init__(self, score_ids: Callable[..., list[float]], *, window_ms: float, max_items: int,
                 forward_batch: int | None = None, name: str = "", across_requests: bool = True) -> None:
        self._score_ids = score_ids
        self.across_requests = across_requests
        self.window = max(window_ms, 0.0) / 1000.0
        self.max_items = max(int(max_items), 1)
        self.forward_batch = max(int(forward_batch or self.max_items), 1)
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        # (requests, candidates) of recent gatherings, for tests and debugging.
        self.passes: deque[tuple[int, int]] = deque(maxlen=256)
        self._thread = threading.Thread(target=self._run, name=f"rerank-batcher-{name}", daemon=True)
        self._thread.start()

    def score(self, sequences: Sequence[Sequence[int]], *, timeout: float = 300.0) -> list[float]:
        if not sequences:
            return []
        pending = _Pending(sequences=sequences)
        with self._cond:
            if self._stopped:
                raise ModelUnloaded("This model was unloaded; retry the request.")
            self._queue.append(pending)
            self._cond.notify()
        if not pending.done.wait(timeout):
            raise TimeoutError(f"Scoring did not finish within {timeout:.0f} s.")
        if pending.error is not None:
            raise pending.error
        assert pending.scores is not None
        return pending.scores

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _collect(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped and not self._queue:
                return None
            batch = [self._queue.popleft()]
            items = len(batch[0].sequences)
            deadline = time.monotonic() + self.window
            while items < self.max_items:
                if self._queue:
                    if items + len(self._queue[0].sequences) > self.max_items:
                        break
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    items += len(nxt.sequences)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self.passes.append((len(batch), sum(len(pending.sequences) for pending in batch)))
            if self.across_requests:
                self._score_together(batch)
                continue
            requests: dict[frozenset[tuple[int, ...]], list[_Pending]] = {}
            for pending in batch:
                requests.setdefault(frozenset(tuple(ids) for ids in pending.sequences), []).append(pending)
            for callers in requests.values():
                self._score_together(callers)

    def _score_together(self, callers: list[_Pending]) -> None:
        """Scores the distinct candidates of every caller in `callers` in one call."""
        unique = list(dict.fromkeys(tuple(ids) for pending in callers for ids in pending.sequences))
        try:
            # The scorer sorts the candidates by length and batches neighbours of similar length; which batches
            # they form depends on the distinct candidates only, not on their order.
            scores = self._score_ids([list(ids) for ids in unique], batch_size=self.forward_batch)
        except BaseException as exc:  # handed to every waiting caller, who re-raises it
            logger.exception("reranking forward pass failed")
            for pending in callers:
                pending.error = exc
                pending.done.set()
            return
        RERANK_BATCH_SIZE.observe(len(unique))
        by_ids = dict(zip(unique, scores, strict=True))
        for pending in callers:
            pending.scores = [by_ids[tuple(ids)] for ids in pending.sequences]
            pending.done.set()


# --- the warm pool ---------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    reward_model_id: int
    artifact_path: str
    scorer: RewardScorer
    batcher: MicroBatcher
    registered: Any = None

    def score(self, prompt: Any, candidates: Sequence[str]) -> list[float]:
        encoded = [self.scorer.encode(prompt, candidate).input_ids for candidate in candidates]
        return self.batcher.score(encoded)


class ModelPool:
    """Loaded reward models keyed by RewardModel id, least recently used evicted beyond `size`.

    A RewardModel row's files never change (a new version is a new row); hot swaps happen because the caller
    resolves the deployed id from the database on each request. A loaded model is served only to the version it
    was loaded for (its folder and registration time): a process can outlive its database, and after a reset a
    new version may reuse a loaded id, in another folder or in the same one written again (runs/<run>/).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[int, ServedModel] = OrderedDict()
        self._loading: dict[int, threading.Lock] = {}
        self._pid = os.getpid()
        self.loads = 0

    def _reset_after_fork(self) -> None:
        # Threads do not survive fork(): a pool inherited from a preloading parent starts over.
        if self._pid != os.getpid():
            self._models = OrderedDict()
            self._loading = {}
            self._pid = os.getpid()

    def _loaded(self, reward_model_id: int, artifact_path: str, registered: Any) -> ServedModel | None:
        served = self._models.get(reward_model_id)
        if served is None or (served.artifact_path, served.registered) != (artifact_path, registered):
            return None
        self._models.move_to_end(reward_model_id)
        return served

    def get(self, *, reward_model_id: int, artifact_path: str, registered: Any = None) -> ServedModel:
        """The loaded model of a version; `registered` (its created_at) tells a reused id from the version before."""
        with self._lock:
            self._reset_after_fork()
            served = self._loaded(reward_model_id, artifact_path, registered)
            if served is not None:
                return served
            load_lock = self._loading.setdefault(reward_model_id, threading.Lock())
        # Concurrent first requests for one model wait here and load it once; other models are not held up.
        with load_lock:
            with self._lock:
                served = self._loaded(reward_model_id, artifact_path, registered)
                if served is not None:
                    return served
            served = self._load(reward_model_id=reward_model_id, artifact_path=artifact_path)
            served.registered = registered
            with self._lock:
                replaced = self._models.pop(reward_model_id, None)
                self._models[reward_model_id] = served
                self._loading.pop(reward_model_id, None)
                evicted = [replaced] if replaced is not None else []
                while len(self._models) > max(int(_setting("RERANK_MODEL_CACHE_SIZE", 2)), 1):
                    _, old = self._models.popitem(last=False)
                    evicted.append(old)
            for old in evicted:
                old.batcher.stop()
                logger.info("unloaded reward model %s", old.reward_model_id)
            return served

    def _load(self, *, reward_model_id: int, artifact_path: str) -> ServedModel:
        torch_threads_configure()
        started = time.perf_counter()
        scorer = RewardScorer.load(artifact_path)
        seconds = time.perf_counter() - started
        MODEL_LOAD_SECONDS.labels(kind="reward_model").observe(seconds)
        self.loads += 1
        logger.info("loaded reward model %s from %s in %.2f s", reward_model_id, artifact_path, seconds)
        batcher = MicroBatcher(scorer.score_ids, window_ms=float(_setting("RERANK_BATCH_WINDOW_MS", 5)),
                               max_items=int(_setting("RERANK_MAX_BATCH", 256)),
                               forward_batch=int(_setting("RERANK_FORWARD_BATCH", 16)), name=str(reward_model_id),
                               across_requests=bool(_setting("RERANK_BATCH_ACROSS_REQUESTS", True)))
        return ServedModel(reward_model_id=reward_model_id, artifact_path=artifact_path, scorer=scorer,
                           batcher=batcher)

    def loaded_ids(self) -> list[int]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        for served in models:
            served.batcher.stop()


pool = ModelPool()


# --- deployed versions -----------------------------------------------------------------------------------


class DeploymentCache:
    """Each project's deployed RewardModel as this process last read it, reused for `ttl` seconds.

    Resolving "deployed" is a query per request, the largest part of a cache hit after authentication. A
    deployment clears the entry of its project in the process that made it (`clear`, at once and again after
    the commit), so that process serves the new version on its next request; every other server process reads
    it again within `ttl` (PREFLAB["RERANK_DEPLOYMENT_TTL_SECONDS"], 1 s; 0 reads on every request).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[float, Any]] = {}

    def get(self, *, project_id: int, load: Callable[[], Any]) -> Any:
        """The cached row, or `load()` (None when nothing is deployed, which is not cached)."""
        ttl = float(_setting("RERANK_DEPLOYMENT_TTL_SECONDS", 1.0))
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(project_id)
        if entry is not None and now - entry[0] < ttl:
            return entry[1]
        found = load()
        with self._lock:
            if found is None:
                self._entries.pop(project_id, None)
            else:
                self._entries[project_id] = (now, found)
        return found

    def clear(self, *, project_id: int | None = None) -> None:
        with self._lock:
            if project_id is None:
                self._entries.clear()
            else:
                self._entries.pop(project_id, None)


deployments = DeploymentCache()

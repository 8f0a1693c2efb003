"""Reranking with the real embedded MiniLM: the API's scores are plain transformers' on the same formatted texts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from django.core.cache import cache
from rest_framework.test import APIClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from labeling.models import ApiToken
from labeling.services import api_token_create
from rewards import serving
from rewards.embedded import minilm_path
from rewards.services import reward_model_register
from rewards.training.data import read_preference_file
from tests.factories import UserFactory

HH_SAMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-sample.jsonl"
MAX_LENGTH = 128


def minilm_reward_model(folder: Path, *, max_length: int = MAX_LENGTH) -> Path:
    """The embedded all-MiniLM-L6-v2 with a freshly initialised 1-output head, saved as a reward-model folder with
    the plain template (what a reward run on it writes)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    (folder / "preflab.json").write_text(json.dumps({"format": {"max_length": max_length, "template": "plain"}}))
    return folder


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    return minilm_reward_model(tmp_path_factory.mktemp("minilm-rm"))


@pytest.fixture(autouse=True)
def fresh_state():
    serving.pool.clear()
    cache.clear()
    yield
    serving.pool.clear()
    cache.clear()


def _hh_request(*, candidates: int) -> tuple[list[dict], list[str]]:
    """The longest dialogue of the sample (so truncation matters) and real replies short enough to fit whole."""
    with HH_SAMPLE.open("rb") as stream:
        examples, _ = read_preference_file(stream, file_format="hh")
    prompt = max(examples, key=lambda ex: sum(len(m["content"]) for m in ex.prompt)).prompt
    replies = sorted({text for ex in examples for text in (ex.chosen, ex.rejected) if 0 < len(text) <= 200})
    return prompt, replies[:candidates]


def _plain_transformers_scores(folder: Path, prompt: list[dict], candidates: list[str]) -> tuple[list[float], int]:
    """Rewards as a plain script computes them: the plain template's text, left truncation by the tokenizer, one
    unpadded sequence at a time. Also returns how many inputs were longer than the model's max_length."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    dialogue = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    scores, truncated = [], 0
    with torch.inference_mode():
        for candidate in candidates:
            text = f"{dialogue}\n\nassistant: {candidate}"
            truncated += len(tokenizer(text)["input_ids"]) > MAX_LENGTH
            inputs = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            scores.append(model(**inputs).logits[0, 0].item())
    return scores, truncated


@pytest.mark.slow
@pytest.mark.django_db
def test_the_real_minilm_reranks_hh_replies_exactly_as_plain_transformers_scores_them(project, minilm_dir):
    deployed = reward_model_register(project=project, path=minilm_dir, deploy=True)
    _, key = api_token_create(user=UserFactory(), scope=ApiToken.Scope.RERANK, project=project, name="prod")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    prompt, candidates = _hh_request(candidates=12)
    assert len(candidates) == 12

    response = client.post("/api/v1/rerank/", {"project": project.slug, "prompt": prompt, "candidates": candidates},
                           format="json")
    assert response.status_code == 200, response.json()
    body = response.json()

    expected, truncated = _plain_transformers_scores(minilm_dir, prompt, candidates)
    assert truncated == len(candidates)  # the dialogue is cut from the left for every candidate
    assert body["model"]["id"] == deployed.pk and body["cached"] is False
    got = {row["index"]: row["score"] for row in body["results"]}
    assert sorted(got) == list(range(len(candidates)))
    for index, score in enumerate(expected):
        assert got[index] == pytest.approx(score, abs=1e-4)
    # A fresh head still separates the replies; the ranking follows the scores, best first.
    assert len({round(score, 3) for score in expected}) > 1
    assert [row["score"] for row in body["results"]] == sorted(got.values(), reverse=True)
    assert body["best_index"] == body["results"][0]["index"]
    assert expected[body["best_index"]] == pytest.approx(max(expected), abs=1e-4)

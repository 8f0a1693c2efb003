"""Sequence lengths past a policy's positions: refused at submission for `dpo` and `rlhf` runs as for `reward` ones,
checked again in the worker, and prompts that leave too little room shortened so a GPT-2-style policy (learned
absolute positions, which fail with an index error past them) trains and answers instead of crashing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labeling.errors import DomainError
from rewards import services
from rewards.models import TrainingRun
from rewards.training.common import EMBEDDED_POSITIONS, HyperparameterError, base_model_positions
from rewards.training.data import PreferenceExample
from rewards.training.dpo import generate_greedy_ids, load_policy, prompt_ids, train_dpo
from rewards.training.rlhf import fit_prompt, train_rlhf
from tests.conftest import client_for
from tests.rewards.factories import labeled_pairs
from tests.rewards.tiny import tiny_reward_model

URL = "/api/v1/training-runs/"
POSITIONS = 64


def _tiny_policy(folder: Path, name: str, build) -> Path:
    """`build(tokenizer)`'s model, seeded, saved as `folder/name` with the SmolLM2 tokenizer and chat template."""
    from transformers import AutoTokenizer

    from rewards.embedded import smollm2_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    torch.manual_seed(0)
    path = Path(folder) / name
    build(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_gpt2(folder: Path, *, positions: int = POSITIONS) -> Path:
    """A randomly initialised 2-layer GPT-2 (learned absolute positions, `n_positions` in its config.json, no
    `max_position_embeddings`) with the SmolLM2 tokenizer and chat template, built offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _tiny_policy(folder, f"tiny-gpt2-{positions}", lambda tokenizer: GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)))


def tiny_llama(folder: Path, *, positions: int = POSITIONS) -> Path:
    """A 1-layer Llama (rotary positions) that claims only `positions` positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_policy(folder, f"tiny-llama-{positions}", lambda tokenizer: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    return tiny_reward_model(tmp_path_factory.mktemp("judge"))


LONG = " ".join(f"word{i}" for i in range(120))


def long_dialogues(count: int, offset: int = 0) -> list[PreferenceExample]:
    """Dialogues whose opening turn alone is longer than POSITIONS tokens, ending in a short question."""
    return [PreferenceExample(prompt=[{"role": "user", "content": f"Story {i}: {LONG}"},
                                      {"role": "assistant", "content": "I see."},
                                      {"role": "user", "content": f"What is {i} plus {i}?"}],
                              chosen=f"{2 * i}.", rejected="No.") for i in range(offset, offset + count)]


# --- at submission --------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("policy", ["gpt2", "llama"])
@pytest.mark.parametrize(("kind", "hyperparameters", "field"), [
    ("dpo", {"max_length": POSITIONS + 1, "max_new_tokens": 8}, "max_length"),
    ("dpo", {"max_length": 4096, "max_new_tokens": 8}, "max_length"),
    ("dpo", {"max_length": POSITIONS, "max_new_tokens": POSITIONS}, "max_new_tokens"),
    ("rlhf", {"max_completion_length": POSITIONS}, "max_completion_length"),
    ("rlhf", {"max_completion_length": 1000}, "max_completion_length"),
])
def test_a_policy_length_past_its_positions_is_a_400_naming_the_field(project, manager, settings, gpt2_dir,
                                                                      llama_dir, policy, kind, hyperparameters,
                                                                      field, deployed):
    """GPT-2's config names its positions n_positions, Llama's max_position_embeddings: both are read, and both
    kinds of policy are held to them (rotary positions do not crash past the limit, they only degrade)."""
    folder = gpt2_dir if policy == "gpt2" else llama_dir
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [folder.parent]}
    labeled_pairs(project, count=4)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind, "base_model": str(folder),
                                              "hyperparameters": hyperparameters}, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["field"] == f"hyperparameters.{field}" and error["code"] == "invalid_hyperparameter", error
    assert f"{POSITIONS} positions" in error["message"], error
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "hyperparameters"), [
    ("dpo", {"max_length": POSITIONS, "max_new_tokens": POSITIONS - 1}),
    # The answers are never generated without win-rate prompts, so their length is not held against the policy.
    ("dpo", {"max_length": POSITIONS, "max_new_tokens": 500, "win_rate_prompts": 0}),
    ("rlhf", {"max_completion_length": POSITIONS - 1, "num_generations": 2, "per_device_train_batch_size": 2}),
])
def test_lengths_that_fit_the_policy_are_accepted(project, manager, settings, gpt2_dir, kind, hyperparameters,
                                                  deployed):
    settings.PREFLAB = {**settings.PREFLAB, "MODEL_IMPORT_DIRS": [gpt2_dir.parent]}
    labeled_pairs(project, count=4)
    response = client_for(manager).post(URL, {"project": project.slug, "kind": kind, "base_model": str(gpt2_dir),
                                              "hyperparameters": hyperparameters}, format="json")
    assert response.status_code == 202, response.json()


@pytest.mark.django_db
@pytest.mark.parametrize("base_model", ["", "smollm2", "SmolLM2-135M-Instruct"])
def test_the_embedded_smollm2_is_held_to_its_8192_positions_without_being_built(project, base_model, tmp_path,
                                                                               monkeypatch):
    """Submitted before the embedded policy was ever unpacked (an empty model cache), a DPO run past SmolLM2's
    positions is refused all the same, and nothing is built to answer."""
    monkeypatch.setenv("PREFLAB_MODEL_CACHE", str(tmp_path / "model-cache"))
    labeled_pairs(project, count=4)
    with pytest.raises(DomainError) as caught:
        services.training_run_start(project=project, kind="dpo", base_model=base_model,
                                    hyperparameters={"max_length": 8193}, queue=False)
    assert caught.value.field == "hyperparameters.max_length" and "8192 positions" in caught.value.message
    run = services.training_run_start(project=project, kind="dpo", base_model=base_model,
                                      hyperparameters={"max_length": 8192}, queue=False)
    assert run.hyperparameters["max_length"] == 8192
    assert not (tmp_path / "model-cache").exists()


@pytest.mark.django_db
def test_a_gpt2_style_reward_backbone_is_held_to_its_n_positions(project, tmp_path):
    """The reward recipe's check read only max_position_embeddings, which a GPT-2 config.json does not carry."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from rewards.embedded import smollm2_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=POSITIONS, n_embd=32, n_layer=1, n_head=2,
                        num_labels=1, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "gpt2-rm"
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    labeled_pairs(project, count=4)
    with pytest.raises(DomainError) as caught:
        services.training_run_start(project=project, kind="reward", base_model=str(folder),
                                    hyperparameters={"max_length": 128}, queue=False)
    assert caught.value.field == "hyperparameters.max_length" and f"{POSITIONS} positions" in caught.value.message
    assert not TrainingRun.objects.exists()


@pytest.mark.slow
def test_the_embedded_positions_are_the_packaged_models_own():
    """EMBEDDED_POSITIONS answers submissions made before SmolLM2 is unpacked: it must be what the package holds."""
    import json

    import gguf

    from rewards.embedded import minilm_path, smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    field = reader.fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == EMBEDDED_POSITIONS["smollm2_path"]
    minilm = json.loads((minilm_path() / "config.json").read_text())
    assert minilm["max_position_embeddings"] == EMBEDDED_POSITIONS["minilm_path"]
    assert base_model_positions("", default="minilm") == 512


# --- in the worker --------------------------------------------------------------------------------------


def test_the_worker_refuses_a_max_length_past_the_loaded_policys_positions(gpt2_dir, tmp_path):
    """The folder can change between submission and training: the loaded model is checked before any work."""
    with pytest.raises(HyperparameterError) as caught:
        train_dpo(base_model=str(gpt2_dir), train=long_dialogues(2), eval=[], output_dir=tmp_path / "run",
                  hyperparameters={"max_length": 2 * POSITIONS, "max_steps": 1})
    assert caught.value.field == "max_length" and f"{POSITIONS} positions" in caught.value.message
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.django_db
def test_a_run_whose_policy_shrank_after_submission_fails_naming_max_length(project, tmp_path, settings):
    import shutil

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    folder = tiny_gpt2(tmp_path / "big", positions=256)
    labeled_pairs(project, count=4)
    run = services.training_run_start(project=project, kind="dpo", base_model=str(folder),
                                      hyperparameters={"max_length": 128, "max_steps": 1, "max_new_tokens": 4},
                                      queue=False)
    shutil.rmtree(folder)
    shutil.copytree(tiny_gpt2(tmp_path / "small"), folder)
    run = services.training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.FAILED
    assert run.error == f"max_length: is larger than the {POSITIONS} positions of the base model."
    assert "Traceback" not in run.log_tail


def test_greedy_answers_of_a_long_prompt_keep_its_end_within_the_positions(gpt2_dir):
    model, tokenizer = load_policy(str(gpt2_dir), "cpu")
    prompt = long_dialogues(1)[0].prompt
    full = prompt_ids(tokenizer, prompt)
    assert len(full) > POSITIONS
    [(ids, completion)] = generate_greedy_ids(model, tokenizer, [prompt], max_new_tokens=16)
    assert len(ids) == POSITIONS - 16 and ids == full[-len(ids):]
    assert 1 <= len(completion) <= 16


def test_fit_prompt_drops_old_turns_then_cuts_the_last_from_the_left(gpt2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    room = 48
    system = {"role": "system", "content": "Be brief."}
    dialogue = [system, *long_dialogues(1)[0].prompt]
    fitted, cut = fit_prompt(tokenizer, dialogue, room=room)
    assert cut and fitted == [system, dialogue[-1]] and len(prompt_ids(tokenizer, fitted)) <= room

    one_turn = [{"role": "user", "content": f"{LONG} What now?"}]
    fitted, cut = fit_prompt(tokenizer, one_turn, room=room)
    assert cut and len(prompt_ids(tokenizer, fitted)) <= room
    assert fitted[0]["content"].endswith("What now?") and LONG.endswith(fitted[0]["content"][:-len(" What now?")])

    text = f"{LONG} What now?"
    fitted, cut = fit_prompt(tokenizer, text, room=room)
    assert cut and text.endswith(fitted) and room - 3 <= len(prompt_ids(tokenizer, fitted)) <= room

    short = [{"role": "user", "content": "Hi?"}]
    assert fit_prompt(tokenizer, short, room=room) == (short, False)
    with pytest.raises(HyperparameterError) as caught:
        fit_prompt(tokenizer, one_turn, room=2)
    assert caught.value.field == "max_completion_length"


def parameters_changed(base_path: Path, trained_path: Path) -> bool:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(trained_path).state_dict()
    return any(not torch.equal(base[name], trained[name]) for name in base)


@pytest.mark.parametrize("conversational", [False, True])
def test_dpo_trains_and_judges_a_gpt2_policy_on_prompts_longer_than_its_positions(gpt2_dir, judge_dir, tmp_path,
                                                                                  conversational):
    """Before: a held-out text prompt longer than GPT-2's 64 positions (TRL leaves such pairs out of its own
    evaluation, but the win rate answers every held-out prompt) made the base policy's greedy answer run past
    them, and the run died with `IndexError: index out of range in self` before training."""
    if conversational:
        train, held_out = long_dialogues(4), long_dialogues(2, offset=10)
    else:
        train = [PreferenceExample(prompt=f"What is {i} plus {i}?", chosen=f"{2 * i}.", rejected="No.")
                 for i in range(4)]
        held_out = [PreferenceExample(prompt=f"{LONG} What is {i} plus {i}?", chosen=f"{2 * i}.", rejected="No.")
                    for i in range(10, 12)]
    result = train_dpo(base_model=str(gpt2_dir), train=train, eval=held_out, output_dir=tmp_path / "run",
                       judge_path=judge_dir, hyperparameters={"max_length": POSITIONS, "max_new_tokens": 8,
                                                              "max_steps": 2, "learning_rate": 1e-3,
                                                              "logging_steps": 1})
    assert [entry["loss"] for entry in result.history if "loss" in entry]
    assert result.metrics["judged_prompts"] == 2 and 0.0 <= result.metrics["win_rate_vs_base"] <= 1.0
    assert result.extra["pairs_with_turns_dropped"] == (4 if conversational else 0)
    assert parameters_changed(gpt2_dir, result.artifact)


def test_rlhf_trains_a_gpt2_policy_on_prompts_longer_than_its_positions(gpt2_dir, judge_dir, tmp_path):
    """Before: GRPO (which does not cut prompts) and the held-out answers ran past the positions: IndexError."""
    prompts = [example.prompt for example in long_dialogues(4)]
    result = train_rlhf(base_model=str(gpt2_dir), prompts=prompts, reward_model_path=judge_dir,
                        output_dir=tmp_path / "run",
                        hyperparameters={"max_completion_length": 8, "num_generations": 2,
                                         "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
                                         "heldout_prompts": 1, "logging_steps": 1})
    assert [entry["loss"] for entry in result.history if "loss" in entry]
    assert result.extra["shortened_prompts"] == 4
    assert result.metrics["heldout_prompts"] == 1 and result.metrics["kl_to_base"] >= 0.0
    assert parameters_changed(gpt2_dir, result.artifact)


def test_rlhf_refuses_a_completion_that_leaves_no_prompt_room_on_the_loaded_policy(gpt2_dir, judge_dir, tmp_path):
    with pytest.raises(HyperparameterError) as caught:
        train_rlhf(base_model=str(gpt2_dir), prompts=["Hi?", "Hello?"], reward_model_path=judge_dir,
                   output_dir=tmp_path / "run", hyperparameters={"max_completion_length": POSITIONS})
    assert caught.value.field == "max_completion_length"

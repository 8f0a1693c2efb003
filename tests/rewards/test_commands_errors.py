"""The command-line entry points of the rewards app on wrong input: every mistake ends in one clear line (a
CommandError, exit status non-zero, no traceback) and writes nothing; `train --wait` keeps stdout to its JSON line.
Run through call_command, and as real processes where the exit status and the two streams are the point."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from labeling.errors import DomainError
from rewards import services
from rewards.models import RewardModel, TrainingRun
from tests.rewards.factories import labeled_pairs
from tests.rewards.tiny import tiny_causal_lm, tiny_reward_model

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "No idea."},
        {"prompt": "Colour of the sky?", "chosen": "Blue on a clear day.", "rejected": "Loud."},
        {"prompt": "How many legs has a spider?", "chosen": "Eight.", "rejected": "Two."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A good reward model folder and folders that are not one (each with what makes it wrong)."""
    root = tmp_path_factory.mktemp("models")
    good = tiny_reward_model(root / "good")
    corrupt = root / "corrupt-weights"
    corrupt.mkdir()
    for path in good.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"this is not a safetensors file")
    bad_config = root / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text(json.dumps({"model_type": "bert", "num_labels": "one"}))
    (root / "no-config").mkdir()
    return {"good": good, "corrupt": corrupt, "bad_config": bad_config, "no_config": root / "no-config",
            "causal_lm": tiny_causal_lm(root / "lm"), "missing": root / "missing"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    good = root / "pairs.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    invalid = root / "invalid.jsonl"
    invalid.write_text('not json\n{"prompt": "no replies"}\n[1, 2]\n')
    binary = root / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01 binary")
    return {"good": good, "invalid": invalid, "binary": binary, "folder": root, "missing": root / "missing.jsonl"}


def one_line_error(call) -> str:
    with pytest.raises(CommandError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# --- train ----------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("arguments", "expected"), [
    (["--project", "nope"], "No project with slug 'nope'."),
    (["--epochs", "abc"], "argument --epochs: invalid float value: 'abc'"),
    (["--max-steps", "2.5"], "argument --max-steps: invalid int value: '2.5'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--kind", "ppo"], "argument --kind: invalid choice: 'ppo'"),
    (["--hyperparameters", "{not json"], "--hyperparameters is not valid JSON"),
    (["--hyperparameters", "[1, 2]"], "--hyperparameters must be a JSON object."),
    (["--hyperparameters", '{"warmup_ratio": 0.1}'], "hyperparameters.warmup_ratio: is not a tunable"),
    (["--max-length", "4"], "hyperparameters.max_length: must be at least 16."),
    (["--learning-rate", "nan"], "hyperparameters.learning_rate: must be a finite number."),
    (["--eval-fraction", "1.5"], "eval_fraction must be at least 0 and below 1. (eval_fraction)"),
    # Before: accepted, and PostgreSQL refused the run's 32-bit column with a DataError traceback.
    (["--seed", "99999999999"], "seed must be a whole number from 0 to 2147483647. (seed)"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 2147483647. (seed)"),
    (["--base-model", "/nonexistent/model"], "/nonexistent/model is neither an embedded model"),
    (["--kind", "rlhf"], "none is deployed. (kind)"),
    (["--kind", "dpo", "--max-length", "9000"], "hyperparameters.max_length: is larger than the 8192 positions"),
])
def test_train_refuses_wrong_input_in_one_line_and_starts_no_run(project, arguments, expected):
    labeled_pairs(project, count=4)
    if "--project" not in arguments:
        arguments = ["--project", project.slug, *arguments]
    message = one_line_error(lambda: call_command("train", *arguments, "--wait"))
    assert expected in message, message
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_train_refuses_a_project_without_decided_pairs(project):
    message = one_line_error(lambda: call_command("train", "--project", project.slug, "--wait"))
    assert "has no decided pairs to train on" in message and message.endswith("(project)")
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_train_wait_cancelled_from_elsewhere_prints_its_json_line_and_fails(project, tmp_path, settings, capsys,
                                                                           monkeypatch):
    """A foreground run cancelled from the API or the dashboard made no model: `train --wait && deploy ...` must
    not go on as if it had."""
    from rewards.training import reward
    from rewards.training.common import TrainingCancelled

    settings.PREFLAB = {**settings.PREFLAB, "ARTIFACTS_DIR": tmp_path / "artifacts"}
    labeled_pairs(project, count=4)

    def cancelled_while_training(**kwargs):
        services.training_run_cancel(run=TrainingRun.objects.get())
        raise TrainingCancelled("training stopped on a cancel request")

    monkeypatch.setattr(reward, "train_reward_model", cancelled_while_training)
    message = one_line_error(lambda: call_command("train", "--project", project.slug, "--wait"))
    run = TrainingRun.objects.get()
    assert message == f"training run {run.pk} was cancelled; no model was registered."
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["run"] == run.pk and result["status"] == "cancelled" == run.status
    assert result["artifact"] is None and result["produced"] is None


# --- evaluate_reward_model ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "file", "extra", "expected"), [
    ("good", "missing", [], "missing.jsonl does not exist."),
    ("good", "folder", [], "is not a file."),
    ("good", "invalid", [], "No usable pairs in"),
    ("good", "binary", [], "No usable pairs in"),
    ("good", "good", ["--format", "csv"], "argument --format: invalid choice: 'csv'"),
    ("good", "good", ["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    ("good", "good", ["--limit", "0"], "--limit must be at least 1."),
    # Before: a RuntimeError (an unknown device) or AssertionError (no CUDA) traceback from torch.
    ("good", "good", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ("missing", "good", [], "No folder at"),
    ("no_config", "good", [], "is not a reward model folder (no config.json)."),
    ("bad_config", "good", [], "has no readable model config (config.json)"),
    ("causal_lm", "good", [], "is a LlamaForCausalLM, not a sequence-classification model."),
    # Before: a SafetensorError traceback when the weights were loaded.
    ("corrupt", "good", [], "model.safetensors is not a safetensors file."),
])
def test_evaluate_refuses_wrong_input_in_one_line(models, files, model, file, extra, expected):
    arguments = [str(models[model]), str(files[file]), *(extra if "--format" in extra else ["--format", "trl",
                                                                                            *extra])]
    message = one_line_error(lambda: call_command("evaluate_reward_model", *arguments))
    assert expected in message, message


@pytest.mark.django_db
def test_evaluate_refuses_a_gpu_this_machine_does_not_have(models, files):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    message = one_line_error(lambda: call_command("evaluate_reward_model", str(models["good"]), str(files["good"]),
                                                  "--format", "trl", "--device", "cuda"))
    assert message == "--device cuda: this machine has no CUDA GPU; use cpu."


@pytest.mark.django_db
def test_evaluate_refuses_a_version_id_that_does_not_exist_or_whose_weights_are_broken(project, models, files):
    good = str(files["good"])
    message = one_line_error(lambda: call_command("evaluate_reward_model", "4242", good, "--format", "trl"))
    assert message == "No reward model with id 4242."
    message = one_line_error(lambda: call_command("evaluate_reward_model", "9" * 30, good, "--format", "trl"))
    assert message == f"No reward model with id {'9' * 30}."
    # A version registered before its weights were damaged: loading it is the first to find out.
    model = services.reward_model_register(project=project, path=models["good"])
    RewardModel.objects.filter(pk=model.pk).update(artifact_path=str(models["corrupt"]))
    message = one_line_error(lambda: call_command("evaluate_reward_model", str(model.pk), good, "--format", "trl"))
    assert message.startswith(f"The reward model in {models['corrupt']} could not be loaded: "), message


# --- register_reward_model ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "expected"), [
    ("missing", "No folder at"),
    ("no_config", "is not a model folder: it has no config.json."),
    # Before: a TypeError traceback from inside transformers.
    ("bad_config", "has no readable model config (config.json)"),
    ("causal_lm", "is a LlamaForCausalLM, not a sequence-classification model."),
    # Before: registered, and every scoring request with the version failed.
    ("corrupt", "has weights that cannot be read: model.safetensors is not a safetensors file."),
])
def test_register_refuses_a_folder_that_is_not_a_reward_model_and_registers_nothing(project, models, model,
                                                                                     expected):
    message = one_line_error(lambda: call_command("register_reward_model", str(models[model]), "--project",
                                                  project.slug, "--deploy"))
    assert expected in message, message
    assert not RewardModel.objects.exists()


@pytest.mark.django_db
def test_register_refuses_an_unknown_project(models):
    message = one_line_error(lambda: call_command("register_reward_model", str(models["good"]), "--project", "nope"))
    assert message == "No project with slug 'nope'."
    assert not RewardModel.objects.exists()


def test_a_shard_index_naming_a_missing_shard_is_not_a_model(models, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for path in models["good"].iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (folder / "model-00001-of-00002.safetensors").write_bytes((models["good"] / "model.safetensors").read_bytes())
    with pytest.raises(DomainError) as caught:
        services.reward_model_folder_check(path=folder)
    assert caught.value.code == "unreadable_weights"
    assert "shard model-00002-of-00002.safetensors of model.safetensors.index.json is missing" in caught.value.message


# --- as real processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory, files):
    """Runs `manage.py` as a process on a SQLite database of its own (migrated, with a project `cli` of four
    labeled pairs), whatever database the tests use."""
    var = tmp_path_factory.mktemp("cli-var")
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(PREFLAB_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="config.settings.local", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")

    def start(*arguments: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "manage.py", *arguments], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def run(*arguments: str) -> subprocess.CompletedProcess:
        process = start(*arguments)
        out, err = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    for arguments in (("migrate", "-v", "0"),
                      ("import_preferences", str(files["good"]), "--project", "cli", "--format", "trl", "--create",
                       "--no-progress")):
        done = run(*arguments)
        assert done.returncode == 0, done.stderr

    def rows(table: str) -> int:
        with sqlite3.connect(var / "preflab.sqlite3") as database:
            return database.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    run.start = start
    run.rows = rows
    return run


def test_wrong_input_on_the_command_line_exits_non_zero_with_one_line_and_no_traceback(cli, models, files):
    cases = [
        (("train", "--project", "nope"), 1, "CommandError: No project with slug 'nope'."),
        (("train", "--project", "cli", "--seed", "99999999999", "--wait"), 1,
         "CommandError: seed must be a whole number from 0 to 2147483647. (seed)"),
        (("train", "--project", "cli", "--epochs", "abc"), 2,
         "manage.py train: error: argument --epochs: invalid float value: 'abc'"),
        (("evaluate_reward_model", str(models["good"]), str(files["good"]), "--format", "trl", "--device", "gpu0"),
         1, "CommandError: --device 'gpu0' is not a device; use cpu or cuda (cuda:N for one GPU of several)."),
        (("evaluate_reward_model", "4242", str(files["good"]), "--format", "trl"), 1,
         "CommandError: No reward model with id 4242."),
        (("evaluate_reward_model", str(models["good"]), str(files["invalid"]), "--format", "hh"), 1,
         f"CommandError: No usable pairs in {files['invalid']} (3 bad lines)."),
        (("register_reward_model", str(models["corrupt"]), "--project", "cli"), 1,
         f"CommandError: '{models['corrupt']}' has weights that cannot be read: model.safetensors is not a "
         "safetensors file."),
    ]
    # At once: each process spends most of its time importing.
    processes = [(cli.start(*arguments), status, last) for arguments, status, last in cases]
    for process, status, last in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == status, (process.args, err)
        assert "Traceback" not in err and out == "", (process.args, err)
        assert err.strip().splitlines()[-1] == last, (process.args, err)
    assert cli.rows("rewards_trainingrun") == 0 and cli.rows("rewards_rewardmodel") == 0


def test_train_wait_prints_one_json_line_on_stdout_and_the_progress_bar_on_stderr(cli, models):
    done = cli("train", "--project", "cli", "--base-model", str(models["good"]), "--max-steps", "2",
               "--batch-size", "2", "--max-length", "64", "--eval-fraction", "0.25", "--hyperparameters",
               '{"logging_steps": 1}', "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[-1])
    assert result["status"] == "succeeded" and result["error"] is None
    assert Path(result["artifact"]).is_dir() and result["produced"]["type"] == "reward_model"
    assert {"eval_accuracy", "eval_pairs", "train_loss"} <= set(result["eval_metrics"])
    assert result["eval_metrics"]["eval_pairs"] == 1
    # The bar and the trainer's own log lines are on stderr only.
    assert "training: 100%" in done.stderr and "'loss'" in done.stderr
    assert "training:" not in done.stdout and "Traceback" not in done.stderr
    assert cli.rows("rewards_rewardmodel") == 1

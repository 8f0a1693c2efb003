"""GPU check: a reward, a DPO and an RLHF run through the service on a CUDA machine, each on the real embedded model.

Imports the HH sample of the tests into a scratch SQLite project, then trains in turn, through the same services a
Celery worker calls (training_run_start, training_run_execute):

- `reward` on MiniLM, one epoch over the sample, then deploys it;
- `dpo` on SmolLM2, a few steps, its win rate judged by that reward model;
- `rlhf` on SmolLM2, a few steps, against that reward model.

For each it prints the status, the device and precision its trainer ran on (read by a trainer callback), the
GPU memory it took and its main held-out figure, and exits non-zero when a run did not succeed or did not train on
CUDA. Nothing in the code changes between CPU and GPU: this script is the proof that the same runs use the GPU.
`--cpu` runs the same on the CPU (expecting the device `cpu`), to check the script on a machine without a GPU.

    .venv/bin/python bench/gpu_check.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "tests" / "fixtures" / "hh-sample.jsonl"
RUNS = (
    ("reward", {"num_train_epochs": 1, "max_length": 256, "logging_steps": 2}, "eval_accuracy"),
    ("dpo", {"max_steps": 4, "max_length": 256, "logging_steps": 1, "win_rate_prompts": 4, "max_new_tokens": 32},
     "win_rate_vs_base"),
    ("rlhf", {"max_steps": 2, "max_completion_length": 32, "heldout_prompts": 4, "logging_steps": 1},
     "reward_gain"),
)


def _device_seen() -> Any:
    """A trainer callback that notes the device and precision the trainer runs on, as it starts."""
    from transformers import TrainerCallback

    class DeviceSeen(TrainerCallback):
        device: str | None = None
        bf16: bool | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.device, self.bf16 = args.device.type, bool(args.bf16)

    return DeviceSeen()


def main() -> int:
    import torch

    on_cpu = "--cpu" in sys.argv[1:]
    expected = "cpu" if on_cpu else "cuda"
    if not on_cpu and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU machine (--cpu checks the script on the CPU)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="preflab-gpu-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ.setdefault("PREFLAB_VAR_DIR", str(scratch / "var"))
    Path(os.environ["PREFLAB_VAR_DIR"]).mkdir(parents=True, exist_ok=True)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from labeling import imports
    from labeling import services as labeling_services
    from rewards import services
    from rewards.models import RewardModel, TrainingRun

    project = labeling_services.project_create(name="GPU check", slug="gpu-check")
    with SAMPLE.open("rb") as stream:
        report = imports.preferences_import(project=project, stream=stream, format="hh")
    name = "CPU" if on_cpu else torch.cuda.get_device_name(0)
    print(f"{name} | torch {torch.__version__} | {report.pairs_created} HH pairs")
    print(f"{'kind':<7} {'status':<10} {'device':<7} {'bf16':<6} {'seconds':>8} {'GPU MiB':>8}  figure")
    failures = 0
    for kind, hyperparameters, figure in RUNS:
        if not on_cpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        run = services.training_run_start(project=project, kind=kind, hyperparameters=hyperparameters,
                                          eval_fraction=0.25, queue=False)
        seen = _device_seen()
        services.training_run_execute(run_id=run.pk, callbacks=[seen])
        run.refresh_from_db()
        seconds = time.perf_counter() - started
        device, bf16 = seen.device, seen.bf16
        value = (run.eval_metrics or {}).get(figure)
        memory = 0.0 if on_cpu else torch.cuda.max_memory_allocated() / 2**20
        print(f"{kind:<7} {run.status:<10} {device!s:<7} {bf16!s:<6} {seconds:>8.1f} {memory:>8.0f}  "
              f"{figure} {value}")
        if run.status != TrainingRun.Status.SUCCEEDED or device != expected or (memory == 0) != on_cpu:
            failures += 1
            print(f"        {run.error or f'did not train on the {expected} device'}")
        if kind == "reward" and run.status == TrainingRun.Status.SUCCEEDED:
            services.reward_model_deploy(reward_model=RewardModel.objects.get(training_run=run))
    print("GPU check:", "passed" if not failures else f"{failures} of {len(RUNS)} runs failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
